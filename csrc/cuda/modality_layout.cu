// CUDA kernel of the modality layout (the CPU launcher csrc/cpu/modality_layout.cpp computes the same): from the
// vision flags and their inclusive prefix count, every token's sorted row, the inverse permutation and the two group
// sizes, all written on the device (nothing read back to the host). No torch headers: the launcher (declared in
// launchers.h) takes raw pointers and a stream; the driver csrc/modality_layout.cpp calls it.
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"

namespace {

constexpr int kThreads = 256;

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

}  // namespace

namespace libra {

// flags: bool [total]; inclusive_count: int64 [total], the inclusive prefix sum of flags. Writes sort_index [total],
// row_of [total] and counts [2] = (n_text, n_vision).
cudaError_t modality_layout_cuda(const bool* flags, const int64_t* inclusive_count, int64_t total,
                                 int64_t* sort_index, int64_t* row_of, int64_t* counts, cudaStream_t stream) {
  if (total == 0) return cudaSuccess;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  layout_kernel<<<static_cast<unsigned>(blocks < 65536 ? blocks : 65536), kThreads, 0, stream>>>(
      flags, inclusive_count, total, sort_index, row_of, counts);
  return cudaGetLastError();
}

}  // namespace libra
