// CPU launcher of permute_rows: out[r] = x[index[r]], rows moved as raw bytes (one memcpy each), so one loop serves
// every dtype. Checks and allocation are the driver's (csrc/permute_rows.cpp).
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>

#include "launchers.h"

namespace libra {

void permute_rows_cpu(const void* src, void* dst, const int64_t* index, int64_t rows, int64_t row_bytes) {
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(index[r] >= 0 && index[r] < rows, "permute_rows: index ", index[r], " out of range [0, ", rows, ")");
  }
  const auto* in = static_cast<const char*>(src);
  auto* out = static_cast<char*>(dst);
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / row_bytes);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      std::memcpy(out + r * row_bytes, in + index[r] * row_bytes, row_bytes);
    }
  });
}

}  // namespace libra
