// CUDA bindings of row_select_ and nm_select_ (each segment, a row or an N:M
// group, is its own pool): checks, working copies, device guard, current
// stream. The algorithm is in csrc/kernels/segment_select.cu.
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "../kernels/segment_select.cuh"
#include "../select_common.h"
#include "cuda_utils.h"

namespace obd {
namespace cuda {
namespace {

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
  return stats_tensor(weight.device(), static_cast<double>(cv[kernels::kSegDeletedNow]),
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
  m.impl("row_select_", &row_select_cuda);
  m.impl("nm_select_", &nm_select_cuda);
}

}  // namespace cuda
}  // namespace obd
