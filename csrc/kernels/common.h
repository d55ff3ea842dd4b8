// Torch-free definitions shared by the CPU kernels (g++) and the CUDA kernels
// (bare nvcc). Nothing here may include a torch, ATen, c10 or pybind11 header:
// tests/test_nvcc_compile.py compiles every csrc/kernels/*.cu with bare nvcc.
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define OBD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define OBD_HOST_DEVICE inline
#endif

namespace obd {

// Element types the kernels accept, numbered independently of torch so that
// the CUDA kernels need no torch header. The bindings translate ScalarType.
enum class Dtype : int32_t { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

// ---------------------------------------------------------------------------
// Saliency s = h * w^2 / 2.
//
// The exact order of the multiplications is part of the contract: the
// reference (obd_ext/reference.py) evaluates `h * (w * w) * 0.5` in the same
// precision, so the CPU, CUDA and reference saliencies agree bit for bit and
// selection results can be compared exactly. No additions are involved, so
// FMA contraction cannot change the result.
// ---------------------------------------------------------------------------
template <typename S>
OBD_HOST_DEVICE S saliency_of(S w, S h) {
  return h * (w * w) * S(0.5);
}

// ---------------------------------------------------------------------------
// Order-preserving keys. A float's bit pattern, with the sign bit flipped for
// non-negative numbers and all bits flipped for negative ones, orders as an
// unsigned integer exactly as the floats do (NaN excluded). -0.0 is mapped to
// +0.0 first so that equal saliencies always have equal keys (the reference
// sorts values, and -0.0 == +0.0 there).
// ---------------------------------------------------------------------------
OBD_HOST_DEVICE uint32_t key_of(float s) {
  uint32_t u;
  memcpy(&u, &s, sizeof(u));
  if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

OBD_HOST_DEVICE uint64_t key_of(double s) {
  uint64_t u;
  memcpy(&u, &s, sizeof(u));
  if (u == 0x8000000000000000ull) u = 0ull;
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

OBD_HOST_DEVICE float value_of_key(uint32_t k) {
  uint32_t u = (k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k;
  float s;
  memcpy(&s, &u, sizeof(s));
  return s;
}

OBD_HOST_DEVICE double value_of_key(uint64_t k) {
  uint64_t u = (k & 0x8000000000000000ull) ? (k & 0x7FFFFFFFFFFFFFFFull) : ~k;
  double s;
  memcpy(&s, &u, sizeof(s));
  return s;
}

// A key in a pool of `Key` width: float saliencies are widened exactly to
// double when the pool holds any float64 tensor.
template <typename Key>
struct KeyOf;
template <>
struct KeyOf<uint32_t> {
  OBD_HOST_DEVICE static uint32_t get(float s) { return key_of(s); }
};
template <>
struct KeyOf<uint64_t> {
  OBD_HOST_DEVICE static uint64_t get(float s) { return key_of(static_cast<double>(s)); }
  OBD_HOST_DEVICE static uint64_t get(double s) { return key_of(s); }
};

// ---------------------------------------------------------------------------
// Statistics every selection op returns (one float64 tensor of this layout).
// float64 holds counts exactly up to 2^53.
// ---------------------------------------------------------------------------
enum StatIndex : int {
  kStatDeletedNow = 0,       // entries this call deleted
  kStatDeletedBefore = 1,    // entries already deleted (mask false) on entry
  kStatSkippedNonfinite = 2, // non-finite entries left alone (skip_nonfinite)
  kStatMaxDeleted = 3,       // largest saliency deleted by this call (NaN if none)
  kStatSaliencySum = 4,      // sum of the saliencies deleted by this call
  kNumStats = 5
};

// Radix select works on 16-bit digits on the CPU (histograms fit in L2) and on
// 8-bit digits per row on the GPU; see the kernels.
constexpr int kCpuDigitBits = 16;

}  // namespace obd
