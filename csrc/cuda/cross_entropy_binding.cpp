// CUDA binding of the fused linear cross-entropy's row kernel (csrc/cuda/cross_entropy.cu): launches it on the
// current stream of the current device (csrc/cross_entropy.cpp has set the device guard) and turns a launch error
// into a C++ exception. Compiled only in CUDA builds (LIBRA_WITH_CUDA).
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "cross_entropy_math.h"

extern "C" cudaError_t libra_xent_rows_cuda(const libra::xent::Rows* args, int dtype, cudaStream_t stream);

namespace libra {
namespace xent {

void rows_cuda(const Rows& args, Dtype dtype) {
  TORCH_CHECK(args.rows * args.segments < (int64_t(1) << 31), "linear_cross_entropy: at most 2^31 - 1 (row, head) "
              "pairs per launch, got ", args.rows * args.segments);
  const cudaError_t status = libra_xent_rows_cuda(&args, static_cast<int>(dtype), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "linear_cross_entropy: CUDA row kernel failed: ", cudaGetErrorString(status));
}

}  // namespace xent
}  // namespace libra
