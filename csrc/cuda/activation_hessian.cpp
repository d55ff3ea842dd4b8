// CUDA binding of activation_hessian: checks, allocation, device guard,
// current stream; the kernel is csrc/kernels/activation_hessian.cu.
#include <torch/library.h>

#include <tuple>

#include "../checks.h"
#include "../rule_common.h"
#include "../kernels/activation_hessian.cuh"
#include "cuda_utils.h"

namespace obd {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> activation_hessian_cuda(const at::Tensor& saved, const at::Tensor& h,
                                                           const c10::optional<at::Tensor>& g, int64_t kind,
                                                           double p0, double p1, double p2, bool lm, bool want_g) {
  check_activation_args(saved, h, g, kind, lm, want_g);
  c10::DeviceGuard guard(saved.device());
  const RuleTensors t = prepare_rule(saved, h, g, want_g);
  kernels::ActivationParams p{t.ref.data_ptr(), t.h.data_ptr(), t.g_raw(), t.h_out.data_ptr(), t.g_out_raw(),
                              t.ref.numel(), to_dtype(t.ref.scalar_type()), static_cast<int32_t>(kind), p0, p1, p2,
                              lm};
  check_cuda(kernels::launch_activation_hessian(p, current_stream(t.ref.device())), "activation_hessian");
  return {t.h_out, t.g_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(obd_ext, CUDA, m) { m.impl("activation_hessian", &activation_hessian_cuda); }

}  // namespace cuda
}  // namespace obd
