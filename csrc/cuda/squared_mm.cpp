// squared_mm on CUDA: cuBLAS (through at::matmul) on a squared temporary, the
// choice the CPU measurement made; a square-on-load CUDA kernel is to be
// measured against it on a GPU (bench/RESULTS.md).
#include <torch/library.h>

#include "../checks.h"
#include "cuda_utils.h"

namespace obd {
namespace cuda {
namespace {

at::Tensor squared_mm_cuda(const at::Tensor& a, const at::Tensor& b, bool square_a, bool square_b) {
  check_squared_mm_args(a, b);
  c10::DeviceGuard guard(a.device());
  return at::matmul(square_a ? a * a : a, square_b ? b * b : b);
}

}  // namespace

TORCH_LIBRARY_IMPL(obd_ext, CUDA, m) { m.impl("squared_mm", &squared_mm_cuda); }

}  // namespace cuda
}  // namespace obd
