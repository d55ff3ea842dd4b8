// CUDA kernels of column_sq_sum_: acc[j] += sum_r x[r, j]^2.
//
// Pass 1: block (column tile, row chunk); each thread owns one column and
// walks the chunk's rows, so a warp reads consecutive addresses of a row
// (coalesced) and float16/bfloat16 are widened in registers (no upcast copy).
// Each chunk's partial goes to the workspace. Pass 2 adds the partials in
// chunk order: no atomics, so the result is deterministic.
#include "column_sq_sum.cuh"

namespace obd {
namespace kernels {
namespace {

constexpr int kColumnThreads = 256;

template <typename S>
__global__ void column_partials_kernel(ColumnSqSumParams p, int64_t chunks) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  if (col >= p.cols) return;
  const int64_t per = (p.rows + chunks - 1) / chunks;
  const int64_t r0 = chunk * per;
  const int64_t r1 = r0 + per < p.rows ? r0 + per : p.rows;
  S total = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const S v = load_as<S>(p.x, p.x_dtype, r * p.cols + col);
    total += v * v;
  }
  static_cast<S*>(p.workspace)[chunk * p.cols + col] = total;
}

template <typename S>
__global__ void column_fold_kernel(ColumnSqSumParams p, int64_t chunks) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= p.cols) return;
  const S* part = static_cast<const S*>(p.workspace);
  S total = 0;
  for (int64_t c = 0; c < chunks; ++c) total += part[c * p.cols + col];
  static_cast<S*>(p.acc)[col] += total;
}

template <typename S>
cudaError_t launch_typed(const ColumnSqSumParams& p, cudaStream_t stream) {
  const int64_t chunks = column_sq_sum_chunks(p.rows);
  const unsigned tiles = static_cast<unsigned>((p.cols + kColumnThreads - 1) / kColumnThreads);
  column_partials_kernel<S><<<dim3(tiles, static_cast<unsigned>(chunks)), kColumnThreads, 0, stream>>>(p, chunks);
  column_fold_kernel<S><<<tiles, kColumnThreads, 0, stream>>>(p, chunks);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_column_sq_sum(const ColumnSqSumParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  return p.acc_double ? launch_typed<double>(p, stream) : launch_typed<float>(p, stream);
}

}  // namespace kernels
}  // namespace obd
