// Torch-free launchers for the saliency kernels (see saliency.cu).
#pragma once

#include <cuda_runtime.h>

#include "common.h"

namespace obd {
namespace kernels {

struct SaliencyParams {
  const void* w;  // n entries of w_dtype
  const void* h;  // n entries of h_dtype
  void* out;      // n entries, float64 if out_double else float32
  int64_t n;
  Dtype w_dtype, h_dtype;
  bool out_double;
};

// The tensor is seen as outer x groups x inner (contiguous); out[g] is the
// sum of the saliencies with group index g.
struct GroupSaliencyParams {
  const void* w;
  const void* h;
  void* out;  // groups entries, float64 if out_double else float32
  int64_t outer, groups, inner;
  Dtype w_dtype, h_dtype;
  bool out_double;
};

cudaError_t launch_saliency(const SaliencyParams& p, cudaStream_t stream);
cudaError_t launch_group_saliency(const GroupSaliencyParams& p, cudaStream_t stream);

}  // namespace kernels
}  // namespace obd
