// CUDA kernels: saliency s = h w^2 / 2 (elementwise, as (h * w) * w * 0.5: see
// common.h) and group saliency (sum of s over every dimension but one, one
// block per group).
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
  using ReduceInt = cub::BlockReduce<int, kThreads>;
  __shared__ union {
    typename Reduce::TempStorage sum;
    typename ReduceInt::TempStorage max;
  } tmp;
  __shared__ double shared_total;
  __shared__ int shared_top;
  const int64_t per_group = p.outer * p.inner;
  for (int64_t g = blockIdx.x; g < p.groups; g += gridDim.x) {
    auto w_at = [&](int64_t e) { return load_double(p.w, p.w_dtype, (e / p.inner * p.groups + g) * p.inner + e % p.inner); };
    auto h_at = [&](int64_t e) { return load_double(p.h, p.h_dtype, (e / p.inner * p.groups + g) * p.inner + e % p.inner); };
    // Terms and sum in double (common.h, group_term).
    double acc = 0.0;
    for (int64_t e = threadIdx.x; e < per_group; e += blockDim.x) acc += group_term(w_at(e), h_at(e));
    double total = Reduce(tmp.sum).Sum(acc);
    if (threadIdx.x == 0) shared_total = total;
    __syncthreads();
    total = shared_total;
    if (!isfinite(total)) {
      // Only float64 inputs get here: sum the split terms scaled by the
      // group's largest exponent (the block takes this branch as a whole).
      int top = INT32_MIN;
      for (int64_t e = threadIdx.x; e < per_group; e += blockDim.x) {
        int x;
        group_term_split(w_at(e), h_at(e), &x);
        top = max(top, x);
      }
      top = ReduceInt(tmp.max).Reduce(top, [](int a, int b) { return a > b ? a : b; });
      if (threadIdx.x == 0) shared_top = top;
      __syncthreads();
      top = shared_top;
      double scaled = 0.0;
      for (int64_t e = threadIdx.x; e < per_group; e += blockDim.x) {
        int x;
        const double m = group_term_split(w_at(e), h_at(e), &x);
        if (m != 0.0) scaled += ::ldexp(m, x - top);
      }
      scaled = Reduce(tmp.sum).Sum(scaled);
      if (threadIdx.x == 0) total = ::ldexp(scaled, top);
    }
    if (threadIdx.x == 0) {
      if (p.out_double)
        static_cast<double*>(p.out)[g] = total;
      else
        static_cast<float*>(p.out)[g] = static_cast<float>(total);
    }
    __syncthreads();  // tmp and the shared values are reused by the next group
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
