// Square-on-load product of the linear rule, H_x = H (W*W)^T and h_W = (X*X)^T H,
// without the squared temporary that ops.squared_mm gives cuBLAS.
//
// Classic shared-memory tiling: a block computes a 64 x 64 tile of out from
// 16-wide slices of k; each of its 256 threads owns a 4 x 4 micro-tile whose
// rows and columns are 16 apart, so the shared-memory reads of a warp are
// broadcasts (A) or consecutive words (B) and the stores are coalesced. The
// squaring happens while a slice is copied into shared memory, once per loaded
// element. This kernel exists to be measured against cuBLAS on a squared copy
// (bench/bench_squared_mm.py --device cuda); the op uses whichever wins
// (bench/RESULTS.md). The sums run in a fixed order: deterministic.
#include "squared_mm.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace obd {
namespace kernels {
namespace {

constexpr int kTileM = 64, kTileN = 64, kTileK = 16, kMicro = 4, kSide = 16;
constexpr int kMmThreads = kSide * kSide;  // 256

template <typename T>
struct Widen;
template <>
struct Widen<float> {
  using Acc = float;
  __device__ static float in(float v) { return v; }
  __device__ static float out(float v) { return v; }
};
template <>
struct Widen<double> {
  using Acc = double;
  __device__ static double in(double v) { return v; }
  __device__ static double out(double v) { return v; }
};
template <>
struct Widen<__half> {
  using Acc = float;
  __device__ static float in(__half v) { return __half2float(v); }
  __device__ static __half out(float v) { return __float2half_rn(v); }
};
template <>
struct Widen<__nv_bfloat16> {
  using Acc = float;
  __device__ static float in(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 out(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
__global__ void __launch_bounds__(kMmThreads) squared_mm_kernel(SquaredMmParams p) {
  using Acc = typename Widen<T>::Acc;
  __shared__ Acc a_tile[kTileK][kTileM];  // a_tile[kk][i] = op_a(a)[row0 + i, k0 + kk]
  __shared__ Acc b_tile[kTileK][kTileN];  // b_tile[kk][j] = op_b(b)[k0 + kk, col0 + j]
  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
  const int64_t tiles_m = (p.m + kTileM - 1) / kTileM;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  for (int64_t bz = blockIdx.z; bz < p.batch; bz += gridDim.z) {
    const T* a = static_cast<const T*>(p.a) + bz * p.a_batch_stride;
    const T* b = static_cast<const T*>(p.b) + bz * p.b_batch_stride;
    T* out = static_cast<T*>(p.out) + bz * p.m * p.n;
    for (int64_t tm = blockIdx.y; tm < tiles_m; tm += gridDim.y) {
      const int64_t row0 = tm * kTileM;
      Acc acc[kMicro][kMicro];
      for (int i = 0; i < kMicro; ++i)
        for (int j = 0; j < kMicro; ++j) acc[i][j] = Acc(0);
      for (int64_t k0 = 0; k0 < p.k; k0 += kTileK) {
        // Consecutive threads take consecutive k for A and consecutive columns
        // for B: coalesced for a row-major A and B (the usual layouts).
        for (int e = threadIdx.x; e < kTileM * kTileK; e += kMmThreads) {
          const int i = e / kTileK, kk = e % kTileK;
          const int64_t r = row0 + i, c = k0 + kk;
          Acc v = Acc(0);
          if (r < p.m && c < p.k) {
            v = Widen<T>::in(a[r * p.a_row_stride + c * p.a_col_stride]);
            if (p.square_a) v *= v;
          }
          a_tile[kk][i] = v;
        }
        for (int e = threadIdx.x; e < kTileK * kTileN; e += kMmThreads) {
          const int kk = e / kTileN, j = e % kTileN;
          const int64_t r = k0 + kk, c = col0 + j;
          Acc v = Acc(0);
          if (r < p.k && c < p.n) {
            v = Widen<T>::in(b[r * p.b_row_stride + c * p.b_col_stride]);
            if (p.square_b) v *= v;
          }
          b_tile[kk][j] = v;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kTileK; ++kk) {
          Acc av[kMicro], bv[kMicro];
#pragma unroll
          for (int t = 0; t < kMicro; ++t) {
            av[t] = a_tile[kk][ty + t * kSide];
            bv[t] = b_tile[kk][tx + t * kSide];
          }
#pragma unroll
          for (int i = 0; i < kMicro; ++i)
#pragma unroll
            for (int j = 0; j < kMicro; ++j) acc[i][j] += av[i] * bv[j];
        }
        __syncthreads();
      }
      for (int i = 0; i < kMicro; ++i) {
        const int64_t r = row0 + ty + i * kSide;
        if (r >= p.m) continue;
        for (int j = 0; j < kMicro; ++j) {
          const int64_t c = col0 + tx + j * kSide;
          if (c < p.n) out[r * p.n + c] = Widen<T>::out(acc[i][j]);
        }
      }
    }
  }
}

template <typename T>
cudaError_t launch_typed(const SquaredMmParams& p, cudaStream_t stream) {
  const int64_t tiles_n = (p.n + kTileN - 1) / kTileN, tiles_m = (p.m + kTileM - 1) / kTileM;
  if (tiles_n > 2147483647LL) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(tiles_n), static_cast<unsigned>(tiles_m < 65535 ? tiles_m : 65535),
                  static_cast<unsigned>(p.batch < 65535 ? p.batch : 65535));
  squared_mm_kernel<T><<<grid, kMmThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_squared_mm(const SquaredMmParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.m == 0 || p.n == 0) return cudaSuccess;
  switch (p.dtype) {
    case Dtype::F32: return launch_typed<float>(p, stream);
    case Dtype::F64: return launch_typed<double>(p, stream);
    case Dtype::F16: return launch_typed<__half>(p, stream);
    default: return launch_typed<__nv_bfloat16>(p, stream);
  }
}

}  // namespace kernels
}  // namespace obd
