// Torch-free launcher of the activation rule of the curvature sweep (activation_hessian.cu).
#pragma once

#include <cuda_runtime.h>

#include "common.h"

namespace obd {
namespace kernels {

struct ActivationParams {
  const void* saved;  // n entries of `dtype`
  const void* h;      // n entries
  const void* g;      // n entries, or nullptr (then the f'' term is dropped and g_in is not written)
  void* h_in;         // n entries (output)
  void* g_in;         // n entries (output), or nullptr
  int64_t n;
  Dtype dtype;
  int32_t kind;  // ActKind
  double p0, p1, p2;
  bool lm;
};

cudaError_t launch_activation_hessian(const ActivationParams& p, cudaStream_t stream);

}  // namespace kernels
}  // namespace obd
