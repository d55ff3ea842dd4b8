// CPU kernel of activation_hessian: the activation rule of the curvature sweep
// in one pass (the math is act_rule in csrc/kernels/common.h, shared with CUDA).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "../checks.h"
#include "dispatch.h"

namespace obd {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> activation_hessian_cpu(const at::Tensor& saved, const at::Tensor& h,
                                                          const c10::optional<at::Tensor>& g, int64_t kind,
                                                          double p0, double p1, double p2, bool lm, bool want_g) {
  check_activation_args(saved, h, g, kind, lm, want_g);
  auto v = saved.contiguous();
  auto hc = h.contiguous();
  const bool has_g = g.has_value() && g->defined();
  auto gc = has_g ? g->contiguous() : at::Tensor();
  auto h_in = at::empty_like(hc);
  auto g_in = want_g ? at::empty_like(hc) : at::empty({0}, hc.options());
  const int64_t n = v.numel();
  dispatch_float(v.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using S = std::conditional_t<std::is_same_v<T, double>, double, float>;
    const T* vp = v.const_data_ptr<T>();
    const T* hp = hc.const_data_ptr<T>();
    const T* gp = has_g ? gc.const_data_ptr<T>() : nullptr;
    T* hop = h_in.mutable_data_ptr<T>();
    T* gop = want_g ? g_in.mutable_data_ptr<T>() : nullptr;
    const S q0 = static_cast<S>(p0), q1 = static_cast<S>(p1), q2 = static_cast<S>(p2);
    const bool use_lm = lm || !has_g;
    // One loop per kind (a compile-time constant), and separate loops for the
    // optional pieces, so that the arithmetic kinds vectorise.
    with_act_kind(static_cast<int>(kind), [&](auto kt) {
      constexpr int K = decltype(kt)::value;
      at::parallel_for(0, n, 1 << 14, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          S hi, gi;
          act_rule<K, S>(static_cast<S>(vp[i]), static_cast<S>(hp[i]), gp ? static_cast<S>(gp[i]) : S(0), use_lm,
                         q0, q1, q2, &hi, &gi);
          hop[i] = static_cast<T>(hi);
          if (gop) gop[i] = static_cast<T>(gi);
        }
      });
    });
  });
  return {h_in, g_in};
}

}  // namespace

TORCH_LIBRARY_IMPL(obd_ext, CPU, m) { m.impl("activation_hessian", &activation_hessian_cpu); }

}  // namespace cpu
}  // namespace obd
