// CUDA kernels of the routed RMSNorm (semantics in csrc/cpu/routed_rms_norm.cpp), one launch for both groups:
// each row picks w_text or w_vision by comparing its index with n_text.
//   forward : one block per row (grid-stride); optional fused residual add h = x + residual; float32 statistics.
//   backward: blocks of rows_per_block rows, text and vision rows never in one block (libra::block_rows). Each
//             block writes dx of its rows and a float32 partial sum of dy * xhat per column; a second small kernel
//             adds the partial sums of each group into dw_text and dw_vision (one launch for both).
// No torch headers: the launchers (declared in launchers.h) take raw pointers and a stream; the driver
// csrc/routed_rms_norm.cpp calls them.
#include "launchers.h"

namespace {

using libra::cuda::Acc;
using libra::cuda::block_sum;
using libra::cuda::from_acc;
using libra::cuda::load;
using libra::cuda::Pack;
using libra::cuda::round_to;
using libra::cuda::store;
using libra::cuda::to_acc;

constexpr int kMaxThreads = 256;
constexpr int kColumnTile = 32;   // weight-gradient reduction: columns per block
constexpr int kRowLanes = 16;     // weight-gradient reduction: threads that share one column

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    rms_norm_fwd_kernel(const T* x, const T* residual, T* h, T* __restrict__ y, typename Acc<T>::type* __restrict__ rstd,
                        const T* __restrict__ w_text, const T* __restrict__ w_vision, int64_t rows, int64_t n_text,
                        int64_t width, typename Acc<T>::type eps) {
  using acc_t = typename Acc<T>::type;
  __shared__ acc_t scratch[33];
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t offset = row * width;
    acc_t sum_sq = 0;
    for (int64_t c = threadIdx.x * VEC; c < width; c += step) {
      Pack<T, VEC> v = load<T, VEC>(x + offset + c);
      if (residual != nullptr) {
        const Pack<T, VEC> r = load<T, VEC>(residual + offset + c);
#pragma unroll
        for (int k = 0; k < VEC; ++k) v.v[k] = from_acc<T>(to_acc(v.v[k]) + to_acc(r.v[k]));
        store<T, VEC>(h + offset + c, v);
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const acc_t a = to_acc(v.v[k]);
        sum_sq += a * a;
      }
    }
    const acc_t inv = libra::rms_inverse<acc_t>(block_sum(sum_sq, scratch), width, eps);
    if (threadIdx.x == 0) rstd[row] = inv;
    // With the fused add, each thread reads back the h values it wrote itself above.
    const T* src = residual != nullptr ? h : x;
    const T* w = row < n_text ? w_text : w_vision;
    for (int64_t c = threadIdx.x * VEC; c < width; c += step) {
      const Pack<T, VEC> v = load<T, VEC>(src + offset + c);
      const Pack<T, VEC> wv = load<T, VEC>(w + c);
      Pack<T, VEC> out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) out.v[k] = from_acc<T>(to_acc(wv.v[k]) * round_to<T>(to_acc(v.v[k]) * inv));
      store<T, VEC>(y + offset + c, out);
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    rms_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const typename Acc<T>::type* __restrict__ rstd,
                        const T* __restrict__ w_text, const T* __restrict__ w_vision, const T* __restrict__ grad_h,
                        T* __restrict__ dx, typename Acc<T>::type* __restrict__ partial, int64_t rows, int64_t n_text,
                        int64_t width, int64_t rows_per_block, int64_t text_blocks) {
  using acc_t = typename Acc<T>::type;
  extern __shared__ unsigned char shared_bytes[];
  acc_t* mean_dot = reinterpret_cast<acc_t*>(shared_bytes);  // [rows_per_block]
  __shared__ acc_t scratch[33];
  int64_t begin = 0, count = 0;
  bool is_text = true;
  libra::block_rows(blockIdx.x, text_blocks, n_text, rows, rows_per_block, &begin, &count, &is_text);
  const T* w = is_text ? w_text : w_vision;
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;

  // Phase 1, row by row: the mean over the row of dxhat * xhat, which every dx of the row needs.
  for (int64_t i = 0; i < count; ++i) {
    const int64_t offset = (begin + i) * width;
    const acc_t inv = rstd[begin + i];
    acc_t dot = 0;
    for (int64_t c = threadIdx.x * VEC; c < width; c += step) {
      const Pack<T, VEC> g = load<T, VEC>(dy + offset + c);
      const Pack<T, VEC> xv = load<T, VEC>(x + offset + c);
      const Pack<T, VEC> wv = load<T, VEC>(w + c);
#pragma unroll
      for (int k = 0; k < VEC; ++k) dot += to_acc(g.v[k]) * to_acc(wv.v[k]) * (to_acc(xv.v[k]) * inv);
    }
    dot = block_sum(dot, scratch);
    if (threadIdx.x == 0) mean_dot[i] = dot / static_cast<acc_t>(width);
  }
  __syncthreads();

  // Phase 2, columns outer and rows inner: each thread owns VEC columns, writes their dx row by row and keeps
  // their weight-gradient sums in registers, so the block needs no shared accumulator of width D.
  for (int64_t c = threadIdx.x * VEC; c < width; c += step) {
    const Pack<T, VEC> wv = load<T, VEC>(w + c);
    acc_t acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = 0;
    for (int64_t i = 0; i < count; ++i) {
      const int64_t offset = (begin + i) * width + c;
      const acc_t inv = rstd[begin + i], md = mean_dot[i];
      const Pack<T, VEC> g = load<T, VEC>(dy + offset);
      const Pack<T, VEC> xv = load<T, VEC>(x + offset);
      Pack<T, VEC> extra;
      if (grad_h != nullptr) extra = load<T, VEC>(grad_h + offset);
      Pack<T, VEC> out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const acc_t gk = to_acc(g.v[k]), xhat = to_acc(xv.v[k]) * inv;
        acc_t d = libra::rms_norm_input_grad<acc_t>(gk * to_acc(wv.v[k]), xhat, md, inv);
        if (grad_h != nullptr) d += to_acc(extra.v[k]);
        out.v[k] = from_acc<T>(d);
        acc[k] += gk * xhat;
      }
      store<T, VEC>(dx + offset, out);
    }
    if (partial != nullptr) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) partial[blockIdx.x * width + c + k] = acc[k];
    }
  }
}

