// Routed linear projection on the sorted layout: rows [0, n_text) through w_text, rows [n_text, T) through the
// vision expert (w_vision_a then w_vision_b, or a dense w_vision_a).
//
// Every product is one ATen GEMM (cuBLAS on CUDA, the CPU BLAS on the CPU) on a contiguous row slice, and
// every result is written with mm_out straight into its slice of one output buffer: no gather, scatter,
// concatenation or device-to-host synchronisation, so the op is capturable in a CUDA graph. The same
// function is registered for the CPU and the CUDA dispatch keys: ATen dispatches the GEMMs.
//
// routed_projections_fwd/_bwd run several routed projections of the same input as one: the text weights of all
// maps in one GEMM, the vision A factors in one GEMM, then one B GEMM per map, all into column slices of one
// output. The weights are passed separately (each keeps its own requires_grad and checkpoint name); when they
// are consecutive row blocks of one buffer (libra_kernels.ops.routed_projections.pack_rows does this once), the
// packed matrix is used as is, otherwise each weight runs its own GEMM into its slice (still no copy).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

namespace {

// out = a @ b, written by the GEMM itself into out, a row or column slice of a larger buffer: BLAS takes the
// buffer's row stride as the leading dimension, so there is no temporary and no copy.
void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }

void check_inputs(const at::Tensor& x, int64_t n_text, const at::Tensor& w_text, const at::Tensor& w_vision_a,
                  const c10::optional<at::Tensor>& w_vision_b) {
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

std::tuple<at::Tensor, at::Tensor> routed_linear_fwd(const at::Tensor& x, int64_t n_text, const at::Tensor& w_text,
                                                     const at::Tensor& w_vision_a,
                                                     const c10::optional<at::Tensor>& w_vision_b) {
  check_inputs(x, n_text, w_text, w_vision_a, w_vision_b);
  const int64_t rows = x.size(0), n_vision = rows - n_text;
  auto y = at::empty({rows, w_text.size(0)}, x.options());
  if (n_text > 0) {
    mm_into(y.narrow(0, 0, n_text), x.narrow(0, 0, n_text), w_text.t());
  }
  const auto x_vision = x.narrow(0, n_text, n_vision);
  auto y_vision = y.narrow(0, n_text, n_vision);
  if (!w_vision_b.has_value()) {
    if (n_vision > 0) {
      mm_into(y_vision, x_vision, w_vision_a.t());
    }
    return {y, at::empty({0}, x.options())};
  }
  // The rank-r activation is returned so that the backward does not recompute it for the gradient of B.
  auto low = at::empty({n_vision, w_vision_a.size(0)}, x.options());
  if (n_vision > 0) {
    mm_into(low, x_vision, w_vision_a.t());
    mm_into(y_vision, low, w_vision_b->t());
  }
  return {y, low};
}

// A [0] placeholder for a gradient that was not asked for; the Python operator drops these before returning.
at::Tensor none_like(const at::Tensor& x) { return at::empty({0}, x.options()); }

// The gradient of a weight from its rows' output gradient and input: dW = dy.T @ input (zeros for 0 rows).
// dy may be a column slice of a wider gradient: the GEMM reads it in place.
at::Tensor weight_grad(const at::Tensor& dy, const at::Tensor& input) {
  if (dy.size(0) == 0) {
    return at::zeros({dy.size(1), input.size(1)}, input.options());
  }
  return at::mm(dy.t(), input);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routed_linear_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& low, int64_t n_text, const at::Tensor& w_text,
    const at::Tensor& w_vision_a, const c10::optional<at::Tensor>& w_vision_b, std::array<bool, 4> needs) {
  check_inputs(x, n_text, w_text, w_vision_a, w_vision_b);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == x.size(0) && grad_y.size(1) == w_text.size(0),
              "routed_linear_bwd: grad_y must be [T, out], got ", grad_y.sizes());
  const auto [need_x, need_w_text, need_a, need_b_flag] = needs;
  const bool low_rank = w_vision_b.has_value();
  const bool need_b = need_b_flag && low_rank;
  const int64_t rows = x.size(0), n_vision = rows - n_text;
  const auto dy = grad_y.scalar_type() == x.scalar_type() ? grad_y : grad_y.to(x.scalar_type());
  const auto dy_text = dy.narrow(0, 0, n_text), dy_vision = dy.narrow(0, n_text, n_vision);
  const auto x_text = x.narrow(0, 0, n_text), x_vision = x.narrow(0, n_text, n_vision);

  // dx is written slice by slice by the GEMMs themselves: no temporary, no copy.
  at::Tensor dx = need_x ? at::empty_like(x, at::MemoryFormat::Contiguous) : none_like(x);
  if (need_x && n_text > 0) {
    mm_into(dx.narrow(0, 0, n_text), dy_text, w_text);
  }
  const at::Tensor d_w_text = need_w_text ? weight_grad(dy_text, x_text) : none_like(x);

  at::Tensor d_a = none_like(x), d_b = none_like(x);
  if (!low_rank) {
    if (need_x && n_vision > 0) {
      mm_into(dx.narrow(0, n_text, n_vision), dy_vision, w_vision_a);
    }
    if (need_a) {
      d_a = weight_grad(dy_vision, x_vision);
    }
    return {dx, d_w_text, d_a, d_b};
  }
  TORCH_CHECK(low.dim() == 2 && low.size(0) == n_vision && low.size(1) == w_vision_a.size(0),
              "routed_linear_bwd: low must be [T - n_text, r], got ", low.sizes());
  if (need_b) {
    d_b = weight_grad(dy_vision, low);
  }
  if (need_x || need_a) {
    // The gradient of the rank-r activation, shared by dx and dA (no GEMM for a slice without rows).
    const auto d_low = n_vision > 0 ? at::mm(dy_vision, *w_vision_b) : at::empty({0, low.size(1)}, x.options());
    if (need_x && n_vision > 0) {
      mm_into(dx.narrow(0, n_text, n_vision), d_low, w_vision_a);
    }
    if (need_a) {
      d_a = weight_grad(d_low, x_vision);
    }
  }
  return {dx, d_w_text, d_a, d_b};
}

