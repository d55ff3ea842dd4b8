// CPU global selection: the k lowest saliencies over many tensors as one pool,
// by a multi-tensor radix select on the saliency's bit pattern.
//
// Saliencies are never materialised and the tensors never concatenated: every
// pass recomputes s = h w^2 / 2 on the fly from (w, h) and maps it to an
// order-preserving unsigned key (csrc/kernels/common.h).
//
//   1. histogram of the top 16 key bits (plus the counts and NaN checks);
//      the bin holding the k-th key becomes the prefix;
//   2. while the prefix's bin is too big to buffer, histogram the next 16 bits
//      among the entries matching the prefix (adversarial inputs only: all
//      values equal, values a few ulps apart);
//   3. one fused pass writes masks (and scales weights) for every entry below
//      the prefix, and either (a) buffers the entries of the prefix's bin as
//      candidates, sorted afterwards by (key, tensor, index) to take exactly
//      the r still needed, or (b) when the prefix is the whole key, takes the
//      first r equal keys in (tensor, index) order using per-chunk quotas from
//      a counting pass.
//
// Typical inputs need two passes over the data. Extra memory is the
// histograms (512 KiB per thread), the chunk table, and the candidate buffer,
// capped at kCandidateBytesPerElement bytes per element: O(histogram +
// candidates), never O(N).
//
// Determinism: the work is cut into fixed chunks of kChunk elements (never
// spanning tensors); counts are exact integers; per-chunk partial sums are
// combined in chunk order; candidates are sorted. Results are identical for
// any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <vector>

#include "../checks.h"
#include "../select_common.h"
#include "dispatch.h"

namespace obd {
namespace cpu {
namespace {

constexpr int64_t kChunk = 1 << 16;
constexpr int kDigit = kCpuDigitBits;
constexpr int64_t kBins = int64_t{1} << kDigit;
// Candidate buffer budget, in bytes per pool element (the memory
// target is 0.1 bytes per parameter in all).
constexpr double kCandidateBytesPerElement = 0.05;
constexpr int64_t kMinCandidates = 1 << 16;

enum : int { kAlive = 0, kMasked = 1, kNonfinite = 2 };

// Test hook: OBD_EXT_CANDIDATE_CAP overrides the candidate buffer size so that
// small inputs exercise every path (refinement passes, the tie quotas).
int64_t candidate_cap(int64_t fallback) {
  const char* env = std::getenv("OBD_EXT_CANDIDATE_CAP");
  return env ? std::max<int64_t>(0, std::atoll(env)) : fallback;
}

struct NoWeight {};

template <typename T>
inline bool finite(T v) {
  return std::isfinite(static_cast<float>(v));
}
inline bool finite(double v) { return std::isfinite(v); }

struct Chunk {
  int32_t member;
  int64_t begin, end;
};

template <typename Key>
struct Candidate {
  Key key;
  int32_t member;
  int64_t offset;
  bool operator<(const Candidate& o) const {
    if (key != o.key) return key < o.key;
    if (member != o.member) return member < o.member;
    return offset < o.offset;
  }
};

// Per-chunk visitor: calls f(i, state, key, s) for every element of the
// chunk, with s the saliency (or score) in precision S.
template <typename Key, typename W, typename H, typename F>
inline void visit_chunk(const PoolMember& p, const Chunk& c, bool skip_nonfinite, F&& f) {
  using S = std::conditional_t<std::is_same_v<W, NoWeight>, std::conditional_t<std::is_same_v<H, double>, double, float>,
                               acc_t<W, H>>;
  const H* hp = p.h.const_data_ptr<H>();
  const uint8_t* mp = reinterpret_cast<const uint8_t*>(p.mask.const_data_ptr<bool>());
  const W* wp = nullptr;
  if constexpr (!std::is_same_v<W, NoWeight>) wp = p.w.const_data_ptr<W>();
  for (int64_t i = c.begin; i < c.end; ++i) {
    if (!mp[i]) {
      f(i, kMasked, Key(0), S(0));
      continue;
    }
    S s;
    bool ok;
    if constexpr (std::is_same_v<W, NoWeight>) {
      s = static_cast<S>(hp[i]);
      ok = finite(hp[i]);
    } else {
      ok = finite(wp[i]) && finite(hp[i]);
      s = saliency_of<S>(static_cast<S>(wp[i]), static_cast<S>(hp[i]));
    }
    (void)skip_nonfinite;
    if (!ok) {
      f(i, kNonfinite, Key(0), S(0));
      continue;
    }
    f(i, kAlive, KeyOf<Key>::get(s), s);
  }
}

template <typename Key>
class GlobalSelect {
 public:
  static constexpr int kKeyBits = 8 * sizeof(Key);

