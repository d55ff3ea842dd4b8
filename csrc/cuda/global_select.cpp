// CUDA bindings of the selection ops: checks, working copies, workspace
// allocation through torch, device guard, current stream. The algorithms are
// in csrc/kernels/select_global.cu and select_segments.cu.
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../checks.h"
#include "../kernels/select_global.cuh"
#include "../kernels/select_segments.cuh"
#include "../select_common.h"
#include "cuda_utils.h"

namespace obd {
namespace cuda {
namespace {

at::Tensor stats_on(const at::Device& device, double now, double before, double skipped, double max_deleted,
                    double sum) {
  auto st = at::empty({kNumStats}, at::TensorOptions().dtype(at::kDouble));
  double* p = st.mutable_data_ptr<double>();
  p[kStatDeletedNow] = now;
  p[kStatDeletedBefore] = before;
  p[kStatSkippedNonfinite] = skipped;
  p[kStatMaxDeleted] = now > 0 ? max_deleted : std::numeric_limits<double>::quiet_NaN();
  p[kStatSaliencySum] = sum;
  return st.to(device);
}

at::Tensor global_select_cuda(at::TensorList weights, at::TensorList curvatures, at::TensorList masks, int64_t k,
                              c10::optional<double> factor, bool skip_nonfinite) {
  auto pool = make_pool("global_select_", weights, curvatures, masks, factor);
  TORCH_CHECK(!pool.empty(), "obd_ext.global_select_: curvatures must not be empty");
  const at::Device device = curvatures[0].device();
  c10::DeviceGuard guard(device);
  std::vector<kernels::PoolMemberDesc> descs;
  int64_t base = 0;
  bool wide = false;
  for (auto& p : pool) {
    const bool has_w = p.w.defined();
    descs.push_back({has_w ? p.w.data_ptr() : nullptr, p.h.data_ptr(), ptr<uint8_t>(p.mask), p.numel(), base,
                     has_w ? to_dtype(p.w.scalar_type()) : Dtype::F32, to_dtype(p.h.scalar_type())});
    base += p.numel();
    wide = wide || p.h.scalar_type() == at::kDouble || (has_w && p.w.scalar_type() == at::kDouble);
  }
  kernels::GlobalSelectParams params{descs.data(), static_cast<int32_t>(descs.size()), k, wide, skip_nonfinite,
                                     factor.has_value(), factor.value_or(0.0)};
  const size_t bytes = kernels::global_select_workspace_bytes(params);
  auto workspace = at::empty({static_cast<int64_t>(bytes)}, curvatures[0].options().dtype(at::kByte));
  kernels::GlobalSelectResult res;
  check_cuda(kernels::run_global_select(params, workspace.data_ptr(), bytes, current_stream(device), &res),
             "global_select_");
  if (res.bad_member >= 0) {
    const auto& p = pool[res.bad_member];
    throw_nonfinite("global_select_", "weights", "curvatures", res.bad_member, p.w, p.h, res.bad_offset);
  }
  check_global_k("global_select_", k, base, res.nonfinite);
  write_back(pool, factor.has_value());
  return stats_on(device, static_cast<double>(res.deleted_now), static_cast<double>(res.deleted_before),
                  skip_nonfinite ? static_cast<double>(res.nonfinite) : 0.0, res.max_deleted, res.saliency_sum);
}

using Launcher = cudaError_t (*)(const kernels::SegmentSelectParams&, cudaStream_t);

at::Tensor segmented_select_cuda(const char* op, const at::Tensor& weight, const at::Tensor& curvature,
                                 const at::Tensor& mask, int64_t count, int64_t len, int64_t stride, int64_t groups,
                                 int64_t inner, int64_t target, const c10::optional<double>& factor,
                                 bool skip_nonfinite, Launcher launch) {
  c10::DeviceGuard guard(weight.device());
  const cudaStream_t stream = current_stream(weight.device());
  auto w = weight.contiguous();
  auto h = curvature.contiguous();
  auto m = mask.contiguous();
  const Dtype wd = to_dtype(w.scalar_type()), hd = to_dtype(h.scalar_type());
  const bool wide = wd == Dtype::F64 || hd == Dtype::F64;
  auto counters = at::zeros({kernels::kSegCounters}, w.options().dtype(at::kLong));
  auto seg_sum = at::zeros({std::max<int64_t>(count, 1)}, w.options().dtype(at::kDouble));
  auto reset = [&]() {
    counters.zero_();
    counters.select(0, kernels::kSegShort).fill_(-1);  // ~0 as unsigned
  };
  reset();
  kernels::SegmentSelectParams p{w.data_ptr(), h.data_ptr(), ptr<uint8_t>(m), wd, hd, count, len, stride, groups,
                                 inner, target, factor.has_value(), factor.value_or(0.0), false,
                                 seg_sum.data_ptr<double>(),
                                 reinterpret_cast<unsigned long long*>(counters.data_ptr<int64_t>())};
  // Errors are found before anything is written.
  if (!skip_nonfinite) {
    auto bad = at::full({1}, -1, w.options().dtype(at::kLong));
    check_cuda(kernels::launch_find_nonfinite(w.data_ptr(), wd, h.data_ptr(), hd, ptr<uint8_t>(m), w.numel(),
                                              reinterpret_cast<unsigned long long*>(bad.data_ptr<int64_t>()), stream),
               op);
    const int64_t first = bad.item<int64_t>();
    if (first >= 0) throw_nonfinite(op, "weight", "curvature", -1, w, h, first);
  } else {
    p.check_only = true;
    check_cuda(launch(p, stream), op);
    const int64_t short_seg = counters.select(0, kernels::kSegShort).item<int64_t>();
    if (short_seg >= 0) throw_short_segment(op, short_seg, target);
    p.check_only = false;
    reset();
  }
  check_cuda(launch(p, stream), op);
  auto c = counters.cpu();
  const int64_t* cv = c.data_ptr<int64_t>();
  const auto max_key = static_cast<unsigned long long>(cv[kernels::kSegMaxKey]);
  const double max_deleted = wide ? value_of_key(static_cast<uint64_t>(max_key))
                                  : static_cast<double>(value_of_key(static_cast<uint32_t>(max_key)));
  const double sum = seg_sum.sum().item<double>();
  if (!m.is_same(mask)) mask.copy_(m);
  if (factor.has_value() && !w.is_same(weight)) weight.copy_(w);
  return stats_on(weight.device(), static_cast<double>(cv[kernels::kSegDeletedNow]),
                  static_cast<double>(cv[kernels::kSegDeletedBefore]),
                  skip_nonfinite ? static_cast<double>(cv[kernels::kSegNonfinite]) : 0.0, max_deleted, sum);
}

at::Tensor row_select_cuda(const at::Tensor& weight, const at::Tensor& curvature, const at::Tensor& mask, int64_t k,
                           c10::optional<double> factor, bool skip_nonfinite) {
  check_single("row_select_", weight, curvature, mask, factor);
  const auto [rows, cols] = rows_cols(weight);
  check_row_k("row_select_", k, cols, weight);
  return segmented_select_cuda("row_select_", weight, curvature, mask, rows, cols, 1, 1, 1, k, factor,
                               skip_nonfinite, &kernels::launch_row_select);
}

at::Tensor nm_select_cuda(const at::Tensor& weight, const at::Tensor& curvature, const at::Tensor& mask, int64_t n,
                          int64_t m, c10::optional<double> factor, bool skip_nonfinite) {
  check_single("nm_select_", weight, curvature, mask, factor);
  const auto g = nm_groups("nm_select_", weight, n, m);
  return segmented_select_cuda("nm_select_", weight, curvature, mask, g.count, m, g.inner, g.groups, g.inner, m - n,
                               factor, skip_nonfinite, &kernels::launch_nm_select);
}

}  // namespace

TORCH_LIBRARY_IMPL(obd_ext, CUDA, m) {
  m.impl("global_select_", &global_select_cuda);
  m.impl("row_select_", &row_select_cuda);
  m.impl("nm_select_", &nm_select_cuda);
}

}  // namespace cuda
}  // namespace obd
