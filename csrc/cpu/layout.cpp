// CPU kernels of the modality layout ops (DESIGN.md §2): building the sorted layout from a vision mask, and the
// row permutation that sorts [B, N, ...] into [T, ...] and back.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "libra_common.h"

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> modality_layout_cpu(const at::Tensor& vision_mask) {
  TORCH_CHECK(vision_mask.dim() == 2 && vision_mask.scalar_type() == at::kBool,
              "modality_layout: vision_mask must be a bool [B, N] tensor");
  const auto flags = vision_mask.contiguous();
  const int64_t total = flags.numel();
  const bool* f = flags.data_ptr<bool>();
  auto sort_index = at::empty({total}, flags.options().dtype(at::kLong));
  auto row_of = at::empty(flags.sizes(), flags.options().dtype(at::kLong));
  int64_t n_vision = 0;
  for (int64_t i = 0; i < total; ++i) {
    n_vision += f[i];
  }
  const int64_t n_text = total - n_vision;
  int64_t* si = sort_index.data_ptr<int64_t>();
  int64_t* ro = row_of.data_ptr<int64_t>();
  int64_t vision_before = 0;  // running exclusive count of vision tokens
  for (int64_t i = 0; i < total; ++i) {
    const int64_t row = libra::sorted_row(i, vision_before, f[i], n_text);
    ro[i] = row;
    si[row] = i;
    vision_before += f[i];
  }
  auto counts = at::empty({2}, flags.options().dtype(at::kLong));
  counts.data_ptr<int64_t>()[0] = n_text;
  counts.data_ptr<int64_t>()[1] = n_vision;
  return {sort_index, row_of, counts};
}

at::Tensor permute_rows_cpu(const at::Tensor& x_in, const at::Tensor& index_in,
                           const at::Tensor& /*inverse_index: used by the backward only*/) {
  TORCH_CHECK(x_in.dim() >= 1, "permute_rows: x must have a row dimension");
  TORCH_CHECK(index_in.dim() == 1 && index_in.scalar_type() == at::kLong && index_in.size(0) == x_in.size(0),
              "permute_rows: index must be int64 [T] with T = x.shape[0]");
  const auto x = x_in.contiguous();
  const auto index = index_in.contiguous();
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t rows = x.size(0);
  if (rows == 0 || x.numel() == 0) {
    return out;
  }
  const int64_t row_bytes = x.numel() / rows * x.element_size();
  const auto* src = static_cast<const char*>(x.const_data_ptr());
  auto* dst = static_cast<char*>(out.data_ptr());
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(idx[r] >= 0 && idx[r] < rows, "permute_rows: index ", idx[r], " out of range [0, ", rows, ")");
  }
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / row_bytes);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      std::memcpy(dst + r * row_bytes, src + idx[r] * row_bytes, row_bytes);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(libra, CPU, m) {
  m.impl("modality_layout", &modality_layout_cpu);
  m.impl("permute_rows", &permute_rows_cpu);
}