// ---- several projections of one input

// The rows of `parts` as one [sum of rows, in] matrix when they are consecutive row blocks of one contiguous
// buffer (no copy); an undefined tensor otherwise.
at::Tensor packed_rows(const std::vector<at::Tensor>& parts) {
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

// Column offsets of consecutive blocks of the given widths, plus the total width at the end.
std::vector<int64_t> offsets(const std::vector<int64_t>& widths) {
  std::vector<int64_t> result{0};
  for (const auto w : widths) {
    result.push_back(result.back() + w);
  }
  return result;
}

struct Projections {
  std::vector<at::Tensor> w_text, w_a;
  std::vector<c10::optional<at::Tensor>> w_b;
  std::vector<int64_t> out_cols, low_cols;  // column offsets of each map in y and in low (+ total)

  // w_b_in holds the B factors of the maps with has_b[i] set, in map order.
  Projections(const at::Tensor& x, int64_t n_text, at::TensorList w_text_in, at::TensorList w_a_in,
              at::TensorList w_b_in, at::IntArrayRef has_b)
      : w_text(w_text_in.vec()), w_a(w_a_in.vec()) {
    TORCH_CHECK(!w_text.empty() && w_text.size() == w_a.size() && w_text.size() == has_b.size(),
                "routed_projections: w_text, w_vision_a and has_b must be non-empty lists of one length");
    TORCH_CHECK(static_cast<int64_t>(w_b_in.size()) == std::count(has_b.begin(), has_b.end(), 1),
                "routed_projections: w_vision_b must hold one B factor per map with has_b set");
    std::vector<int64_t> outs, ranks;
    size_t next_b = 0;
    for (size_t i = 0; i < w_text.size(); ++i) {
      w_b.push_back(has_b[i] ? c10::optional<at::Tensor>(w_b_in[next_b++]) : c10::nullopt);
      check_inputs(x, n_text, w_text[i], w_a[i], w_b.back());
      outs.push_back(w_text[i].size(0));
      ranks.push_back(w_a[i].size(0));
    }
    out_cols = offsets(outs);
    low_cols = offsets(ranks);
  }
  size_t size() const { return w_text.size(); }
  int64_t out(size_t i) const { return out_cols[i + 1] - out_cols[i]; }
  int64_t rank(size_t i) const { return low_cols[i + 1] - low_cols[i]; }
};

// out = sum over maps of a[:, slice i] @ weights[i]: one GEMM on the packed weights when possible, else a chain of
// GEMMs accumulating into out (the first writes, the others add).
void mm_sum_into(at::Tensor out, const at::Tensor& a, const std::vector<at::Tensor>& weights,
                 const std::vector<int64_t>& cols) {
  const auto packed = packed_rows(weights);
  if (packed.defined()) {
    mm_into(out, a, packed);
    return;
  }
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto a_i = a.narrow(1, cols[i], cols[i + 1] - cols[i]);
    if (i == 0) {
      mm_into(out, a_i, weights[i]);
    } else {
      out.addmm_(a_i, weights[i]);
    }
  }
}

