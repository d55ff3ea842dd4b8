// Type dispatch for the CPU kernels: weight and curvature may have different
// float dtypes, so kernels are instantiated over the pair.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

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

}  // namespace cpu
}  // namespace obd
