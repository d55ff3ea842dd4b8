// CPU selection within segments of one weight: per output row (row_select_)
// and N:M groups (nm_select_). Each segment is its own small pool with a
// target count of deleted entries; already deleted entries count towards it
// and stay deleted; ties are deleted in index order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <vector>

#include "../checks.h"
#include "../select_common.h"
#include "dispatch.h"

namespace obd {
namespace cpu {
namespace {

// Segment s holds the entries base(s) + j * stride, j < len.
struct Segments {
  int64_t count, len, stride;
  // N:M: segments enumerate (outer, group, inner); rows: inner == 1, groups == 1.
  int64_t groups, inner;
  int64_t base(int64_t s) const {
    const int64_t i = s % inner;
    const int64_t og = s / inner;
    const int64_t g = og % groups;
    const int64_t o = og / groups;
    return (o * groups * len + g * len) * inner + i;
  }
};

// First non-finite entry of w or h in flat order, or -1.
template <typename W, typename H>
int64_t first_nonfinite(const W* w, const H* h, const uint8_t* mask, int64_t n) {
  int64_t first = -1;
  std::mutex mu;
  at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (mask[i] && !(finite_value(w[i]) && finite_value(h[i]))) {
        std::lock_guard<std::mutex> lock(mu);
        if (first < 0 || i < first) first = i;
        return;
      }
    }
  });
  return first;
}

// First segment (in order) whose deletable entries are fewer than it must
// delete, or -1.
template <typename W, typename H>
int64_t first_short_segment(const W* w, const H* h, const uint8_t* mask, const Segments& seg, int64_t target) {
  int64_t first = -1;
  std::mutex mu;
  at::parallel_for(0, seg.count, 1, [&](int64_t sb, int64_t se) {
    for (int64_t s = sb; s < se; ++s) {
      const int64_t base = seg.base(s);
      int64_t masked = 0, deletable = 0;
      for (int64_t j = 0; j < seg.len; ++j) {
        const int64_t i = base + j * seg.stride;
        masked += !mask[i];
        deletable += mask[i] && finite_value(w[i]) && finite_value(h[i]);
      }
      if (target - masked > deletable) {
        std::lock_guard<std::mutex> lock(mu);
        if (first < 0 || s < first) first = s;
        return;
      }
    }
  });
  return first;
}

