// Helpers for the CUDA bindings. They use only torch's device-generic API
// (DeviceGuard, DeviceGuardImplInterface) and <cuda_runtime.h>, so that the
// bindings can be syntax-checked against a CPU build of torch on machines
// without a CUDA torch (tests/test_cuda_sources.py).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <cuda_runtime.h>

namespace obd {
namespace cuda {

// The stream torch is currently using on `device`: kernels launch on it.
inline cudaStream_t current_stream(const at::Device& device) {
  const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl->getStream(device).native_handle());
}

inline void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "obd_ext.", op, ": CUDA error: ", cudaGetErrorString(err));
}

template <typename T>
inline T* ptr(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

}  // namespace cuda
}  // namespace obd
