// CUDA binding of activation_hessian: checks, allocation, device guard,
// current stream; the kernel is csrc/kernels/activation.cu.
#include <torch/library.h>

#include <tuple>

#include "../checks.h"
#include "../kernels/activation.cuh"
#include "cuda_utils.h"

namespace obd {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> activation_hessian_cuda(const at::Tensor& saved, const at::Tensor& h,
                                                           const c10::optional<at::Tensor>& g, int64_t kind,
                                                           double p0, double p1, double p2, bool lm, bool want_g) {
  check_activation_args(saved, h, g, kind, lm, want_g);
  c10::DeviceGuard guard(saved.device());
  auto v = saved.contiguous();
  auto hc = h.contiguous();
  const bool has_g = g.has_value() && g->defined();
  auto gc = has_g ? g->contiguous() : at::Tensor();
  auto h_in = at::empty_like(hc);
  auto g_in = want_g ? at::empty_like(hc) : at::empty({0}, hc.options());
  kernels::ActivationParams p{v.data_ptr(), hc.data_ptr(), has_g ? gc.data_ptr() : nullptr, h_in.data_ptr(),
                              want_g ? g_in.data_ptr() : nullptr, v.numel(), to_dtype(v.scalar_type()),
                              static_cast<int32_t>(kind), p0, p1, p2, lm};
  check_cuda(kernels::launch_activation_hessian(p, current_stream(v.device())), "activation_hessian");
  return {h_in, g_in};
}

}  // namespace

TORCH_LIBRARY_IMPL(obd_ext, CUDA, m) { m.impl("activation_hessian", &activation_hessian_cuda); }

}  // namespace cuda
}  // namespace obd
