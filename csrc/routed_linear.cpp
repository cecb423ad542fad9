// Driver of the routed linear projection on the sorted layout: rows [0, n_text) through w_text, rows [n_text, T)
// through the vision expert (w_vision_a then w_vision_b, or a dense w_vision_a). Schemas: csrc/ops.cpp.
//
// Every product is one ATen GEMM (cuBLAS on CUDA, the CPU BLAS on the CPU) on a contiguous row slice, and
// every result is written with mm_out straight into its slice of one output buffer: no gather, scatter,
// concatenation or device-to-host synchronisation, so the op is capturable in a CUDA graph. The GEMMs are the
// launchers: ATen dispatches them to the device, so the same driver is registered for the CPU and the CUDA keys
// (also in a build without CUDA kernels of its own).
//
// The grouped form (routed_linear_grouped_fwd/_bwd) runs G such projections with dense vision weights at once: x
// [G, T, in], one text and one vision weight [out, in] per group. When each modality's G weights are consecutive
// blocks of one buffer (pack_rows), every product is one batched GEMM over the groups (bmm into a row slice of the
// output: the batch and row strides go to the strided-batched BLAS call as they are, no copy); otherwise each
// group runs its own GEMM.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "routed_gemm.h"

namespace {

using libra::check_routed_linear_inputs;
using libra::mm_into;
using libra::none_like;
using libra::packed_rows;
using libra::weight_grad;

std::tuple<at::Tensor, at::Tensor> routed_linear_fwd(const at::Tensor& x, int64_t n_text, const at::Tensor& w_text,
                                                     const at::Tensor& w_vision_a,
                                                     const c10::optional<at::Tensor>& w_vision_b) {
  check_routed_linear_inputs(x, n_text, w_text, w_vision_a, w_vision_b);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routed_linear_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& low, int64_t n_text, const at::Tensor& w_text,
    const at::Tensor& w_vision_a, const c10::optional<at::Tensor>& w_vision_b, std::array<bool, 4> needs) {
  check_routed_linear_inputs(x, n_text, w_text, w_vision_a, w_vision_b);
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

// ---- the grouped form

void check_grouped_inputs(const at::Tensor& x, int64_t n_text, at::TensorList w_text, at::TensorList w_vision) {
  TORCH_CHECK(x.dim() == 3, "routed_linear: grouped x must be [G, T, in], got ", x.sizes());
  TORCH_CHECK(n_text >= 0 && n_text <= x.size(1), "routed_linear: n_text must be in [0, ", x.size(1), "], got ",
              n_text);
  TORCH_CHECK(static_cast<int64_t>(w_text.size()) == x.size(0) && static_cast<int64_t>(w_vision.size()) == x.size(0),
              "routed_linear: grouped w_text and w_vision need one weight per group (G = ", x.size(0), "), got ",
              w_text.size(), " and ", w_vision.size());
  for (size_t g = 0; g < w_text.size(); ++g) {
    for (const auto& w : {w_text[g], w_vision[g]}) {
      TORCH_CHECK(w.dim() == 2 && w.size(0) == w_text[0].size(0) && w.size(1) == x.size(2),
                  "routed_linear: every grouped weight must be [out, in] with one out and in = x.size(2), got ",
                  w.sizes(), " for group ", g);
    }
  }
}

// The G weights [out, in] as one [G, out, in] view when they are consecutive blocks of one buffer; undefined
// otherwise.
at::Tensor stacked(at::TensorList weights) {
  const auto rows = packed_rows(weights.vec());
  if (!rows.defined()) {
    return rows;
  }
  return rows.view({static_cast<int64_t>(weights.size()), weights[0].size(0), weights[0].size(1)});
}

// out[g] = a[g] @ w_g.T (transpose) or a[g] @ w_g for every group: one batched GEMM on packed weights, else one GEMM
// per group; nothing for a slice without rows.
void grouped_mm_into(at::Tensor out, const at::Tensor& a, at::TensorList weights, bool transpose) {
  if (a.size(1) == 0) {
    return;
  }
  const auto packed = stacked(weights);
  if (packed.defined()) {
    at::bmm_out(out, a, transpose ? packed.transpose(1, 2) : packed);
    return;
  }
  for (size_t g = 0; g < weights.size(); ++g) {
    const auto i = static_cast<int64_t>(g);
    mm_into(out.select(0, i), a.select(0, i), transpose ? weights[g].t() : weights[g]);
  }
}

// dW[g] = dy[g].T @ input[g] for every group in one batched GEMM (zeros for a slice without rows).
at::Tensor grouped_weight_grad(const at::Tensor& dy, const at::Tensor& input) {
  if (dy.size(1) == 0) {
    return at::zeros({dy.size(0), dy.size(2), input.size(2)}, input.options());
  }
  return at::bmm(dy.transpose(1, 2), input);
}

at::Tensor routed_linear_grouped_fwd(const at::Tensor& x, int64_t n_text, at::TensorList w_text,
                                     at::TensorList w_vision) {
  check_grouped_inputs(x, n_text, w_text, w_vision);
  const int64_t rows = x.size(1), n_vision = rows - n_text;
  auto y = at::empty({x.size(0), rows, w_text[0].size(0)}, x.options());
  grouped_mm_into(y.narrow(1, 0, n_text), x.narrow(1, 0, n_text), w_text, true);
  grouped_mm_into(y.narrow(1, n_text, n_vision), x.narrow(1, n_text, n_vision), w_vision, true);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_linear_grouped_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                                                         int64_t n_text, at::TensorList w_text,
                                                                         at::TensorList w_vision,
                                                                         std::array<bool, 3> needs) {
  check_grouped_inputs(x, n_text, w_text, w_vision);
  TORCH_CHECK(grad_y.dim() == 3 && grad_y.size(0) == x.size(0) && grad_y.size(1) == x.size(1) &&
                  grad_y.size(2) == w_text[0].size(0),
              "routed_linear_grouped_bwd: grad_y must be [G, T, out], got ", grad_y.sizes());
  const auto [need_x, need_w_text, need_w_vision] = needs;
  const int64_t rows = x.size(1), n_vision = rows - n_text;
  const auto dy = grad_y.scalar_type() == x.scalar_type() ? grad_y : grad_y.to(x.scalar_type());
  const auto dy_text = dy.narrow(1, 0, n_text), dy_vision = dy.narrow(1, n_text, n_vision);
  // dx takes x's strides (x may be a [T, G, in] buffer seen as [G, T, in]), so its gradient reaches that buffer
  // without a copy.
  at::Tensor dx = need_x ? at::empty_like(x) : none_like(x);
  if (need_x) {
    grouped_mm_into(dx.narrow(1, 0, n_text), dy_text, w_text, false);
    grouped_mm_into(dx.narrow(1, n_text, n_vision), dy_vision, w_vision, false);
  }
  const auto d_w_text = need_w_text ? grouped_weight_grad(dy_text, x.narrow(1, 0, n_text)) : none_like(x);
  const auto d_w_vision = need_w_vision ? grouped_weight_grad(dy_vision, x.narrow(1, n_text, n_vision)) : none_like(x);
  return {dx, d_w_text, d_w_vision};
}

}  // namespace

TORCH_LIBRARY_IMPL(libra, CPU, m) {
  m.impl("routed_linear_fwd", &routed_linear_fwd);
  m.impl("routed_linear_bwd", &routed_linear_bwd);
  m.impl("routed_linear_grouped_fwd", &routed_linear_grouped_fwd);
  m.impl("routed_linear_grouped_bwd", &routed_linear_grouped_bwd);
}

TORCH_LIBRARY_IMPL(libra, CUDA, m) {
  m.impl("routed_linear_fwd", &routed_linear_fwd);
  m.impl("routed_linear_bwd", &routed_linear_bwd);
  m.impl("routed_linear_grouped_fwd", &routed_linear_grouped_fwd);
  m.impl("routed_linear_grouped_bwd", &routed_linear_grouped_bwd);
}
