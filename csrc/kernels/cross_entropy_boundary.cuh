// Torch-free launcher of the cross-entropy boundary (cross_entropy_boundary.cu).
#pragma once

#include <cuda_runtime.h>

#include "common.h"

namespace obd {
namespace kernels {

struct CrossEntropyParams {
  const void* logits;       // n x c, `dtype`
  const int64_t* target;    // n
  void* g;                  // n x c, `dtype` (output), or nullptr (not wanted)
  void* h;                  // n x c, `dtype` (output)
  double* row_loss;         // n (output)
  int* bad_target;          // set to 1 when a target is neither ignore_index nor a class
  int64_t n, c, ignore_index;
  double scale;
  Dtype dtype;
};

cudaError_t launch_cross_entropy_boundary(const CrossEntropyParams& p, cudaStream_t stream);

}  // namespace kernels
}  // namespace obd
