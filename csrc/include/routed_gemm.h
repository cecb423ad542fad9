// GEMM helpers shared by the drivers of the routed projections (csrc/routed_linear.cpp,
// csrc/routed_projections.cpp): every product is one ATen GEMM written straight into its slice of an output.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace libra {

// out = a @ b, written by the GEMM itself into out, a row or column slice of a larger buffer: BLAS takes the
// buffer's row stride as the leading dimension, so there is no temporary and no copy.
inline void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }

// The rows of `parts` as one [sum of rows, in] matrix when they are consecutive row blocks of one contiguous
// buffer (no copy); an undefined tensor otherwise.
inline at::Tensor packed_rows(const std::vector<at::Tensor>& parts) {
  const auto& first = parts.front();
  if (parts.size() == 1) {
    return first;
  }
  int64_t next_offset = first.storage_offset(), rows = 0;
  for (const auto& part : parts) {
    if (!part.is_contiguous() || part.size(1) != first.size(1) || part.scalar_type() != first.scalar_type() ||
        part.storage_offset() != next_offset || !part.storage().is_alias_of(first.storage())) {
      return at::Tensor();
    }
    next_offset += part.numel();
    rows += part.size(0);
  }
  return first.as_strided({rows, first.size(1)}, {first.size(1), 1}, first.storage_offset());
}

// The shape checks of one routed projection (w_vision_b absent: a dense vision weight).
inline void check_routed_linear_inputs(const at::Tensor& x, int64_t n_text, const at::Tensor& w_text,
                                       const at::Tensor& w_vision_a, const c10::optional<at::Tensor>& w_vision_b) {
  TORCH_CHECK(x.dim() == 2, "routed_linear: x must be [T, in], got ", x.sizes());
  TORCH_CHECK(n_text >= 0 && n_text <= x.size(0), "routed_linear: n_text must be in [0, ", x.size(0), "], got ",
              n_text);
  TORCH_CHECK(w_text.dim() == 2 && w_text.size(1) == x.size(1), "routed_linear: w_text must be [out, in], got ",
              w_text.sizes());
  TORCH_CHECK(w_vision_a.dim() == 2 && w_vision_a.size(1) == x.size(1),
              "routed_linear: w_vision_a must be [r, in] or [out, in], got ", w_vision_a.sizes());
  if (w_vision_b.has_value()) {
    TORCH_CHECK(w_vision_b->dim() == 2 && w_vision_b->size(0) == w_text.size(0) &&
                    w_vision_b->size(1) == w_vision_a.size(0),
                "routed_linear: w_vision_b must be [out, r], got ", w_vision_b->sizes());
  } else {
    TORCH_CHECK(w_vision_a.size(0) == w_text.size(0), "routed_linear: a dense w_vision_a must be [out, in]");
  }
}

// The [0] placeholder returned for a gradient that was not asked for (the convention of every registered backward
// op); the Python autograd turns it into None.
inline at::Tensor none_like(const at::Tensor& x) { return at::empty({0}, x.options()); }

// The gradient of a weight from its rows' output gradient and input: dW = dy.T @ input (zeros for 0 rows).
// dy may be a column slice of a wider gradient: the GEMM reads it in place.
inline at::Tensor weight_grad(const at::Tensor& dy, const at::Tensor& input) {
  if (dy.size(0) == 0) {
    return at::zeros({dy.size(1), input.size(1)}, input.options());
  }
  return at::mm(dy.t(), input);
}

}  // namespace libra
