// CUDA global selection: the k lowest saliencies over many tensors as one pool,
// by a multi-tensor radix select on the bit pattern of s = h w^2 / 2, computed
// on the fly (never materialised, tensors never concatenated).
//
// The algorithm is the CPU one (csrc/cpu/global_select.cpp) with 12-bit
// digits, whose histograms fit in shared memory:
//   hist pass (top digit; counts; NaN check) -> pick bin on the device ->
//   [more hist passes while the bin is too big to buffer] ->
//   one fused write pass: entries below the prefix are deleted; entries in the
//   prefix's bin are either all deleted, buffered as candidates (then sorted
//   by (key, position) with cub and the first r deleted), or, when the prefix
//   is the whole key, taken in position order with per-chunk quotas from a
//   counting pass and an exclusive scan.
// Positions are 64-bit (tensor base + flat index), so the pool can exceed 2^32
// entries. All reductions are either exact integer atomics or fixed-order
// (block reduce per chunk, then cub::DeviceReduce), so results are
// deterministic.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_reduce.cuh>
#include <cub/device/device_scan.cuh>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "global_select.cuh"

namespace obd {
namespace kernels {
namespace {

constexpr int kDigit = 12;
constexpr int kBins = 1 << kDigit;
constexpr int64_t kChunk = 1 << 14;
constexpr double kCandidateBytesPerElement = 0.05;
constexpr int64_t kMinCandidates = 1 << 16;

enum Mode : int { kTakeAll = 0, kCandidates = 1, kTies = 2 };

struct ChunkDesc {
  int32_t member;
  int64_t begin, end;
};

// Device-resident state of the radix select.
struct State {
  unsigned long long masked;
  unsigned long long nonfinite;
  unsigned long long bad_pos;   // first non-finite position (min), ~0 if none
  unsigned long long prefix;
  long long r;                  // entries still to take among prefix matches
  long long count;              // entries matching the prefix
  int pbits;
  int pad;
  unsigned long long ncands;
  unsigned long long deleted;
  unsigned long long max_key;
};

template <typename Key>
__device__ __forceinline__ bool prefix_matches(Key key, Key prefix, int pbits) {
  constexpr int kb = 8 * sizeof(Key);
  return pbits == 0 || (key >> (kb - pbits)) == prefix;
}

template <typename Key>
__global__ void __launch_bounds__(kThreads) hist_kernel(const PoolMemberDesc* members, const ChunkDesc* chunks,
                                                        int64_t n_chunks, State* st, unsigned long long* hist,
                                                        bool first) {
  constexpr int kb = 8 * sizeof(Key);
  __shared__ unsigned int sh[kBins];
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) sh[b] = 0u;
  __syncthreads();
  const int pbits = st->pbits;
  const Key prefix = static_cast<Key>(st->prefix);
  const int digit = min(kDigit, kb - pbits);
  const int shift = kb - pbits - digit;
  const Key dmask = static_cast<Key>((1u << digit) - 1u);
  unsigned long long masked = 0, nonfinite = 0, bad = ~0ull;
  for (int64_t c = blockIdx.x; c < n_chunks; c += gridDim.x) {
    const ChunkDesc ch = chunks[c];
    const PoolMemberDesc m = members[ch.member];
    for (int64_t i = ch.begin + threadIdx.x; i < ch.end; i += blockDim.x) {
      int state;
      const Key key = element_key<Key>(Operand{m.w, m.w_dtype}, Operand{m.h, m.h_dtype}, m.mask, i, &state);
      if (state == kAlive) {
        if (prefix_matches(key, prefix, pbits)) atomicAdd(&sh[(key >> shift) & dmask], 1u);
      } else if (first) {
        if (state == kMasked) {
          ++masked;
        } else {
          ++nonfinite;
          bad = min(bad, static_cast<unsigned long long>(m.base + i));
        }
      }
    }
  }
  __syncthreads();
  for (int b = threadIdx.x; b < kBins; b += blockDim.x)
    if (sh[b]) atomicAdd(&hist[b], static_cast<unsigned long long>(sh[b]));
  if (first) {
    if (masked) atomicAdd(&st->masked, masked);
    if (nonfinite) atomicAdd(&st->nonfinite, nonfinite);
    if (bad != ~0ull) atomicMin(&st->bad_pos, bad);
  }
}

// One block of kBins/4 threads: find the bin holding the r-th entry, narrow the prefix.
template <typename Key>
__global__ void pick_kernel(State* st, const unsigned long long* hist) {
  constexpr int kb = 8 * sizeof(Key);
  constexpr int kPer = 4;
  using Scan = cub::BlockScan<unsigned long long, kBins / kPer>;
  __shared__ typename Scan::TempStorage tmp;
  // Read everything before the scan's barrier: one thread rewrites st after it.
  const int digit = min(kDigit, kb - st->pbits);
  const int bins = 1 << digit;
  const unsigned long long r = static_cast<unsigned long long>(st->r);
  unsigned long long local[kPer];
  unsigned long long sum = 0;
  for (int j = 0; j < kPer; ++j) {
    const int b = threadIdx.x * kPer + j;
    local[j] = b < bins ? hist[b] : 0ull;
    sum += local[j];
  }
  unsigned long long before;
  Scan(tmp).ExclusiveSum(sum, before);
  // Exactly one thread's range holds the r-th entry (1 <= r <= total).
  if (before < r && before + sum >= r) {
    unsigned long long below = before;
    for (int j = 0; j < kPer; ++j) {
      if (below + local[j] >= r) {
        const int b = threadIdx.x * kPer + j;
        st->r = static_cast<long long>(r - below);
        st->count = static_cast<long long>(local[j]);
        st->prefix = (st->prefix << digit) | static_cast<unsigned long long>(b);
        st->pbits += digit;
        break;
      }
      below += local[j];
    }
  }
}

template <typename Key>
__global__ void tie_count_kernel(const PoolMemberDesc* members, const ChunkDesc* chunks, int64_t n_chunks,
                                 const State* st, long long* counts) {
  using Reduce = cub::BlockReduce<long long, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const Key key_wanted = static_cast<Key>(st->prefix);
  for (int64_t c = blockIdx.x; c < n_chunks; c += gridDim.x) {
    const ChunkDesc ch = chunks[c];
    const PoolMemberDesc m = members[ch.member];
    long long n = 0;
    for (int64_t i = ch.begin + threadIdx.x; i < ch.end; i += blockDim.x) {
      int state;
      const Key key = element_key<Key>(Operand{m.w, m.w_dtype}, Operand{m.h, m.h_dtype}, m.mask, i, &state);
      n += (state == kAlive && key == key_wanted);
    }
    const long long total = Reduce(tmp).Sum(n);
    if (threadIdx.x == 0) counts[c] = total;
    __syncthreads();
  }
}

// quota[c] holds the exclusive prefix of counts on entry, the chunk's share of r on exit.
__global__ void quota_kernel(const State* st, const long long* counts, long long* quota, int64_t n_chunks) {
  const long long r = st->r;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < n_chunks;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const long long q = r - quota[c];
    quota[c] = q < 0 ? 0 : (q > counts[c] ? counts[c] : q);
  }
}

template <typename Key>
__global__ void __launch_bounds__(kThreads) write_kernel(const PoolMemberDesc* members, const ChunkDesc* chunks,
                                                         int64_t n_chunks, State* st, int mode,
                                                         const long long* quota, unsigned long long* cand_keys,
                                                         unsigned long long* cand_pos, double* chunk_sum,
                                                         bool write_weights, double factor) {
  constexpr int kb = 8 * sizeof(Key);
  using Scan = cub::BlockScan<int, kThreads>;
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ union {
    typename Scan::TempStorage scan;
    typename Reduce::TempStorage reduce;
  } tmp;
  const int pbits = st->pbits;
  const int shift = kb - pbits;  // pbits >= kDigit here, so shift < kb
  const Key prefix = static_cast<Key>(st->prefix);
  unsigned long long deleted = 0, max_key = 0;
  for (int64_t c = blockIdx.x; c < n_chunks; c += gridDim.x) {
    const ChunkDesc ch = chunks[c];
    const PoolMemberDesc m = members[ch.member];
    const long long left = mode == kTies ? quota[c] : 0;
    long long taken = 0;  // equal keys seen so far in this chunk (block-uniform)
    double acc = 0.0;
    // Every thread runs the same number of tiles: the scan needs the whole block.
    for (int64_t base = ch.begin; base < ch.end; base += blockDim.x) {
      const int64_t i = base + threadIdx.x;
      int state = kMasked;
      Key key = 0;
      if (i < ch.end) key = element_key<Key>(Operand{m.w, m.w_dtype}, Operand{m.h, m.h_dtype}, m.mask, i, &state);
      const bool alive = state == kAlive;
      const Key top = static_cast<Key>(key >> shift);
      const bool in_bin = alive && top == prefix;
      int rank = 0, ties = 0;
      if (mode == kTies) {
        Scan(tmp.scan).ExclusiveSum(in_bin ? 1 : 0, rank, ties);
        __syncthreads();
      }
      bool del = alive && top < prefix;
      if (in_bin) {
        if (mode == kTakeAll) {
          del = true;
        } else if (mode == kTies) {
          del = taken + rank < left;
        } else {
          const unsigned long long slot = atomicAdd(&st->ncands, 1ull);
          cand_keys[slot] = static_cast<unsigned long long>(key);
          cand_pos[slot] = static_cast<unsigned long long>(m.base + i);
        }
      }
      taken += ties;
      if (del) {
        delete_entry(m.w, m.w_dtype, m.mask, i, write_weights, factor);
        acc += static_cast<double>(value_of_key(key));
        ++deleted;
        max_key = max(max_key, static_cast<unsigned long long>(key));
      }
    }
    const double total = Reduce(tmp.reduce).Sum(acc);
    if (threadIdx.x == 0) chunk_sum[c] = total;
    __syncthreads();
  }
  if (deleted) {
    atomicAdd(&st->deleted, deleted);
    atomicMax(&st->max_key, max_key);
  }
}

// Deletes the first r sorted candidates; vals[j] receives each one's saliency.
template <typename Key>
__global__ void resolve_kernel(const PoolMemberDesc* members, int32_t n_members, const unsigned long long* keys,
                               const unsigned long long* pos, int64_t r, double* vals, State* st,
                               bool write_weights, double factor) {
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < r;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const long long p = static_cast<long long>(pos[j]);
    int lo = 0, hi = n_members - 1;  // last member with base <= p
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (members[mid].base <= p) lo = mid; else hi = mid - 1;
    }
    const PoolMemberDesc m = members[lo];
    delete_entry(m.w, m.w_dtype, m.mask, p - m.base, write_weights, factor);
    const Key key = static_cast<Key>(keys[j]);
    vals[j] = static_cast<double>(value_of_key(key));
    if (j == r - 1) {
      atomicAdd(&st->deleted, static_cast<unsigned long long>(r));
      atomicMax(&st->max_key, keys[j]);
    }
  }
}

