// Routed linear projection on the sorted layout: rows [0, n_text) through w_text, rows [n_text, T) through the
// vision expert (w_vision_a then w_vision_b, or a dense w_vision_a).
//
// Every product is one ATen GEMM (cuBLAS on CUDA, the CPU BLAS on the CPU) on a contiguous row slice, and
// every result is written with mm_out straight into its slice of one output buffer: no gather, scatter,
// concatenation or device-to-host synchronisation, so the op is capturable in a CUDA graph. The same
// function is registered for the CPU and the CUDA dispatch keys: ATen dispatches the GEMMs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>

namespace {

// out = a @ b, written by the GEMM itself into out (a row slice of a larger buffer: no temporary, no copy).
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

// The gradient of a weight from its rows' output gradient and input: dW = dy.T @ input (zeros for 0 rows).
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
  const auto none = at::empty({0}, x.options());
  const auto dy = grad_y.scalar_type() == x.scalar_type() ? grad_y : grad_y.to(x.scalar_type());
  const auto dy_text = dy.narrow(0, 0, n_text), dy_vision = dy.narrow(0, n_text, n_vision);
  const auto x_text = x.narrow(0, 0, n_text), x_vision = x.narrow(0, n_text, n_vision);

  // dx is written slice by slice by the GEMMs themselves: no temporary, no copy.
  at::Tensor dx = need_x ? at::empty_like(x, at::MemoryFormat::Contiguous) : none;
  if (need_x && n_text > 0) {
    mm_into(dx.narrow(0, 0, n_text), dy_text, w_text);
  }
  const at::Tensor d_w_text = need_w_text ? weight_grad(dy_text, x_text) : none;

  at::Tensor d_a = none, d_b = none;
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
    // The gradient of the rank-r activation, shared by dx and dA.
    const auto d_low = at::mm(dy_vision, *w_vision_b);
    if (need_x && n_vision > 0) {
      mm_into(dx.narrow(0, n_text, n_vision), d_low, w_vision_a);
    }
    if (need_a) {
      d_a = weight_grad(d_low, x_vision);
    }
  }
  return {dx, d_w_text, d_a, d_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(libra, CPU, m) {
  m.impl("routed_linear_fwd", &routed_linear_fwd);
  m.impl("routed_linear_bwd", &routed_linear_bwd);
}

TORCH_LIBRARY_IMPL(libra, CUDA, m) {
  m.impl("routed_linear_fwd", &routed_linear_fwd);
  m.impl("routed_linear_bwd", &routed_linear_bwd);
}
