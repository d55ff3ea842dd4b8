// Torch-free definitions shared by the CPU kernels (g++) and the CUDA kernels
// (bare nvcc). Nothing here may include a torch, ATen, c10 or pybind11 header:
// tests/test_cuda_sources.py compiles every csrc/kernels/*.cu with bare nvcc.
#pragma once

#include <math.h>
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
// Saliency s = h * w^2 / 2, evaluated as (h * w) * w * 0.5 in the saliency
// precision S (docs/math.md, "Saliency").
//
// The order is chosen so that finite w and h never give NaN and the rounded
// values keep the order of the exact ones: h * w is finite or +-inf; if it
// is infinite then w != 0, so (h * w) * w is +-inf with the exact value's
// sign, never 0 * inf; if h * w underflows to 0 then |w| < 1 and the exact
// value underflows too. Squaring w first would not do: w = 1e30 in float32
// gives w * w = inf and h = 0 then gives NaN, and w = 1e-30 gives w * w = 0,
// losing every saliency with a large h. Saliencies above half of S's largest
// finite value overflow in (h * w) * w and become +-inf (ties, deleted in
// index order).
//
// The exact order of the multiplications is part of the contract: the
// reference (obd_ext/reference.py) evaluates `(h * w) * w * 0.5` in the same
// precision, so the CPU, CUDA and reference saliencies agree bit for bit and
// selection results can be compared exactly. No additions are involved, so
// FMA contraction cannot change the result.
// ---------------------------------------------------------------------------
template <typename S>
OBD_HOST_DEVICE S saliency_of(S w, S h) {
  return (h * w) * w * S(0.5);
}

// ---------------------------------------------------------------------------
// Group saliency: the sum of the saliencies of one group. Each term is
// (h * w) * w * 0.5 in double whatever the input dtypes (float32, float16 and
// bfloat16 inputs then never overflow: |h w^2| <= (3.4e38)^3 < 1.8e308) and
// the sum is accumulated in double. Only float64 inputs can overflow a term;
// a group whose plain sum is then not finite (+inf and -inf terms give NaN)
// is summed again from exact mantissa/exponent pairs (group_term_split)
// scaled by the group's largest exponent, and the result is
// ldexp(sum, exponent): +-inf when the exact sum overflows, finite when the
// infinities cancelled. Terms more than 2^1074 below the largest are lost,
// far below double's rounding of the sum.
// ---------------------------------------------------------------------------
OBD_HOST_DEVICE double group_term(double w, double h) {
  return (h * w) * w * 0.5;
}

// h w^2 / 2 = m * 2^e with |m| < 1 (m = 0 and e = INT32_MIN for a zero term,
// so that it never sets the group's exponent).
OBD_HOST_DEVICE double group_term_split(double w, double h, int* e) {
  int eh = 0, ew = 0;
  const double mh = ::frexp(h, &eh), mw = ::frexp(w, &ew);
  const double m = (mh * mw) * mw * 0.5;  // |mh|, |mw| in [0.5, 1): no overflow or underflow
  *e = m == 0.0 ? INT32_MIN : eh + 2 * ew;
  return m;
}

// ---------------------------------------------------------------------------
// Order-preserving keys. A float's bit pattern, with the sign bit flipped for
// non-negative numbers and all bits flipped for negative ones, orders as an
// unsigned integer exactly as the floats do (NaN excluded). -0.0 is mapped to
// +0.0 first so that equal saliencies always have equal keys (the reference
// sorts values, and -0.0 == +0.0 there). Finite w and h never give a NaN
// saliency (see saliency_of), but a NaN score passed in score mode is mapped
// to the positive quiet NaN first: its key is then above +inf's on every
// path, as torch.sort orders NaN last in the reference. (x86's 0 * inf is a
// *negative* NaN, which would otherwise sort first.)
// ---------------------------------------------------------------------------
OBD_HOST_DEVICE uint32_t key_of(float s) {
  uint32_t u;
  memcpy(&u, &s, sizeof(u));
  if (u == 0x80000000u) u = 0u;
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) u = 0x7FC00000u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

