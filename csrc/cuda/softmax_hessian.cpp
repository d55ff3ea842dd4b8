// CUDA binding of softmax_hessian: checks, allocation, device guard, current
// stream; the kernel is csrc/kernels/softmax_hessian.cu.
#include <torch/library.h>

#include <tuple>

#include "../checks.h"
#include "../rule_common.h"
#include "../kernels/softmax_hessian.cuh"
#include "cuda_utils.h"

namespace obd {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> softmax_hessian_cuda(const at::Tensor& y, const at::Tensor& h,
                                                        const c10::optional<at::Tensor>& g, bool lm, bool want_g) {
  check_softmax_args(y, h, g, lm, want_g);
  c10::DeviceGuard guard(y.device());
  const RuleTensors t = prepare_rule(y, h, g, want_g);
  const int64_t n = t.ref.size(-1);
  kernels::SoftmaxParams p{t.ref.data_ptr(), t.h.data_ptr(), t.g_raw(), t.h_out.data_ptr(), t.g_out_raw(),
                           n == 0 ? 0 : t.ref.numel() / n, n, to_dtype(t.ref.scalar_type()), lm};
  check_cuda(kernels::launch_softmax_hessian(p, current_stream(t.ref.device())), "softmax_hessian");
  return {t.h_out, t.g_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(obd_ext, CUDA, m) { m.impl("softmax_hessian", &softmax_hessian_cuda); }

}  // namespace cuda
}  // namespace obd
