// Schemas of the C++ operators of namespace libra. Kernels are registered per device in csrc/cpu and
// csrc/cuda; fake (meta) implementations and autograd are registered from Python (libra_kernels/_ext.py).
// Other operator families add their schemas with TORCH_LIBRARY_FRAGMENT(libra, m) in their own files.
#include <torch/library.h>

TORCH_LIBRARY(libra, m) {
  // y [T, D] (dtype of x), rstd [T] float32 (float64 for float64 input). Rows [0, n_text) use w_text.
  m.def("routed_rms_norm_fwd(Tensor x, SymInt n_text, Tensor w_text, Tensor w_vision, float eps) -> (Tensor, Tensor)");
  // Returns (dx, dw_text, dw_vision); a weight gradient that is not asked for is returned as an empty [0] tensor.
  m.def(
      "routed_rms_norm_bwd(Tensor grad_y, Tensor x, Tensor rstd, SymInt n_text, Tensor w_text, Tensor w_vision, "
      "bool need_w_text_grad, bool need_w_vision_grad) -> (Tensor, Tensor, Tensor)");
}
