// CUDA kernel of cross_entropy_boundary: one block per row; block reductions
// for the row's max and sum of exponentials, then one pass writing g and h.
#include <cub/block/block_reduce.cuh>

#include "cross_entropy_boundary.cuh"

namespace obd {
namespace kernels {
namespace {

struct MaxOp {
  template <typename S>
  __device__ __forceinline__ S operator()(S a, S b) const { return a > b ? a : b; }
};

template <typename S>
__global__ void __launch_bounds__(kThreads) ce_kernel(CrossEntropyParams p) {
  using Reduce = cub::BlockReduce<S, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ S sh_max, sh_sum;
  for (int64_t r = blockIdx.x; r < p.n; r += gridDim.x) {
    const int64_t base = r * p.c;
    S mx = -INFINITY;
    for (int64_t j = threadIdx.x; j < p.c; j += blockDim.x)
      mx = max(mx, static_cast<S>(load_double(p.logits, p.dtype, base + j)));
    mx = Reduce(tmp).Reduce(mx, MaxOp());
    if (threadIdx.x == 0) sh_max = mx;
    __syncthreads();
    mx = sh_max;
    S sum = 0;
    for (int64_t j = threadIdx.x; j < p.c; j += blockDim.x)
      sum += exp(static_cast<S>(load_double(p.logits, p.dtype, base + j)) - mx);
    sum = Reduce(tmp).Sum(sum);
    if (threadIdx.x == 0) sh_sum = sum;
    __syncthreads();
    sum = sh_sum;
    const int64_t t = p.target[r];
    const bool valid = t != p.ignore_index;
    if (valid && (t < 0 || t >= p.c)) {
      if (threadIdx.x == 0) *p.bad_target = 1;
      __syncthreads();
      continue;
    }
    const S w = valid ? static_cast<S>(p.scale) : S(0);
    const S inv = S(1) / sum;
    for (int64_t j = threadIdx.x; j < p.c; j += blockDim.x) {
      const S pr = exp(static_cast<S>(load_double(p.logits, p.dtype, base + j)) - mx) * inv;
      if (p.g) store_double(p.g, p.dtype, base + j, static_cast<double>(w * (pr - (j == t ? S(1) : S(0)))));
      store_double(p.h, p.dtype, base + j, static_cast<double>(w * pr * (S(1) - pr)));
    }
    if (threadIdx.x == 0)
      p.row_loss[r] = valid ? static_cast<double>(log(sum) + mx - static_cast<S>(load_double(p.logits, p.dtype,
                                                                                             base + t))) * p.scale
                            : 0.0;
    __syncthreads();  // tmp and the shared scalars are reused by the next row
  }
}

}  // namespace

cudaError_t launch_cross_entropy_boundary(const CrossEntropyParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  const int grid = grid_for(p.n, 1);
  if (p.dtype == Dtype::F64)
    ce_kernel<double><<<grid, kThreads, 0, stream>>>(p);
  else
    ce_kernel<float><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace obd
