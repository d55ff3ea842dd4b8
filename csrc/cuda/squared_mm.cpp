// squared_mm on CUDA: cuBLAS (through at::matmul) on a squared temporary, the
// choice the CPU measurement made. _squared_mm_direct is the square-on-load
// kernel (csrc/kernels/squared_mm.cu), registered so that
// bench/bench_squared_mm.py --device cuda can measure the two against each
// other and the tests can check it; the op switches to it only if it wins
// (bench/RESULTS.md).
#include <torch/library.h>

#include "../checks.h"
#include "../kernels/squared_mm.cuh"
#include "cuda_utils.h"

namespace obd {
namespace cuda {
namespace {

at::Tensor squared_mm_cuda(const at::Tensor& a, const at::Tensor& b, bool square_a, bool square_b) {
  check_squared_mm_args(a, b);
  c10::DeviceGuard guard(a.device());
  return at::matmul(square_a ? a * a : a, square_b ? b * b : b);
}

// Reads both operands through their strides: no contiguous or squared copy.
at::Tensor squared_mm_direct_cuda(const at::Tensor& a, const at::Tensor& b, bool square_a, bool square_b) {
  check_squared_mm_args(a, b);
  c10::DeviceGuard guard(a.device());
  const bool batched = a.dim() == 3;
  const int64_t batch = batched ? a.size(0) : 1;
  const int64_t m = a.size(-2), k = a.size(-1), n = b.size(-1);
  auto out = batched ? at::empty({batch, m, n}, a.options()) : at::empty({m, n}, a.options());
  kernels::SquaredMmParams p{a.data_ptr(), b.data_ptr(), out.data_ptr(), batch, m, k, n,
                             batched ? a.stride(0) : 0, a.stride(-2), a.stride(-1),
                             batched ? b.stride(0) : 0, b.stride(-2), b.stride(-1),
                             to_dtype(a.scalar_type()), square_a, square_b};
  check_cuda(kernels::launch_squared_mm(p, current_stream(a.device())), "_squared_mm_direct");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(obd_ext, CUDA, m) {
  m.impl("squared_mm", &squared_mm_cuda);
  m.impl("_squared_mm_direct", &squared_mm_direct_cuda);
}

}  // namespace cuda
}  // namespace obd
