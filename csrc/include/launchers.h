// The launchers every operator driver (csrc/<op>.cpp) calls: one CPU launcher (csrc/cpu/<op>.cpp) and one CUDA
// launcher (csrc/cuda/<op>.cu) per kernel, with the same arguments apart from the CUDA stream. Tensors are passed as
// raw pointers, already checked, allocated and made contiguous by the driver; element types as a libra::DType code.
// CPU launchers report bad input by throwing (TORCH_CHECK); CUDA launchers return the launch status, which the driver
// turns into an error. No torch headers here, so nvcc compiles the .cu files without them.
#pragma once

#include <cstdint>

#include "libra_common.h"
#include "linear_cross_entropy_math.h"

#if defined(LIBRA_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime.h>
#define LIBRA_CUDA_LAUNCHERS 1
#endif

namespace libra {

// ---- routed_rms_norm: h and residual are null without the fused add; rstd is float32 (float64 for float64 data).
// The backward partial is a [blocks, width] accumulator scratch (blocks = blocks_for_rows(n_text, rows_per_block) +
// blocks_for_rows(rows - n_text, rows_per_block)), needed when dw_text or dw_vision is asked for (non-null); grad_h
// (may be null) is added to dx. A weight gradient of a group without rows is written as zeros.
void routed_rms_norm_fwd_cpu(DType dtype, const void* x, const void* residual, void* h, void* y, void* rstd,
                             const void* w_text, const void* w_vision, int64_t rows, int64_t n_text, int64_t width,
                             double eps);
void routed_rms_norm_bwd_cpu(DType dtype, const void* dy, const void* x, const void* rstd, const void* w_text,
                             const void* w_vision, const void* grad_h, void* dx, void* partial, void* dw_text,
                             void* dw_vision, int64_t rows, int64_t n_text, int64_t width, int64_t rows_per_block);

// ---- modality_layout: flags bool [total], inclusive_count int64 [total] (the inclusive prefix sum of flags) ->
// sort_index [total], row_of [total], counts [2] = (n_text, n_vision). total > 0.
void modality_layout_cpu(const bool* flags, const int64_t* inclusive_count, int64_t total, int64_t* sort_index,
                         int64_t* row_of, int64_t* counts);

// ---- permute_rows: dst row r = src row index[r], rows of row_bytes bytes; index int64 [rows], a permutation.
void permute_rows_cpu(const void* src, void* dst, const int64_t* index, int64_t rows, int64_t row_bytes);

// ---- linear_cross_entropy's row kernel: statistics and/or logit gradients of one logits buffer (see Rows).
void linear_cross_entropy_rows_cpu(const xent::Rows& args, DType dtype);

#if defined(LIBRA_CUDA_LAUNCHERS)
cudaError_t routed_rms_norm_fwd_cuda(DType dtype, const void* x, const void* residual, void* h, void* y, void* rstd,
                                     const void* w_text, const void* w_vision, int64_t rows, int64_t n_text,
                                     int64_t width, double eps, cudaStream_t stream);
cudaError_t routed_rms_norm_bwd_cuda(DType dtype, const void* dy, const void* x, const void* rstd,
                                     const void* w_text, const void* w_vision, const void* grad_h, void* dx,
                                     void* partial, void* dw_text, void* dw_vision, int64_t rows, int64_t n_text,
                                     int64_t width, int64_t rows_per_block, cudaStream_t stream);
cudaError_t modality_layout_cuda(const bool* flags, const int64_t* inclusive_count, int64_t total,
                                 int64_t* sort_index, int64_t* row_of, int64_t* counts, cudaStream_t stream);
cudaError_t permute_rows_cuda(const void* src, void* dst, const int64_t* index, int64_t rows, int64_t row_bytes,
                              cudaStream_t stream);
// One thread block per (row, segment): the caller guarantees rows * segments < 2^31.
cudaError_t linear_cross_entropy_rows_cuda(const xent::Rows& args, DType dtype, cudaStream_t stream);
#endif

}  // namespace libra
