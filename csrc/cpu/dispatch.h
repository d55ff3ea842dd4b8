// Type dispatch for the CPU kernels: weight and curvature may have different
// float dtypes, so kernels are instantiated over the pair.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "vec_math.h"

namespace obd {
namespace cpu {

template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
decltype(auto) dispatch_float(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(Tag<float>{});
    case at::kDouble: return f(Tag<double>{});
    case at::kHalf: return f(Tag<c10::Half>{});
    case at::kBFloat16: return f(Tag<c10::BFloat16>{});
    default: TORCH_CHECK(false, "obd_ext: unsupported dtype ", t);
  }
}

// f(Tag<W>, Tag<H>)
template <typename F>
decltype(auto) dispatch_pair(at::ScalarType w, at::ScalarType h, F&& f) {
  return dispatch_float(w, [&](auto wt) {
    return dispatch_float(h, [&](auto ht) { return f(wt, ht); });
  });
}

// The precision a saliency is computed and returned in: float64 if either
// operand is float64, float32 otherwise (float16/bfloat16 accumulate in fp32).
template <typename W, typename H>
using acc_t = std::conditional_t<std::is_same_v<W, double> || std::is_same_v<H, double>, double, float>;

// Finiteness from the bit pattern: plain integer ops, so the loops vectorise.
inline bool finite_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return (u & 0x7F800000u) != 0x7F800000u;
}
inline bool finite_bits(double v) {
  uint64_t u;
  std::memcpy(&u, &v, sizeof(u));
  return (u & 0x7FF0000000000000ull) != 0x7FF0000000000000ull;
}
// Any supported element (float16/bfloat16 widen exactly to float).
template <typename T>
inline bool finite_value(T v) {
  if constexpr (std::is_same_v<T, double>) return finite_bits(v);
  else return finite_bits(static_cast<float>(v));
}

// f(use_g, want_g) with both as compile-time constants
// (std::integral_constant<bool, ...>): the sweep kernels' loops are
// instantiated per combination, so the optional f'' term and gradient output
// cost no branch inside them.
template <typename F>
void with_rule_flags(bool use_g, bool want_g, F&& f) {
  using Yes = std::true_type;
  using No = std::false_type;
  if (use_g && want_g) f(Yes{}, Yes{});
  else if (use_g) f(Yes{}, No{});
  else if (want_g) f(No{}, Yes{});
  else f(No{}, No{});
}

// The baseline and the AVX2 copy of one chunk of a fused loop: `body` is
// inlined into each (it must be an OBD_INLINE_LAMBDA calling always-inline
// code), so its loops are compiled once per instruction set.
template <typename Body>
void run_chunk_baseline(const Body& body, int64_t begin, int64_t end) {
  body(begin, end);
}
template <typename Body>
OBD_TARGET_AVX2 void run_chunk_avx2(const Body& body, int64_t begin, int64_t end) {
  body(begin, end);
}

// at::parallel_for over [0, n) whose chunks run from the AVX2 copy where the
// CPU has it (use_avx2()). Only float and double element types T take it:
// half types convert element by element either way.
template <typename T, typename Body>
void parallel_for_simd(int64_t n, int64_t grain, const Body& body) {
  constexpr bool kWide = std::is_same_v<T, float> || std::is_same_v<T, double>;
  const bool avx2 = kWide && use_avx2();
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    if (avx2) run_chunk_avx2(body, begin, end);
    else run_chunk_baseline(body, begin, end);
  });
}

}  // namespace cpu
}  // namespace obd
