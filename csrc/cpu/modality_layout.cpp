// CPU launcher of the modality layout: from the vision flags and their inclusive prefix count, every token's sorted
// row, the inverse permutation and the two group sizes (text rows first, then vision rows, each in (batch,
// position) order). The same per-token formula as the CUDA kernel (libra::sorted_row). Checks and allocation are
// the driver's (csrc/modality_layout.cpp).
#include <ATen/Parallel.h>

#include "launchers.h"

namespace libra {

void modality_layout_cpu(const bool* flags, const int64_t* inclusive_count, int64_t total, int64_t* sort_index,
                         int64_t* row_of, int64_t* counts) {
  const int64_t n_vision = inclusive_count[total - 1];
  const int64_t n_text = total - n_vision;
  at::parallel_for(0, total, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = sorted_row(i, inclusive_count[i] - flags[i], flags[i], n_text);
      row_of[i] = row;
      sort_index[row] = i;
    }
  });
  counts[0] = n_text;
  counts[1] = n_vision;
}

}  // namespace libra
