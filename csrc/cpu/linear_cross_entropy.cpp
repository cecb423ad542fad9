// CPU row kernel of the fused linear cross-entropy (driver: csrc/linear_cross_entropy.cpp): for each (row, segment)
// of a logits buffer, the online softmax statistics and the loss, and/or the gradient of the logits written in
// place. The arithmetic is the LIBRA_HD math of linear_cross_entropy_math.h, the same the CUDA kernel runs.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "launchers.h"

namespace {

using libra::xent::Rows;

template <typename scalar_t, typename acc_t>
void rows_kernel(const Rows& a) {
  scalar_t* logits = static_cast<scalar_t*>(a.logits);
  // A task is a few (row, segment) pairs holding at least ~16K logits, so both cores share small launches too.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(a.width, 1));
  at::parallel_for(0, a.rows * a.segments, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = i / a.segments, segment = i % a.segments;
      scalar_t* z = logits + row * a.ld + segment * a.width;
      const auto target = libra::xent::target_of(a, row, segment);
      acc_t lse;
      if (a.lse_in == nullptr) {
        acc_t max = libra::xent::lowest(acc_t(0)), sum = 0, sum_logits = 0;
        for (int64_t j = 0; j < a.width; ++j) {
          const acc_t v = static_cast<acc_t>(z[j]);
          libra::xent::softmax_add(max, sum, v);
          sum_logits += v;
        }
        lse = libra::xent::log_sum_exp(max, sum);
        const acc_t target_logit = target.column >= 0 ? static_cast<acc_t>(z[target.column]) : acc_t(0);
        libra::xent::write_row_stats(a, row, segment, target.valid, lse, target_logit, sum_logits);
      } else {
        lse = libra::xent::given_lse<acc_t>(a, row, segment);
      }
      if (a.weights == nullptr) continue;
      const auto c = libra::xent::grad_coefficients(lse, libra::xent::row_weight<acc_t>(a, row, segment),
                                                    target.valid, a);
      for (int64_t j = 0; j < a.width; ++j) {
        z[j] = static_cast<scalar_t>(libra::xent::logit_grad(static_cast<acc_t>(z[j]), j == target.column, c));
      }
    }
  });
}

}  // namespace

namespace libra {

void linear_cross_entropy_rows_cpu(const xent::Rows& args, DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return rows_kernel<float, float>(args);
    case DType::kFloat64:
      return rows_kernel<double, double>(args);
    case DType::kFloat16:
      return rows_kernel<c10::Half, float>(args);
    case DType::kBFloat16:
      return rows_kernel<c10::BFloat16, float>(args);
  }
}

}  // namespace libra
