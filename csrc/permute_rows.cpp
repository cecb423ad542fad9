// Driver of permute_rows (out[r] = x[index[r]]): checks, allocation through ATen and the call of the device's
// launcher (csrc/cpu/permute_rows.cpp, csrc/cuda/permute_rows.cu). inverse_index is used by the backward only,
// which Python registers as this op applied with the two indices swapped. Schema: csrc/ops.cpp.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "driver.h"

namespace {

at::Tensor permute_rows(const at::Tensor& x_in, const at::Tensor& index_in, const at::Tensor& /*inverse_index*/) {
  TORCH_CHECK(x_in.dim() >= 1, "permute_rows: x must have a row dimension");
  TORCH_CHECK(index_in.dim() == 1 && index_in.scalar_type() == at::kLong && index_in.size(0) == x_in.size(0),
              "permute_rows: index must be int64 [T] with T = x.shape[0], got ", index_in.scalar_type(), " ",
              index_in.sizes());
  TORCH_CHECK(index_in.device() == x_in.device(), "permute_rows: index must be on the device of x");
  const at::OptionalDeviceGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const auto index = index_in.contiguous();
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t rows = x.size(0);
  if (rows == 0 || x.numel() == 0) {
    return out;
  }
  const int64_t row_bytes = x.numel() / rows * x.element_size();
  if (x.is_cuda()) {
    libra::require_cuda_build("permute_rows");
#if defined(LIBRA_WITH_CUDA)
    libra::check_launch(libra::permute_rows_cuda(x.const_data_ptr(), out.data_ptr(), index.const_data_ptr<int64_t>(),
                                                 rows, row_bytes, libra::current_stream()),
                        "permute_rows");
#endif
  } else {
    libra::permute_rows_cpu(x.const_data_ptr(), out.data_ptr(), index.const_data_ptr<int64_t>(), rows, row_bytes);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(libra, CPU, m) { m.impl("permute_rows", &permute_rows); }

#if defined(LIBRA_WITH_CUDA)
TORCH_LIBRARY_IMPL(libra, CUDA, m) { m.impl("permute_rows", &permute_rows); }
#endif
