// Torch-free launcher of the softmax rule of the curvature sweep (softmax_hessian.cu).
#pragma once

#include <cuda_runtime.h>

#include "common.h"

namespace obd {
namespace kernels {

struct SoftmaxParams {
  const void* y;  // rows x n, `dtype` (the softmax's output)
  const void* h;  // rows x n
  const void* g;  // rows x n, or nullptr (lm and no g_in wanted)
  void* h_in;     // rows x n (output)
  void* g_in;     // rows x n (output), or nullptr
  int64_t rows, n;
  Dtype dtype;
  bool lm;  // drop the f'' term
};

cudaError_t launch_softmax_hessian(const SoftmaxParams& p, cudaStream_t stream);

}  // namespace kernels
}  // namespace obd
