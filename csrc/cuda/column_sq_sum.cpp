// CUDA binding of column_sq_sum_: checks, workspace, device guard, current
// stream; the math is in csrc/kernels/column_sq_sum.cu.
#include <torch/library.h>

#include "../checks.h"
#include "../kernels/column_sq_sum.cuh"
#include "cuda_utils.h"

namespace obd {
namespace cuda {
namespace {

void column_sq_sum_cuda(const at::Tensor& acc, const at::Tensor& x) {
  check_column_sq_sum_args(acc, x);
  const int64_t cols = acc.size(0);
  if (cols == 0 || x.numel() == 0) return;
  c10::DeviceGuard guard(x.device());
  auto xc = x.contiguous();
  const int64_t rows = xc.numel() / cols;
  auto workspace = at::empty({kernels::column_sq_sum_chunks(rows), cols}, acc.options());
  kernels::ColumnSqSumParams p{xc.data_ptr(), acc.data_ptr(), workspace.data_ptr(), rows, cols,
                               to_dtype(xc.scalar_type()), acc.scalar_type() == at::kDouble};
  check_cuda(kernels::launch_column_sq_sum(p, current_stream(x.device())), "column_sq_sum_");
}

}  // namespace

TORCH_LIBRARY_IMPL(obd_ext, CUDA, m) { m.impl("column_sq_sum_", &column_sq_sum_cuda); }

}  // namespace cuda
}  // namespace obd
