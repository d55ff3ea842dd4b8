// CUDA selection within segments of one weight: per output row and N:M.
// Same contract as csrc/cpu/segment_select.cpp: every segment is its own pool
// with `target` deleted entries wanted; deleted entries count and stay
// deleted; ties are deleted in index order.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "segment_select.cuh"

namespace obd {
namespace kernels {
namespace {

__device__ __forceinline__ int64_t seg_base(const SegmentSelectParams& p, int64_t s) {
  const int64_t i = s % p.inner;
  const int64_t og = s / p.inner;
  const int64_t g = og % p.groups;
  const int64_t o = og / p.groups;
  return (o * p.groups * p.len + g * p.len) * p.inner + i;
}

// One block per row: count, 8-bit radix passes to the exact key, then one
// ordered write pass (ties by index through a block scan).
template <typename Key>
__global__ void __launch_bounds__(kThreads) row_kernel(SegmentSelectParams p) {
  constexpr int kb = 8 * sizeof(Key);
  using Scan = cub::BlockScan<int, kThreads>;
  using ReduceI = cub::BlockReduce<long long, kThreads>;
  using ReduceD = cub::BlockReduce<double, kThreads>;
  __shared__ union {
    typename Scan::TempStorage scan;
    typename ReduceI::TempStorage ri;
    typename ReduceD::TempStorage rd;
  } tmp;
  __shared__ unsigned int hist[256];
  __shared__ long long sh_r, sh_count;
  __shared__ unsigned long long sh_prefix;
  __shared__ int sh_pbits;
  const Operand w{p.w, p.w_dtype}, h{p.h, p.h_dtype};
  unsigned long long deleted = 0, before = 0, nonfinite = 0, max_key = 0;
  for (int64_t s = blockIdx.x; s < p.count; s += gridDim.x) {
    const int64_t base = seg_base(p, s);
    long long masked = 0, alive = 0, bad = 0;
    for (int64_t j = threadIdx.x; j < p.len; j += blockDim.x) {
      int state;
      element_key<Key>(w, h, p.mask, base + j * p.stride, &state);
      masked += state == kMasked;
      alive += state == kAlive;
      bad += state == kNonfinite;
    }
    masked = ReduceI(tmp.ri).Sum(masked);
    __syncthreads();
    alive = ReduceI(tmp.ri).Sum(alive);
    __syncthreads();
    bad = ReduceI(tmp.ri).Sum(bad);
    if (threadIdx.x == 0) {
      sh_r = p.target - masked;
      sh_count = alive;
    }
    __syncthreads();
    const long long want = sh_r;
    if (threadIdx.x == 0) {
      before += masked;
      nonfinite += bad;
    }
    if (p.check_only) {
      if (threadIdx.x == 0 && want > sh_count) atomicMin(&p.counters[kSegShort], static_cast<unsigned long long>(s));
      __syncthreads();
      continue;
    }
    if (want <= 0 || want > sh_count) {
      if (threadIdx.x == 0) p.seg_sum[s] = 0.0;
      __syncthreads();
      continue;
    }
    if (threadIdx.x == 0) {
      sh_prefix = 0;
      sh_pbits = 0;
    }
    __syncthreads();
    // Narrow to the bin holding the want-th key until it is taken whole or exact.
    while (true) {
      for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0u;
      __syncthreads();
      const int pbits = sh_pbits;
      const Key prefix = static_cast<Key>(sh_prefix);
      const int shift = kb - pbits - 8;
      for (int64_t j = threadIdx.x; j < p.len; j += blockDim.x) {
        int state;
        const Key key = element_key<Key>(w, h, p.mask, base + j * p.stride, &state);
        if (state == kAlive && (pbits == 0 || (key >> (kb - pbits)) == prefix))
          atomicAdd(&hist[(key >> shift) & 0xFF], 1u);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        long long below = 0;
        int b = 0;
        for (; b < 255; ++b) {
          if (below + static_cast<long long>(hist[b]) >= sh_r) break;
          below += hist[b];
        }
        sh_r -= below;
        sh_count = hist[b];
        sh_prefix = (sh_prefix << 8) | static_cast<unsigned long long>(b);
        sh_pbits += 8;
      }
      __syncthreads();
      if (sh_r == sh_count || sh_pbits == kb) break;
    }
    const bool take_all = sh_r == sh_count;
    const long long r = sh_r;
    const int shift = kb - sh_pbits;
    const Key prefix = static_cast<Key>(sh_prefix);
    long long taken = 0;
    double acc = 0.0;
    for (int64_t j0 = 0; j0 < p.len; j0 += blockDim.x) {
      const int64_t j = j0 + threadIdx.x;
      const int64_t i = base + j * p.stride;
      int state = kMasked;
      Key key = 0;
      if (j < p.len) key = element_key<Key>(w, h, p.mask, i, &state);
      const Key top = static_cast<Key>(key >> shift);
      const bool in_bin = state == kAlive && top == prefix;
      int rank = 0, ties = 0;
      __syncthreads();
      Scan(tmp.scan).ExclusiveSum(in_bin ? 1 : 0, rank, ties);
      const bool del = state == kAlive && (top < prefix || (in_bin && (take_all || taken + rank < r)));
      taken += ties;
      if (del) {
        delete_entry(p.w, p.w_dtype, p.mask, i, p.write_weights, p.factor);
        acc += static_cast<double>(value_of_key(key));
        ++deleted;
        max_key = max(max_key, static_cast<unsigned long long>(key));
      }
    }
    __syncthreads();
    const double total = ReduceD(tmp.rd).Sum(acc);
    if (threadIdx.x == 0) p.seg_sum[s] = total;
    __syncthreads();
  }
  if (deleted) {
    atomicAdd(&p.counters[kSegDeletedNow], deleted);
    atomicMax(&p.counters[kSegMaxKey], max_key);
  }
  if (before) atomicAdd(&p.counters[kSegDeletedBefore], before);
  if (nonfinite) atomicAdd(&p.counters[kSegNonfinite], nonfinite);
}

// One thread per N:M group; ranks by (key, index) in O(m^2), fine for the
// small m of N:M patterns.
template <typename Key>
__global__ void nm_kernel(SegmentSelectParams p) {
  const Operand w{p.w, p.w_dtype}, h{p.h, p.h_dtype};
  unsigned long long deleted = 0, before = 0, nonfinite = 0, max_key = 0;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < p.count;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t base = seg_base(p, s);
    long long masked = 0, alive = 0;
    for (int64_t j = 0; j < p.len; ++j) {
      int state;
      element_key<Key>(w, h, p.mask, base + j * p.stride, &state);
      masked += state == kMasked;
      alive += state == kAlive;
      nonfinite += state == kNonfinite;
    }
    before += masked;
    const long long want = p.target - masked;
    if (p.check_only) {
      if (want > alive) atomicMin(&p.counters[kSegShort], static_cast<unsigned long long>(s));
      continue;
    }
    double acc = 0.0;
    if (want > 0 && want <= alive) {
      // Decide every entry from the original masks first, then write:
      // deleting while ranking would change the ranks of later entries.
      // Chosen entries are marked 3 in the (byte) mask meanwhile; any
      // non-zero byte still reads as "kept" to element_key.
      for (int64_t j = 0; j < p.len; ++j) {
        int sj;
        const Key kj = element_key<Key>(w, h, p.mask, base + j * p.stride, &sj);
        if (sj != kAlive) continue;
        long long rank = 0;
        for (int64_t q = 0; q < p.len; ++q) {
          int sq;
          const Key kq = element_key<Key>(w, h, p.mask, base + q * p.stride, &sq);
          rank += sq == kAlive && (kq < kj || (kq == kj && q < j));
        }
        if (rank < want) p.mask[base + j * p.stride] = 3;
      }
      for (int64_t j = 0; j < p.len; ++j) {
        const int64_t i = base + j * p.stride;
        if (p.mask[i] == 3) {
          p.mask[i] = 1;
          int sj;
          const Key kj = element_key<Key>(w, h, p.mask, i, &sj);
          delete_entry(p.w, p.w_dtype, p.mask, i, p.write_weights, p.factor);
          acc += static_cast<double>(value_of_key(kj));
          ++deleted;
          max_key = max(max_key, static_cast<unsigned long long>(kj));
        }
      }
    }
    p.seg_sum[s] = acc;
  }
  if (deleted) {
    atomicAdd(&p.counters[kSegDeletedNow], deleted);
    atomicMax(&p.counters[kSegMaxKey], max_key);
  }
  if (before) atomicAdd(&p.counters[kSegDeletedBefore], before);
  if (nonfinite) atomicAdd(&p.counters[kSegNonfinite], nonfinite);
}

__global__ void find_nonfinite_kernel(Operand w, Operand h, const uint8_t* mask, int64_t n, unsigned long long* out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (mask[i] && !(finite_at(w.data, w.dtype, i) && finite_at(h.data, h.dtype, i)))
      atomicMin(out, static_cast<unsigned long long>(i));
  }
}

bool wide_pair(const SegmentSelectParams& p) { return p.w_dtype == Dtype::F64 || p.h_dtype == Dtype::F64; }

}  // namespace

cudaError_t launch_row_select(const SegmentSelectParams& p, cudaStream_t stream) {
  if (p.count == 0 || p.len == 0) return cudaSuccess;
  const int grid = grid_for(p.count, 1);
  if (wide_pair(p))
    row_kernel<uint64_t><<<grid, kThreads, 0, stream>>>(p);
  else
    row_kernel<uint32_t><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_nm_select(const SegmentSelectParams& p, cudaStream_t stream) {
  if (p.count == 0 || p.len == 0) return cudaSuccess;
  const int grid = grid_for(p.count, kThreads);
  if (wide_pair(p))
    nm_kernel<uint64_t><<<grid, kThreads, 0, stream>>>(p);
  else
    nm_kernel<uint32_t><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_find_nonfinite(const void* w, Dtype w_dtype, const void* h, Dtype h_dtype, const uint8_t* mask,
                                  int64_t n, unsigned long long* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  find_nonfinite_kernel<<<grid_for(n, kThreads * 4), kThreads, 0, stream>>>(Operand{w, w_dtype}, Operand{h, h_dtype},
                                                                            mask, n, out);
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace obd
