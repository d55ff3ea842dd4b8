// Torch-free launcher of the square-on-load product (see squared_mm.cu).
#pragma once

#include <cuda_runtime.h>

#include "common.h"

namespace obd {
namespace kernels {

// out[b] = op_a(a[b]) @ op_b(b[b]) with op(x) = x*x when asked, for `batch`
// products of (m x k) by (k x n). The operands are read through their strides
// (a transposed view needs no copy); out is contiguous, batch x m x n, in the
// operands' dtype. Accumulation is float32 (float64 for float64 operands).
struct SquaredMmParams {
  const void* a;
  const void* b;
  void* out;
  int64_t batch, m, k, n;
  int64_t a_batch_stride, a_row_stride, a_col_stride;
  int64_t b_batch_stride, b_row_stride, b_col_stride;
  Dtype dtype;
  bool square_a, square_b;
};

cudaError_t launch_squared_mm(const SquaredMmParams& p, cudaStream_t stream);

}  // namespace kernels
}  // namespace obd
