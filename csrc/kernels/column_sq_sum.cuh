// Torch-free launcher of column_sq_sum_ (see column_sq_sum.cu).
#pragma once

#include <cuda_runtime.h>

#include "common.h"

namespace obd {
namespace kernels {

// Rows are split into `chunks` fixed ranges that depend only on the row count,
// so the result is the same on every GPU and every run.
constexpr int64_t kColumnStatsRowsPerChunk = 1024;
constexpr int64_t kColumnStatsMaxChunks = 128;

inline int64_t column_sq_sum_chunks(int64_t rows) {
  const int64_t c = (rows + kColumnStatsRowsPerChunk - 1) / kColumnStatsRowsPerChunk;
  return c < 1 ? 1 : (c > kColumnStatsMaxChunks ? kColumnStatsMaxChunks : c);
}

struct ColumnSqSumParams {
  const void* x;     // rows x cols, x_dtype, contiguous
  void* acc;         // cols entries, float64 if acc_double else float32; added to
  void* workspace;   // column_sq_sum_chunks(rows) x cols entries of acc's dtype
  int64_t rows, cols;
  Dtype x_dtype;
  bool acc_double;
};

cudaError_t launch_column_sq_sum(const ColumnSqSumParams& p, cudaStream_t stream);

}  // namespace kernels
}  // namespace obd
