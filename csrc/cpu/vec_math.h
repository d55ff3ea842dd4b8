// Branch-free float exp/erfc/tanh that GCC vectorises, and the switch between
// the baseline and AVX2 copies of the curvature sweep's fused loops (the
// activation, softmax and layer-norm rules, the cross-entropy boundary),
// chosen at run time.
//
// Why: the extension is built for baseline x86-64, and libm's expf/erff are
// scalar calls that stop a loop from vectorising. The GELU rule spent 32 ms
// per call of the benchmark GPT where torch's vectorised gelu_backward spends
// 5.4 ms (bench/RESULTS.md, curvature). These versions are straight-line code
// (range reduction, polynomial, exponent bits; selects instead of branches),
// so the loops that use them vectorise, 4 floats wide for baseline x86-64 and
// 8 wide in the AVX2 copy of each loop.
//
// Accuracy (float, measured against double libm on dense grids): exp within
// 1 ulp, denormal results within one unit of the smallest denormal; erfc
// within 6e-7 absolute (the 1.5e-7 of the formula plus float rounding of its
// terms near 1); tanh within 1.2e-7 absolute.
// Special values follow libm: exp(-inf) = 0, exp(+inf) = inf, NaN in NaN out.
// double keeps libm: float64 is the precision users compare against.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define OBD_HAVE_AVX2_PATH 1
#define OBD_TARGET_AVX2 __attribute__((target("avx2")))
#else
#define OBD_HAVE_AVX2_PATH 0
#define OBD_TARGET_AVX2
#endif

#if defined(__GNUC__) || defined(__clang__)
#define OBD_ALWAYS_INLINE inline __attribute__((always_inline))
#define OBD_INLINE_LAMBDA __attribute__((always_inline))
#else
#define OBD_ALWAYS_INLINE inline
#define OBD_INLINE_LAMBDA
#endif

namespace obd {
namespace cpu {

// Whether this CPU runs the AVX2 copies of the loops (checked once).
// OBD_EXT_DISABLE_AVX2=1 forces the baseline copies: the tests use it to check
// that both give the same bits (the build disables FMA contraction).
inline bool use_avx2() {
#if OBD_HAVE_AVX2_PATH
  static const bool yes = [] {
    const char* off = std::getenv("OBD_EXT_DISABLE_AVX2");
    if (off != nullptr && off[0] == '1') return false;
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return yes;
#else
  return false;
#endif
}

OBD_ALWAYS_INLINE float bits_to_float(int32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}

// e^x: x = n ln2 + r with |r| <= ln2/2, e^r by Cephes' degree-6 polynomial,
// 2^n from exponent bits. n is rounded with the 1.5 * 2^23 trick (SSE2 has no
// vector round instruction; the trick is exact for |x log2 e| < 2^22). n runs
// from -150 (denormal results) to 128 (results near FLT_MAX), beyond the
// exponents of one normal float, so 2^n is applied as two factors 2^(n/2).
OBD_ALWAYS_INLINE float fast_exp(float x) {
  const float hi = 88.72283935546875f;   // log(FLT_MAX): above it e^x overflows to inf
  const float lo = -103.97208404541016f;  // below it e^x rounds to 0
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  xc = x != x ? 0.0f : xc;  // keeps the int conversion below defined for NaN
  const float magic = 12582912.0f;  // 1.5 * 2^23
  const float n = (xc * 1.44269504088896341f + magic) - magic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t n1 = ni >> 1, n2 = ni - n1;  // each in [-75, 64]
  float y = p * bits_to_float((n1 + 127) << 23) * bits_to_float((n2 + 127) << 23);
  y = x < lo ? 0.0f : y;
  y = x > hi ? std::numeric_limits<float>::infinity() : y;
  return x != x ? x : y;
}

// erfc(|x|) by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7):
// t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) e^{-x^2}, t = 1 / (1 + p |x|).
OBD_ALWAYS_INLINE float fast_erfc_abs(float ax) {
  const float t = 1.0f / (1.0f + 0.3275911f * ax);
  float q = 1.061405429f;
  q = q * t - 1.453152027f;
  q = q * t + 1.421413741f;
  q = q * t - 0.284496736f;
  q = q * t + 0.254829592f;
  return q * t * fast_exp(-ax * ax);
}

// erfc(x) = erfc(|x|) for x >= 0, 2 - erfc(|x|) below. The rules use erfc,
// not erf: GELU's normal CDF is erfc(-v / sqrt 2) / 2, whose lower tail is then
// computed directly instead of as the difference of two numbers near 1.
OBD_ALWAYS_INLINE float fast_erfc(float x) {
  const float e = fast_erfc_abs(x < 0.0f ? -x : x);
  const float y = x < 0.0f ? 2.0f - e : e;
  return x != x ? x : y;  // NaN in, NaN out (the formula would give 0 or 2)
}

// tanh(x) = sign(x) (1 - 2 / (e^{2|x|} + 1)); e^{2|x|} = inf gives exactly 1.
OBD_ALWAYS_INLINE float fast_tanh(float x) {
  const float ax = x < 0.0f ? -x : x;
  const float t = 1.0f - 2.0f / (fast_exp(2.0f * ax) + 1.0f);
  const float y = x < 0.0f ? -t : t;
  return x != x ? x : y;
}

// The math policy of the activation rules (obd::act_rule's M): vectorisable
// float functions, libm for double.
struct CpuMath {
  template <typename S>
  static S exp(S x) {
    if constexpr (std::is_same_v<S, float>) return fast_exp(x);
    else return std::exp(x);
  }
  template <typename S>
  static S erfc(S x) {
    if constexpr (std::is_same_v<S, float>) return fast_erfc(x);
    else return std::erfc(x);
  }
  template <typename S>
  static S tanh(S x) {
    if constexpr (std::is_same_v<S, float>) return fast_tanh(x);
    else return std::tanh(x);
  }
};

}  // namespace cpu
}  // namespace obd
