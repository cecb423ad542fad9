// Driver of the routed RMSNorm ops (routed_rms_norm_fwd, routed_add_rms_norm_fwd, routed_rms_norm_bwd): checks,
// allocation through ATen (on CUDA the caching allocator, so the ops are capturable in a CUDA graph) and the call of
// the device's launcher (csrc/cpu/routed_rms_norm.cpp, csrc/cuda/routed_rms_norm.cu). Schemas: csrc/ops.cpp.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "driver.h"

namespace {

constexpr const char* kOp = "routed_rms_norm";
constexpr int64_t kCpuRowsPerBackwardBlock = 64;

void check_inputs(const at::Tensor& x, int64_t n_text, const at::Tensor& w_text, const at::Tensor& w_vision) {
  TORCH_CHECK(x.dim() == 2, kOp, ": x must be [T, D], got ", x.sizes());
  TORCH_CHECK(n_text >= 0 && n_text <= x.size(0), kOp, ": n_text must be in [0, ", x.size(0), "], got ", n_text);
  TORCH_CHECK(w_text.dim() == 1 && w_text.size(0) == x.size(1), kOp, ": w_text must be [D], got ", w_text.sizes());
  TORCH_CHECK(w_vision.dim() == 1 && w_vision.size(0) == x.size(1), kOp, ": w_vision must be [D], got ",
              w_vision.sizes());
  TORCH_CHECK(w_text.scalar_type() == x.scalar_type() && w_vision.scalar_type() == x.scalar_type(), kOp,
              ": weights must have the dtype of x");
  TORCH_CHECK(w_text.device() == x.device() && w_vision.device() == x.device(), kOp,
              ": all tensors must be on the device of x");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x_in, const at::Tensor* residual_in,
                                                       int64_t n_text, const at::Tensor& w_text_in,
                                                       const at::Tensor& w_vision_in, double eps) {
  check_inputs(x_in, n_text, w_text_in, w_vision_in);
  const at::OptionalDeviceGuard guard(x_in.device());
  const auto x = x_in.contiguous(), w_text = w_text_in.contiguous(), w_vision = w_vision_in.contiguous();
  at::Tensor residual, h;
  if (residual_in != nullptr) {
    TORCH_CHECK(residual_in->sizes() == x.sizes() && residual_in->scalar_type() == x.scalar_type() &&
                    residual_in->device() == x.device(),
                "routed_add_rms_norm: residual must have the shape, dtype and device of x");
    residual = residual_in->contiguous();
    h = at::empty_like(x);
  }
  auto y = at::empty_like(x);
  auto rstd = at::empty({x.size(0)}, x.options().dtype(libra::stat_type(x)));
  const auto dtype = libra::dtype_code(x.scalar_type(), kOp);
  const void* residual_ptr = residual.defined() ? residual.const_data_ptr() : nullptr;
  void* h_ptr = h.defined() ? h.data_ptr() : nullptr;
  if (x.is_cuda()) {
    libra::require_cuda_build(kOp);
#if defined(LIBRA_WITH_CUDA)
    libra::check_launch(libra::routed_rms_norm_fwd_cuda(dtype, x.const_data_ptr(), residual_ptr, h_ptr, y.data_ptr(),
                                                        rstd.data_ptr(), w_text.const_data_ptr(),
                                                        w_vision.const_data_ptr(), x.size(0), n_text, x.size(1), eps,
                                                        libra::current_stream()),
                        "routed_rms_norm forward");
#endif
  } else {
    libra::routed_rms_norm_fwd_cpu(dtype, x.const_data_ptr(), residual_ptr, h_ptr, y.data_ptr(), rstd.data_ptr(),
                                   w_text.const_data_ptr(), w_vision.const_data_ptr(), x.size(0), n_text, x.size(1),
                                   eps);
  }
  return {y, h, rstd};
}

std::tuple<at::Tensor, at::Tensor> routed_rms_norm_fwd(const at::Tensor& x, int64_t n_text, const at::Tensor& w_text,
                                                       const at::Tensor& w_vision, double eps) {
  auto [y, h, rstd] = forward(x, nullptr, n_text, w_text, w_vision, eps);
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_add_rms_norm_fwd(const at::Tensor& x, const at::Tensor& residual,
                                                                       int64_t n_text, const at::Tensor& w_text,
                                                                       const at::Tensor& w_vision, double eps) {
  return forward(x, &residual, n_text, w_text, w_vision, eps);
}

// Backward rows per block. CPU: a fixed 64 (a task of the thread pool). CUDA: about four blocks per multiprocessor,
// enough parallelism while the float32 partial sums of the weight gradients stay a small part of the traffic.
int64_t rows_per_block(const at::Tensor& x) {
  if (!x.is_cuda()) {
    return kCpuRowsPerBackwardBlock;
  }
#if defined(LIBRA_WITH_CUDA)
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  const int64_t per_block = (x.size(0) + 4 * sms - 1) / (4 * sms);
  return std::min<int64_t>(1024, std::max<int64_t>(8, per_block));
#else
  libra::require_cuda_build(kOp);
  return 0;
#endif
}

// A weight gradient that is not asked for is returned as an empty [0] tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_rms_norm_bwd(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& rstd_in, int64_t n_text,
    const at::Tensor& w_text_in, const at::Tensor& w_vision_in, bool need_w_text_grad, bool need_w_vision_grad,
    const c10::optional<at::Tensor>& grad_h_in) {
  check_inputs(x_in, n_text, w_text_in, w_vision_in);
  TORCH_CHECK(grad_y.sizes() == x_in.sizes() && grad_y.device() == x_in.device(),
              "routed_rms_norm_bwd: grad_y must have the shape and device of x");
  TORCH_CHECK(rstd_in.dim() == 1 && rstd_in.size(0) == x_in.size(0) &&
                  rstd_in.scalar_type() == libra::stat_type(x_in) && rstd_in.device() == x_in.device(),
              "routed_rms_norm_bwd: rstd must be [T] float32 (float64 for float64 x) on the device of x");
  const at::OptionalDeviceGuard guard(x_in.device());
  const auto dy = grad_y.contiguous().to(x_in.scalar_type());
  const auto x = x_in.contiguous(), rstd = rstd_in.contiguous();
  const auto w_text = w_text_in.contiguous(), w_vision = w_vision_in.contiguous();
  at::Tensor grad_h;
  if (grad_h_in.has_value()) {
    TORCH_CHECK(grad_h_in->sizes() == x.sizes() && grad_h_in->device() == x.device(),
                "routed_rms_norm_bwd: grad_h must have the shape and device of x");
    grad_h = grad_h_in->contiguous().to(x.scalar_type());
  }
  const int64_t rows = x.size(0), width = x.size(1);
  const int64_t per_block = rows_per_block(x);
  const int64_t n_blocks =
      libra::blocks_for_rows(n_text, per_block) + libra::blocks_for_rows(rows - n_text, per_block);
  const bool need_partial = need_w_text_grad || need_w_vision_grad;
  auto dx = at::empty_like(x);
  // The launchers write the partial sums and the weight gradients whole (a group without rows gets zeros).
  auto partial = at::empty({need_partial ? n_blocks : 0, width}, x.options().dtype(libra::stat_type(x)));
  auto dw_text = at::empty({need_w_text_grad ? width : 0}, x.options());
  auto dw_vision = at::empty({need_w_vision_grad ? width : 0}, x.options());
  const auto dtype = libra::dtype_code(x.scalar_type(), kOp);
  const void* grad_h_ptr = grad_h.defined() ? grad_h.const_data_ptr() : nullptr;
  void* partial_ptr = need_partial ? partial.data_ptr() : nullptr;
  void* dw_text_ptr = need_w_text_grad ? dw_text.data_ptr() : nullptr;
  void* dw_vision_ptr = need_w_vision_grad ? dw_vision.data_ptr() : nullptr;
  if (x.is_cuda()) {
#if defined(LIBRA_WITH_CUDA)
    libra::check_launch(libra::routed_rms_norm_bwd_cuda(dtype, dy.const_data_ptr(), x.const_data_ptr(),
                                                        rstd.const_data_ptr(), w_text.const_data_ptr(),
                                                        w_vision.const_data_ptr(), grad_h_ptr, dx.data_ptr(),
                                                        partial_ptr, dw_text_ptr, dw_vision_ptr, rows, n_text, width,
                                                        per_block, libra::current_stream()),
                        "routed_rms_norm backward");
#endif
  } else {
    libra::routed_rms_norm_bwd_cpu(dtype, dy.const_data_ptr(), x.const_data_ptr(), rstd.const_data_ptr(),
                                   w_text.const_data_ptr(), w_vision.const_data_ptr(), grad_h_ptr, dx.data_ptr(),
                                   partial_ptr, dw_text_ptr, dw_vision_ptr, rows, n_text, width, per_block);
  }
  return {dx, dw_text, dw_vision};
}

}  // namespace

TORCH_LIBRARY_IMPL(libra, CPU, m) {
  m.impl("routed_rms_norm_fwd", &routed_rms_norm_fwd);
  m.impl("routed_add_rms_norm_fwd", &routed_add_rms_norm_fwd);
  m.impl("routed_rms_norm_bwd", &routed_rms_norm_bwd);
}

#if defined(LIBRA_WITH_CUDA)
TORCH_LIBRARY_IMPL(libra, CUDA, m) {
  m.impl("routed_rms_norm_fwd", &routed_rms_norm_fwd);
  m.impl("routed_add_rms_norm_fwd", &routed_add_rms_norm_fwd);
  m.impl("routed_rms_norm_bwd", &routed_rms_norm_bwd);
}
#endif
