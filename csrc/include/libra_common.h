// Shared by the CPU (.cpp) and CUDA (.cu) sources: no torch headers here, so nvcc compiles it quickly.
// Per-row math lives in LIBRA_HD functions so the CPU kernels run exactly the code the GPU kernels run.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LIBRA_HD __host__ __device__ __forceinline__
#else
#define LIBRA_HD inline
#endif

namespace libra {

// Inverse root mean square of a row, from its sum of squares (accumulated in float32 or wider).
template <typename acc_t>
LIBRA_HD acc_t rms_inverse(acc_t sum_of_squares, int64_t width, acc_t eps) {
  return acc_t(1) / std::sqrt(sum_of_squares / acc_t(width) + eps);
}

// Gradient of x for y = w * (x * rstd), given dxhat = dy * w, xhat = x * rstd and
// mean_dot = mean over the row of dxhat * xhat:  dx = rstd * (dxhat - xhat * mean_dot).
template <typename acc_t>
LIBRA_HD acc_t rms_norm_input_grad(acc_t dxhat, acc_t xhat, acc_t mean_dot, acc_t rstd) {
  return rstd * (dxhat - xhat * mean_dot);
}

}  // namespace libra
