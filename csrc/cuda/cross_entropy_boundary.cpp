// CUDA binding of cross_entropy_boundary; the kernel is csrc/kernels/cross_entropy_boundary.cu.
#include <torch/library.h>

#include <tuple>

#include "../checks.h"
#include "../kernels/cross_entropy_boundary.cuh"
#include "cuda_utils.h"

namespace obd {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_boundary_cuda(const at::Tensor& logits,
                                                                           const at::Tensor& target,
                                                                           int64_t ignore_index, double scale,
                                                                           bool want_g) {
  check_ce_args(logits, target);
  c10::DeviceGuard guard(logits.device());
  auto x = logits.contiguous();
  auto t = target.contiguous();
  auto g = want_g ? at::empty_like(x) : at::empty({0}, x.options());
  auto h = at::empty_like(x);
  auto row_loss = at::zeros({x.size(0)}, x.options().dtype(at::kDouble));
  auto bad = at::zeros({1}, x.options().dtype(at::kInt));
  kernels::CrossEntropyParams p{x.data_ptr(), t.data_ptr<int64_t>(), want_g ? g.data_ptr() : nullptr, h.data_ptr(),
                                row_loss.data_ptr<double>(), bad.data_ptr<int>(), x.size(0), x.size(1),
                                ignore_index, scale, to_dtype(x.scalar_type())};
  check_cuda(kernels::launch_cross_entropy_boundary(p, current_stream(x.device())), "cross_entropy_boundary");
  TORCH_CHECK(bad.item<int>() == 0, "obd_ext.cross_entropy_boundary: a target is not a class in [0, ", x.size(1),
              ") nor ignore_index=", ignore_index);
  return {row_loss.sum(), g, h};
}

}  // namespace

TORCH_LIBRARY_IMPL(obd_ext, CUDA, m) { m.impl("cross_entropy_boundary", &cross_entropy_boundary_cuda); }

}  // namespace cuda
}  // namespace obd
