// CPU kernel of cross_entropy_boundary: the loss's gradient and the diagonal
// of its Hessian at the logits in three passes over each row (max, sum of
// exponentials, outputs), instead of a dozen unfused tensor ops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "dispatch.h"

namespace obd {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_boundary_cpu(const at::Tensor& logits,
                                                                          const at::Tensor& target,
                                                                          int64_t ignore_index, double scale) {
  check_ce_args(logits, target);
  auto x = logits.contiguous();
  auto t = target.contiguous();
  const int64_t n = x.size(0), c = x.size(1);
  auto g = at::empty_like(x);
  auto h = at::empty_like(x);
  std::vector<double> row_loss(n, 0.0);
  const int64_t* tp = t.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r)
    TORCH_CHECK(tp[r] == ignore_index || (tp[r] >= 0 && tp[r] < c), "obd_ext.cross_entropy_boundary: target[",
                r, "] = ", tp[r], " is not a class in [0, ", c, ")");
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using S = std::conditional_t<std::is_same_v<T, double>, double, float>;
    const T* xp = x.const_data_ptr<T>();
    T* gp = g.mutable_data_ptr<T>();
    T* hp = h.mutable_data_ptr<T>();
    at::parallel_for(0, n, 1, [&](int64_t rb, int64_t re) {
      std::vector<S> e(c);  // exp(x - max) of one row: one exponential per entry
      for (int64_t r = rb; r < re; ++r) {
        const T* row = xp + r * c;
        S mx = -std::numeric_limits<S>::infinity();
        for (int64_t j = 0; j < c; ++j) mx = std::max(mx, static_cast<S>(row[j]));
        S sum = 0;
        for (int64_t j = 0; j < c; ++j) {
          e[j] = std::exp(static_cast<S>(row[j]) - mx);
          sum += e[j];
        }
        const bool valid = tp[r] != ignore_index;
        const int64_t k = valid ? tp[r] : -1;
        const S w = valid ? static_cast<S>(scale) : S(0);
        const S inv = S(1) / sum;
        T* grow = gp + r * c;
        T* hrow = hp + r * c;
        for (int64_t j = 0; j < c; ++j) {
          const S p = e[j] * inv;
          grow[j] = static_cast<T>(w * p);
          hrow[j] = static_cast<T>(w * p * (S(1) - p));
        }
        if (valid) {
          grow[k] = static_cast<T>(w * (e[k] * inv - S(1)));
          row_loss[r] = static_cast<double>(std::log(sum) + mx - static_cast<S>(row[k])) * scale;
        }
      }
    });
  });
  double loss = 0.0;
  for (double v : row_loss) loss += v;  // in row order: deterministic
  return {at::scalar_tensor(loss, x.options().dtype(at::kDouble)), g, h};
}

}  // namespace

TORCH_LIBRARY_IMPL(obd_ext, CPU, m) { m.impl("cross_entropy_boundary", &cross_entropy_boundary_cpu); }

}  // namespace cpu
}  // namespace obd
