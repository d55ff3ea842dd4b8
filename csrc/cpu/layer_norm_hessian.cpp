// CPU kernel of layer_norm_hessian: the layer-norm rule of the curvature
// sweep for the input, two passes over each row (five row sums, then the
// outputs) while the row is in cache. As tensor ops the rule made about 25
// passes and a dozen activation-sized temporaries per call.
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

template <typename T, typename S>
struct LayerNormArgs {
  const T* x;      // rows x n
  const S* mean;   // rows
  const S* rstd;   // rows
  const S* gamma;  // n, or null (gamma = 1)
  const T* h;
  const T* g;  // null unless UseG or WantG
  T* h_x;
  T* g_x;  // null unless WantG
  int64_t n;
};

constexpr int64_t kLanes = 8;  // fixed partial sums: vectorised, same result on any machine

// UseG: add the f'' term; WantG: write g_x. The closed forms are those of
// reference.layer_norm_hessian.
template <typename T, typename S, bool UseG, bool WantG>
OBD_ALWAYS_INLINE void layer_norm_rows(const LayerNormArgs<T, S>& a, int64_t rb, int64_t re) {
  constexpr bool kReadG = UseG || WantG;
  const int64_t n = a.n;
  const int64_t body = n - n % kLanes;
  const S inv_n = S(1) / static_cast<S>(n), inv_n2 = inv_n * inv_n;
  const S* __restrict gam = a.gamma;
  for (int64_t r = rb; r < re; ++r) {
    const T* __restrict x = a.x + r * n;
    const T* __restrict h = a.h + r * n;
    const T* __restrict g = kReadG ? a.g + r * n : nullptr;
    const S mu = a.mean[r], rs = a.rstd[r];
    S l0[kLanes], l1[kLanes], l2[kLanes], la[kLanes], lb[kLanes];
    for (int64_t l = 0; l < kLanes; ++l) l0[l] = l1[l] = l2[l] = la[l] = lb[l] = S(0);
    auto accumulate = [&](int64_t j, int64_t l) {
      const S xh = (static_cast<S>(x[j]) - mu) * rs;
      const S gm = gam ? gam[j] : S(1);
      const S A = gm * gm * static_cast<S>(h[j]);
      l0[l] += A;
      l1[l] += A * xh;
      l2[l] += A * xh * xh;
      if constexpr (kReadG) {
        const S av = gm * static_cast<S>(g[j]);
        la[l] += av;
        lb[l] += av * xh;
      }
    };
    for (int64_t j = 0; j < body; j += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) accumulate(j + l, l);
    for (int64_t j = body; j < n; ++j) accumulate(j, 0);
    S s0 = 0, s1 = 0, s2 = 0, sa = 0, sb = 0;
    for (int64_t l = 0; l < kLanes; ++l) {
      s0 += l0[l];
      s1 += l1[l];
      s2 += l2[l];
      sa += la[l];
      sb += lb[l];
    }
    const S r2 = rs * rs;
    // h_x = r2 (c0 + A (1 - 2/n) + c1 xh + xh^2 (c2 - 2 A / n)) [+ r2 (-2 a xh / n + d1 xh + d0 + d2 xh^2)]
    S c0 = s0 * inv_n2, c1 = S(2) * s1 * inv_n2, c2 = s2 * inv_n2;
    if constexpr (UseG) {
      c0 -= sb * (S(1) - inv_n) * inv_n;
      c1 += S(2) * sa * inv_n2;
      c2 += S(3) * sb * inv_n2;
    }
    T* __restrict hx = a.h_x + r * n;
    T* __restrict gx = WantG ? a.g_x + r * n : nullptr;
    for (int64_t j = 0; j < n; ++j) {
      const S xh = (static_cast<S>(x[j]) - mu) * rs;
      const S gm = gam ? gam[j] : S(1);
      const S A = gm * gm * static_cast<S>(h[j]);
      S v = c0 + A * (S(1) - S(2) * inv_n) + c1 * xh + xh * xh * (c2 - S(2) * A * inv_n);
      if constexpr (kReadG) {
        const S av = gm * static_cast<S>(g[j]);
        if constexpr (UseG) v -= S(2) * av * xh * inv_n;
        if constexpr (WantG) gx[j] = static_cast<T>(rs * (av - sa * inv_n - xh * sb * inv_n));
      }
      hx[j] = static_cast<T>(r2 * v);
    }
  }
}

template <typename T, typename S, bool UseG, bool WantG>
void layer_norm_run(const LayerNormArgs<T, S>& a, int64_t rows) {
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(a.n, 1));
  parallel_for_simd<T>(rows, grain, [&](int64_t rb, int64_t re) OBD_INLINE_LAMBDA {
    layer_norm_rows<T, S, UseG, WantG>(a, rb, re);
  });
}

std::tuple<at::Tensor, at::Tensor> layer_norm_hessian_cpu(const at::Tensor& x, const at::Tensor& mean,
                                                          const at::Tensor& rstd,
                                                          const c10::optional<at::Tensor>& weight,
                                                          const at::Tensor& h, const c10::optional<at::Tensor>& g,
                                                          bool lm, bool want_g) {
  check_layer_norm_args(x, mean, rstd, weight, h, g, lm, want_g);
  const RuleTensors t = prepare_rule(x, h, g, want_g);
  const bool has_w = weight.has_value() && weight->defined();
  const int64_t n = t.ref.size(-1);
  const int64_t rows = n == 0 ? 0 : t.ref.numel() / n;
  const bool use_g = !lm;
  dispatch_float(t.ref.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using S = std::conditional_t<std::is_same_v<T, double>, double, float>;
    // Statistics and gamma in the accumulation precision (native_layer_norm
    // returns float32 statistics for half inputs; gamma may be any float).
    const auto st = std::is_same_v<S, double> ? at::kDouble : at::kFloat;
    auto mu = mean.to(st).contiguous(), rs = rstd.to(st).contiguous();
    auto gm = has_w ? weight->to(st).contiguous() : at::Tensor();
    const LayerNormArgs<T, S> a{t.ref.const_data_ptr<T>(),
                                mu.template const_data_ptr<S>(),
                                rs.template const_data_ptr<S>(),
                                has_w ? gm.template const_data_ptr<S>() : nullptr,
                                t.h.const_data_ptr<T>(),
                                t.g_data<T>(),
                                t.h_out.mutable_data_ptr<T>(),
                                t.g_out_data<T>(),
                                n};
    with_rule_flags(use_g, want_g, [&](auto ug, auto wg) { layer_norm_run<T, S, ug.value, wg.value>(a, rows); });
  });
  return {t.h_out, t.g_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(obd_ext, CPU, m) { m.impl("layer_norm_hessian", &layer_norm_hessian_cpu); }

}  // namespace cpu
}  // namespace obd
