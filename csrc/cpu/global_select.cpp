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
#include <cstring>
#include <limits>
#include <memory>
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

// Elements are processed in blocks: one branch-free loop computes every key
// and state of a block (it vectorises), then each pass runs its own short
// loop over the block's arrays.
constexpr int kBlock = 1024;

template <typename Key>
struct Block {
  int64_t begin = 0;  // flat index of element 0 of the block
  int n = 0;
  alignas(64) Key key[kBlock];
  alignas(64) uint8_t state[kBlock];
};

template <typename Key, typename W, typename H>
inline void load_block(const W* wp, const H* hp, const uint8_t* mp, int64_t b, int n, Block<Key>& blk) {
  using S = std::conditional_t<std::is_same_v<W, NoWeight>, std::conditional_t<std::is_same_v<H, double>, double, float>,
                               acc_t<W, H>>;
  blk.begin = b;
  blk.n = n;
  for (int j = 0; j < n; ++j) {
    const S h = static_cast<S>(hp[b + j]);
    S s;
    bool ok;
    if constexpr (std::is_same_v<W, NoWeight>) {
      s = h;
      ok = finite_bits(h);
    } else {
      const S w = static_cast<S>(wp[b + j]);
      s = saliency_of<S>(w, h);
      ok = finite_bits(w) & finite_bits(h);
    }
    blk.key[j] = KeyOf<Key>::get(s);
    blk.state[j] = mp[b + j] ? (ok ? kAlive : kNonfinite) : kMasked;
  }
}

