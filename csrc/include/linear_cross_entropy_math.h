// Per-row math of the fused linear cross-entropy (csrc/linear_cross_entropy.cpp), shared by the CPU kernel
// (csrc/cpu/linear_cross_entropy.cpp) and the CUDA kernel (csrc/cuda/linear_cross_entropy.cu), so the CPU tests run
// the very arithmetic the GPU runs. No torch headers: nvcc compiles this quickly.
//
// A "row" is one (token, head segment) pair: z[0, width) are its logits over the ids of this buffer (a whole
// codebook, the text head, this rank's text shard, or a block of ids for the weight-gradient pass), y its target.
// With label smoothing eps over a vocabulary of `vocab` ids and z-loss weight w (all in float32, or float64 for
// float64 input):
//   lse  = log sum_j exp z_j                                       (online softmax: one pass, running max and sum)
//   loss = lse - (1 - eps) z_y - (eps / vocab) sum_j z_j + w lse^2
//   d loss / d z_j = p_j (1 + 2 w lse) - (1 - eps) [j == y] - eps / vocab,   p_j = exp(z_j - lse)
// An ignored target (label == ignore_index) has loss 0 and gradient 0.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "libra_common.h"

namespace libra {
namespace xent {

// Everything one kernel launch needs; pointers are already offset to the launch's first row. Accumulator-typed
// pointers (acc_t: float, double for float64 logits) are void* so one struct serves every element type.
struct Rows {
  void* logits;     // [rows, ld] in the input dtype; segment s of row r is logits[r * ld + s * width, + width)
  int64_t ld;       // elements between consecutive rows of the buffer
  int64_t rows;     // rows in this launch
  int64_t segments; // heads side by side in a buffer row (the C codebooks; 1 for the text head)
  int64_t width;    // ids of one segment held in the buffer
  int64_t first_id; // id (inside the segment's vocabulary) of the buffer's first column
  const int64_t* labels;  // labels[s * label_stride + r]: the combined-space label of (row r, segment s)
  int64_t label_stride;
  int64_t label_offset;   // the id of label l inside the segment's vocabulary is l - label_offset
  int64_t ignore_index;
  int64_t vocab;          // ids of the segment's full vocabulary (all shards): the label-smoothing divisor
  double smoothing;
  double z_loss_weight;
  const void* weights;    // acc_t, weights[s * weight_stride_s + r * weight_stride_r] = d total / d loss(r, s);
  int64_t weight_stride_s;//   nullptr: write no gradient
  int64_t weight_stride_r;
  const void* lse_in;     // acc_t [s * out_stride + r]: the log-sum-exp to use; nullptr: compute it here
  void* loss_out;         // acc_t [s * out_stride + r], written when lse_in is nullptr
  void* stats_out;        // acc_t [k * stats_plane + s * out_stride + r], k = 0: lse, 1: target logit (0 when the
  int64_t out_stride;     //   target is not in this buffer), 2: sum of the logits; written when lse_in is nullptr
  int64_t stats_plane;
};

// Column of the target of (row, segment) in this buffer, or -1 when it is ignored or lies outside the buffer.
struct Target {
  bool valid;      // the label is not ignore_index
  int64_t column;  // in [0, width) or -1
};

LIBRA_HD Target target_of(const Rows& a, int64_t row, int64_t segment) {
  const int64_t label = a.labels[segment * a.label_stride + row];
  Target t{label != a.ignore_index, -1};
  const int64_t column = label - a.label_offset - a.first_id;
  if (t.valid && column >= 0 && column < a.width) t.column = column;
  return t;
}

// Start value of the running maximum: the lowest finite number, so an all -inf row gives sum 0 and lse -inf
// without evaluating exp(-inf - -inf).
LIBRA_HD float lowest(float) { return -FLT_MAX; }
LIBRA_HD double lowest(double) { return -DBL_MAX; }

// Online softmax: add logit z to the running (max, sum of exp(z_j - max)).
template <typename acc_t>
LIBRA_HD void softmax_add(acc_t& max, acc_t& sum, acc_t z) {
  if (z > max) {
    sum = sum * std::exp(max - z) + acc_t(1);
    max = z;
  } else {
    sum += std::exp(z - max);
  }
}

// Online softmax: merge another partial (max, sum) into the running one.
template <typename acc_t>
LIBRA_HD void softmax_merge(acc_t& max, acc_t& sum, acc_t other_max, acc_t other_sum) {
  if (other_max > max) {
    sum = sum * std::exp(max - other_max) + other_sum;
    max = other_max;
  } else {
    sum += other_sum * std::exp(other_max - max);
  }
}

template <typename acc_t>
LIBRA_HD acc_t log_sum_exp(acc_t max, acc_t sum) {
  return max + std::log(sum);
}

// The loss of one valid target from the row's statistics.
template <typename acc_t>
LIBRA_HD acc_t row_loss(acc_t lse, acc_t target_logit, acc_t sum_logits, const Rows& a) {
  const acc_t eps = acc_t(a.smoothing), z_weight = acc_t(a.z_loss_weight);
  return lse - (acc_t(1) - eps) * target_logit - eps / acc_t(a.vocab) * sum_logits + z_weight * lse * lse;
}

// What the gradient of every logit of a row needs: g_j = scale * exp(z_j - lse) - shift - [j == y] * target_shift.
template <typename acc_t>
struct GradCoefficients {
  acc_t lse;
  acc_t scale;         // weight * (1 + 2 w lse)
  acc_t shift;         // weight * eps / vocab
  acc_t target_shift;  // weight * (1 - eps)
  bool active;         // false for an ignored target: every gradient of its row is an exact 0
};

template <typename acc_t>
LIBRA_HD GradCoefficients<acc_t> grad_coefficients(acc_t lse, acc_t weight, bool valid, const Rows& a) {
  // An ignored target contributes nothing, even when its row's logits are NaN or inf (as in
  // torch.nn.functional.cross_entropy): its gradients are set to 0, never computed as 0 * NaN.
  if (!valid) return {acc_t(0), acc_t(0), acc_t(0), acc_t(0), false};
  const acc_t eps = acc_t(a.smoothing);
  return {lse, weight * (acc_t(1) + acc_t(2) * acc_t(a.z_loss_weight) * lse), weight * eps / acc_t(a.vocab),
          weight * (acc_t(1) - eps), true};
}

template <typename acc_t>
LIBRA_HD acc_t logit_grad(acc_t z, bool is_target, const GradCoefficients<acc_t>& c) {
  if (!c.active) return acc_t(0);
  const acc_t g = c.scale * std::exp(z - c.lse) - c.shift;
  return is_target ? g - c.target_shift : g;
}

template <typename acc_t>
LIBRA_HD acc_t row_weight(const Rows& a, int64_t row, int64_t segment) {
  return static_cast<const acc_t*>(a.weights)[segment * a.weight_stride_s + row * a.weight_stride_r];
}

// Writes the statistics and the loss of (row, segment) (loss 0 for an ignored target).
template <typename acc_t>
LIBRA_HD void write_row_stats(const Rows& a, int64_t row, int64_t segment, bool valid, acc_t lse, acc_t target_logit,
                              acc_t sum_logits) {
  const int64_t at = segment * a.out_stride + row;
  acc_t* stats = static_cast<acc_t*>(a.stats_out);
  stats[at] = lse;
  stats[a.stats_plane + at] = target_logit;
  stats[2 * a.stats_plane + at] = sum_logits;
  static_cast<acc_t*>(a.loss_out)[at] = valid ? row_loss(lse, target_logit, sum_logits, a) : acc_t(0);
}

template <typename acc_t>
LIBRA_HD acc_t given_lse(const Rows& a, int64_t row, int64_t segment) {
  return static_cast<const acc_t*>(a.lse_in)[segment * a.out_stride + row];
}

}  // namespace xent
}  // namespace libra
