// Driver of modality_layout: checks, allocation through ATen, the prefix count of the vision flags by ATen's cumsum
// (a device scan on CUDA) and the call of the device's launcher (csrc/cpu/modality_layout.cpp,
// csrc/cuda/modality_layout.cu). Nothing is read back to the host, so building a layout never synchronises.
// Schema: csrc/ops.cpp.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "driver.h"

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> modality_layout(const at::Tensor& vision_mask) {
  TORCH_CHECK(vision_mask.dim() == 2 && vision_mask.scalar_type() == at::kBool,
              "modality_layout: vision_mask must be a bool [B, N] tensor, got ", vision_mask.scalar_type(), " ",
              vision_mask.sizes());
  const at::OptionalDeviceGuard guard(vision_mask.device());
  const auto flags = vision_mask.contiguous().view({-1});
  const auto index_options = flags.options().dtype(at::kLong);
  auto sort_index = at::empty({flags.numel()}, index_options);
  auto row_of = at::empty(vision_mask.sizes(), index_options);
  auto counts = at::zeros({2}, index_options);
  if (flags.numel() == 0) {
    return {sort_index, row_of, counts};
  }
  const auto inclusive = at::cumsum(flags, 0, at::kLong);
  if (flags.is_cuda()) {
    libra::require_cuda_build("modality_layout");
#if defined(LIBRA_WITH_CUDA)
    libra::check_launch(libra::modality_layout_cuda(flags.const_data_ptr<bool>(), inclusive.const_data_ptr<int64_t>(),
                                                    flags.numel(), sort_index.data_ptr<int64_t>(),
                                                    row_of.data_ptr<int64_t>(), counts.data_ptr<int64_t>(),
                                                    libra::current_stream()),
                        "modality_layout");
#endif
  } else {
    libra::modality_layout_cpu(flags.const_data_ptr<bool>(), inclusive.const_data_ptr<int64_t>(), flags.numel(),
                               sort_index.data_ptr<int64_t>(), row_of.data_ptr<int64_t>(), counts.data_ptr<int64_t>());
  }
  return {sort_index, row_of, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(libra, CPU, m) { m.impl("modality_layout", &modality_layout); }

#if defined(LIBRA_WITH_CUDA)
TORCH_LIBRARY_IMPL(libra, CUDA, m) { m.impl("modality_layout", &modality_layout); }
#endif