// The saliency of `key` if `keep`, else +0.0, selected on the bits (a
// multiplication by 0 would turn an infinite saliency into NaN).
template <typename Key>
inline auto masked_value(Key key, uint8_t keep) {
  auto v = value_of_key(key);
  Key bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits &= Key(0) - Key(keep);
  std::memcpy(&v, &bits, sizeof(bits));
  return v;
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

  // Calls f(block) for every block of the chunk, keys and states filled in
  // with the member's dtypes.
  template <typename F>
  void for_chunk(const Chunk& c, Block<Key>& blk, F&& f) {
    const PoolMember& p = pool_[c.member];
    const uint8_t* mp = reinterpret_cast<const uint8_t*>(p.mask.const_data_ptr<bool>());
    auto run = [&](const auto* wp, const auto* hp) {
      for (int64_t b = c.begin; b < c.end; b += kBlock) {
        load_block<Key>(wp, hp, mp, b, static_cast<int>(std::min<int64_t>(kBlock, c.end - b)), blk);
        f(blk);
      }
    };
    if (!p.w.defined()) {
      dispatch_float(p.h.scalar_type(), [&](auto ht) {
        using H = typename decltype(ht)::type;
        run(static_cast<const NoWeight*>(nullptr), p.h.const_data_ptr<H>());
      });
    } else {
      dispatch_pair(p.w.scalar_type(), p.h.scalar_type(), [&](auto wt, auto ht) {
        using W = typename decltype(wt)::type;
        using H = typename decltype(ht)::type;
        run(p.w.const_data_ptr<W>(), p.h.const_data_ptr<H>());
      });
    }
  }

  std::vector<uint64_t> histogram(int pbits, Key prefix, bool first) {
    std::vector<uint64_t> hist(kBins, 0);
    std::mutex mu;
    const int shift = kKeyBits - pbits - kDigit;
    // Entries outside the prefix add 0 to some bin: no branch to mispredict.
    const int pshift = pbits == 0 ? 0 : kKeyBits - pbits;
    const Key want_top = pbits == 0 ? Key(0) : prefix;
    const Key top_mask = pbits == 0 ? Key(0) : ~Key(0);
    at::parallel_for(0, static_cast<int64_t>(chunks_.size()), 1, [&](int64_t cb, int64_t ce) {
      // 32-bit counts (256 KiB: stays in L2), flushed before they could overflow.
      std::vector<uint32_t> local(kBins, 0);
      std::vector<uint64_t> wide(kBins, 0);
      auto blk = std::make_unique<Block<Key>>();
      int64_t masked = 0, nonfinite = 0, bad_chunk = -1, bad_offset = -1, since_flush = 0;
      auto flush = [&]() {
        for (int64_t b = 0; b < kBins; ++b) wide[b] += local[b];
        std::fill(local.begin(), local.end(), 0u);
        since_flush = 0;
      };
      for (int64_t ci = cb; ci < ce; ++ci) {
        const Chunk& c = chunks_[ci];
        if (since_flush + (c.end - c.begin) >= (int64_t{1} << 32) - 1) flush();
        since_flush += c.end - c.begin;
        for_chunk(c, *blk, [&](const Block<Key>& bl) {
          const int n = bl.n;
          const Key* __restrict key = bl.key;
          const uint8_t* __restrict state = bl.state;
          uint32_t* __restrict counts = local.data();
          for (int j = 0; j < n; ++j) {
            const bool hit = (state[j] == kAlive) & (((key[j] >> pshift) & top_mask) == want_top);
            counts[(key[j] >> shift) & (kBins - 1)] += hit;
          }
          int nm = 0, nn = 0;
          for (int j = 0; j < n; ++j) {
            nm += state[j] == kMasked;
            nn += state[j] == kNonfinite;
          }
          if (!first) return;
          masked += nm;
          nonfinite += nn;
          if (nn && bad_chunk < 0) {
            bad_chunk = ci;
            for (int j = 0; j < bl.n; ++j)
              if (bl.state[j] == kNonfinite) {
                bad_offset = bl.begin + j;
                break;
              }
          }
        });
      }
      flush();
      std::lock_guard<std::mutex> lock(mu);
      for (int64_t b = 0; b < kBins; ++b) hist[b] += wide[b];
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
      auto blk = std::make_unique<Block<Key>>();
      for (int64_t ci = cb; ci < ce; ++ci) {
        int64_t c = 0;
        for_chunk(chunks_[ci], *blk, [&](const Block<Key>& bl) {
          const int n = bl.n;
          for (int j = 0; j < n; ++j) c += (bl.state[j] == kAlive) & (bl.key[j] == key);
        });
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

  // Scales one deleted weight (the candidates and the factor != 0 variant).
  void scale_entry(PoolMember& p, int64_t i) {
    dispatch_float(p.w.scalar_type(), [&](auto wt) {
      using W = typename decltype(wt)::type;
      W* wp = p.w.mutable_data_ptr<W>();
      const double f = *factor_;
      // Write an exact zero (not -0.0) when deleting.
      wp[i] = f == 0.0 ? W(0) : static_cast<W>(static_cast<double>(wp[i]) * f);
    });
  }

  void delete_entry(PoolMember& p, int64_t i) {
    p.mask.mutable_data_ptr<bool>()[i] = false;
    if (factor_.has_value() && p.w.defined()) scale_entry(p, i);
  }

  // Applies a block's decisions: masks, and weights zeroed (branch-free on the
  // raw bits, so it vectorises) or scaled.
  void apply_block(PoolMember& p, const Block<Key>& bl, const uint8_t* del) {
    const int n = bl.n;
    uint8_t* __restrict mp = reinterpret_cast<uint8_t*>(p.mask.mutable_data_ptr<bool>()) + bl.begin;
    for (int j = 0; j < n; ++j) mp[j] &= static_cast<uint8_t>(!del[j]);
    if (!factor_.has_value() || !p.w.defined()) return;
    if (*factor_ == 0.0) {
      auto zero = [&](auto* __restrict wp) {
        for (int j = 0; j < n; ++j) wp[j] = del[j] ? 0 : wp[j];
      };
      const size_t es = p.w.element_size();
      char* base = static_cast<char*>(p.w.data_ptr()) + bl.begin * static_cast<int64_t>(es);
      if (es == 2) zero(reinterpret_cast<uint16_t*>(base));
      else if (es == 4) zero(reinterpret_cast<uint32_t*>(base));
      else zero(reinterpret_cast<uint64_t*>(base));
      return;
    }
    for (int j = 0; j < n; ++j)
      if (del[j]) scale_entry(p, bl.begin + j);
  }

  // The fused write pass. Entries below the prefix are deleted; entries in the
  // prefix's bin are all deleted (kTakeAll), deleted up to the chunk's quota in
  // index order (kTies), or buffered (kCandidates). The largest deleted key
  // lies in the prefix's bin in every mode, so only bin entries are tracked.
  Outcome write_pass(Key prefix, int pbits, Mode mode, const std::vector<int64_t>& quota,
                     std::vector<Candidate<Key>>& cands) {
    using Val = decltype(value_of_key(Key(0)));
    const int64_t nc = static_cast<int64_t>(chunks_.size());
    const int shift = kKeyBits - pbits;
    std::vector<double> chunk_sum(nc, 0.0);
    std::atomic<int64_t> ncands{0};
    std::mutex mu;
    Outcome total;
    at::parallel_for(0, nc, 1, [&](int64_t cb, int64_t ce) {
      // Locals, not captures: the byte stores below could alias a capture.
      const int sh = shift;
      const Key pre = prefix;
      const bool take_all = mode == Mode::kTakeAll;
      const Key pre_hi = take_all ? static_cast<Key>(pre + 1) : pre;  // top < pre_hi is deleted
      const bool last_bin = take_all && pre == static_cast<Key>(~Key(0) >> sh);  // pre + 1 wrapped
      int64_t deleted = 0;
      Key max_key = 0;
      auto blk = std::make_unique<Block<Key>>();
      alignas(64) uint8_t del[kBlock];
      alignas(64) Val val[kBlock];  // deleted saliency, or +0.0
      for (int64_t ci = cb; ci < ce; ++ci) {
        const Chunk& c = chunks_[ci];
        PoolMember& p = pool_[c.member];
        int64_t left = mode == Mode::kTies ? quota[ci] : 0;
        // Eight fixed accumulation lanes: vectorisable, and the same order for
        // any thread count.
        double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for_chunk(c, *blk, [&](const Block<Key>& bl) {
          const int n = bl.n;
          const Key* __restrict key = bl.key;
          const uint8_t* __restrict state = bl.state;
          uint8_t* __restrict dl = del;
          Val* __restrict vl = val;
          int nd = 0, nb = 0;
          for (int j = 0; j < n; ++j) {
            const Key top = static_cast<Key>(key[j] >> sh);
            const bool alive = state[j] == kAlive;
            const uint8_t d = alive & ((top < pre_hi) | last_bin);
            dl[j] = d;
            nd += d;
            nb += alive & (top == pre);
            vl[j] = masked_value(key[j], d);
          }
          if (nb) {
            for (int j = 0; j < n; ++j) {
              if (state[j] != kAlive || static_cast<Key>(key[j] >> sh) != pre) continue;
              if (take_all) {
                max_key = std::max(max_key, key[j]);
              } else if (mode == Mode::kTies) {
                if (left > 0) {
                  dl[j] = 1;
                  vl[j] = value_of_key(key[j]);
                  max_key = key[j];
                  --left;
                  ++nd;
                }
              } else {
                cands[ncands.fetch_add(1, std::memory_order_relaxed)] = {key[j], c.member, bl.begin + j};
              }
            }
          }
          if (nd == 0) return;
          double ln[8] = {lanes[0], lanes[1], lanes[2], lanes[3], lanes[4], lanes[5], lanes[6], lanes[7]};
          int j = 0;
          for (; j + 8 <= n; j += 8)
            for (int l = 0; l < 8; ++l) ln[l] += static_cast<double>(vl[j + l]);
          for (; j < n; ++j) ln[j & 7] += static_cast<double>(vl[j]);
          for (int l = 0; l < 8; ++l) lanes[l] = ln[l];
          deleted += nd;
          apply_block(p, bl, dl);
        });
        double sum = 0.0;
        for (double v : lanes) sum += v;
        chunk_sum[ci] = sum;
      }
      std::lock_guard<std::mutex> lock(mu);
      total.deleted += deleted;
      total.max_key = std::max(total.max_key, max_key);
    });
    for (int64_t ci = 0; ci < nc; ++ci) total.sum += chunk_sum[ci];
    total.ncands = ncands.load();
    total.any = total.deleted > 0 && mode != Mode::kCandidates;
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
