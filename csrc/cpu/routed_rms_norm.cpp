// CPU kernels of the routed RMSNorm (LLaMA semantics): rows [0, n_text) use w_text, rows [n_text, T) w_vision.
//   h    = x + residual                (optional fused add, rounded to x's dtype like an eager add)
//   rstd = 1 / sqrt(mean(h^2) + eps)  (accumulated in float32, float64 for float64 input)
//   y    = w * cast(h * rstd)         (the normalised row is rounded to x's dtype before the weight, as in LLaMA)
// The backward runs the block partition of the CUDA kernel (libra::block_rows): per-block float32 partial sums of
// the weight gradients, text and vision rows never in one block, then one sum over the blocks of each group.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "libra_common.h"

namespace {

constexpr int64_t kRowsPerTask = 16;
constexpr int64_t kRowsPerBackwardBlock = 64;

void check_inputs(const at::Tensor& x, int64_t n_text, const at::Tensor& w_text, const at::Tensor& w_vision) {
  TORCH_CHECK(x.dim() == 2, "routed_rms_norm: x must be [T, D]");
  TORCH_CHECK(n_text >= 0 && n_text <= x.size(0), "routed_rms_norm: n_text out of range");
  TORCH_CHECK(w_text.dim() == 1 && w_text.size(0) == x.size(1), "routed_rms_norm: w_text must be [D]");
  TORCH_CHECK(w_vision.dim() == 1 && w_vision.size(0) == x.size(1), "routed_rms_norm: w_vision must be [D]");
  TORCH_CHECK(w_text.scalar_type() == x.scalar_type() && w_vision.scalar_type() == x.scalar_type(),
              "routed_rms_norm: weights must have the dtype of x");
}

at::ScalarType stat_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// Normalises rows of x (or of h = x + residual, written to h, when residual is not null).
template <typename scalar_t>
void forward_rows(const scalar_t* x, const scalar_t* residual, scalar_t* h, scalar_t* y,
                  at::opmath_type<scalar_t>* rstd, const scalar_t* w_text, const scalar_t* w_vision, int64_t rows,
                  int64_t n_text, int64_t width, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t offset = r * width;
      acc_t sum_sq = 0;
      for (int64_t j = 0; j < width; ++j) {
        acc_t v = static_cast<acc_t>(x[offset + j]);
        if (residual != nullptr) {
          const scalar_t sum = static_cast<scalar_t>(v + static_cast<acc_t>(residual[offset + j]));
          h[offset + j] = sum;
          v = static_cast<acc_t>(sum);
        }
        sum_sq += v * v;
      }
      const acc_t inv = libra::rms_inverse<acc_t>(sum_sq, width, static_cast<acc_t>(eps));
      rstd[r] = inv;
      const scalar_t* src = residual != nullptr ? h + offset : x + offset;
      const scalar_t* w = r < n_text ? w_text : w_vision;
      for (int64_t j = 0; j < width; ++j) {
        const scalar_t xhat = static_cast<scalar_t>(static_cast<acc_t>(src[j]) * inv);
        y[offset + j] = static_cast<scalar_t>(static_cast<acc_t>(w[j]) * static_cast<acc_t>(xhat));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x_in, const at::Tensor* residual_in,
                                                       int64_t n_text, const at::Tensor& w_text_in,
                                                       const at::Tensor& w_vision_in, double eps) {
  check_inputs(x_in, n_text, w_text_in, w_vision_in);
  const auto x = x_in.contiguous();
  const auto w_text = w_text_in.contiguous();
  const auto w_vision = w_vision_in.contiguous();
  at::Tensor residual, h;
  if (residual_in != nullptr) {
    TORCH_CHECK(residual_in->sizes() == x.sizes() && residual_in->scalar_type() == x.scalar_type(),
                "routed_add_rms_norm: residual must have the shape and dtype of x");
    residual = residual_in->contiguous();
    h = at::empty_like(x);
  }
  auto y = at::empty_like(x);
  auto rstd = at::empty({x.size(0)}, x.options().dtype(stat_type(x)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "routed_rms_norm_fwd_cpu", [&] {
    forward_rows<scalar_t>(x.data_ptr<scalar_t>(), residual.defined() ? residual.data_ptr<scalar_t>() : nullptr,
                           h.defined() ? h.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(),
                           rstd.data_ptr<at::opmath_type<scalar_t>>(), w_text.data_ptr<scalar_t>(),
                           w_vision.data_ptr<scalar_t>(), x.size(0), n_text, x.size(1), eps);
  });
  return {y, h, rstd};
}

std::tuple<at::Tensor, at::Tensor> routed_rms_norm_fwd_cpu(const at::Tensor& x, int64_t n_text,
                                                           const at::Tensor& w_text, const at::Tensor& w_vision,
                                                           double eps) {
  auto [y, h, rstd] = forward(x, nullptr, n_text, w_text, w_vision, eps);
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_add_rms_norm_fwd_cpu(const at::Tensor& x,
                                                                           const at::Tensor& residual, int64_t n_text,
                                                                           const at::Tensor& w_text,
                                                                           const at::Tensor& w_vision, double eps) {
  return forward(x, &residual, n_text, w_text, w_vision, eps);
}

// One backward block: dx of its rows (plus grad_h when given) and, when partial is not null, the block's
// float32 partial sums of dy * xhat for the weight of its group.
template <typename scalar_t, typename acc_t>
void backward_block(const scalar_t* dy, const scalar_t* x, const acc_t* rstd, const scalar_t* w, const scalar_t* grad_h,
                    scalar_t* dx, acc_t* partial, int64_t begin, int64_t count, int64_t width) {
  for (int64_t r = begin; r < begin + count; ++r) {
    const int64_t offset = r * width;
    const acc_t inv = rstd[r];
    acc_t dot = 0;
    for (int64_t j = 0; j < width; ++j) {
      const acc_t xhat = static_cast<acc_t>(x[offset + j]) * inv;
      dot += static_cast<acc_t>(dy[offset + j]) * static_cast<acc_t>(w[j]) * xhat;
    }
    const acc_t mean_dot = dot / static_cast<acc_t>(width);
    for (int64_t j = 0; j < width; ++j) {
      const acc_t g = static_cast<acc_t>(dy[offset + j]);
      const acc_t xhat = static_cast<acc_t>(x[offset + j]) * inv;
      acc_t d = libra::rms_norm_input_grad<acc_t>(g * static_cast<acc_t>(w[j]), xhat, mean_dot, inv);
      if (grad_h != nullptr) {
        d += static_cast<acc_t>(grad_h[offset + j]);
      }
      dx[offset + j] = static_cast<scalar_t>(d);
      if (partial != nullptr) {
        partial[j] += g * xhat;
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_rms_norm_bwd_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& rstd_in, int64_t n_text,
    const at::Tensor& w_text_in, const at::Tensor& w_vision_in, bool need_w_text_grad, bool need_w_vision_grad,
    const c10::optional<at::Tensor>& grad_h_in) {
  check_inputs(x_in, n_text, w_text_in, w_vision_in);
  TORCH_CHECK(grad_y_in.sizes() == x_in.sizes(), "routed_rms_norm_bwd: grad_y must have the shape of x");
  TORCH_CHECK(rstd_in.dim() == 1 && rstd_in.size(0) == x_in.size(0) && rstd_in.scalar_type() == stat_type(x_in),
              "routed_rms_norm_bwd: rstd must be [T] float32 (float64 for float64 x)");
  const auto dy = grad_y_in.contiguous().to(x_in.scalar_type());
  const auto x = x_in.contiguous();
  const auto rstd = rstd_in.contiguous();
  const auto w_text = w_text_in.contiguous();
  const auto w_vision = w_vision_in.contiguous();
  at::Tensor grad_h;
  if (grad_h_in.has_value()) {
    TORCH_CHECK(grad_h_in->sizes() == x.sizes(), "routed_rms_norm_bwd: grad_h must have the shape of x");
    grad_h = grad_h_in->contiguous().to(x.scalar_type());
  }
  const int64_t rows = x.size(0), width = x.size(1);
  const int64_t text_blocks = libra::blocks_for_rows(n_text, kRowsPerBackwardBlock);
  const int64_t n_blocks = text_blocks + libra::blocks_for_rows(rows - n_text, kRowsPerBackwardBlock);
  const bool need_partial = need_w_text_grad || need_w_vision_grad;
  auto dx = at::empty_like(x);
  auto partial = at::zeros({need_partial ? n_blocks : 0, width}, x.options().dtype(stat_type(x)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "routed_rms_norm_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* wt = w_text.data_ptr<scalar_t>();
    const scalar_t* wv = w_vision.data_ptr<scalar_t>();
    const scalar_t* gh = grad_h.defined() ? grad_h.data_ptr<scalar_t>() : nullptr;
    acc_t* pp = need_partial ? partial.data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        int64_t begin = 0, count = 0;
        bool is_text = true;
        libra::block_rows(b, text_blocks, n_text, rows, kRowsPerBackwardBlock, &begin, &count, &is_text);
        backward_block<scalar_t, acc_t>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), rstd.data_ptr<acc_t>(),
                                        is_text ? wt : wv, gh, dx.data_ptr<scalar_t>(),
                                        pp == nullptr ? nullptr : pp + b * width, begin, count, width);
      }
    });
  });
  const auto none = at::empty({0}, x.options());
  const auto dw_text = need_w_text_grad ? partial.narrow(0, 0, text_blocks).sum(0).to(x.scalar_type()) : none;
  const auto dw_vision =
      need_w_vision_grad ? partial.narrow(0, text_blocks, n_blocks - text_blocks).sum(0).to(x.scalar_type()) : none;
  return {dx, dw_text, dw_vision};
}

}  // namespace

TORCH_LIBRARY_IMPL(libra, CPU, m) {
  m.impl("routed_rms_norm_fwd", &routed_rms_norm_fwd_cpu);
  m.impl("routed_add_rms_norm_fwd", &routed_add_rms_norm_fwd_cpu);
  m.impl("routed_rms_norm_bwd", &routed_rms_norm_bwd_cpu);
}
