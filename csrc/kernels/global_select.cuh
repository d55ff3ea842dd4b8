// Torch-free interface of the CUDA global selection (see global_select.cu).
#pragma once

#include <cuda_runtime.h>

#include "common.h"

namespace obd {
namespace kernels {

// One tensor of the pool. All pointers are device pointers to contiguous data.
struct PoolMemberDesc {
  void* w;         // weight (read, and written when write_weights), nullptr = score mode
  const void* h;   // curvature, or the score itself in score mode
  uint8_t* mask;   // bool keep-mask, read and written
  int64_t n;       // entries
  int64_t base;    // position of entry 0 in the pool's (tensor, index) order
  Dtype w_dtype, h_dtype;
};

struct GlobalSelectParams {
  const PoolMemberDesc* members;  // host array of n_members
  int32_t n_members;
  int64_t k;              // deleted entries wanted in total
  bool wide_keys;         // 64-bit keys (some member is float64)
  bool skip_nonfinite;    // non-finite entries are never prunable (else: error)
  bool write_weights;     // multiply deleted weights by factor
  double factor;
};

struct GlobalSelectResult {
  int64_t deleted_now = 0;
  int64_t deleted_before = 0;
  int64_t nonfinite = 0;
  double max_deleted = 0.0;   // valid when deleted_now > 0
  double saliency_sum = 0.0;
  // Errors found before anything was written (the binding raises them):
  int64_t bad_member = -1;    // first non-finite entry (when !skip_nonfinite)
  int64_t bad_offset = -1;
  bool k_out_of_range = false;  // k not in [0, prunable]: nothing was written
  int64_t prunable = 0;          // entries that could be deleted (set once the counts are known)
};

// Bytes of device workspace run_global_select needs.
size_t global_select_workspace_bytes(const GlobalSelectParams& p);

// Runs the whole selection on `stream`, synchronising with the host between
// radix passes (a few small copies). `workspace` must hold
// global_select_workspace_bytes(p) bytes of device memory.
cudaError_t run_global_select(const GlobalSelectParams& p, void* workspace, size_t workspace_bytes,
                              cudaStream_t stream, GlobalSelectResult* result);

}  // namespace kernels
}  // namespace obd