// out[:, slice i] = a @ weights[i].T for every map: one GEMM on the packed weights when possible.
void mm_split_into(at::Tensor out, const at::Tensor& a, const std::vector<at::Tensor>& weights,
                   const std::vector<int64_t>& cols) {
  const auto packed = packed_rows(weights);
  if (packed.defined()) {
    mm_into(out, a, packed.t());
    return;
  }
  for (size_t i = 0; i < weights.size(); ++i) {
    mm_into(out.narrow(1, cols[i], cols[i + 1] - cols[i]), a, weights[i].t());
  }
}

// The gradients of the weights that need one, dW_i = dy[:, slice i].T @ input, one GEMM each: the gradients are
// separate tensors (outputs of an op may not alias each other), and each GEMM is already large.
std::vector<at::Tensor> weight_grads(const at::Tensor& dy, const at::Tensor& input,
                                     const std::vector<int64_t>& cols, const std::vector<bool>& needs) {
  std::vector<at::Tensor> grads;
  for (size_t i = 0; i < needs.size(); ++i) {
    grads.push_back(needs[i] ? weight_grad(dy.narrow(1, cols[i], cols[i + 1] - cols[i]), input) : none_like(input));
  }
  return grads;
}

std::tuple<at::Tensor, at::Tensor> routed_projections_fwd(const at::Tensor& x, int64_t n_text,
                                                          at::TensorList w_text, at::TensorList w_vision_a,
                                                          at::TensorList w_vision_b, at::IntArrayRef has_b) {
  const Projections p(x, n_text, w_text, w_vision_a, w_vision_b, has_b);
  const int64_t rows = x.size(0), n_vision = rows - n_text;
  auto y = at::empty({rows, p.out_cols.back()}, x.options());
  auto low = at::empty({n_vision, p.low_cols.back()}, x.options());
  if (n_text > 0) {
    mm_split_into(y.narrow(0, 0, n_text), x.narrow(0, 0, n_text), p.w_text, p.out_cols);
  }
  if (n_vision > 0) {
    mm_split_into(low, x.narrow(0, n_text, n_vision), p.w_a, p.low_cols);
    auto y_vision = y.narrow(0, n_text, n_vision);
    for (size_t i = 0; i < p.size(); ++i) {
      auto out = y_vision.narrow(1, p.out_cols[i], p.out(i));
      const auto low_i = low.narrow(1, p.low_cols[i], p.rank(i));
      if (p.w_b[i].has_value()) {
        mm_into(out, low_i, p.w_b[i]->t());
      } else {
        out.copy_(low_i);  // a map without B (a bridge's A factor) outputs its A product itself
      }
    }
  }
  return {y, low};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
routed_projections_bwd(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& low, int64_t n_text,
                       at::TensorList w_text, at::TensorList w_vision_a, at::TensorList w_vision_b,
                       at::IntArrayRef has_b, bool need_x,
                       const c10::List<bool>& need_w_text_in, const c10::List<bool>& need_w_vision_a_in,
                       const c10::List<bool>& need_w_vision_b_in) {
  const Projections p(x, n_text, w_text, w_vision_a, w_vision_b, has_b);
  const std::vector<bool> need_w_text(need_w_text_in.begin(), need_w_text_in.end());
  const std::vector<bool> need_w_vision_a(need_w_vision_a_in.begin(), need_w_vision_a_in.end());
  const std::vector<bool> need_w_vision_b(need_w_vision_b_in.begin(), need_w_vision_b_in.end());
  TORCH_CHECK(need_w_text.size() == p.size() && need_w_vision_a.size() == p.size() &&
                  need_w_vision_b.size() == w_vision_b.size(),
              "routed_projections_bwd: one need flag per weight");
  const int64_t rows = x.size(0), n_vision = rows - n_text;
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == rows && grad_y.size(1) == p.out_cols.back(),
              "routed_projections_bwd: grad_y must be [T, sum of out], got ", grad_y.sizes());
  TORCH_CHECK(low.dim() == 2 && low.size(0) == n_vision && low.size(1) == p.low_cols.back(),
              "routed_projections_bwd: low must be [T - n_text, sum of r], got ", low.sizes());
  const auto dy = grad_y.scalar_type() == x.scalar_type() ? grad_y : grad_y.to(x.scalar_type());
  const auto dy_text = dy.narrow(0, 0, n_text), dy_vision = dy.narrow(0, n_text, n_vision);
  const auto x_text = x.narrow(0, 0, n_text), x_vision = x.narrow(0, n_text, n_vision);
  at::Tensor dx = need_x ? at::empty_like(x, at::MemoryFormat::Contiguous) : none_like(x);

  if (need_x && n_text > 0) {
    mm_sum_into(dx.narrow(0, 0, n_text), dy_text, p.w_text, p.out_cols);
  }
  auto d_w_text = weight_grads(dy_text, x_text, p.out_cols, need_w_text);

  std::vector<at::Tensor> d_b;
  for (size_t j = 0; j < w_vision_b.size(); ++j) {
    d_b.push_back(none_like(x));
  }
  size_t b_index = 0;  // index of map i's B factor among the listed ones
  const bool need_a_any = std::any_of(need_w_vision_a.begin(), need_w_vision_a.end(), [](bool n) { return n; });
  const bool need_d_low = need_x || need_a_any;
  // The gradient of the packed rank-r activations, written slice by slice.
  auto d_low = need_d_low ? at::empty({n_vision, p.low_cols.back()}, x.options()) : none_like(x);
  for (size_t i = 0; i < p.size(); ++i) {
    const auto dy_i = dy_vision.narrow(1, p.out_cols[i], p.out(i));
    if (!p.w_b[i].has_value()) {
      if (need_d_low) {
        d_low.narrow(1, p.low_cols[i], p.rank(i)).copy_(dy_i);
      }
      continue;
    }
    if (need_w_vision_b[b_index]) {
      d_b[b_index] = weight_grad(dy_i, low.narrow(1, p.low_cols[i], p.rank(i)));
    }
    ++b_index;
    if (need_d_low && n_vision > 0) {
      mm_into(d_low.narrow(1, p.low_cols[i], p.rank(i)), dy_i, *p.w_b[i]);
    }
  }
  if (need_x && n_vision > 0) {
    mm_sum_into(dx.narrow(0, n_text, n_vision), d_low, p.w_a, p.low_cols);
  }
  // Without any A gradient d_low is a [0] placeholder, which weight_grads then never reads.
  auto d_a = weight_grads(d_low, x_vision, p.low_cols, need_w_vision_a);
  return {dx, d_w_text, d_a, d_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(libra, CPU, m) {
  m.impl("routed_linear_fwd", &routed_linear_fwd);
  m.impl("routed_linear_bwd", &routed_linear_bwd);
  m.impl("routed_projections_fwd", &routed_projections_fwd);
  m.impl("routed_projections_bwd", &routed_projections_bwd);
}

TORCH_LIBRARY_IMPL(libra, CUDA, m) {
  m.impl("routed_linear_fwd", &routed_linear_fwd);
  m.impl("routed_linear_bwd", &routed_linear_bwd);
  m.impl("routed_projections_fwd", &routed_projections_fwd);
  m.impl("routed_projections_bwd", &routed_projections_bwd);
}
