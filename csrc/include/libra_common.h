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

// Element types of the launchers (they take raw pointers, so the driver passes the type as this code).
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// ---- RMSNorm (LLaMA): y = w * cast(x * rstd), rstd = 1 / sqrt(mean(x^2) + eps).

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

// Rows per block of the routed-norm backward, for each group: text and vision rows never share a block, so every
// block adds into exactly one of the two weight gradients.
LIBRA_HD int64_t blocks_for_rows(int64_t rows, int64_t rows_per_block) {
  return (rows + rows_per_block - 1) / rows_per_block;
}

// First row and row count of backward block b (blocks [0, text_blocks) cover the text rows, the rest the vision
// rows); *is_text tells which weight the rows use.
LIBRA_HD void block_rows(int64_t b, int64_t text_blocks, int64_t n_text, int64_t rows, int64_t rows_per_block,
                         int64_t* begin, int64_t* count, bool* is_text) {
  *is_text = b < text_blocks;
  const int64_t group_begin = *is_text ? 0 : n_text;
  const int64_t group_end = *is_text ? n_text : rows;
  const int64_t local = *is_text ? b : b - text_blocks;
  *begin = group_begin + local * rows_per_block;
  const int64_t end = *begin + rows_per_block < group_end ? *begin + rows_per_block : group_end;
  *count = end > *begin ? end - *begin : 0;
}

// ---- Modality layout: text rows first, then vision rows, each in (batch, position) order.

// Sorted row of flat token i, given the number of vision tokens before it, its flag and the text count.
LIBRA_HD int64_t sorted_row(int64_t i, int64_t vision_before, bool is_vision, int64_t n_text) {
  return is_vision ? n_text + vision_before : i - vision_before;
}

}  // namespace libra

// ---- Device helpers of the CUDA kernels: element conversions, vector packs, block sums.
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace libra {
namespace cuda {

// float32 accumulation for every type but float64.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(typename Acc<T>::type v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Rounds an accumulator value through T and back: what an eager op in T would have stored.
template <typename T>
__device__ __forceinline__ typename Acc<T>::type round_to(typename Acc<T>::type v) {
  return to_acc(from_acc<T>(v));
}

// VEC consecutive elements moved with one aligned load/store (16 bytes when VEC = 16 / sizeof(T)).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* p, const Pack<T, VEC>& pack) {
  *reinterpret_cast<Pack<T, VEC>*>(p) = pack;
}

// Sum of v over the block; every thread gets the result. scratch holds 33 values.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  __syncthreads();  // the previous call's readers are done with scratch
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? scratch[lane] : acc_t(0);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (lane == 0) scratch[32] = v;
  }
  __syncthreads();
  return scratch[32];
}

inline bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace cuda
}  // namespace libra
#endif  // __CUDACC__
