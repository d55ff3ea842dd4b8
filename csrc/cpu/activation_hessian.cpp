// CPU kernel of activation_hessian: the activation rule of the curvature sweep
// in one pass (the math is act_rule in csrc/kernels/common.h, shared with CUDA).
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
struct ActArgs {
  const T* v;
  const T* h;
  const T* g;  // null unless UseG or WantG
  T* h_in;
  T* g_in;  // null unless WantG
  S p0, p1, p2;
};

// One range of elements. The kind and the optional pieces are compile-time
// constants, so every loop is straight-line code that vectorises (with the
// float math of vec_math.h for exp/erf/tanh). UseG: add the f'' term f'' g;
// WantG: write g_in = f' g.
template <int K, typename T, typename S, bool UseG, bool WantG>
OBD_ALWAYS_INLINE void act_range(const ActArgs<T, S>& a, int64_t b, int64_t e) {
  const T* __restrict vp = a.v;
  const T* __restrict hp = a.h;
  const T* __restrict gp = a.g;
  T* __restrict hop = a.h_in;
  T* __restrict gop = a.g_in;
  const S p0 = a.p0, p1 = a.p1, p2 = a.p2;
  for (int64_t i = b; i < e; ++i) {
    S hi, gi;
    const S gv = (UseG || WantG) ? static_cast<S>(gp[i]) : S(0);
    act_rule<K, S, CpuMath>(static_cast<S>(vp[i]), static_cast<S>(hp[i]), gv, !UseG, p0, p1, p2, &hi, &gi);
    hop[i] = static_cast<T>(hi);
    if constexpr (WantG) gop[i] = static_cast<T>(gi);
  }
}

template <int K, typename T, typename S, bool UseG, bool WantG>
void act_run(const ActArgs<T, S>& a, int64_t n) {
  parallel_for_simd<T>(n, 1 << 14,
                       [&](int64_t b, int64_t e) OBD_INLINE_LAMBDA { act_range<K, T, S, UseG, WantG>(a, b, e); });
}

std::tuple<at::Tensor, at::Tensor> activation_hessian_cpu(const at::Tensor& saved, const at::Tensor& h,
                                                          const c10::optional<at::Tensor>& g, int64_t kind,
                                                          double p0, double p1, double p2, bool lm, bool want_g) {
  check_activation_args(saved, h, g, kind, lm, want_g);
  const RuleTensors t = prepare_rule(saved, h, g, want_g);
  const int64_t n = t.ref.numel();
  const bool use_g = !lm && t.has_g;
  dispatch_float(t.ref.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using S = std::conditional_t<std::is_same_v<T, double>, double, float>;
    const ActArgs<T, S> a{t.ref.const_data_ptr<T>(),
                          t.h.const_data_ptr<T>(),
                          t.g_data<T>(),
                          t.h_out.mutable_data_ptr<T>(),
                          t.g_out_data<T>(),
                          static_cast<S>(p0),
                          static_cast<S>(p1),
                          static_cast<S>(p2)};
    with_act_kind(static_cast<int>(kind), [&](auto kt) {
      constexpr int K = decltype(kt)::value;
      with_rule_flags(use_g, want_g, [&](auto ug, auto wg) { act_run<K, T, S, ug.value, wg.value>(a, n); });
    });
  });
  return {t.h_out, t.g_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(obd_ext, CPU, m) { m.impl("activation_hessian", &activation_hessian_cpu); }

}  // namespace cpu
}  // namespace obd
