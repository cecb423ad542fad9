// CUDA row kernel of the fused linear cross-entropy (driver: csrc/linear_cross_entropy.cpp): one thread block per
// (row, segment) of a logits buffer. First sweep: online softmax (running max and sum, float32) plus the sum of the
// logits, reduced over the block, giving the loss and the statistics. Second sweep: the gradient of every logit
// written in place, ready for the dh and dW GEMMs. The arithmetic is the LIBRA_HD math of linear_cross_entropy_math.h, the same the CPU
// kernel runs. Offsets are 64-bit (row * ld exceeds 2^31 for large chunks); ids within a row are 32-bit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launchers.h"

namespace {

using libra::xent::Rows;

// Element conversions, the accumulator type and the vector pack (VEC consecutive logits moved by one aligned load or
// store: 16 bytes when vectorised, one element otherwise) come from libra_common.h.
using libra::cuda::Acc;
using libra::cuda::from_acc;
using libra::cuda::Pack;
using libra::cuda::to_acc;

template <typename scalar_t, int THREADS, int VEC>
__global__ void __launch_bounds__(THREADS) rows_kernel(Rows a) {
  using acc_t = typename Acc<scalar_t>::type;
  using pack_t = Pack<scalar_t, VEC>;
  constexpr int kWarps = THREADS / 32;
  const int64_t pair = blockIdx.x;
  const int64_t row = pair / a.segments, segment = pair % a.segments;
  scalar_t* z = static_cast<scalar_t*>(a.logits) + row * a.ld + segment * a.width;
  const int width = static_cast<int>(a.width);
  const auto target = libra::xent::target_of(a, row, segment);

  acc_t lse;
  if (a.lse_in == nullptr) {
    __shared__ acc_t warp_max[kWarps], warp_sum[kWarps], warp_logits[kWarps];
    __shared__ acc_t block_lse;
    // Read before the block's barrier, so no thread can have overwritten it with a gradient yet.
    const acc_t target_logit = target.column >= 0 ? to_acc(z[target.column]) : acc_t(0);
    acc_t max = libra::xent::lowest(acc_t(0)), sum = 0, sum_logits = 0;
    for (int j = threadIdx.x * VEC; j < width; j += THREADS * VEC) {
      const pack_t p = *reinterpret_cast<const pack_t*>(z + j);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const acc_t v = to_acc(p.v[k]);
        libra::xent::softmax_add(max, sum, v);
        sum_logits += v;
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      libra::xent::softmax_merge(max, sum, __shfl_xor_sync(0xffffffffu, max, offset),
                                 __shfl_xor_sync(0xffffffffu, sum, offset));
      sum_logits += __shfl_xor_sync(0xffffffffu, sum_logits, offset);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
      warp_max[warp] = max;
      warp_sum[warp] = sum;
      warp_logits[warp] = sum_logits;
    }
    __syncthreads();
    if (warp == 0) {
      max = lane < kWarps ? warp_max[lane] : libra::xent::lowest(acc_t(0));
      sum = lane < kWarps ? warp_sum[lane] : acc_t(0);
      sum_logits = lane < kWarps ? warp_logits[lane] : acc_t(0);
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) {
        libra::xent::softmax_merge(max, sum, __shfl_xor_sync(0xffffffffu, max, offset),
                                   __shfl_xor_sync(0xffffffffu, sum, offset));
        sum_logits += __shfl_xor_sync(0xffffffffu, sum_logits, offset);
      }
      if (lane == 0) {
        block_lse = libra::xent::log_sum_exp(max, sum);
        libra::xent::write_row_stats(a, row, segment, target.valid, block_lse, target_logit, sum_logits);
      }
    }
    __syncthreads();
    lse = block_lse;
  } else {
    lse = libra::xent::given_lse<acc_t>(a, row, segment);
  }
  if (a.weights == nullptr) return;

  const auto c = libra::xent::grad_coefficients(lse, libra::xent::row_weight<acc_t>(a, row, segment), target.valid,
                                                a);
  for (int j = threadIdx.x * VEC; j < width; j += THREADS * VEC) {
    pack_t p = *reinterpret_cast<const pack_t*>(z + j);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      p.v[k] = from_acc<scalar_t>(libra::xent::logit_grad(to_acc(p.v[k]), j + k == target.column, c));
    }
    *reinterpret_cast<pack_t*>(z + j) = p;
  }
}

template <typename scalar_t, int THREADS>
cudaError_t launch_with_threads(const Rows& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  // 16-byte packs need every row and segment start aligned: the buffer is, so its widths must be multiples of kVec.
  const bool vector = a.width % kVec == 0 && a.ld % kVec == 0 &&
                      reinterpret_cast<uintptr_t>(a.logits) % (kVec * sizeof(scalar_t)) == 0;
  const dim3 grid(static_cast<unsigned>(a.rows * a.segments));
  if (vector) {
    rows_kernel<scalar_t, THREADS, kVec><<<grid, THREADS, 0, stream>>>(a);
  } else {
    rows_kernel<scalar_t, THREADS, 1><<<grid, THREADS, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch(const Rows& a, cudaStream_t stream) {
  // Enough threads that each handles a few dozen logits: 512 for the 32,000-id text head, 128 for a 514-id codebook.
  if (a.width >= 8192) return launch_with_threads<scalar_t, 512>(a, stream);
  if (a.width >= 1024) return launch_with_threads<scalar_t, 256>(a, stream);
  return launch_with_threads<scalar_t, 128>(a, stream);
}

}  // namespace

namespace libra {

// The caller guarantees rows * segments < 2^31 (one block each).
cudaError_t linear_cross_entropy_rows_cuda(const xent::Rows& args, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch<float>(args, stream);
    case DType::kFloat64:
      return launch<double>(args, stream);
    case DType::kFloat16:
      return launch<__half>(args, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace libra