// dw_text[c] = sum of the text blocks' partial[:, c]; dw_vision likewise (blockIdx.y picks the group).
template <typename T>
__global__ void weight_grad_kernel(const typename Acc<T>::type* __restrict__ partial, T* dw_text, T* dw_vision,
                                   int64_t width, int64_t text_blocks, int64_t n_blocks) {
  using acc_t = typename Acc<T>::type;
  __shared__ acc_t sums[kRowLanes][kColumnTile + 1];
  const bool text = blockIdx.y == 0;
  T* out = text ? dw_text : dw_vision;
  if (out == nullptr) return;  // the same for the whole block
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColumnTile + threadIdx.x;
  const int64_t b_end = text ? text_blocks : n_blocks;
  acc_t s = 0;
  if (c < width) {
    for (int64_t b = (text ? 0 : text_blocks) + threadIdx.y; b < b_end; b += kRowLanes) s += partial[b * width + c];
  }
  sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < width) {
    acc_t total = 0;
#pragma unroll
    for (int j = 0; j < kRowLanes; ++j) total += sums[j][threadIdx.x];
    out[c] = from_acc<T>(total);
  }
}

int threads_for(int64_t width, int vec) {
  const int64_t packs = (width + vec - 1) / vec;
  const int64_t rounded = (packs + 31) / 32 * 32;
  return static_cast<int>(rounded < 32 ? 32 : (rounded > kMaxThreads ? kMaxThreads : rounded));
}

int grid_for(int64_t rows) { return static_cast<int>(rows < (1 << 30) ? rows : (1 << 30)); }

