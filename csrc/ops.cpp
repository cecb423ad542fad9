// Schemas of all C++ operators of namespace libra (the only TORCH_LIBRARY block). Each operator has a driver,
// csrc/<op>.cpp (checks, allocation, dispatch to the device's launcher in csrc/cpu/ or csrc/cuda/, registration for
// the CPU and CUDA keys); fake (meta) implementations and autograd are registered from Python
// (libra_kernels/ops/*.py). A backward op returns an empty [0] tensor for every gradient that is not asked for.
#include <torch/library.h>

TORCH_LIBRARY(libra, m) {
  // ---- routed RMSNorm: rows [0, n_text) use w_text, rows [n_text, T) w_vision.
  // y [T, D] (dtype of x), rstd [T] float32 (float64 for float64 input).
  m.def("routed_rms_norm_fwd(Tensor x, SymInt n_text, Tensor w_text, Tensor w_vision, float eps) -> (Tensor, Tensor)");
  // The fused residual add: h = x + residual (rounded to x's dtype, as an eager add), y = routed_rms_norm(h).
  // Returns (y, h, rstd).
  m.def(
      "routed_add_rms_norm_fwd(Tensor x, Tensor residual, SymInt n_text, Tensor w_text, Tensor w_vision, float eps) "
      "-> (Tensor, Tensor, Tensor)");
  // Returns (dx, dw_text, dw_vision); a weight gradient that is not asked for is returned as an empty [0] tensor.
  // x is the normalised input (h for the fused add); grad_h, when given, is the gradient that reached h directly
  // (through the returned residual stream) and is added to dx.
  m.def(
      "routed_rms_norm_bwd(Tensor grad_y, Tensor x, Tensor rstd, SymInt n_text, Tensor w_text, Tensor w_vision, "
      "bool need_w_text_grad, bool need_w_vision_grad, Tensor? grad_h=None) -> (Tensor, Tensor, Tensor)");

  // ---- routed linear: GEMMs on the two contiguous row slices, written straight into one output.
  // Returns (y [T, out], low [T - n_text, r]): low = x[n_text:] @ w_vision_a.T is kept for the gradient of
  // w_vision_b (an empty [0] tensor for a dense vision weight, w_vision_b None).
  m.def(
      "routed_linear_fwd(Tensor x, SymInt n_text, Tensor w_text, Tensor w_vision_a, Tensor? w_vision_b) "
      "-> (Tensor, Tensor)");
  // needs = which of (x, w_text, w_vision_a, w_vision_b) want a gradient; an unwanted one is an empty [0] tensor
  // and costs no GEMM.
  m.def(
      "routed_linear_bwd(Tensor grad_y, Tensor x, Tensor low, SymInt n_text, Tensor w_text, Tensor w_vision_a, "
      "Tensor? w_vision_b, bool[4] needs) -> (Tensor, Tensor, Tensor, Tensor)");
  // The grouped form: G projections with dense vision weights, x [G, T, in], w_text[g] and w_vision[g] [out, in].
  // Returns y [G, T, out]; one batched GEMM per modality when each list is packed in one buffer.
  m.def("routed_linear_grouped_fwd(Tensor x, SymInt n_text, Tensor[] w_text, Tensor[] w_vision) -> Tensor");
  // needs = which of (x, w_text, w_vision) want a gradient. Returns (dx with x's strides, d_w_text [G, out, in],
  // d_w_vision [G, out, in]), an empty [0] tensor for each one not asked for.
  m.def(
      "routed_linear_grouped_bwd(Tensor grad_y, Tensor x, SymInt n_text, Tensor[] w_text, Tensor[] w_vision, "
      "bool[3] needs) -> (Tensor, Tensor, Tensor)");

  // ---- several routed projections of one input (attention's q, k, v and bridge A factors): map i has w_text[i]
  // [out_i, in], w_vision_a[i] [r_i, in] and, when has_b[i] is 1, a B factor [out_i, r_i] (w_vision_b lists those
  // in map order); a map without one has out_i = r_i and its vision rows output x @ w_vision_a[i].T.
  // Returns (y [T, sum out_i], low [T - n_text, sum r_i]), the maps side by side.
  m.def(
      "routed_projections_fwd(Tensor x, SymInt n_text, Tensor[] w_text, Tensor[] w_vision_a, Tensor[] w_vision_b, "
      "int[] has_b) -> (Tensor, Tensor)");
  // Returns (dx or [0], d_w_text[i], d_w_vision_a[i], d_w_vision_b[j] (one per listed B factor)); [0] tensors
  // where not needed.
  m.def(
      "routed_projections_bwd(Tensor grad_y, Tensor x, Tensor low, SymInt n_text, Tensor[] w_text, "
      "Tensor[] w_vision_a, Tensor[] w_vision_b, int[] has_b, bool need_x, bool[] need_w_text, "
      "bool[] need_w_vision_a, bool[] need_w_vision_b) -> (Tensor, Tensor[], Tensor[], Tensor[])");

  // ---- modality layout: text rows first, then vision rows, each in (batch, position) order.
  // vision_mask bool [B, N] -> (sort_index int64 [T], row_of int64 [B, N], counts int64 [2] = (n_text, n_vision)),
  // all on the mask's device; nothing is read back to the host.
  m.def("modality_layout(Tensor vision_mask) -> (Tensor, Tensor, Tensor)");
  // out[r] = x[index[r]] for the rows of x [T, ...]; index int64 [T] must be a permutation of [0, T) and
  // inverse_index its inverse, which only the backward uses (the gradient is the gather by the inverse: no
  // scatter, no atomics, no zero fill).
  m.def("permute_rows(Tensor x, Tensor index, Tensor inverse_index) -> Tensor");

  // ---- fused linear cross-entropy over one head (the shared kernel of discrete_token_cross_entropy).
  // One head of S segments with K ids each: h [n, hidden]; weight [S, K, hidden] (h's dtype); labels int64 [S, n]
  // (local id = label - label_offset; ignore_index ignored); row_weights [S, n] float32 (float64 for float64 h,
  // any strides) = d total / d loss(row, segment), or an empty [0] when no gradient is asked; lse [S, n]: given (the
  // vocab-parallel global one) or None to compute it; dh: [n, hidden] written with the gradient of h, or an empty
  // [0] to skip it.
  // vocab: ids of a segment's full vocabulary (label-smoothing divisor). Returns (loss [S, n], stats [3, S, n] =
  // (lse, target logit, sum of logits) of this buffer's ids, dW [S, K, hidden] or [0]); loss and stats are [0]
  // when lse is given. chunk_elements <= 0 selects the default budget of the logits buffer.
  m.def(
      "linear_cross_entropy(Tensor h, Tensor weight, Tensor labels, Tensor row_weights, Tensor? lse, Tensor(a!) dh, "
      "int label_offset, int ignore_index, int vocab, float label_smoothing, float z_loss_weight, bool need_dw, "
      "int chunk_elements) -> (Tensor, Tensor, Tensor)");
}
