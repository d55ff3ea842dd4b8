// CUDA binding of layer_norm_hessian: checks, allocation, device guard,
// current stream; the kernel is csrc/kernels/layer_norm.cu.
#include <torch/library.h>

#include <tuple>

#include "../checks.h"
#include "../kernels/layer_norm.cuh"
#include "cuda_utils.h"

namespace obd {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> layer_norm_hessian_cuda(const at::Tensor& x, const at::Tensor& mean,
                                                           const at::Tensor& rstd,
                                                           const c10::optional<at::Tensor>& weight,
                                                           const at::Tensor& h, const c10::optional<at::Tensor>& g,
                                                           bool lm, bool want_g) {
  check_layer_norm_args(x, mean, rstd, weight, h, g, lm, want_g);
  c10::DeviceGuard guard(x.device());
  auto xc = x.contiguous();
  auto hc = h.contiguous();
  const bool has_g = g.has_value() && g->defined();
  const bool has_w = weight.has_value() && weight->defined();
  auto gc = has_g ? g->contiguous() : at::Tensor();
  // Statistics and gamma in the accumulation precision, as on the CPU.
  const auto st = xc.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto mu = mean.to(st).contiguous(), rs = rstd.to(st).contiguous();
  auto gm = has_w ? weight->to(st).contiguous() : at::Tensor();
  auto h_x = at::empty_like(hc);
  auto g_x = want_g ? at::empty_like(hc) : at::empty({0}, hc.options());
  const int64_t n = xc.size(-1);
  kernels::LayerNormParams p{xc.data_ptr(), mu.data_ptr(), rs.data_ptr(), has_w ? gm.data_ptr() : nullptr,
                             hc.data_ptr(), has_g ? gc.data_ptr() : nullptr, h_x.data_ptr(),
                             want_g ? g_x.data_ptr() : nullptr, n == 0 ? 0 : xc.numel() / n, n,
                             to_dtype(xc.scalar_type()), to_dtype(st), lm};
  check_cuda(kernels::launch_layer_norm_hessian(p, current_stream(xc.device())), "layer_norm_hessian");
  return {h_x, g_x};
}

}  // namespace

TORCH_LIBRARY_IMPL(obd_ext, CUDA, m) { m.impl("layer_norm_hessian", &layer_norm_hessian_cuda); }

}  // namespace cuda
}  // namespace obd
