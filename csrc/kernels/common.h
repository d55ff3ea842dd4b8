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

// ---------------------------------------------------------------------------
// Device-side loads and stores of any supported dtype, chosen at run time.
// The dtype is uniform across a tensor, so the switch never diverges within
// a warp; it keeps one kernel instantiation for every mix of dtypes.
// ---------------------------------------------------------------------------
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace obd {

struct Operand {
  const void* data;
  Dtype dtype;
};

__device__ __forceinline__ float load_float(const void* p, Dtype t, int64_t i) {
  switch (t) {
    case Dtype::F32: return static_cast<const float*>(p)[i];
    case Dtype::F64: return static_cast<float>(static_cast<const double*>(p)[i]);
    case Dtype::F16: return __half2float(static_cast<const __half*>(p)[i]);
    default: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
}

__device__ __forceinline__ double load_double(const void* p, Dtype t, int64_t i) {
  if (t == Dtype::F64) return static_cast<const double*>(p)[i];
  return static_cast<double>(load_float(p, t, i));
}

// Rounds like the CPU kernels: double -> float -> (half | bfloat16).
__device__ __forceinline__ void store_double(void* p, Dtype t, int64_t i, double v) {
  switch (t) {
    case Dtype::F32: static_cast<float*>(p)[i] = static_cast<float>(v); break;
    case Dtype::F64: static_cast<double*>(p)[i] = v; break;
    case Dtype::F16: static_cast<__half*>(p)[i] = __float2half_rn(static_cast<float>(v)); break;
    default: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(static_cast<float>(v)); break;
  }
}

__device__ __forceinline__ bool finite_at(const void* p, Dtype t, int64_t i) {
  return t == Dtype::F64 ? isfinite(static_cast<const double*>(p)[i]) : isfinite(load_float(p, t, i));
}

// Saliency of entry i in the precision of the pair (double if either is F64),
// or the score itself when there is no weight (w.data == nullptr).
__device__ __forceinline__ double saliency_at_double(Operand w, Operand h, int64_t i) {
  if (w.data == nullptr) return load_double(h.data, h.dtype, i);
  return saliency_of<double>(load_double(w.data, w.dtype, i), load_double(h.data, h.dtype, i));
}
__device__ __forceinline__ float saliency_at_float(Operand w, Operand h, int64_t i) {
  if (w.data == nullptr) return load_float(h.data, h.dtype, i);
  return saliency_of<float>(load_float(w.data, w.dtype, i), load_float(h.data, h.dtype, i));
}
__device__ __forceinline__ bool wide(Operand w, Operand h) {
  return h.dtype == Dtype::F64 || (w.data != nullptr && w.dtype == Dtype::F64);
}

// State of one pool entry for the selection kernels.
enum : int { kAlive = 0, kMasked = 1, kNonfinite = 2 };

// Order-preserving key of entry i's saliency (see key_of), and its state:
// masked (already deleted), non-finite (w or h is NaN/Inf) or alive.
template <typename Key>
__device__ __forceinline__ Key element_key(Operand w, Operand h, const uint8_t* mask, int64_t i, int* state) {
  if (!mask[i]) {
    *state = kMasked;
    return Key(0);
  }
  const bool ok = finite_at(h.data, h.dtype, i) && (w.data == nullptr || finite_at(w.data, w.dtype, i));
  if (!ok) {
    *state = kNonfinite;
    return Key(0);
  }
  *state = kAlive;
  if constexpr (sizeof(Key) == 8) {
    if (wide(w, h)) return key_of(saliency_at_double(w, h, i));
    return KeyOf<uint64_t>::get(saliency_at_float(w, h, i));
  } else {
    return key_of(saliency_at_float(w, h, i));
  }
}

// Deletes entry i: mask false and, if asked, the weight multiplied by factor
// (an exact zero for factor 0).
__device__ __forceinline__ void delete_entry(void* w, Dtype wd, uint8_t* mask, int64_t i, bool write_weights,
                                             double factor) {
  mask[i] = 0;
  if (write_weights && w != nullptr) store_double(w, wd, i, factor == 0.0 ? 0.0 : load_double(w, wd, i) * factor);
}

// Launch geometry shared by the kernels.
constexpr int kThreads = 256;

inline int grid_for(int64_t work_items, int per_block, int max_blocks = 65535 * 4) {
  int64_t b = (work_items + per_block - 1) / per_block;
  if (b < 1) b = 1;
  if (b > max_blocks) b = max_blocks;
  return static_cast<int>(b);
}

}  // namespace obd
#endif  // __CUDACC__
