// Driver of the fused linear cross-entropy over one head (the shared kernel of discrete_token_cross_entropy): the
// chunked algorithm below, the same on every device. Checks, allocation and GEMMs go through ATen (cuBLAS on CUDA);
// the per-row work (online softmax, loss, logit gradient written in place) is the device's row launcher:
// libra::linear_cross_entropy_rows_cpu (csrc/cpu/linear_cross_entropy.cpp) or _cuda (csrc/cuda/), both built on the
// math of csrc/include/linear_cross_entropy_math.h. Schema: csrc/ops.cpp.
//
// A head is S segments of K ids each (the text head: S = 1; the visual codebooks: S = C heads side by side, so
// one GEMM serves all of them and dh sums their contributions inside the GEMM). For n rows:
//   pass A, row chunks: logits = h[chunk] @ W^T (in h's dtype); row kernel: loss and statistics, and the logit
//     gradient in place; dh[chunk] = dlogits @ W. When the head's rows fit one chunk, dW = dlogits^T @ h too.
//   pass B, only for a head that needs dW and whose rows span several chunks: for each block of ids, logits of all
//     rows are recomputed, the row kernel writes their gradient with the log-sum-exp of pass A, and
//     dW[block] = dlogits^T @ h. Each element of dW is thus one GEMM's float32 accumulation over all rows (rounded
//     once), without a float32 [S*K, hidden] accumulator (500 MiB for the 7B text head): the price is one more
//     logits GEMM for a trained head that does not fit one chunk, and none for a frozen one.
// The logits buffer holds at most `chunk_elements` elements (default 2^23, 16 MiB in bf16): rows per chunk =
// chunk_elements / (S*K), rounded down to a multiple of 128 for full GEMM tiles; pass B takes chunk_elements / n
// ids per block. Extra memory is that buffer plus the [S, n] statistics.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "driver.h"

namespace {

using libra::xent::Rows;

constexpr int64_t kDefaultChunkElements = int64_t(1) << 23;
constexpr const char* kOp = "linear_cross_entropy";

void run_rows(const at::Tensor& logits, const Rows& rows) {
  if (rows.rows == 0 || rows.segments == 0) return;
  const libra::DType dtype = libra::dtype_code(logits.scalar_type(), kOp);
  if (logits.is_cuda()) {
    libra::require_cuda_build(kOp);
#if defined(LIBRA_WITH_CUDA)
    TORCH_CHECK(rows.rows * rows.segments < (int64_t(1) << 31), kOp,
                ": at most 2^31 - 1 (row, head) pairs per launch, got ", rows.rows * rows.segments);
    libra::check_launch(libra::linear_cross_entropy_rows_cuda(rows, dtype, libra::current_stream()),
                        "linear_cross_entropy row kernel");
#endif
  } else {
    libra::linear_cross_entropy_rows_cpu(rows, dtype);
  }
}

// Rows of pass A's chunks: as many as the budget allows, in whole 128-row GEMM tiles when there are several.
int64_t rows_per_chunk(int64_t budget, int64_t width, int64_t n) {
  int64_t rows = std::max<int64_t>(1, budget / std::max<int64_t>(width, 1));
  if (rows >= n) return n;
  if (rows >= 256) rows -= rows % 128;
  return rows;
}

// Ids per block of pass B (all n rows at once), in multiples of 64 when large enough.
int64_t ids_per_block(int64_t budget, int64_t n, int64_t ids) {
  int64_t block = std::max<int64_t>(1, budget / std::max<int64_t>(n, 1));
  if (block >= ids) return ids;
  if (block >= 128) block -= block % 64;
  return block;
}

void check_inputs(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& labels,
                  const at::Tensor& row_weights, const std::optional<at::Tensor>& lse, const at::Tensor& dh,
                  at::ScalarType stat) {
  TORCH_CHECK(h.dim() == 2, kOp, ": h must be [n, hidden], got ", h.sizes());
  TORCH_CHECK(weight.dim() == 3 && weight.size(2) == h.size(1), kOp, ": weight must be [S, K, hidden], got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == h.scalar_type() && weight.device() == h.device(), kOp,
              ": weight must have the dtype and device of h");
  TORCH_CHECK(weight.size(1) < (int64_t(1) << 31), kOp, ": at most 2^31 - 1 ids per segment");
  const auto S = weight.size(0), n = h.size(0);
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 2 && labels.size(0) == S && labels.size(1) == n &&
                  labels.device() == h.device(),
              kOp, ": labels must be int64 [S, n] on h's device, got ", labels.sizes());
  if (row_weights.dim() != 1 || row_weights.numel() != 0) {
    TORCH_CHECK(row_weights.dim() == 2 && row_weights.size(0) == S && row_weights.size(1) == n &&
                    row_weights.scalar_type() == stat && row_weights.device() == h.device(),
                kOp, ": row_weights must be [S, n] in ", stat, " on h's device");
  }
  if (lse.has_value()) {
    TORCH_CHECK(lse->dim() == 2 && lse->size(0) == S && lse->size(1) == n && lse->scalar_type() == stat &&
                    lse->device() == h.device(),
                kOp, ": lse must be [S, n] in ", stat, " on h's device");
  }
  if (dh.dim() != 1 || dh.numel() != 0) {
    TORCH_CHECK(dh.sizes() == h.sizes() && dh.scalar_type() == h.scalar_type() && dh.device() == h.device() &&
                    dh.is_contiguous(),
                kOp, ": dh must be a contiguous tensor of h's shape, dtype and device (or empty)");
    TORCH_CHECK(row_weights.dim() == 2, kOp, ": dh needs row_weights");
  }
}

