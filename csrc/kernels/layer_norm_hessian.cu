// CUDA kernel of layer_norm_hessian: one warp per row; the five row sums by
// warp shuffles, then one pass writing h_x and g_x (closed forms of
// reference.layer_norm_hessian, arranged as in csrc/cpu/layer_norm_hessian.cpp).
#include "layer_norm_hessian.cuh"

namespace obd {
namespace kernels {
namespace {

template <typename S>
__global__ void __launch_bounds__(kThreads) layer_norm_kernel(LayerNormParams p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  const bool read_g = p.g != nullptr;
  const bool use_g = read_g && !p.lm;
  const S inv_n = S(1) / static_cast<S>(p.n), inv_n2 = inv_n * inv_n;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp; r < p.rows;
       r += warps) {
    const int64_t base = r * p.n;
    const S mu = load_as<S>(p.mean, p.stat_dtype, r), rs = load_as<S>(p.rstd, p.stat_dtype, r);
    S s0 = 0, s1 = 0, s2 = 0, sa = 0, sb = 0;
    for (int64_t j = lane; j < p.n; j += kWarp) {
      const S xh = (load_as<S>(p.x, p.dtype, base + j) - mu) * rs;
      const S gm = p.gamma ? load_as<S>(p.gamma, p.stat_dtype, j) : S(1);
      const S A = gm * gm * load_as<S>(p.h, p.dtype, base + j);
      s0 += A;
      s1 += A * xh;
      s2 += A * xh * xh;
      if (read_g) {
        const S av = gm * load_as<S>(p.g, p.dtype, base + j);
        sa += av;
        sb += av * xh;
      }
    }
    s0 = warp_sum(s0);
    s1 = warp_sum(s1);
    s2 = warp_sum(s2);
    sa = warp_sum(sa);
    sb = warp_sum(sb);
    const S r2 = rs * rs;
    S c0 = s0 * inv_n2, c1 = S(2) * s1 * inv_n2, c2 = s2 * inv_n2;
    if (use_g) {
      c0 -= sb * (S(1) - inv_n) * inv_n;
      c1 += S(2) * sa * inv_n2;
      c2 += S(3) * sb * inv_n2;
    }
    for (int64_t j = lane; j < p.n; j += kWarp) {
      const S xh = (load_as<S>(p.x, p.dtype, base + j) - mu) * rs;
      const S gm = p.gamma ? load_as<S>(p.gamma, p.stat_dtype, j) : S(1);
      const S A = gm * gm * load_as<S>(p.h, p.dtype, base + j);
      S v = c0 + A * (S(1) - S(2) * inv_n) + c1 * xh + xh * xh * (c2 - S(2) * A * inv_n);
      if (read_g) {
        const S av = gm * load_as<S>(p.g, p.dtype, base + j);
        if (use_g) v -= S(2) * av * xh * inv_n;
        if (p.g_x) store_double(p.g_x, p.dtype, base + j, static_cast<double>(rs * (av - sa * inv_n - xh * sb * inv_n)));
      }
      store_double(p.h_x, p.dtype, base + j, static_cast<double>(r2 * v));
    }
  }
}

}  // namespace

cudaError_t launch_layer_norm_hessian(const LayerNormParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.n == 0) return cudaSuccess;
  const int grid = grid_for(p.rows, kThreads / kWarp);
  if (p.dtype == Dtype::F64)
    layer_norm_kernel<double><<<grid, kThreads, 0, stream>>>(p);
  else
    layer_norm_kernel<float><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace obd
