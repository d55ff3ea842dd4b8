// Torch-free interface of the CUDA per-row and N:M selection (segment_select.cu).
#pragma once

#include <cuda_runtime.h>

#include "common.h"

namespace obd {
namespace kernels {

// Segment s holds entries base(s) + j * stride for j < len, with
// base(s) = (o * groups * len + g * len) * inner + i for s = (o, g, i)
// enumerated with i fastest. Rows: groups = inner = stride = 1.
struct SegmentSelectParams {
  void* w;               // weight (written when write_weights)
  const void* h;         // curvature
  uint8_t* mask;         // bool keep-mask, read and written
  Dtype w_dtype, h_dtype;
  int64_t count, len, stride, groups, inner;
  int64_t target;        // deleted entries wanted per segment
  bool write_weights;
  double factor;
  bool check_only;       // only look for segments with too few deletable entries
  // Device outputs:
  double* seg_sum;                 // count: saliency deleted per segment
  unsigned long long* counters;    // kSegCounters entries, zeroed by the caller except kSegShort = ~0
};

enum SegCounter : int {
  kSegDeletedNow = 0,
  kSegDeletedBefore = 1,
  kSegNonfinite = 2,
  kSegMaxKey = 3,    // largest deleted key (wide keys when the pair has float64)
  kSegShort = 4,     // first segment with too few deletable entries (~0 if none)
  kSegCounters = 5
};

// Per output row: one block per row, 8-bit radix passes over the row.
cudaError_t launch_row_select(const SegmentSelectParams& p, cudaStream_t stream);
// N:M: one thread per group of m entries.
cudaError_t launch_nm_select(const SegmentSelectParams& p, cudaStream_t stream);

// First position (flat index) of an unmasked entry whose w or h is not finite;
// *out must be ~0 on entry and stays so if there is none.
cudaError_t launch_find_nonfinite(const void* w, Dtype w_dtype, const void* h, Dtype h_dtype, const uint8_t* mask,
                                  int64_t n, unsigned long long* out, cudaStream_t stream);

}  // namespace kernels
}  // namespace obd
