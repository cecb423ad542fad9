// CUDA kernels of the modality layout ops (semantics in csrc/cpu/layout.cpp). No torch headers: the launchers take
// raw pointers and a stream; csrc/cuda/layout_binding.cpp calls them.
//   layout      : from the vision flags and their inclusive prefix count, every token's sorted row, the inverse
//                 permutation and the two group sizes, all written on the device (nothing read back to the host).
//   permute_rows: out[r] = x[index[r]], rows moved as raw bytes in the widest aligned unit (16, 4, 2 or 1 bytes),
//                 so one kernel serves every dtype.
#include <cuda_runtime.h>

#include <cstdint>

#include "libra_common.h"

namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = 8;  // permute_rows: one warp per row, 8 rows per block

__global__ void layout_kernel(const bool* __restrict__ flags, const int64_t* __restrict__ inclusive_count,
                              int64_t total, int64_t* __restrict__ sort_index, int64_t* __restrict__ row_of,
                              int64_t* __restrict__ counts) {
  const int64_t n_vision = inclusive_count[total - 1];
  const int64_t n_text = total - n_vision;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const bool is_vision = flags[i];
    const int64_t row = libra::sorted_row(i, inclusive_count[i] - is_vision, is_vision, n_text);
    row_of[i] = row;
    sort_index[row] = i;
    if (i == 0) {
      counts[0] = n_text;
      counts[1] = n_vision;
    }
  }
}

template <typename Unit>
__global__ void permute_rows_kernel(const Unit* __restrict__ src, Unit* __restrict__ dst,
                                    const int64_t* __restrict__ index, int64_t rows, int64_t units_per_row) {
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y; r < rows;
       r += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t from = index[r];
    if (from < 0 || from >= rows) __trap();  // not a permutation: fail loudly rather than read out of bounds
    const Unit* in = src + from * units_per_row;
    Unit* out = dst + r * units_per_row;
    for (int64_t u = threadIdx.x; u < units_per_row; u += 32) out[u] = in[u];
  }
}

template <typename Unit>
void launch_permute(const void* src, void* dst, const int64_t* index, int64_t rows, int64_t row_bytes,
                    cudaStream_t stream) {
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const unsigned grid = static_cast<unsigned>(blocks < (1 << 30) ? blocks : (1 << 30));
  permute_rows_kernel<Unit><<<grid, dim3(32, kRowsPerBlock), 0, stream>>>(
      static_cast<const Unit*>(src), static_cast<Unit*>(dst), index, rows,
      row_bytes / static_cast<int64_t>(sizeof(Unit)));
}

}  // namespace

// flags: bool [total]; inclusive_count: int64 [total], the inclusive prefix sum of flags. Writes sort_index [total],
// row_of [total] and counts [2] = (n_text, n_vision).
extern "C" cudaError_t libra_modality_layout_cuda(const bool* flags, const int64_t* inclusive_count, int64_t total,
                                                  int64_t* sort_index, int64_t* row_of, int64_t* counts,
                                                  cudaStream_t stream) {
  if (total == 0) return cudaSuccess;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  layout_kernel<<<static_cast<unsigned>(blocks < 65536 ? blocks : 65536), kThreads, 0, stream>>>(
      flags, inclusive_count, total, sort_index, row_of, counts);
  return cudaGetLastError();
}

// src, dst: rows of row_bytes bytes each; index: int64 [rows], a permutation of [0, rows).
extern "C" cudaError_t libra_permute_rows_cuda(const void* src, void* dst, const int64_t* index, int64_t rows,
                                               int64_t row_bytes, cudaStream_t stream) {
  if (rows == 0 || row_bytes == 0) return cudaSuccess;
  const auto fits = [&](int unit) {
    return row_bytes % unit == 0 && reinterpret_cast<uintptr_t>(src) % unit == 0 &&
           reinterpret_cast<uintptr_t>(dst) % unit == 0;
  };
  if (fits(16)) {
    launch_permute<uint4>(src, dst, index, rows, row_bytes, stream);
  } else if (fits(4)) {
    launch_permute<uint32_t>(src, dst, index, rows, row_bytes, stream);
  } else if (fits(2)) {
    launch_permute<uint16_t>(src, dst, index, rows, row_bytes, stream);
  } else {
    launch_permute<uint8_t>(src, dst, index, rows, row_bytes, stream);
  }
  return cudaGetLastError();
}
