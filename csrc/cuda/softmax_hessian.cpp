// CUDA binding of softmax_hessian: checks, allocation, device guard, current
// stream; the kernel is csrc/kernels/softmax.cu.
#include <torch/library.h>

#include <tuple>

#include "../checks.h"
#include "../kernels/softmax.cuh"
#include "cuda_utils.h"

namespace obd {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> softmax_hessian_cuda(const at::Tensor& y, const at::Tensor& h,
                                                        const c10::optional<at::Tensor>& g, bool lm, bool want_g) {
  check_softmax_args(y, h, g, lm, want_g);
  c10::DeviceGuard guard(y.device());
  auto yc = y.contiguous();
  auto hc = h.contiguous();
  const bool has_g = g.has_value() && g->defined();
  auto gc = has_g ? g->contiguous() : at::Tensor();
  auto h_in = at::empty_like(hc);
  auto g_in = want_g ? at::empty_like(hc) : at::empty({0}, hc.options());
  const int64_t n = yc.size(-1);
  kernels::SoftmaxParams p{yc.data_ptr(), hc.data_ptr(), has_g ? gc.data_ptr() : nullptr, h_in.data_ptr(),
                           want_g ? g_in.data_ptr() : nullptr, n == 0 ? 0 : yc.numel() / n, n,
                           to_dtype(yc.scalar_type()), lm};
  check_cuda(kernels::launch_softmax_hessian(p, current_stream(yc.device())), "softmax_hessian");
  return {h_in, g_in};
}

}  // namespace

TORCH_LIBRARY_IMPL(obd_ext, CUDA, m) { m.impl("softmax_hessian", &softmax_hessian_cuda); }

}  // namespace cuda
}  // namespace obd
