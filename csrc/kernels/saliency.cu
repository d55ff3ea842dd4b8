// CUDA kernels: saliency s = h w^2 / 2 (elementwise) and group saliency (sum
// of s over every dimension but one, one block per group).
#include <cub/block/block_reduce.cuh>

#include "saliency.cuh"

namespace obd {
namespace kernels {
namespace {

__global__ void saliency_kernel(SaliencyParams p) {
  const Operand w{p.w, p.w_dtype}, h{p.h, p.h_dtype};
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride) {
    if (p.out_double)
      static_cast<double*>(p.out)[i] = saliency_at_double(w, h, i);
    else
      static_cast<float*>(p.out)[i] = saliency_at_float(w, h, i);
  }
}

__global__ void group_saliency_kernel(GroupSaliencyParams p) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const Operand w{p.w, p.w_dtype}, h{p.h, p.h_dtype};
  const int64_t per_group = p.outer * p.inner;
  for (int64_t g = blockIdx.x; g < p.groups; g += gridDim.x) {
    double acc = 0.0;
    for (int64_t e = threadIdx.x; e < per_group; e += blockDim.x) {
      const int64_t o = e / p.inner, i = e % p.inner;
      const int64_t idx = (o * p.groups + g) * p.inner + i;
      acc += p.out_double ? saliency_at_double(w, h, idx) : static_cast<double>(saliency_at_float(w, h, idx));
    }
    const double total = Reduce(tmp).Sum(acc);
    if (threadIdx.x == 0) {
      if (p.out_double)
        static_cast<double*>(p.out)[g] = total;
      else
        static_cast<float*>(p.out)[g] = static_cast<float>(total);
    }
    __syncthreads();  // tmp is reused by the next group
  }
}

}  // namespace

cudaError_t launch_saliency(const SaliencyParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  saliency_kernel<<<grid_for(p.n, kThreads * 4), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_group_saliency(const GroupSaliencyParams& p, cudaStream_t stream) {
  if (p.groups == 0) return cudaSuccess;
  group_saliency_kernel<<<grid_for(p.groups, 1), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace obd
