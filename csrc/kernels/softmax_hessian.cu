// CUDA kernel of softmax_hessian: one warp per row (attention rows are a few
// hundred entries); the row sums s = sum y^2 h and t = sum g y by warp
// shuffles, then one pass writing h_in and g_in.
#include "softmax_hessian.cuh"

namespace obd {
namespace kernels {
namespace {

template <typename S>
__global__ void __launch_bounds__(kThreads) softmax_kernel(SoftmaxParams p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  const bool read_g = p.g != nullptr;
  const bool use_g = read_g && !p.lm;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp; r < p.rows;
       r += warps) {
    const int64_t base = r * p.n;
    S s = 0, t = 0;
    for (int64_t j = lane; j < p.n; j += kWarp) {
      const S y = load_as<S>(p.y, p.dtype, base + j);
      s += y * y * load_as<S>(p.h, p.dtype, base + j);
      if (read_g) t += load_as<S>(p.g, p.dtype, base + j) * y;
    }
    s = warp_sum(s);
    t = warp_sum(t);
    for (int64_t j = lane; j < p.n; j += kWarp) {
      const S y = load_as<S>(p.y, p.dtype, base + j);
      S hv = y * y * ((S(1) - S(2) * y) * load_as<S>(p.h, p.dtype, base + j) + s);
      if (read_g) {
        const S d = t - load_as<S>(p.g, p.dtype, base + j);
        if (use_g) hv += y * (S(2) * y - S(1)) * d;
        if (p.g_in) store_double(p.g_in, p.dtype, base + j, static_cast<double>(-y * d));
      }
      store_double(p.h_in, p.dtype, base + j, static_cast<double>(hv));
    }
  }
}

}  // namespace

cudaError_t launch_softmax_hessian(const SoftmaxParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.n == 0) return cudaSuccess;
  const int grid = grid_for(p.rows, kThreads / kWarp);
  if (p.dtype == Dtype::F64)
    softmax_kernel<double><<<grid, kThreads, 0, stream>>>(p);
  else
    softmax_kernel<float><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace obd
