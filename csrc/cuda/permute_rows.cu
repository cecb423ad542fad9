// CUDA kernel of permute_rows: out[r] = x[index[r]], rows moved as raw bytes in the widest aligned unit (16, 4, 2 or
// 1 bytes), so one kernel serves every dtype. No torch headers: the launcher (declared in launchers.h) takes raw
// pointers and a stream; the driver csrc/permute_rows.cpp calls it.
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"

namespace {

constexpr int kRowsPerBlock = 8;  // one warp per row, 8 rows per block

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

namespace libra {

// src, dst: rows of row_bytes bytes each; index: int64 [rows], a permutation of [0, rows).
cudaError_t permute_rows_cuda(const void* src, void* dst, const int64_t* index, int64_t rows, int64_t row_bytes,
                              cudaStream_t stream) {
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

}  // namespace libra
