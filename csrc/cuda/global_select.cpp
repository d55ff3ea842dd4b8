// CUDA binding of global_select_: checks, working copies, workspace allocation
// through torch, device guard, current stream. The algorithm is in
// csrc/kernels/global_select.cu.
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "../kernels/global_select.cuh"
#include "../select_common.h"
#include "cuda_utils.h"

namespace obd {
namespace cuda {
namespace {

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
  // run_global_select stops before writing anything when k is out of range
  // (it counts the non-finite entries first); the error is raised here.
  if (res.k_out_of_range) check_global_k("global_select_", k, base, res.nonfinite);
  TORCH_INTERNAL_ASSERT(!res.k_out_of_range, "obd_ext.global_select_: k out of range but not reported");
  write_back(pool, factor.has_value());
  return stats_tensor(device, static_cast<double>(res.deleted_now), static_cast<double>(res.deleted_before),
                      skip_nonfinite ? static_cast<double>(res.nonfinite) : 0.0, res.max_deleted, res.saliency_sum);
}

}  // namespace

TORCH_LIBRARY_IMPL(obd_ext, CUDA, m) { m.impl("global_select_", &global_select_cuda); }

}  // namespace cuda
}  // namespace obd
