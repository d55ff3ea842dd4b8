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

namespace obd {
namespace kernels {
namespace {

constexpr int kTileM = 64, kTileN = 64, kTileK = 16, kMicro = 4, kSide = 16;
constexpr int kMmThreads = kSide * kSide;  // 256

// Entry (r, c) of an operand read through its strides, squared if asked; 0
// outside the rows x cols matrix (the ragged edges of the last tiles).
template <typename S>
__device__ __forceinline__ S operand_at(const void* x, Dtype t, int64_t offset, int64_t r, int64_t c, int64_t rows,
                                        int64_t cols, int64_t row_stride, int64_t col_stride, bool square) {
  if (r >= rows || c >= cols) return S(0);
  const S v = load_as<S>(x, t, offset + r * row_stride + c * col_stride);
  return square ? v * v : v;
}

template <typename S>
__global__ void __launch_bounds__(kMmThreads) squared_mm_kernel(SquaredMmParams p) {
  __shared__ S a_tile[kTileK][kTileM];  // a_tile[kk][i] = op_a(a)[row0 + i, k0 + kk]
  __shared__ S b_tile[kTileK][kTileN];  // b_tile[kk][j] = op_b(b)[k0 + kk, col0 + j]
  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
  const int64_t tiles_m = (p.m + kTileM - 1) / kTileM;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  for (int64_t bz = blockIdx.z; bz < p.batch; bz += gridDim.z) {
    const int64_t a_off = bz * p.a_batch_stride, b_off = bz * p.b_batch_stride, out_off = bz * p.m * p.n;
    for (int64_t tm = blockIdx.y; tm < tiles_m; tm += gridDim.y) {
      const int64_t row0 = tm * kTileM;
      S acc[kMicro][kMicro];
      for (int i = 0; i < kMicro; ++i)
        for (int j = 0; j < kMicro; ++j) acc[i][j] = S(0);
      for (int64_t k0 = 0; k0 < p.k; k0 += kTileK) {
        // Consecutive threads take consecutive k for A and consecutive columns
        // for B: coalesced for a row-major A and B (the usual layouts).
        for (int e = threadIdx.x; e < kTileM * kTileK; e += kMmThreads)
          a_tile[e % kTileK][e / kTileK] = operand_at<S>(p.a, p.dtype, a_off, row0 + e / kTileK, k0 + e % kTileK, p.m,
                                                         p.k, p.a_row_stride, p.a_col_stride, p.square_a);
        for (int e = threadIdx.x; e < kTileK * kTileN; e += kMmThreads)
          b_tile[e / kTileN][e % kTileN] = operand_at<S>(p.b, p.dtype, b_off, k0 + e / kTileN, col0 + e % kTileN, p.k,
                                                         p.n, p.b_row_stride, p.b_col_stride, p.square_b);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kTileK; ++kk) {
          S av[kMicro], bv[kMicro];
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
          if (c < p.n) store_double(p.out, p.dtype, out_off + r * p.n + c, static_cast<double>(acc[i][j]));
        }
      }
    }
  }
}

template <typename S>
cudaError_t launch_typed(const SquaredMmParams& p, cudaStream_t stream) {
  const int64_t tiles_n = (p.n + kTileN - 1) / kTileN, tiles_m = (p.m + kTileM - 1) / kTileM;
  if (tiles_n > 2147483647LL) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(tiles_n), static_cast<unsigned>(tiles_m < 65535 ? tiles_m : 65535),
                  static_cast<unsigned>(p.batch < 65535 ? p.batch : 65535));
  squared_mm_kernel<S><<<grid, kMmThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_squared_mm(const SquaredMmParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.m == 0 || p.n == 0) return cudaSuccess;
  return p.dtype == Dtype::F64 ? launch_typed<double>(p, stream) : launch_typed<float>(p, stream);
}

}  // namespace kernels
}  // namespace obd