// The fields of Rows shared by every launch of a call.
Rows common_rows(const at::Tensor& labels, int64_t label_offset, int64_t ignore_index, int64_t vocab,
                 double smoothing, double z_loss_weight) {
  Rows a{};
  a.label_stride = labels.stride(0);
  a.label_offset = label_offset;
  a.ignore_index = ignore_index;
  a.vocab = vocab;
  a.smoothing = smoothing;
  a.z_loss_weight = z_loss_weight;
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy(
    const at::Tensor& h_in, const at::Tensor& weight_in, const at::Tensor& labels_in, const at::Tensor& row_weights,
    const std::optional<at::Tensor>& lse_in, const at::Tensor& dh, int64_t label_offset, int64_t ignore_index,
    int64_t vocab, double label_smoothing, double z_loss_weight, bool need_dw, int64_t chunk_elements) {
  const auto stat = h_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_inputs(h_in, weight_in, labels_in, row_weights, lse_in, dh, stat);
  const at::OptionalDeviceGuard guard(h_in.device());
  const auto h = h_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto labels = labels_in.stride(1) == 1 ? labels_in : labels_in.contiguous();
  const int64_t n = h.size(0), hidden = h.size(1), S = weight.size(0), K = weight.size(1);
  const auto W = weight.view({S * K, hidden});
  const auto stat_options = h.options().dtype(stat);
  const bool given_lse = lse_in.has_value();
  const auto lse = given_lse ? lse_in->contiguous() : at::Tensor();

  at::Tensor loss = given_lse ? at::empty({0}, stat_options) : at::empty({S, n}, stat_options);
  at::Tensor stats = given_lse ? at::empty({0}, stat_options) : at::empty({3, S, n}, stat_options);
  at::Tensor dw = need_dw ? at::empty({S, K, hidden}, weight.options()) : at::empty({0}, weight.options());
  TORCH_CHECK(!need_dw || row_weights.dim() == 2, kOp, ": dW needs row_weights");
  if (n == 0) {
    if (need_dw) dw.zero_();
    return {loss, stats, dw};
  }

  const int64_t budget = chunk_elements > 0 ? chunk_elements : kDefaultChunkElements;
  const int64_t chunk = rows_per_chunk(budget, S * K, n);
  const bool one_chunk = chunk == n;
  const bool want_dh = dh.dim() == 2;
  const bool pass_a_grads = want_dh || (need_dw && one_chunk);
  const Rows common = common_rows(labels, label_offset, ignore_index, vocab, label_smoothing, z_loss_weight);

  if (!given_lse || pass_a_grads) {
    auto buffer = at::empty({chunk, S * K}, h.options());
    for (int64_t r0 = 0; r0 < n; r0 += chunk) {
      const int64_t r = std::min(chunk, n - r0);
      auto logits = buffer.narrow(0, 0, r);
      const auto h_chunk = h.narrow(0, r0, r);
      at::mm_out(logits, h_chunk, W.t());
      Rows a = common;
      a.logits = logits.data_ptr();
      a.ld = S * K;
      a.rows = r;
      a.segments = S;
      a.width = K;
      a.labels = labels.narrow(1, r0, r).data_ptr<int64_t>();
      a.out_stride = n;
      a.stats_plane = S * n;
      if (given_lse) {
        a.lse_in = lse.narrow(1, r0, r).data_ptr();
      } else {
        a.loss_out = loss.narrow(1, r0, r).data_ptr();
        a.stats_out = stats.narrow(2, r0, r).data_ptr();
      }
      if (pass_a_grads) {
        a.weights = row_weights.narrow(1, r0, r).data_ptr();
        a.weight_stride_s = row_weights.stride(0);
        a.weight_stride_r = row_weights.stride(1);
      }
      run_rows(logits, a);
      if (want_dh) {
        auto dh_chunk = dh.narrow(0, r0, r);
        at::mm_out(dh_chunk, logits, W);
      }
      if (need_dw && one_chunk) {
        auto dw_flat = dw.view({S * K, hidden});
        at::mm_out(dw_flat, logits.t(), h_chunk);
      }
    }
  }

  if (need_dw && !one_chunk) {
    const auto lse_source = given_lse ? lse : stats.select(0, 0);
    const int64_t block = ids_per_block(budget, n, K);
    auto buffer = at::empty({n * block}, h.options());
    auto dw_flat = dw.view({S * K, hidden});
    for (int64_t s = 0; s < S; ++s) {
      for (int64_t k0 = 0; k0 < K; k0 += block) {
        const int64_t kb = std::min(block, K - k0);
        auto logits = buffer.narrow(0, 0, n * kb).view({n, kb});
        at::mm_out(logits, h, W.narrow(0, s * K + k0, kb).t());
        Rows a = common;
        a.logits = logits.data_ptr();
        a.ld = kb;
        a.rows = n;
        a.segments = 1;
        a.width = kb;
        a.first_id = k0;
        a.labels = labels.select(0, s).data_ptr<int64_t>();
        a.lse_in = lse_source.select(0, s).data_ptr();
        a.out_stride = 0;
        a.weights = row_weights.select(0, s).data_ptr();
        a.weight_stride_r = row_weights.stride(1);
        run_rows(logits, a);
        auto dw_block = dw_flat.narrow(0, s * K + k0, kb);
        at::mm_out(dw_block, logits.t(), h);
      }
    }
  }
  return {loss, stats, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(libra, CPU, m) { m.impl("linear_cross_entropy", &linear_cross_entropy); }

#if defined(LIBRA_WITH_CUDA)
TORCH_LIBRARY_IMPL(libra, CUDA, m) { m.impl("linear_cross_entropy", &linear_cross_entropy); }
#endif
