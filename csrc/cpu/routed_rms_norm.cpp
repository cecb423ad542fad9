// CPU launchers of the routed RMSNorm (LLaMA semantics): rows [0, n_text) use w_text, rows [n_text, T) w_vision.
//   h    = x + residual                (optional fused add, rounded to x's dtype like an eager add)
//   rstd = 1 / sqrt(mean(h^2) + eps)  (accumulated in float32, float64 for float64 input)
//   y    = w * cast(h * rstd)         (the normalised row is rounded to x's dtype before the weight, as in LLaMA)
// The backward runs the block partition of the CUDA kernel (libra::block_rows): per-block float32 partial sums of
// the weight gradients, text and vision rows never in one block, then one sum over the blocks of each group.
// Checks and allocation are the driver's (csrc/routed_rms_norm.cpp).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "launchers.h"

namespace {

constexpr int64_t kRowsPerTask = 16;

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

// One backward block: dx of its rows (plus grad_h when given) and, when partial is not null, the block's
// partial sums of dy * xhat for the weight of its group (written whole: the scratch is not zero-filled).
template <typename scalar_t, typename acc_t>
void backward_block(const scalar_t* dy, const scalar_t* x, const acc_t* rstd, const scalar_t* w, const scalar_t* grad_h,
                    scalar_t* dx, acc_t* partial, int64_t begin, int64_t count, int64_t width) {
  if (partial != nullptr) {
    for (int64_t j = 0; j < width; ++j) partial[j] = 0;
  }
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

// dw[j] = sum of partial[b, j] over blocks [first, last), rounded once to the weight's dtype.
template <typename scalar_t, typename acc_t>
void sum_blocks(const acc_t* partial, scalar_t* dw, int64_t first, int64_t last, int64_t width) {
  at::parallel_for(0, width, 256, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      acc_t total = 0;
      for (int64_t b = first; b < last; ++b) total += partial[b * width + j];
      dw[j] = static_cast<scalar_t>(total);
    }
  });
}

template <typename scalar_t>
void backward(const void* dy_p, const void* x_p, const void* rstd_p, const void* w_text_p, const void* w_vision_p,
              const void* grad_h_p, void* dx_p, void* partial_p, void* dw_text_p, void* dw_vision_p, int64_t rows,
              int64_t n_text, int64_t width, int64_t rows_per_block) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto* dy = static_cast<const scalar_t*>(dy_p);
  const auto* x = static_cast<const scalar_t*>(x_p);
  const auto* rstd = static_cast<const acc_t*>(rstd_p);
  const auto* wt = static_cast<const scalar_t*>(w_text_p);
  const auto* wv = static_cast<const scalar_t*>(w_vision_p);
  const auto* gh = static_cast<const scalar_t*>(grad_h_p);
  auto* dx = static_cast<scalar_t*>(dx_p);
  auto* partial = static_cast<acc_t*>(partial_p);
  const int64_t text_blocks = libra::blocks_for_rows(n_text, rows_per_block);
  const int64_t n_blocks = text_blocks + libra::blocks_for_rows(rows - n_text, rows_per_block);
  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t begin = 0, count = 0;
      bool is_text = true;
      libra::block_rows(b, text_blocks, n_text, rows, rows_per_block, &begin, &count, &is_text);
      backward_block<scalar_t, acc_t>(dy, x, rstd, is_text ? wt : wv, gh, dx,
                                      partial == nullptr ? nullptr : partial + b * width, begin, count, width);
    }
  });
  if (dw_text_p != nullptr) sum_blocks(partial, static_cast<scalar_t*>(dw_text_p), 0, text_blocks, width);
  if (dw_vision_p != nullptr) sum_blocks(partial, static_cast<scalar_t*>(dw_vision_p), text_blocks, n_blocks, width);
}

template <typename scalar_t>
void forward(const void* x, const void* residual, void* h, void* y, void* rstd, const void* w_text,
             const void* w_vision, int64_t rows, int64_t n_text, int64_t width, double eps) {
  forward_rows<scalar_t>(static_cast<const scalar_t*>(x), static_cast<const scalar_t*>(residual),
                         static_cast<scalar_t*>(h), static_cast<scalar_t*>(y),
                         static_cast<at::opmath_type<scalar_t>*>(rstd), static_cast<const scalar_t*>(w_text),
                         static_cast<const scalar_t*>(w_vision), rows, n_text, width, eps);
}

}  // namespace

namespace libra {

void routed_rms_norm_fwd_cpu(DType dtype, const void* x, const void* residual, void* h, void* y, void* rstd,
                             const void* w_text, const void* w_vision, int64_t rows, int64_t n_text, int64_t width,
                             double eps) {
  switch (dtype) {
    case DType::kFloat32:
      return forward<float>(x, residual, h, y, rstd, w_text, w_vision, rows, n_text, width, eps);
    case DType::kFloat64:
      return forward<double>(x, residual, h, y, rstd, w_text, w_vision, rows, n_text, width, eps);
    case DType::kFloat16:
      return forward<c10::Half>(x, residual, h, y, rstd, w_text, w_vision, rows, n_text, width, eps);
    case DType::kBFloat16:
      return forward<c10::BFloat16>(x, residual, h, y, rstd, w_text, w_vision, rows, n_text, width, eps);
  }
}

void routed_rms_norm_bwd_cpu(DType dtype, const void* dy, const void* x, const void* rstd, const void* w_text,
                             const void* w_vision, const void* grad_h, void* dx, void* partial, void* dw_text,
                             void* dw_vision, int64_t rows, int64_t n_text, int64_t width, int64_t rows_per_block) {
  switch (dtype) {
    case DType::kFloat32:
      return backward<float>(dy, x, rstd, w_text, w_vision, grad_h, dx, partial, dw_text, dw_vision, rows, n_text,
                             width, rows_per_block);
    case DType::kFloat64:
      return backward<double>(dy, x, rstd, w_text, w_vision, grad_h, dx, partial, dw_text, dw_vision, rows, n_text,
                              width, rows_per_block);
    case DType::kFloat16:
      return backward<c10::Half>(dy, x, rstd, w_text, w_vision, grad_h, dx, partial, dw_text, dw_vision, rows,
                                 n_text, width, rows_per_block);
    case DType::kBFloat16:
      return backward<c10::BFloat16>(dy, x, rstd, w_text, w_vision, grad_h, dx, partial, dw_text, dw_vision, rows,
                                     n_text, width, rows_per_block);
  }
}

}  // namespace libra
