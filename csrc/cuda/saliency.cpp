// CUDA bindings of saliency and group_saliency: checks, allocation, device
// guard, current stream; the math is in csrc/kernels/saliency.cu.
#include <torch/library.h>

#include "../checks.h"
#include "../kernels/saliency.cuh"
#include "cuda_utils.h"

namespace obd {
namespace cuda {
namespace {

at::Tensor saliency_cuda(const at::Tensor& weight, const at::Tensor& hess) {
  check_saliency_args("saliency", weight, hess);
  c10::DeviceGuard guard(weight.device());
  auto w = weight.contiguous();
  auto h = hess.contiguous();
  const auto dt = saliency_dtype(w, h);
  auto out = at::empty(w.sizes(), w.options().dtype(dt));
  kernels::SaliencyParams p{w.data_ptr(), h.data_ptr(), out.data_ptr(), w.numel(),
                            to_dtype(w.scalar_type()), to_dtype(h.scalar_type()), dt == at::kDouble};
  check_cuda(kernels::launch_saliency(p, current_stream(w.device())), "saliency");
  return out;
}

at::Tensor group_saliency_cuda(const at::Tensor& weight, const at::Tensor& hess, int64_t dim) {
  check_saliency_args("group_saliency", weight, hess);
  const int64_t d = normalize_group_dim(weight, dim);
  c10::DeviceGuard guard(weight.device());
  auto w = weight.contiguous();
  auto h = hess.contiguous();
  const auto dt = saliency_dtype(w, h);
  const GroupShape g = group_shape(w, d);
  auto out = at::empty({g.groups}, w.options().dtype(dt));
  kernels::GroupSaliencyParams p{w.data_ptr(), h.data_ptr(), out.data_ptr(), g.outer, g.groups, g.inner,
                                 to_dtype(w.scalar_type()), to_dtype(h.scalar_type()), dt == at::kDouble};
  check_cuda(kernels::launch_group_saliency(p, current_stream(w.device())), "group_saliency");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(obd_ext, CUDA, m) {
  m.impl("saliency", &saliency_cuda);
  m.impl("group_saliency", &group_saliency_cuda);
}

}  // namespace cuda
}  // namespace obd