template <typename T>
cudaError_t forward(const void* x, const void* residual, void* h, void* y, void* rstd, const void* w_text,
                    const void* w_vision, int64_t rows, int64_t n_text, int64_t width, double eps,
                    cudaStream_t stream) {
  using acc_t = typename Acc<T>::type;
  constexpr int kVec = 16 / sizeof(T);
  if (rows == 0 || width == 0) return cudaSuccess;
  const bool vectorised = width % kVec == 0 && libra::cuda::aligned(x, 16) && libra::cuda::aligned(y, 16) &&
                          libra::cuda::aligned(w_text, 16) && libra::cuda::aligned(w_vision, 16) &&
                          (residual == nullptr || (libra::cuda::aligned(residual, 16) && libra::cuda::aligned(h, 16)));
  const auto args = [&](auto kernel, int vec) {
    kernel<<<grid_for(rows), threads_for(width, vec), 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(residual), static_cast<T*>(h), static_cast<T*>(y),
        static_cast<acc_t*>(rstd), static_cast<const T*>(w_text), static_cast<const T*>(w_vision), rows, n_text,
        width, static_cast<acc_t>(eps));
  };
  if (vectorised) {
    args(rms_norm_fwd_kernel<T, kVec>, kVec);
  } else {
    args(rms_norm_fwd_kernel<T, 1>, 1);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward(const void* dy, const void* x, const void* rstd, const void* w_text, const void* w_vision,
                     const void* grad_h, void* dx, void* partial, void* dw_text, void* dw_vision, int64_t rows,
                     int64_t n_text, int64_t width, int64_t rows_per_block, cudaStream_t stream) {
  using acc_t = typename Acc<T>::type;
  constexpr int kVec = 16 / sizeof(T);
  if (width == 0) return cudaSuccess;
  const int64_t text_blocks = libra::blocks_for_rows(n_text, rows_per_block);
  const int64_t n_blocks = text_blocks + libra::blocks_for_rows(rows - n_text, rows_per_block);
  if (n_blocks > 0) {
    const bool vectorised = width % kVec == 0 && libra::cuda::aligned(dy, 16) && libra::cuda::aligned(x, 16) &&
                            libra::cuda::aligned(dx, 16) && libra::cuda::aligned(w_text, 16) &&
                            libra::cuda::aligned(w_vision, 16) &&
                            (grad_h == nullptr || libra::cuda::aligned(grad_h, 16));
    const size_t shared = static_cast<size_t>(rows_per_block) * sizeof(acc_t);
    const auto launch = [&](auto kernel, int vec) {
      kernel<<<static_cast<unsigned>(n_blocks), threads_for(width, vec), shared, stream>>>(
          static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const acc_t*>(rstd),
          static_cast<const T*>(w_text), static_cast<const T*>(w_vision), static_cast<const T*>(grad_h),
          static_cast<T*>(dx), static_cast<acc_t*>(partial), rows, n_text, width, rows_per_block, text_blocks);
    };
    if (vectorised) {
      launch(rms_norm_bwd_kernel<T, kVec>, kVec);
    } else {
      launch(rms_norm_bwd_kernel<T, 1>, 1);
    }
  }
  if (dw_text != nullptr || dw_vision != nullptr) {
    const dim3 grid(static_cast<unsigned>((width + kColumnTile - 1) / kColumnTile), 2);
    weight_grad_kernel<T><<<grid, dim3(kColumnTile, kRowLanes), 0, stream>>>(
        static_cast<const acc_t*>(partial), static_cast<T*>(dw_text), static_cast<T*>(dw_vision), width,
        text_blocks, n_blocks);
  }
  return cudaGetLastError();
}

}  // namespace

namespace libra {

// h and residual are null without the fused add. rstd is float32 (float64 for float64 data).
cudaError_t routed_rms_norm_fwd_cuda(DType dtype, const void* x, const void* residual, void* h, void* y, void* rstd,
                                     const void* w_text, const void* w_vision, int64_t rows, int64_t n_text,
                                     int64_t width, double eps, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return forward<float>(x, residual, h, y, rstd, w_text, w_vision, rows, n_text, width, eps, stream);
    case DType::kFloat64:
      return forward<double>(x, residual, h, y, rstd, w_text, w_vision, rows, n_text, width, eps, stream);
    case DType::kFloat16:
      return forward<__half>(x, residual, h, y, rstd, w_text, w_vision, rows, n_text, width, eps, stream);
    case DType::kBFloat16:
      return forward<__nv_bfloat16>(x, residual, h, y, rstd, w_text, w_vision, rows, n_text, width, eps, stream);
  }
  return cudaErrorInvalidValue;
}

// partial: float32 (float64) [blocks, width] scratch, needed (non-null) when dw_text or dw_vision is asked for
// (non-null); blocks = blocks_for_rows(n_text, rows_per_block) + blocks_for_rows(rows - n_text, rows_per_block).
// grad_h (may be null) is added to dx. The dynamic shared memory is rows_per_block accumulator values.
cudaError_t routed_rms_norm_bwd_cuda(DType dtype, const void* dy, const void* x, const void* rstd,
                                     const void* w_text, const void* w_vision, const void* grad_h, void* dx,
                                     void* partial, void* dw_text, void* dw_vision, int64_t rows, int64_t n_text,
                                     int64_t width, int64_t rows_per_block, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return backward<float>(dy, x, rstd, w_text, w_vision, grad_h, dx, partial, dw_text, dw_vision, rows, n_text,
                             width, rows_per_block, stream);
    case DType::kFloat64:
      return backward<double>(dy, x, rstd, w_text, w_vision, grad_h, dx, partial, dw_text, dw_vision, rows, n_text,
                              width, rows_per_block, stream);
    case DType::kFloat16:
      return backward<__half>(dy, x, rstd, w_text, w_vision, grad_h, dx, partial, dw_text, dw_vision, rows, n_text,
                              width, rows_per_block, stream);
    case DType::kBFloat16:
      return backward<__nv_bfloat16>(dy, x, rstd, w_text, w_vision, grad_h, dx, partial, dw_text, dw_vision, rows,
                                     n_text, width, rows_per_block, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace libra
