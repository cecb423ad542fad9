// CUDA registration of the modality layout ops: checks, allocation through ATen, the prefix count by ATen's
// cumsum (a device scan), and calls of the launchers of layout.cu on the current stream. Nothing is read back to
// the host, so building a layout and permuting rows never synchronise.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

extern "C" cudaError_t libra_modality_layout_cuda(const bool* flags, const int64_t* inclusive_count, int64_t total,
                                                  int64_t* sort_index, int64_t* row_of, int64_t* counts,
                                                  cudaStream_t stream);
extern "C" cudaError_t libra_permute_rows_cuda(const void* src, void* dst, const int64_t* index, int64_t rows,
                                               int64_t row_bytes, cudaStream_t stream);

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> modality_layout_cuda(const at::Tensor& vision_mask) {
  TORCH_CHECK(vision_mask.dim() == 2 && vision_mask.scalar_type() == at::kBool,
              "modality_layout: vision_mask must be a bool [B, N] tensor");
  const c10::cuda::CUDAGuard guard(vision_mask.device());
  const auto flags = vision_mask.contiguous().view({-1});
  const auto index_options = flags.options().dtype(at::kLong);
  auto sort_index = at::empty({flags.numel()}, index_options);
  auto row_of = at::empty(vision_mask.sizes(), index_options);
  auto counts = at::zeros({2}, index_options);
  if (flags.numel() > 0) {
    const auto inclusive = at::cumsum(flags, 0, at::kLong);
    const auto status = libra_modality_layout_cuda(flags.const_data_ptr<bool>(), inclusive.const_data_ptr<int64_t>(),
                                                   flags.numel(), sort_index.data_ptr<int64_t>(),
                                                   row_of.data_ptr<int64_t>(), counts.data_ptr<int64_t>(),
                                                   c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(status == cudaSuccess, "modality_layout kernel failed: ", cudaGetErrorString(status));
  }
  return {sort_index, row_of, counts};
}

at::Tensor permute_rows_cuda(const at::Tensor& x_in, const at::Tensor& index_in,
                           const at::Tensor& /*inverse_index: used by the backward only*/) {
  TORCH_CHECK(x_in.dim() >= 1, "permute_rows: x must have a row dimension");
  TORCH_CHECK(index_in.dim() == 1 && index_in.scalar_type() == at::kLong && index_in.size(0) == x_in.size(0),
              "permute_rows: index must be int64 [T] with T = x.shape[0]");
  TORCH_CHECK(index_in.device() == x_in.device(), "permute_rows: index must be on the device of x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const auto index = index_in.contiguous();
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t rows = x.size(0);
  if (rows > 0 && x.numel() > 0) {
    const int64_t row_bytes = x.numel() / rows * x.element_size();
    const auto status = libra_permute_rows_cuda(x.const_data_ptr(), out.data_ptr(), index.const_data_ptr<int64_t>(),
                                                rows, row_bytes, c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(status == cudaSuccess, "permute_rows kernel failed: ", cudaGetErrorString(status));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(libra, CUDA, m) {
  m.impl("modality_layout", &modality_layout_cuda);
  m.impl("permute_rows", &permute_rows_cuda);
}
