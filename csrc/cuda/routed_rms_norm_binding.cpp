// CUDA registration of the routed RMSNorm ops: checks, allocation through ATen (the caching allocator, so the ops
// are capturable in a CUDA graph) and calls of the launchers of routed_rms_norm.cu on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "libra_common.h"

extern "C" cudaError_t libra_routed_rms_norm_fwd_cuda(int dtype, const void* x, const void* residual, void* h, void* y,
                                                      void* rstd, const void* w_text, const void* w_vision,
                                                      int64_t rows, int64_t n_text, int64_t width, double eps,
                                                      cudaStream_t stream);
extern "C" cudaError_t libra_routed_rms_norm_bwd_cuda(int dtype, const void* dy, const void* x, const void* rstd,
                                                      const void* w_text, const void* w_vision, const void* grad_h,
                                                      void* dx, void* partial, void* dw_text, void* dw_vision,
                                                      int64_t rows, int64_t n_text, int64_t width,
                                                      int64_t rows_per_block, cudaStream_t stream);

namespace {

int dtype_code(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return static_cast<int>(libra::DType::kFloat32);
    case at::kDouble:
      return static_cast<int>(libra::DType::kFloat64);
    case at::kHalf:
      return static_cast<int>(libra::DType::kFloat16);
    case at::kBFloat16:
      return static_cast<int>(libra::DType::kBFloat16);
    default:
      TORCH_CHECK(false, "routed_rms_norm: unsupported dtype ", type);
  }
}

at::ScalarType stat_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_inputs(const at::Tensor& x, int64_t n_text, const at::Tensor& w_text, const at::Tensor& w_vision) {
  TORCH_CHECK(x.dim() == 2, "routed_rms_norm: x must be [T, D]");
  TORCH_CHECK(n_text >= 0 && n_text <= x.size(0), "routed_rms_norm: n_text out of range");
  TORCH_CHECK(w_text.dim() == 1 && w_text.size(0) == x.size(1), "routed_rms_norm: w_text must be [D]");
  TORCH_CHECK(w_vision.dim() == 1 && w_vision.size(0) == x.size(1), "routed_rms_norm: w_vision must be [D]");
  TORCH_CHECK(w_text.scalar_type() == x.scalar_type() && w_vision.scalar_type() == x.scalar_type(),
              "routed_rms_norm: weights must have the dtype of x");
  TORCH_CHECK(x.is_cuda() && w_text.device() == x.device() && w_vision.device() == x.device(),
              "routed_rms_norm: all tensors must be on the same CUDA device");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x_in, const at::Tensor* residual_in,
                                                       int64_t n_text, const at::Tensor& w_text_in,
                                                       const at::Tensor& w_vision_in, double eps) {
  check_inputs(x_in, n_text, w_text_in, w_vision_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
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
  auto rstd = at::empty({x.size(0)}, x.options().dtype(stat_type(x)));
  const auto status = libra_routed_rms_norm_fwd_cuda(
      dtype_code(x.scalar_type()), x.const_data_ptr(), residual.defined() ? residual.const_data_ptr() : nullptr,
      h.defined() ? h.data_ptr() : nullptr, y.data_ptr(), rstd.data_ptr(), w_text.const_data_ptr(),
      w_vision.const_data_ptr(), x.size(0), n_text, x.size(1), eps, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "routed_rms_norm forward kernel failed: ", cudaGetErrorString(status));
  return {y, h, rstd};
}

std::tuple<at::Tensor, at::Tensor> routed_rms_norm_fwd_cuda(const at::Tensor& x, int64_t n_text,
                                                            const at::Tensor& w_text, const at::Tensor& w_vision,
                                                            double eps) {
  auto [y, h, rstd] = forward(x, nullptr, n_text, w_text, w_vision, eps);
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_add_rms_norm_fwd_cuda(const at::Tensor& x,
                                                                            const at::Tensor& residual,
                                                                            int64_t n_text, const at::Tensor& w_text,
                                                                            const at::Tensor& w_vision, double eps) {
  return forward(x, &residual, n_text, w_text, w_vision, eps);
}

// About four blocks per multiprocessor: enough parallelism, and few enough blocks that the float32 partial sums
// of the weight gradients stay a small fraction of the traffic.
int64_t rows_per_block(int64_t rows, int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t per_block = (rows + 4 * sms - 1) / (4 * sms);
  return std::min<int64_t>(1024, std::max<int64_t>(8, per_block));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_rms_norm_bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& rstd_in, int64_t n_text,
    const at::Tensor& w_text_in, const at::Tensor& w_vision_in, bool need_w_text_grad, bool need_w_vision_grad,
    const c10::optional<at::Tensor>& grad_h_in) {
  check_inputs(x_in, n_text, w_text_in, w_vision_in);
  TORCH_CHECK(grad_y.sizes() == x_in.sizes(), "routed_rms_norm_bwd: grad_y must have the shape of x");
  TORCH_CHECK(rstd_in.dim() == 1 && rstd_in.size(0) == x_in.size(0) && rstd_in.scalar_type() == stat_type(x_in),
              "routed_rms_norm_bwd: rstd must be [T] float32 (float64 for float64 x)");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto dy = grad_y.contiguous().to(x_in.scalar_type());
  const auto x = x_in.contiguous(), rstd = rstd_in.contiguous();
  const auto w_text = w_text_in.contiguous(), w_vision = w_vision_in.contiguous();
  at::Tensor grad_h;
  if (grad_h_in.has_value()) {
    TORCH_CHECK(grad_h_in->sizes() == x.sizes(), "routed_rms_norm_bwd: grad_h must have the shape of x");
    grad_h = grad_h_in->contiguous().to(x.scalar_type());
  }
  const int64_t rows = x.size(0), width = x.size(1);
  const int64_t per_block = rows_per_block(rows, x.get_device());
  const int64_t n_blocks =
      libra::blocks_for_rows(n_text, per_block) + libra::blocks_for_rows(rows - n_text, per_block);
  const bool need_partial = need_w_text_grad || need_w_vision_grad;
  auto dx = at::empty_like(x);
  // The weight gradients are written whole by the reduction kernel, so no zero fill is needed, even for a group
  // without rows (its sum over zero blocks is written as 0).
  auto partial = at::empty({need_partial ? n_blocks : 0, width}, x.options().dtype(stat_type(x)));
  auto dw_text = at::empty({need_w_text_grad ? width : 0}, x.options());
  auto dw_vision = at::empty({need_w_vision_grad ? width : 0}, x.options());
  const auto status = libra_routed_rms_norm_bwd_cuda(
      dtype_code(x.scalar_type()), dy.const_data_ptr(), x.const_data_ptr(), rstd.const_data_ptr(),
      w_text.const_data_ptr(), w_vision.const_data_ptr(), grad_h.defined() ? grad_h.const_data_ptr() : nullptr,
      dx.data_ptr(), need_partial ? partial.data_ptr() : nullptr, need_w_text_grad ? dw_text.data_ptr() : nullptr,
      need_w_vision_grad ? dw_vision.data_ptr() : nullptr, rows, n_text, width, per_block,
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "routed_rms_norm backward kernel failed: ", cudaGetErrorString(status));
  return {dx, dw_text, dw_vision};
}

}  // namespace

TORCH_LIBRARY_IMPL(libra, CUDA, m) {
  m.impl("routed_rms_norm_fwd", &routed_rms_norm_fwd_cuda);
  m.impl("routed_add_rms_norm_fwd", &routed_add_rms_norm_fwd_cuda);
  m.impl("routed_rms_norm_bwd", &routed_rms_norm_bwd_cuda);
}
