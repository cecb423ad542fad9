// Driver of routed_projections: several routed projections of the same input run as one: the text weights of all
// maps in one GEMM, the vision A factors in one GEMM, then one B GEMM per map, all into column slices of one
// output. The weights are passed separately (each keeps its own requires_grad and checkpoint name); when they
// are consecutive row blocks of one buffer (libra_kernels.ops.routed_projections.pack_rows does this once), the
// packed matrix is used as is, otherwise each weight runs its own GEMM into its slice (still no copy). As for
// routed_linear, the ATen GEMMs are the launchers, so one driver serves the CPU and CUDA keys. Schemas: csrc/ops.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "routed_gemm.h"

namespace {

using libra::check_routed_linear_inputs;
using libra::mm_into;
using libra::packed_rows;
using libra::none_like;
using libra::weight_grad;

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
      check_routed_linear_inputs(x, n_text, w_text[i], w_a[i], w_b.back());
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
  m.impl("routed_projections_fwd", &routed_projections_fwd);
  m.impl("routed_projections_bwd", &routed_projections_bwd);
}

TORCH_LIBRARY_IMPL(libra, CUDA, m) {
  m.impl("routed_projections_fwd", &routed_projections_fwd);
  m.impl("routed_projections_bwd", &routed_projections_bwd);
}