// ---------------------------------------------------------------------------
// Host side: workspace layout and the pass loop.
// ---------------------------------------------------------------------------

struct Layout {
  size_t members, chunks, hist, state, chunk_sum, counts, quota, ckeys, ckeys_alt, cpos, cpos_alt, cvals, sums,
      temp, temp_bytes, total;
  int64_t n_chunks, cap;
};

size_t align_up(size_t x) { return (x + 255) & ~size_t(255); }

int64_t count_chunks(const GlobalSelectParams& p) {
  int64_t n = 0;
  for (int32_t i = 0; i < p.n_members; ++i) n += (p.members[i].n + kChunk - 1) / kChunk;
  return n;
}

int64_t pool_size(const GlobalSelectParams& p) {
  int64_t n = 0;
  for (int32_t i = 0; i < p.n_members; ++i) n += p.members[i].n;
  return n;
}

Layout plan(const GlobalSelectParams& p) {
  Layout l{};
  l.n_chunks = count_chunks(p);
  const int64_t n = pool_size(p);
  // 40 bytes per candidate: key, position, their sort buffers, saliency.
  l.cap = std::max<int64_t>(kMinCandidates, static_cast<int64_t>(kCandidateBytesPerElement * n / 40.0));
  // Test hook, as on the CPU: OBD_EXT_CANDIDATE_CAP shrinks the buffer so
  // that small inputs exercise the refinement passes and the tie quotas.
  if (const char* env = std::getenv("OBD_EXT_CANDIDATE_CAP")) l.cap = std::max<int64_t>(1, std::atoll(env));
  size_t off = 0;
  auto take = [&](size_t bytes) {
    const size_t at = off;
    off += align_up(bytes);
    return at;
  };
  l.members = take(sizeof(PoolMemberDesc) * std::max<int32_t>(p.n_members, 1));
  l.chunks = take(sizeof(ChunkDesc) * std::max<int64_t>(l.n_chunks, 1));
  l.hist = take(sizeof(unsigned long long) * kBins);
  l.state = take(sizeof(State));
  l.chunk_sum = take(sizeof(double) * std::max<int64_t>(l.n_chunks, 1));
  l.counts = take(sizeof(long long) * std::max<int64_t>(l.n_chunks, 1));
  l.quota = take(sizeof(long long) * std::max<int64_t>(l.n_chunks, 1));
  l.ckeys = take(sizeof(unsigned long long) * l.cap);
  l.ckeys_alt = take(sizeof(unsigned long long) * l.cap);
  l.cpos = take(sizeof(unsigned long long) * l.cap);
  l.cpos_alt = take(sizeof(unsigned long long) * l.cap);
  l.cvals = take(sizeof(double) * l.cap);
  l.sums = take(sizeof(double) * 2);
  // cub temporary storage: the largest of the three algorithms used.
  size_t sort_bytes = 0, reduce_bytes = 0, scan_bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, static_cast<unsigned long long*>(nullptr),
                                  static_cast<unsigned long long*>(nullptr), static_cast<unsigned long long*>(nullptr),
                                  static_cast<unsigned long long*>(nullptr), l.cap);
  cub::DeviceReduce::Sum(nullptr, reduce_bytes, static_cast<double*>(nullptr), static_cast<double*>(nullptr),
                         std::max<int64_t>(l.n_chunks, l.cap));
  cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, static_cast<long long*>(nullptr),
                                static_cast<long long*>(nullptr), std::max<int64_t>(l.n_chunks, 1));
  l.temp_bytes = std::max(sort_bytes, std::max(reduce_bytes, scan_bytes));
  l.temp = take(l.temp_bytes);
  l.total = off;
  return l;
}

