// CUDA binding of layer_norm_hessian: checks, allocation, device guard,
// current stream; the kernel is csrc/kernels/layer_norm_hessian.cu.
#include <torch/library.h>

#include <tuple>

#include "../checks.h"
#include "../rule_common.h"
#include "../kernels/layer_norm_hessian.cuh"
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
  const RuleTensors t = prepare_rule(x, h, g, want_g);
  const bool has_w = weight.has_value() && weight->defined();
  // Statistics and gamma in the accumulation precision, as on the CPU.
  const auto st = t.ref.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto mu = mean.to(st).contiguous(), rs = rstd.to(st).contiguous();
  auto gm = has_w ? weight->to(st).contiguous() : at::Tensor();
  const int64_t n = t.ref.size(-1);
  kernels::LayerNormParams p{t.ref.data_ptr(), mu.data_ptr(), rs.data_ptr(), has_w ? gm.data_ptr() : nullptr,
                             t.h.data_ptr(), t.g_raw(), t.h_out.data_ptr(), t.g_out_raw(),
                             n == 0 ? 0 : t.ref.numel() / n, n, to_dtype(t.ref.scalar_type()), to_dtype(st), lm};
  check_cuda(kernels::launch_layer_norm_hessian(p, current_stream(t.ref.device())), "layer_norm_hessian");
  return {t.h_out, t.g_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(obd_ext, CUDA, m) { m.impl("layer_norm_hessian", &layer_norm_hessian_cuda); }

}  // namespace cuda
}  // namespace obd