at::Tensor segmented_select(const char* op, const at::Tensor& weight, const at::Tensor& curvature,
                            const at::Tensor& mask, const Segments& seg, int64_t target,
                            const c10::optional<double>& factor, bool skip_nonfinite) {
  auto w = weight.contiguous();
  auto h = curvature.contiguous();
  auto m = mask.contiguous();
  auto stats = make_stats(w);
  double* st = stats.mutable_data_ptr<double>();
  st[kStatMaxDeleted] = std::numeric_limits<double>::quiet_NaN();
  uint8_t* mp = reinterpret_cast<uint8_t*>(m.mutable_data_ptr<bool>());

  dispatch_pair(w.scalar_type(), h.scalar_type(), [&](auto wt, auto ht) {
    using W = typename decltype(wt)::type;
    using H = typename decltype(ht)::type;
    using S = acc_t<W, H>;
    using Key = std::conditional_t<std::is_same_v<S, double>, uint64_t, uint32_t>;
    W* wp = w.mutable_data_ptr<W>();
    const H* hp = h.const_data_ptr<H>();
    // Errors are found before anything is written, so they leave the inputs as they were.
    if (!skip_nonfinite) {
      const int64_t bad = first_nonfinite(wp, hp, mp, w.numel());
      if (bad >= 0) throw_nonfinite(op, "weight", "curvature", -1, w, h, bad);
    } else {
      const int64_t bad = first_short_segment(wp, hp, mp, seg, target);
      if (bad >= 0) throw_short_segment(op, bad, target);
    }
    struct Entry {
      Key key;
      int64_t j;
      bool operator<(const Entry& o) const { return key != o.key ? key < o.key : j < o.j; }
    };
    std::vector<double> seg_sum(seg.count, 0.0);
    std::mutex mu;
    int64_t deleted_now = 0, deleted_before = 0, skipped = 0;
    Key max_key = 0;
    bool any = false;
    at::parallel_for(0, seg.count, 1, [&](int64_t sb, int64_t se) {
      std::vector<Entry> buf;
      buf.reserve(seg.len);
      int64_t now = 0, before = 0, skip = 0;
      Key mk = 0;
      bool a = false;
      for (int64_t s = sb; s < se; ++s) {
        const int64_t base = seg.base(s);
        buf.clear();
        int64_t masked = 0;
        for (int64_t j = 0; j < seg.len; ++j) {
          const int64_t i = base + j * seg.stride;
          if (!mp[i]) {
            ++masked;
            continue;
          }
          if (!(finite_value(wp[i]) && finite_value(hp[i]))) {
            ++skip;
            continue;
          }
          buf.push_back({KeyOf<Key>::get(saliency_of<S>(static_cast<S>(wp[i]), static_cast<S>(hp[i]))), j});
        }
        before += masked;
        const int64_t want = target - masked;
        if (want <= 0) continue;
        TORCH_INTERNAL_ASSERT(want <= static_cast<int64_t>(buf.size()), "obd_ext: short segment after the check");
        std::nth_element(buf.begin(), buf.begin() + (want - 1), buf.end());
        std::sort(buf.begin(), buf.begin() + want);
        double sum = 0.0;
        for (int64_t t = 0; t < want; ++t) {
          const int64_t i = base + buf[t].j * seg.stride;
          mp[i] = 0;
          if (factor.has_value())
            wp[i] = *factor == 0.0 ? W(0) : static_cast<W>(static_cast<double>(wp[i]) * *factor);
          sum += static_cast<double>(value_of_key(buf[t].key));
        }
        seg_sum[s] = sum;
        now += want;
        mk = a ? std::max(mk, buf[want - 1].key) : buf[want - 1].key;
        a = true;
      }
      std::lock_guard<std::mutex> lock(mu);
      deleted_now += now;
      deleted_before += before;
      skipped += skip;
      if (a) max_key = any ? std::max(max_key, mk) : mk;
      any = any || a;
    });
    double sum = 0.0;
    for (double v : seg_sum) sum += v;  // in segment order: deterministic
    st[kStatDeletedNow] = static_cast<double>(deleted_now);
    st[kStatDeletedBefore] = static_cast<double>(deleted_before);
    st[kStatSkippedNonfinite] = static_cast<double>(skipped);
    st[kStatSaliencySum] = sum;
    if (any) st[kStatMaxDeleted] = static_cast<double>(value_of_key(max_key));
  });
  if (!m.is_same(mask)) mask.copy_(m);
  if (factor.has_value() && !w.is_same(weight)) weight.copy_(w);
  return stats;
}

at::Tensor row_select_cpu(const at::Tensor& weight, const at::Tensor& curvature, const at::Tensor& mask, int64_t k,
                          c10::optional<double> factor, bool skip_nonfinite) {
  check_single("row_select_", weight, curvature, mask, factor);
  const auto [rows, cols] = rows_cols(weight);
  check_row_k("row_select_", k, cols, weight);
  return segmented_select("row_select_", weight, curvature, mask, Segments{rows, cols, 1, 1, 1}, k, factor,
                          skip_nonfinite);
}

at::Tensor nm_select_cpu(const at::Tensor& weight, const at::Tensor& curvature, const at::Tensor& mask, int64_t n, int64_t m,
                         c10::optional<double> factor, bool skip_nonfinite) {
  check_single("nm_select_", weight, curvature, mask, factor);
  const auto g = nm_groups("nm_select_", weight, n, m);
  return segmented_select("nm_select_", weight, curvature, mask, Segments{g.count, m, g.inner, g.groups, g.inner},
                          m - n, factor, skip_nonfinite);
}

}  // namespace

TORCH_LIBRARY_IMPL(obd_ext, CPU, m) {
  m.impl("row_select_", &row_select_cpu);
  m.impl("nm_select_", &nm_select_cpu);
}

}  // namespace cpu
}  // namespace obd