#define OBD_TRY(expr)                 \
  do {                                \
    cudaError_t err_ = (expr);        \
    if (err_ != cudaSuccess) return err_; \
  } while (0)

template <typename Key>
cudaError_t run(const GlobalSelectParams& p, char* ws, const Layout& l, cudaStream_t stream,
                GlobalSelectResult* res) {
  constexpr int kb = 8 * sizeof(Key);
  auto* d_members = reinterpret_cast<PoolMemberDesc*>(ws + l.members);
  auto* d_chunks = reinterpret_cast<ChunkDesc*>(ws + l.chunks);
  auto* d_hist = reinterpret_cast<unsigned long long*>(ws + l.hist);
  auto* d_state = reinterpret_cast<State*>(ws + l.state);
  auto* d_chunk_sum = reinterpret_cast<double*>(ws + l.chunk_sum);
  auto* d_counts = reinterpret_cast<long long*>(ws + l.counts);
  auto* d_quota = reinterpret_cast<long long*>(ws + l.quota);
  auto* d_ckeys = reinterpret_cast<unsigned long long*>(ws + l.ckeys);
  auto* d_ckeys_alt = reinterpret_cast<unsigned long long*>(ws + l.ckeys_alt);
  auto* d_cpos = reinterpret_cast<unsigned long long*>(ws + l.cpos);
  auto* d_cpos_alt = reinterpret_cast<unsigned long long*>(ws + l.cpos_alt);
  auto* d_cvals = reinterpret_cast<double*>(ws + l.cvals);
  auto* d_sums = reinterpret_cast<double*>(ws + l.sums);
  void* d_temp = ws + l.temp;

  std::vector<ChunkDesc> chunks;
  chunks.reserve(l.n_chunks);
  for (int32_t mi = 0; mi < p.n_members; ++mi)
    for (int64_t b = 0; b < p.members[mi].n; b += kChunk) chunks.push_back({mi, b, std::min(p.members[mi].n, b + kChunk)});
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  const int64_t total = pool_size(p);

  int device = 0, sms = 1;
  OBD_TRY(cudaGetDevice(&device));
  OBD_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int grid = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_chunks, int64_t{sms} * 8)));

  OBD_TRY(cudaMemcpyAsync(d_members, p.members, sizeof(PoolMemberDesc) * p.n_members, cudaMemcpyHostToDevice, stream));
  if (n_chunks)
    OBD_TRY(cudaMemcpyAsync(d_chunks, chunks.data(), sizeof(ChunkDesc) * n_chunks, cudaMemcpyHostToDevice, stream));
  State st{};
  st.bad_pos = ~0ull;
  OBD_TRY(cudaMemcpyAsync(d_state, &st, sizeof(State), cudaMemcpyHostToDevice, stream));
  OBD_TRY(cudaMemsetAsync(d_hist, 0, sizeof(unsigned long long) * kBins, stream));

  auto read_state = [&]() -> cudaError_t {
    OBD_TRY(cudaMemcpyAsync(&st, d_state, sizeof(State), cudaMemcpyDeviceToHost, stream));
    return cudaStreamSynchronize(stream);
  };

  // Pass 1: counts, NaN check, top digit.
  if (n_chunks) hist_kernel<Key><<<grid, kThreads, 0, stream>>>(d_members, d_chunks, n_chunks, d_state, d_hist, true);
  OBD_TRY(cudaGetLastError());
  OBD_TRY(read_state());
  res->deleted_before = static_cast<int64_t>(st.masked);
  res->nonfinite = static_cast<int64_t>(st.nonfinite);
  if (st.nonfinite && !p.skip_nonfinite) {
    const int64_t pos = static_cast<int64_t>(st.bad_pos);
    for (int32_t mi = p.n_members - 1; mi >= 0; --mi)
      if (p.members[mi].base <= pos) {
        res->bad_member = mi;
        res->bad_offset = pos - p.members[mi].base;
        break;
      }
    return cudaSuccess;
  }
  res->prunable = total - res->nonfinite;
  if (p.k < 0 || p.k > res->prunable) {
    res->k_out_of_range = true;
    return cudaSuccess;
  }
  const int64_t want = p.k - res->deleted_before;
  if (want <= 0) return cudaSuccess;

  st.r = want;
  OBD_TRY(cudaMemcpyAsync(&d_state->r, &st.r, sizeof(st.r), cudaMemcpyHostToDevice, stream));
  while (true) {
    pick_kernel<Key><<<1, kBins / 4, 0, stream>>>(d_state, d_hist);
    OBD_TRY(cudaGetLastError());
    OBD_TRY(read_state());
    if (st.r == st.count || st.pbits == kb || st.count <= l.cap) break;
    OBD_TRY(cudaMemsetAsync(d_hist, 0, sizeof(unsigned long long) * kBins, stream));
    hist_kernel<Key><<<grid, kThreads, 0, stream>>>(d_members, d_chunks, n_chunks, d_state, d_hist, false);
    OBD_TRY(cudaGetLastError());
  }
  const int mode = st.r == st.count ? kTakeAll : (st.pbits == kb ? kTies : kCandidates);
  if (mode == kTies) {
    tie_count_kernel<Key><<<grid, kThreads, 0, stream>>>(d_members, d_chunks, n_chunks, d_state, d_counts);
    OBD_TRY(cudaGetLastError());
    size_t bytes = l.temp_bytes;
    OBD_TRY(cub::DeviceScan::ExclusiveSum(d_temp, bytes, d_counts, d_quota, n_chunks, stream));
    quota_kernel<<<grid_for(n_chunks, kThreads), kThreads, 0, stream>>>(d_state, d_counts, d_quota, n_chunks);
    OBD_TRY(cudaGetLastError());
  }
  write_kernel<Key><<<grid, kThreads, 0, stream>>>(d_members, d_chunks, n_chunks, d_state, mode, d_quota, d_ckeys,
                                                   d_cpos, d_chunk_sum, p.write_weights, p.factor);
  OBD_TRY(cudaGetLastError());
  size_t bytes = l.temp_bytes;
  OBD_TRY(cub::DeviceReduce::Sum(d_temp, bytes, d_chunk_sum, d_sums, n_chunks, stream));
  if (mode == kCandidates) {
    const int64_t nc = st.count;
    // Stable LSD radix sorts: by position, then by key -> (key, position) order.
    bytes = l.temp_bytes;
    OBD_TRY(cub::DeviceRadixSort::SortPairs(d_temp, bytes, d_cpos, d_cpos_alt, d_ckeys, d_ckeys_alt, nc, 0, 64, stream));
    bytes = l.temp_bytes;
    OBD_TRY(cub::DeviceRadixSort::SortPairs(d_temp, bytes, d_ckeys_alt, d_ckeys, d_cpos_alt, d_cpos, nc, 0, kb, stream));
    resolve_kernel<Key><<<grid_for(st.r, kThreads), kThreads, 0, stream>>>(d_members, p.n_members, d_ckeys, d_cpos,
                                                                           st.r, d_cvals, d_state, p.write_weights,
                                                                           p.factor);
    OBD_TRY(cudaGetLastError());
    bytes = l.temp_bytes;
    OBD_TRY(cub::DeviceReduce::Sum(d_temp, bytes, d_cvals, d_sums + 1, st.r, stream));
  }
  double sums[2] = {0.0, 0.0};
  OBD_TRY(cudaMemcpyAsync(sums, d_sums, sizeof(double) * (mode == kCandidates ? 2 : 1), cudaMemcpyDeviceToHost, stream));
  OBD_TRY(read_state());
  res->deleted_now = static_cast<int64_t>(st.deleted);
  res->saliency_sum = sums[0] + sums[1];
  res->max_deleted = static_cast<double>(value_of_key(static_cast<Key>(st.max_key)));
  return cudaSuccess;
}

}  // namespace

size_t global_select_workspace_bytes(const GlobalSelectParams& p) { return plan(p).total; }

cudaError_t run_global_select(const GlobalSelectParams& p, void* workspace, size_t workspace_bytes,
                              cudaStream_t stream, GlobalSelectResult* result) {
  const Layout l = plan(p);
  if (workspace_bytes < l.total) return cudaErrorInvalidValue;
  *result = GlobalSelectResult{};
  char* ws = static_cast<char*>(workspace);
  return p.wide_keys ? run<uint64_t>(p, ws, l, stream, result) : run<uint32_t>(p, ws, l, stream, result);
}

}  // namespace kernels
}  // namespace obd
