// Argument handling shared by the CPU and CUDA bindings of the selection ops:
// validation, contiguous working copies, and copying in-place results back.
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <vector>

#include "checks.h"

namespace obd {

// One tensor of a selection pool, as the kernels see it: contiguous, with the
// user's tensors kept so that in-place results can be copied back when a
// working copy had to be made (non-contiguous input).
struct PoolMember {
  at::Tensor w;          // contiguous weight, undefined in score mode
  at::Tensor h;          // contiguous curvature (or score)
  at::Tensor mask;       // contiguous bool keep-mask
  at::Tensor user_w;     // the caller's weight (written back if copied)
  at::Tensor user_mask;  // the caller's mask (written back if copied)
  int64_t numel() const { return h.numel(); }
};

inline std::vector<PoolMember> make_pool(const char* op, at::TensorList weights, at::TensorList curvatures,
                                         at::TensorList masks, const c10::optional<double>& factor) {
  const bool score_mode = weights.empty();
  TORCH_CHECK(score_mode || weights.size() == curvatures.size(), "obd_ext.", op,
              ": weights and curvatures must have the same length (or weights empty for precomputed "
              "scores), got ", weights.size(), " and ", curvatures.size());
  TORCH_CHECK(masks.size() == curvatures.size(), "obd_ext.", op,
              ": masks must have one bool tensor per curvature tensor, got ", masks.size(), " masks for ",
              curvatures.size(), " curvatures");
  TORCH_CHECK(!(score_mode && factor.has_value()), "obd_ext.", op,
              ": factor needs weights to write, but weights is empty (score mode)");
  check_factor(op, factor);
  std::vector<PoolMember> pool;
  pool.reserve(curvatures.size());
  for (size_t i = 0; i < curvatures.size(); ++i) {
    const int64_t idx = static_cast<int64_t>(i);
    const auto& h = curvatures[i];
    const auto& m = masks[i];
    check_float(op, arg_name("curvatures", idx), h);
    check_mask(op, arg_name("masks", idx), m);
    check_same_shape(op, arg_name("curvatures", idx), h, arg_name("masks", idx), m);
    check_same_device(op, "curvatures[0]", curvatures[0], arg_name("curvatures", idx), h);
    check_same_device(op, "curvatures[0]", curvatures[0], arg_name("masks", idx), m);
    PoolMember p;
    if (!score_mode) {
      const auto& w = weights[i];
      check_float(op, arg_name("weights", idx), w);
      check_same_shape(op, arg_name("weights", idx), w, arg_name("curvatures", idx), h);
      check_same_device(op, "curvatures[0]", curvatures[0], arg_name("weights", idx), w);
      p.user_w = w;
      p.w = w.contiguous();
    }
    p.h = h.contiguous();
    p.user_mask = m;
    p.mask = m.contiguous();
    pool.push_back(std::move(p));
  }
  return pool;
}

// After the kernels wrote into working copies, make the caller's tensors hold
// the results (a no-op when the caller's tensors were contiguous).
inline void write_back(std::vector<PoolMember>& pool, bool wrote_weights) {
  for (auto& p : pool) {
    if (!p.mask.is_same(p.user_mask)) p.user_mask.copy_(p.mask);
    if (wrote_weights && p.w.defined() && !p.w.is_same(p.user_w)) p.user_w.copy_(p.w);
  }
}

// Whole-tensor selection ops (rows, N:M) take one weight.
inline void check_single(const char* op, const at::Tensor& w, const at::Tensor& h, const at::Tensor& mask,
                         const c10::optional<double>& factor) {
  check_float(op, "weight", w);
  check_float(op, "curvature", h);
  check_mask(op, "mask", mask);
  check_same_shape(op, "weight", w, "curvature", h);
  check_same_shape(op, "weight", w, "mask", mask);
  check_same_device(op, "weight", w, "curvature", h);
  check_same_device(op, "weight", w, "mask", mask);
  check_factor(op, factor);
}

// k of the global selection: deleted entries wanted in total, at most the
// entries that can be deleted (non-finite ones skipped cannot).
inline void check_global_k(const char* op, int64_t k, int64_t total, int64_t nonfinite) {
  const int64_t prunable = total - nonfinite;
  TORCH_CHECK(k >= 0 && k <= prunable, "obd_ext.", op, ": k must be in [0, ", prunable, "] (the pool has ", total,
              " entries", nonfinite ? ", minus the non-finite ones" : "", "), got ", k);
}

inline void check_row_k(const char* op, int64_t k, int64_t cols, const at::Tensor& w) {
  TORCH_CHECK(k >= 0 && k <= cols, "obd_ext.", op, ": k (entries to delete per row) must be in [0, ", cols,
              "] for a weight of shape ", w.sizes(), ", got ", k);
}

// A segment (row, N:M group) whose non-finite entries leave too few to delete.
[[noreturn]] inline void throw_short_segment(const char* op, int64_t segment, int64_t target) {
  TORCH_CHECK(false, "obd_ext.", op, ": segment ", segment, " has too few deletable entries (the rest are ",
              "non-finite and skipped) for the ", target, " to delete");
}

// Rows of a weight: dim 0, everything else flattened (a conv's output channel).
inline std::pair<int64_t, int64_t> rows_cols(const at::Tensor& w) {
  if (w.dim() == 0) return {1, 1};
  int64_t cols = 1;
  for (int64_t d = 1; d < w.dim(); ++d) cols *= w.size(d);
  return {w.size(0), cols};
}

// N:M groups run along the input dimension: dim 1 of a Linear (out x in) or
// conv (out x in x kh x kw) weight, dim 0 of a vector. A weight is seen as
// outer x C x inner with C the input dimension; a group is m entries of C at
// fixed (outer, inner), so for a Linear weight it is m consecutive entries.
struct NMGroups {
  int64_t count, groups, inner;
};

inline NMGroups nm_groups(const char* op, const at::Tensor& w, int64_t n, int64_t m) {
  TORCH_CHECK(m >= 1 && m <= 1024, "obd_ext.", op, ": m must be in [1, 1024], got ", m);
  TORCH_CHECK(n >= 0 && n <= m, "obd_ext.", op, ": n (entries kept per group) must be in [0, m=", m, "], got ", n);
  TORCH_CHECK(w.dim() >= 1, "obd_ext.", op, ": weight must have at least one dimension, got a scalar");
  const int64_t d = w.dim() >= 2 ? 1 : 0;
  const int64_t c = w.size(d);
  TORCH_CHECK(c % m == 0, "obd_ext.", op, ": the input dimension (dim ", d, ", size ", c, ") of a weight of shape ",
              w.sizes(), " must be a multiple of m=", m);
  int64_t outer = 1, inner = 1;
  for (int64_t i = 0; i < d; ++i) outer *= w.size(i);
  for (int64_t i = d + 1; i < w.dim(); ++i) inner *= w.size(i);
  return {outer * (c / m) * inner, c / m, inner};
}

// The float64 statistics a selection op returns (layout: StatIndex in
// csrc/kernels/common.h), made on the host and moved to `device`.
inline at::Tensor stats_tensor(const at::Device& device, double now, double before, double skipped,
                               double max_deleted, double sum) {
  auto st = at::empty({kNumStats}, at::TensorOptions().dtype(at::kDouble));
  double* p = st.mutable_data_ptr<double>();
  p[kStatDeletedNow] = now;
  p[kStatDeletedBefore] = before;
  p[kStatSkippedNonfinite] = skipped;
  p[kStatMaxDeleted] = now > 0 ? max_deleted : std::numeric_limits<double>::quiet_NaN();
  p[kStatSaliencySum] = sum;
  return st.to(device);
}

}  // namespace obd