  GlobalSelect(std::vector<PoolMember>& pool, bool skip_nonfinite, const c10::optional<double>& factor)
      : pool_(pool), skip_(skip_nonfinite), factor_(factor) {
    for (size_t m = 0; m < pool_.size(); ++m) {
      const int64_t n = pool_[m].numel();
      for (int64_t b = 0; b < n; b += kChunk)
        chunks_.push_back({static_cast<int32_t>(m), b, std::min(n, b + kChunk)});
      total_ += n;
    }
  }

  at::Tensor run(int64_t k, const at::Tensor& stats_like) {
    // Pass 1: counts, NaN check and the histogram of the top digit.
    std::vector<uint64_t> hist = histogram(0, 0, /*first=*/true);
    if (bad_member_ >= 0 && !skip_) {
      const auto& p = pool_[bad_member_];
      throw_nonfinite("global_select_", "weights", "curvatures", bad_member_, p.w, p.h, bad_offset_);
    }
    check_global_k("global_select_", k, total_, skip_ ? nonfinite_ : 0);
    auto stats = at::zeros({kNumStats}, stats_like.options().dtype(at::kDouble).device(at::kCPU));
    double* st = stats.mutable_data_ptr<double>();
    st[kStatDeletedBefore] = static_cast<double>(masked_);
    st[kStatSkippedNonfinite] = skip_ ? static_cast<double>(nonfinite_) : 0.0;
    st[kStatMaxDeleted] = std::numeric_limits<double>::quiet_NaN();
    const int64_t want = k - masked_;
    if (want <= 0) return stats;

    // Narrow the prefix 16 bits at a time until its bin can be buffered, is
    // taken whole, or is the full key.
    Key prefix = 0;
    int pbits = 0;
    int64_t r = want;  // entries still to take among those matching the prefix
    int64_t count = 0; // entries matching the prefix
    const int64_t cap = candidate_cap(
        std::max<int64_t>(kMinCandidates, static_cast<int64_t>(kCandidateBytesPerElement * total_ / sizeof(Candidate<Key>))));
    while (true) {
      if (pbits > 0) hist = histogram(pbits, prefix, false);
      int64_t below = 0, b = 0;
      for (; b < kBins; ++b) {
        const int64_t c = static_cast<int64_t>(hist[b]);
        if (below + c >= r) break;
        below += c;
      }
      TORCH_INTERNAL_ASSERT(b < kBins, "obd_ext.global_select_: radix select lost count");
      r -= below;
      count = static_cast<int64_t>(hist[b]);
      prefix = static_cast<Key>((prefix << kDigit) | static_cast<Key>(b));
      pbits += kDigit;
      if (r == count || pbits == kKeyBits || count <= cap) break;
    }

    Mode mode = r == count ? Mode::kTakeAll : (pbits == kKeyBits ? Mode::kTies : Mode::kCandidates);
    std::vector<int64_t> quota;
    if (mode == Mode::kTies) quota = tie_quotas(prefix, r);
    std::vector<Candidate<Key>> cands(mode == Mode::kCandidates ? count : 0);
    const Outcome out = write_pass(prefix, pbits, mode, quota, cands);
    int64_t deleted = out.deleted;
    double sum = out.sum;
    Key max_key = out.max_key;
    bool any = out.any;
    if (mode == Mode::kCandidates) {
      TORCH_INTERNAL_ASSERT(out.ncands == count, "obd_ext.global_select_: candidate count mismatch");
      std::nth_element(cands.begin(), cands.begin() + (r - 1), cands.end());
      std::sort(cands.begin(), cands.begin() + r);
      for (int64_t j = 0; j < r; ++j) {
        const auto& c = cands[j];
        delete_entry(pool_[c.member], c.offset);
        sum += static_cast<double>(value_of_key(c.key));
      }
      deleted += r;
      if (r > 0) {
        max_key = any ? std::max(max_key, cands[r - 1].key) : cands[r - 1].key;
        any = true;
      }
    }
    TORCH_INTERNAL_ASSERT(deleted == want, "obd_ext.global_select_: deleted ", deleted, " entries, wanted ", want);
    st[kStatDeletedNow] = static_cast<double>(deleted);
    st[kStatSaliencySum] = sum;
    if (any) st[kStatMaxDeleted] = static_cast<double>(value_of_key(max_key));
    return stats;
  }