OBD_HOST_DEVICE uint64_t key_of(double s) {
  uint64_t u;
  memcpy(&u, &s, sizeof(u));
  if (u == 0x8000000000000000ull) u = 0ull;
  if ((u & 0x7FFFFFFFFFFFFFFFull) > 0x7FF0000000000000ull) u = 0x7FF8000000000000ull;
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

// load_float or load_double by the accumulation type of a kernel template.
template <typename S>
__device__ __forceinline__ S load_as(const void* p, Dtype t, int64_t i);
template <>
__device__ __forceinline__ float load_as<float>(const void* p, Dtype t, int64_t i) {
  return load_float(p, t, i);
}
template <>
__device__ __forceinline__ double load_as<double>(const void* p, Dtype t, int64_t i) {
  return load_double(p, t, i);
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
constexpr int kWarp = 32;

// Sum over the 32 lanes of a warp (every lane gets it): the row reductions of
// the kernels that give one warp to each row.
template <typename S>
__device__ __forceinline__ S warp_sum(S v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

inline int grid_for(int64_t work_items, int per_block, int max_blocks = 65535 * 4) {
  int64_t b = (work_items + per_block - 1) / per_block;
  if (b < 1) b = 1;
  if (b > max_blocks) b = max_blocks;
  return static_cast<int>(b);
}

}  // namespace obd
#endif  // __CUDACC__

// ---------------------------------------------------------------------------
// Activation rules of the curvature sweep (OBD eq. 7), shared by the CPU and
// CUDA kernels of obd_ext::activation_hessian:
//   H_a = f'(a)^2 H_x + f''(a) G_x,   G_a = f'(a) G_x.
// `v` is the tensor autograd saved for the activation: its output for tanh,
// sigmoid and relu, its input for the others. p0..p2 are the activation's
// parameters (slope; alpha, scale, input scale; beta, threshold; min, max).
// ---------------------------------------------------------------------------
#include <type_traits>
#if defined(__CUDA_ARCH__)
#define OBD_MATH(f) ::f
#else
#include <cmath>
#define OBD_MATH(f) std::f
#endif

namespace obd {

enum ActKind : int32_t {
  kActTanh = 0,       // v = output
  kActSigmoid = 1,    // v = output
  kActRelu = 2,       // v = output
  kActLeakyRelu = 3,  // p0 = negative slope
  kActElu = 4,        // p0 = alpha, p1 = scale, p2 = input scale
  kActGelu = 5,       // exact (erf)
  kActGeluTanh = 6,   // tanh approximation
  kActSilu = 7,
  kActSoftplus = 8,   // p0 = beta, p1 = threshold
  kActHardtanh = 9,   // p0 = min, p1 = max
  kNumActKinds = 10
};

// The transcendental functions the rules call, as a policy: this one is the
// platform's (CUDA's device functions, libm on the host); the CPU kernel
// passes vectorisable float versions (csrc/cpu/vec_math.h).
struct StdMath {
  template <typename S>
  OBD_HOST_DEVICE static S exp(S x) {
    return OBD_MATH(exp)(x);
  }
  template <typename S>
  OBD_HOST_DEVICE static S erfc(S x) {
    return OBD_MATH(erfc)(x);
  }
  template <typename S>
  OBD_HOST_DEVICE static S tanh(S x) {
    return OBD_MATH(tanh)(x);
  }
};

// f'(v) and f''(v) for activation K, a compile-time constant so that the CPU
// loops vectorise for the arithmetic kinds.
template <int K, typename S, typename M = StdMath>
OBD_HOST_DEVICE void act_derivs_k(S v, S p0, S p1, S p2, S* d1, S* d2) {
  const S one = S(1), zero = S(0);
  if constexpr (K == kActTanh) {
    *d1 = one - v * v;
    *d2 = S(-2) * v * *d1;
  } else if constexpr (K == kActSigmoid) {
    *d1 = v * (one - v);
    *d2 = *d1 * (one - S(2) * v);
  } else if constexpr (K == kActRelu) {
    *d1 = v > zero ? one : zero;
    *d2 = zero;
  } else if constexpr (K == kActLeakyRelu) {
    *d1 = v > zero ? one : p0;
    *d2 = zero;
  } else if constexpr (K == kActElu) {
    const S neg = p1 * p0 * p2 * M::exp(v * p2);
    *d1 = v > zero ? p1 : neg;
    *d2 = v > zero ? zero : neg * p2;
  } else if constexpr (K == kActGelu) {
    const S pdf = M::exp(S(-0.5) * v * v) * S(0.3989422804014327);  // 1/sqrt(2 pi)
    const S cdf = S(0.5) * M::erfc(v * S(-0.7071067811865476));  // Phi(v), its lower tail without cancellation
    *d1 = cdf + v * pdf;
    *d2 = pdf * (S(2) - v * v);
  } else if constexpr (K == kActGeluTanh) {
    const S k = S(0.7978845608028654), c = S(0.044715);  // sqrt(2/pi)
    const S u = k * (v + c * v * v * v);
    const S du = k * (one + S(3) * c * v * v);
    const S ddu = k * S(6) * c * v;
    const S t = M::tanh(u);
    const S sech2 = one - t * t;
    *d1 = S(0.5) * (one + t) + S(0.5) * v * sech2 * du;
    *d2 = sech2 * du + S(0.5) * v * (S(-2) * t * sech2 * du * du + sech2 * ddu);
  } else if constexpr (K == kActSilu) {
    const S s = one / (one + M::exp(-v));
    *d1 = s * (one + v * (one - s));
    *d2 = s * (one - s) * (S(2) + v * (one - S(2) * s));
  } else if constexpr (K == kActSoftplus) {
    const S s = one / (one + M::exp(-p0 * v));
    const bool linear = p0 * v > p1;
    *d1 = linear ? one : s;
    *d2 = linear ? zero : p0 * s * (one - s);
  } else {  // kActHardtanh
    *d1 = (v > p0 && v < p1) ? one : zero;
    *d2 = zero;
  }
}

// Calls f(std::integral_constant<int, K>) for the run-time kind (host code:
// it picks the kernel instantiation).
template <typename F>
inline void with_act_kind(int kind, F&& f) {
  switch (kind) {
    case kActTanh: f(std::integral_constant<int, kActTanh>{}); break;
    case kActSigmoid: f(std::integral_constant<int, kActSigmoid>{}); break;
    case kActRelu: f(std::integral_constant<int, kActRelu>{}); break;
    case kActLeakyRelu: f(std::integral_constant<int, kActLeakyRelu>{}); break;
    case kActElu: f(std::integral_constant<int, kActElu>{}); break;
    case kActGelu: f(std::integral_constant<int, kActGelu>{}); break;
    case kActGeluTanh: f(std::integral_constant<int, kActGeluTanh>{}); break;
    case kActSilu: f(std::integral_constant<int, kActSilu>{}); break;
    case kActSoftplus: f(std::integral_constant<int, kActSoftplus>{}); break;
    default: f(std::integral_constant<int, kActHardtanh>{}); break;
  }
}

// One element of the rule: h_in = d1^2 h + d2 g (lm: without d2 g), g_in = d1 g.
template <int K, typename S, typename M = StdMath>
OBD_HOST_DEVICE void act_rule(S v, S h, S g, bool lm, S p0, S p1, S p2, S* h_in, S* g_in) {
  S d1, d2;
  act_derivs_k<K, S, M>(v, p0, p1, p2, &d1, &d2);
  *h_in = lm ? d1 * d1 * h : d1 * d1 * h + d2 * g;
  *g_in = d1 * g;
}

}  // namespace obd
