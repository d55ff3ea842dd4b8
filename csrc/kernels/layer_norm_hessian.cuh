// Torch-free launcher of the layer-norm rule of the curvature sweep (layer_norm_hessian.cu).
#pragma once

#include <cuda_runtime.h>

#include "common.h"

namespace obd {
namespace kernels {

struct LayerNormParams {
  const void* x;      // rows x n, `dtype`
  const void* mean;   // rows, `stat_dtype`
  const void* rstd;   // rows, `stat_dtype`
  const void* gamma;  // n, `stat_dtype`, or nullptr (gamma = 1)
  const void* h;      // rows x n
  const void* g;      // rows x n, or nullptr (lm and no g_x wanted)
  void* h_x;          // rows x n (output)
  void* g_x;          // rows x n (output), or nullptr
  int64_t rows, n;
  Dtype dtype, stat_dtype;
  bool lm;  // drop the f'' term
};

cudaError_t launch_layer_norm_hessian(const LayerNormParams& p, cudaStream_t stream);

}  // namespace kernels
}  // namespace obd