 private:
  enum class Mode { kTakeAll, kCandidates, kTies };

  struct Outcome {
    int64_t deleted = 0;
    int64_t ncands = 0;
    double sum = 0.0;
    Key max_key = 0;
    bool any = false;
  };

  // Calls f<Key>(i, state, key, s) over the chunk with the member's dtypes.
  template <typename F>
  void for_chunk(const Chunk& c, F&& f) {
    const PoolMember& p = pool_[c.member];
    const at::ScalarType hs = p.h.scalar_type();
    if (!p.w.defined()) {
      dispatch_float(hs, [&](auto ht) {
        using H = typename decltype(ht)::type;
        visit_chunk<Key, NoWeight, H>(p, c, skip_, f);
      });
    } else {
      dispatch_pair(p.w.scalar_type(), hs, [&](auto wt, auto ht) {
        using W = typename decltype(wt)::type;
        using H = typename decltype(ht)::type;
        visit_chunk<Key, W, H>(p, c, skip_, f);
      });
    }
  }

  static bool matches(Key key, Key prefix, int pbits) {
    return pbits == 0 || (key >> (kKeyBits - pbits)) == prefix;
  }

  std::vector<uint64_t> histogram(int pbits, Key prefix, bool first) {
    std::vector<uint64_t> hist(kBins, 0);
    std::mutex mu;
    const int shift = kKeyBits - pbits - kDigit;
    at::parallel_for(0, static_cast<int64_t>(chunks_.size()), 1, [&](int64_t cb, int64_t ce) {
      std::vector<uint64_t> local(kBins, 0);
      int64_t masked = 0, nonfinite = 0, bad_chunk = -1, bad_offset = -1;
      for (int64_t ci = cb; ci < ce; ++ci) {
        const Chunk& c = chunks_[ci];
        for_chunk(c, [&](int64_t i, int state, Key key, auto) {
          if (state == kAlive) {
            if (matches(key, prefix, pbits)) ++local[(key >> shift) & (kBins - 1)];
          } else if (state == kMasked) {
            ++masked;
          } else {
            ++nonfinite;
            if (bad_chunk < 0) {
              bad_chunk = ci;
              bad_offset = i;
            }
          }
        });
      }
      std::lock_guard<std::mutex> lock(mu);
      for (int64_t b = 0; b < kBins; ++b) hist[b] += local[b];
      if (first) {
        masked_ += masked;
        nonfinite_ += nonfinite;
        // The first bad entry in (tensor, index) order, whichever thread saw it.
        if (bad_chunk >= 0 && (bad_chunk_ < 0 || bad_chunk < bad_chunk_)) {
          bad_chunk_ = bad_chunk;
          bad_member_ = chunks_[bad_chunk].member;
          bad_offset_ = bad_offset;
        }
      }
    });
    return hist;
  }

  // Per-chunk share of the r equal keys to take, in chunk (= tensor, index) order.
  std::vector<int64_t> tie_quotas(Key key, int64_t r) {
    const int64_t nc = static_cast<int64_t>(chunks_.size());
    std::vector<int64_t> cnt(nc, 0);
    at::parallel_for(0, nc, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t ci = cb; ci < ce; ++ci) {
        int64_t c = 0;
        for_chunk(chunks_[ci], [&](int64_t, int state, Key k, auto) { c += (state == kAlive && k == key); });
        cnt[ci] = c;
      }
    });
    int64_t before = 0;
    for (int64_t ci = 0; ci < nc; ++ci) {
      const int64_t c = cnt[ci];
      cnt[ci] = std::clamp<int64_t>(r - before, 0, c);
      before += c;
    }
    return cnt;
  }

