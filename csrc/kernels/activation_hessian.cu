// CUDA kernel of activation_hessian: h_in = f'^2 h + f'' g, g_in = f' g in one
// pass, with the math of act_rule (csrc/kernels/common.h) shared with the CPU.
#include "activation_hessian.cuh"

namespace obd {
namespace kernels {
namespace {

template <int K, typename S>
__global__ void activation_kernel(ActivationParams p) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const bool lm = p.lm || p.g == nullptr;
  const S q0 = static_cast<S>(p.p0), q1 = static_cast<S>(p.p1), q2 = static_cast<S>(p.p2);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride) {
    const S v = static_cast<S>(load_double(p.saved, p.dtype, i));
    const S h = static_cast<S>(load_double(p.h, p.dtype, i));
    const S g = p.g ? static_cast<S>(load_double(p.g, p.dtype, i)) : S(0);
    S hi, gi;
    act_rule<K, S>(v, h, g, lm, q0, q1, q2, &hi, &gi);
    store_double(p.h_in, p.dtype, i, static_cast<double>(hi));
    if (p.g_in) store_double(p.g_in, p.dtype, i, static_cast<double>(gi));
  }
}

}  // namespace

cudaError_t launch_activation_hessian(const ActivationParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  const int grid = grid_for(p.n, kThreads * 4);
  with_act_kind(p.kind, [&](auto kt) {
    constexpr int K = decltype(kt)::value;
    if (p.dtype == Dtype::F64)
      activation_kernel<K, double><<<grid, kThreads, 0, stream>>>(p);
    else
      activation_kernel<K, float><<<grid, kThreads, 0, stream>>>(p);
  });
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace obd
