// CPU kernel of softmax_hessian: the softmax rule of the curvature sweep,
// two passes over each row (its sums, then the outputs) while the row is in
// cache. The plain-tensor form took 12 passes over the attention scores and
// six score-sized temporaries per call (bench/RESULTS.md, curvature).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "../checks.h"
#include "../rule_common.h"
#include "dispatch.h"
#include "vec_math.h"

namespace obd {
namespace cpu {
namespace {

template <typename T>
struct SoftmaxArgs {
  const T* y;  // rows x n
  const T* h;
  const T* g;  // null unless ReadG
  T* h_in;
  T* g_in;  // null unless WantG
  int64_t n;
};

// Row sums in kLanes fixed partial sums: they vectorise without reassociation
// flags and give the same result on every machine and thread count.
constexpr int64_t kLanes = 16;

// UseG: add the f'' term y (2y - 1)(t - g); WantG: write g_in = y (g - t).
template <typename T, typename S, bool UseG, bool WantG>
OBD_ALWAYS_INLINE void softmax_rows(const SoftmaxArgs<T>& a, int64_t rb, int64_t re) {
  constexpr bool kReadG = UseG || WantG;
  const int64_t n = a.n;
  const int64_t body = n - n % kLanes;
  for (int64_t r = rb; r < re; ++r) {
    const T* __restrict y = a.y + r * n;
    const T* __restrict h = a.h + r * n;
    const T* __restrict g = kReadG ? a.g + r * n : nullptr;
    S ls[kLanes], lt[kLanes];
    for (int64_t l = 0; l < kLanes; ++l) ls[l] = lt[l] = S(0);
    for (int64_t j = 0; j < body; j += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) {
        const S yv = static_cast<S>(y[j + l]);
        ls[l] += yv * yv * static_cast<S>(h[j + l]);
        if constexpr (kReadG) lt[l] += static_cast<S>(g[j + l]) * yv;
      }
    S s = 0, t = 0;
    for (int64_t l = 0; l < kLanes; ++l) {
      s += ls[l];
      t += lt[l];
    }
    for (int64_t j = body; j < n; ++j) {
      const S yv = static_cast<S>(y[j]);
      s += yv * yv * static_cast<S>(h[j]);
      if constexpr (kReadG) t += static_cast<S>(g[j]) * yv;
    }
    T* __restrict ho = a.h_in + r * n;
    T* __restrict go = WantG ? a.g_in + r * n : nullptr;
    for (int64_t j = 0; j < n; ++j) {
      const S yv = static_cast<S>(y[j]);
      const S y2 = yv * yv;
      S hv = y2 * ((S(1) - S(2) * yv) * static_cast<S>(h[j]) + s);
      if constexpr (kReadG) {
        const S d = t - static_cast<S>(g[j]);
        if constexpr (UseG) hv += yv * (S(2) * yv - S(1)) * d;
        if constexpr (WantG) go[j] = static_cast<T>(-yv * d);
      }
      ho[j] = static_cast<T>(hv);
    }
  }
}

template <typename T, typename S, bool UseG, bool WantG>
void softmax_run(const SoftmaxArgs<T>& a, int64_t rows) {
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(a.n, 1));
  parallel_for_simd<T>(rows, grain,
                       [&](int64_t rb, int64_t re) OBD_INLINE_LAMBDA { softmax_rows<T, S, UseG, WantG>(a, rb, re); });
}

std::tuple<at::Tensor, at::Tensor> softmax_hessian_cpu(const at::Tensor& y, const at::Tensor& h,
                                                       const c10::optional<at::Tensor>& g, bool lm, bool want_g) {
  check_softmax_args(y, h, g, lm, want_g);
  const RuleTensors t = prepare_rule(y, h, g, want_g);
  const int64_t n = t.ref.size(-1);
  const int64_t rows = n == 0 ? 0 : t.ref.numel() / n;
  const bool use_g = !lm;
  dispatch_float(t.ref.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using S = std::conditional_t<std::is_same_v<T, double>, double, float>;
    const SoftmaxArgs<T> a{t.ref.const_data_ptr<T>(), t.h.const_data_ptr<T>(), t.g_data<T>(),
                           t.h_out.mutable_data_ptr<T>(), t.g_out_data<T>(), n};
    with_rule_flags(use_g, want_g, [&](auto ug, auto wg) { softmax_run<T, S, ug.value, wg.value>(a, rows); });
  });
  return {t.h_out, t.g_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(obd_ext, CPU, m) { m.impl("softmax_hessian", &softmax_hessian_cpu); }

}  // namespace cpu
}  // namespace obd
