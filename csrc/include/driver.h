// Host helpers of the operator drivers (csrc/<op>.cpp): dtype codes for the launchers, the statistics dtype, the
// CUDA stream and the check of a CUDA launch. Torch headers allowed (drivers and CPU launchers only).
#pragma once

#include <ATen/ATen.h>

#include "launchers.h"

#if defined(LIBRA_WITH_CUDA)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace libra {

// The launcher code of a floating dtype; `op` names the operator in the error.
inline DType dtype_code(at::ScalarType type, const char* op) {
  switch (type) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kDouble:
      return DType::kFloat64;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", type, " (expected float32, float64, float16 or bfloat16)");
  }
}

// Statistics (row norms, log-sum-exp) are float32, or float64 for float64 data.
inline at::ScalarType stat_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Fails for a CUDA tensor in a build without CUDA kernels (the dispatcher only routes CUDA tensors to a driver
// registered for CUDA, so this guards a mixed-device call).
inline void require_cuda_build(const char* op) {
#if !defined(LIBRA_WITH_CUDA)
  TORCH_CHECK(false, op, ": this build of the extension has no CUDA kernels");
#endif
}

#if defined(LIBRA_WITH_CUDA)
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

inline void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, ": CUDA kernel launch failed: ", cudaGetErrorString(status));
}
#endif

}  // namespace libra