  void delete_entry(PoolMember& p, int64_t i) {
    p.mask.mutable_data_ptr<bool>()[i] = false;
    if (!factor_.has_value() || !p.w.defined()) return;
    dispatch_float(p.w.scalar_type(), [&](auto wt) {
      using W = typename decltype(wt)::type;
      W* wp = p.w.mutable_data_ptr<W>();
      const double f = *factor_;
      // Write an exact zero (not -0.0) when deleting.
      wp[i] = f == 0.0 ? W(0) : static_cast<W>(static_cast<double>(wp[i]) * f);
    });
  }

  Outcome write_pass(Key prefix, int pbits, Mode mode, const std::vector<int64_t>& quota,
                     std::vector<Candidate<Key>>& cands) {
    const int64_t nc = static_cast<int64_t>(chunks_.size());
    const int shift = kKeyBits - pbits;
    std::vector<double> chunk_sum(nc, 0.0);
    std::atomic<int64_t> ncands{0};
    std::mutex mu;
    Outcome total;
    at::parallel_for(0, nc, 1, [&](int64_t cb, int64_t ce) {
      int64_t deleted = 0;
      Key max_key = 0;
      bool any = false;
      for (int64_t ci = cb; ci < ce; ++ci) {
        const Chunk& c = chunks_[ci];
        PoolMember& p = pool_[c.member];
        int64_t left = mode == Mode::kTies ? quota[ci] : 0;
        double sum = 0.0;
        for_chunk(c, [&](int64_t i, int state, Key key, auto s) {
          if (state != kAlive) return;
          const Key top = static_cast<Key>(key >> shift);
          bool del = top < prefix;
          if (top == prefix) {
            if (mode == Mode::kTakeAll) {
              del = true;
            } else if (mode == Mode::kTies) {
              del = left > 0;
              left -= del;
            } else {
              cands[ncands.fetch_add(1, std::memory_order_relaxed)] = {key, c.member, i};
            }
          }
          if (!del) return;
          delete_entry(p, i);
          sum += static_cast<double>(s);
          ++deleted;
          max_key = any ? std::max(max_key, key) : key;
          any = true;
        });
        chunk_sum[ci] = sum;
      }
      std::lock_guard<std::mutex> lock(mu);
      total.deleted += deleted;
      if (any) total.max_key = total.any ? std::max(total.max_key, max_key) : max_key;
      total.any = total.any || any;
    });
    for (int64_t ci = 0; ci < nc; ++ci) total.sum += chunk_sum[ci];
    total.ncands = ncands.load();
    return total;
  }

  std::vector<PoolMember>& pool_;
  bool skip_;
  c10::optional<double> factor_;
  std::vector<Chunk> chunks_;
  int64_t total_ = 0;
  int64_t masked_ = 0;
  int64_t nonfinite_ = 0;
  int64_t bad_chunk_ = -1;
  int64_t bad_member_ = -1;
  int64_t bad_offset_ = -1;
};

at::Tensor global_select_cpu(at::TensorList weights, at::TensorList curvatures, at::TensorList masks, int64_t k,
                             c10::optional<double> factor, bool skip_nonfinite) {
  auto pool = make_pool("global_select_", weights, curvatures, masks, factor);
  // 64-bit keys when any member's saliency is float64; float saliencies are
  // widened exactly, so the order is the same as in float.
  bool wide = false;
  for (const auto& p : pool)
    wide = wide || p.h.scalar_type() == at::kDouble || (p.w.defined() && p.w.scalar_type() == at::kDouble);
  const at::Tensor like = curvatures.empty() ? at::empty({0}) : curvatures[0];
  at::Tensor stats = wide ? GlobalSelect<uint64_t>(pool, skip_nonfinite, factor).run(k, like)
                          : GlobalSelect<uint32_t>(pool, skip_nonfinite, factor).run(k, like);
  write_back(pool, factor.has_value());
  return stats;
}

}  // namespace

TORCH_LIBRARY_IMPL(obd_ext, CPU, m) { m.impl("global_select_", &global_select_cpu); }

}  // namespace cpu
}  // namespace obd
