// CPU kernels of the routed RMSNorm (LLaMA semantics): rows [0, n_text) use w_text, rows [n_text, T) w_vision.
//   rstd = 1 / sqrt(mean(x^2) + eps)  (accumulated in float32, float64 for float64 input)
//   y    = w * cast(x * rstd)         (the normalised row is rounded to x's dtype before the weight, as in LLaMA)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "libra_common.h"

namespace {

constexpr int64_t kRowsPerTask = 16;

void check_inputs(const at::Tensor& x, int64_t n_text, const at::Tensor& w_text, const at::Tensor& w_vision) {
  TORCH_CHECK(x.dim() == 2, "routed_rms_norm: x must be [T, D]");
  TORCH_CHECK(n_text >= 0 && n_text <= x.size(0), "routed_rms_norm: n_text out of range");
  TORCH_CHECK(w_text.dim() == 1 && w_text.size(0) == x.size(1), "routed_rms_norm: w_text must be [D]");
  TORCH_CHECK(w_vision.dim() == 1 && w_vision.size(0) == x.size(1), "routed_rms_norm: w_vision must be [D]");
  TORCH_CHECK(w_text.scalar_type() == x.scalar_type() && w_vision.scalar_type() == x.scalar_type(),
              "routed_rms_norm: weights must have the dtype of x");
}

std::tuple<at::Tensor, at::Tensor> routed_rms_norm_fwd_cpu(const at::Tensor& x_in, int64_t n_text,
                                                           const at::Tensor& w_text_in, const at::Tensor& w_vision_in,
                                                           double eps) {
  check_inputs(x_in, n_text, w_text_in, w_vision_in);
  const auto x = x_in.contiguous();
  const auto w_text = w_text_in.contiguous();
  const auto w_vision = w_vision_in.contiguous();
  const int64_t rows = x.size(0), width = x.size(1);
  auto y = at::empty_like(x);
  const auto stat_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto rstd = at::empty({rows}, x.options().dtype(stat_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "routed_rms_norm_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wt = w_text.data_ptr<scalar_t>();
    const scalar_t* wv = w_vision.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    acc_t* rp = rstd.data_ptr<acc_t>();
    at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = xp + r * width;
        const scalar_t* w = r < n_text ? wt : wv;
        acc_t sum_sq = 0;
        for (int64_t j = 0; j < width; ++j) {
          const acc_t v = static_cast<acc_t>(row[j]);
          sum_sq += v * v;
        }
        const acc_t inv = libra::rms_inverse<acc_t>(sum_sq, width, static_cast<acc_t>(eps));
        rp[r] = inv;
        for (int64_t j = 0; j < width; ++j) {
          const scalar_t xhat = static_cast<scalar_t>(static_cast<acc_t>(row[j]) * inv);
          yp[r * width + j] = static_cast<scalar_t>(static_cast<acc_t>(w[j]) * static_cast<acc_t>(xhat));
        }
      }
    });
  });
  return {y, rstd};
}

// Sums dy * xhat over rows [begin, end) into a [D] weight gradient, in blocks of rows so both cores help.
template <typename scalar_t, typename acc_t>
at::Tensor weight_grad(const scalar_t* dy, const scalar_t* x, const acc_t* rstd, int64_t begin, int64_t end,
                       int64_t width, const at::TensorOptions& options) {
  const int64_t rows = end - begin;
  const int64_t n_blocks = std::max<int64_t>(1, (rows + 255) / 256);
  auto partial = at::zeros({n_blocks, width}, options.dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* pp = partial.template data_ptr<acc_t>();
  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      acc_t* acc = pp + b * width;
      const int64_t r_end = std::min(end, begin + (b + 1) * 256);
      for (int64_t r = begin + b * 256; r < r_end; ++r) {
        for (int64_t j = 0; j < width; ++j) {
          acc[j] += static_cast<acc_t>(dy[r * width + j]) * static_cast<acc_t>(x[r * width + j]) * rstd[r];
        }
      }
    }
  });
  return partial.sum(0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_rms_norm_bwd_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& rstd_in, int64_t n_text,
    const at::Tensor& w_text_in, const at::Tensor& w_vision_in, bool need_w_text_grad, bool need_w_vision_grad) {
  check_inputs(x_in, n_text, w_text_in, w_vision_in);
  TORCH_CHECK(grad_y_in.sizes() == x_in.sizes(), "routed_rms_norm_bwd: grad_y must have the shape of x");
  const auto dy = grad_y_in.contiguous().to(x_in.scalar_type());
  const auto x = x_in.contiguous();
  const auto rstd = rstd_in.contiguous();
  const auto w_text = w_text_in.contiguous();
  const auto w_vision = w_vision_in.contiguous();
  const int64_t rows = x.size(0), width = x.size(1);
  auto dx = at::empty_like(x);
  at::Tensor dw_text = at::empty({0}, x.options());
  at::Tensor dw_vision = at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "routed_rms_norm_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dyp = dy.data_ptr<scalar_t>();
    const scalar_t* wt = w_text.data_ptr<scalar_t>();
    const scalar_t* wv = w_vision.data_ptr<scalar_t>();
    const acc_t* rp = rstd.data_ptr<acc_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* w = r < n_text ? wt : wv;
        const acc_t inv = rp[r];
        acc_t dot = 0;
        for (int64_t j = 0; j < width; ++j) {
          const acc_t xhat = static_cast<acc_t>(xp[r * width + j]) * inv;
          dot += static_cast<acc_t>(dyp[r * width + j]) * static_cast<acc_t>(w[j]) * xhat;
        }
        const acc_t mean_dot = dot / static_cast<acc_t>(width);
        for (int64_t j = 0; j < width; ++j) {
          const acc_t xhat = static_cast<acc_t>(xp[r * width + j]) * inv;
          const acc_t dxhat = static_cast<acc_t>(dyp[r * width + j]) * static_cast<acc_t>(w[j]);
          dxp[r * width + j] = static_cast<scalar_t>(libra::rms_norm_input_grad<acc_t>(dxhat, xhat, mean_dot, inv));
        }
      }
    });
    if (need_w_text_grad) {
      dw_text = weight_grad<scalar_t, acc_t>(dyp, xp, rp, 0, n_text, width, x.options()).to(x.scalar_type());
    }
    if (need_w_vision_grad) {
      dw_vision = weight_grad<scalar_t, acc_t>(dyp, xp, rp, n_text, rows, width, x.options()).to(x.scalar_type());
    }
  });
  return {dx, dw_text, dw_vision};
}

}  // namespace

TORCH_LIBRARY_IMPL(libra, CPU, m) {
  m.impl("routed_rms_norm_fwd", &routed_rms_norm_fwd_cpu);
  m.impl("routed_rms_norm_bwd", &routed_rms_norm_bwd_cpu);
}
