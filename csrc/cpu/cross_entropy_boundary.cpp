// CPU kernel of cross_entropy_boundary: the loss's gradient and the diagonal
// of its Hessian at the logits, row by row (max, exponentials into a row
// buffer, their sum, outputs: the row stays in L2 even at 32k classes),
// instead of a dozen unfused tensor ops over the whole logits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "dispatch.h"
#include "vec_math.h"

namespace obd {
namespace cpu {
namespace {

template <typename T>
struct CeArgs {
  const T* x;          // N x C logits
  const int64_t* t;    // N targets
  T* g;                // N x C, or null (not wanted)
  T* h;                // N x C
  double* row_loss;    // N
  int64_t c, ignore_index;
  double scale;
};

// Reductions run in kLanes independent partial results, so that they
// vectorise without reassociation flags (and give the same result on every
// machine and thread count: the lanes are fixed, rows are never split).
constexpr int64_t kLanes = 16;

template <typename T, typename S>
OBD_ALWAYS_INLINE void ce_rows(const CeArgs<T>& a, int64_t rb, int64_t re, S* __restrict e) {
  const int64_t c = a.c;
  for (int64_t r = rb; r < re; ++r) {
    const T* __restrict row = a.x + r * c;
    S lane[kLanes];
    for (int64_t l = 0; l < kLanes; ++l) lane[l] = -std::numeric_limits<S>::infinity();
    const int64_t body = c - c % kLanes;
    for (int64_t j = 0; j < body; j += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) {
        const S v = static_cast<S>(row[j + l]);
        lane[l] = v > lane[l] ? v : lane[l];
      }
    S mx = -std::numeric_limits<S>::infinity();
    for (int64_t l = 0; l < kLanes; ++l) mx = lane[l] > mx ? lane[l] : mx;
    for (int64_t j = body; j < c; ++j) mx = std::max(mx, static_cast<S>(row[j]));

    for (int64_t j = 0; j < c; ++j) e[j] = CpuMath::exp<S>(static_cast<S>(row[j]) - mx);  // one exponential per entry
    for (int64_t l = 0; l < kLanes; ++l) lane[l] = S(0);
    for (int64_t j = 0; j < body; j += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) lane[l] += e[j + l];
    S sum = 0;
    for (int64_t l = 0; l < kLanes; ++l) sum += lane[l];
    for (int64_t j = body; j < c; ++j) sum += e[j];

    const bool valid = a.t[r] != a.ignore_index;
    const int64_t k = valid ? a.t[r] : -1;
    const S w = valid ? static_cast<S>(a.scale) : S(0);
    const S inv = S(1) / sum;
    T* __restrict hrow = a.h + r * c;
    for (int64_t j = 0; j < c; ++j) {
      const S p = e[j] * inv;
      hrow[j] = static_cast<T>(w * p * (S(1) - p));
    }
    if (a.g) {
      T* __restrict grow = a.g + r * c;
      for (int64_t j = 0; j < c; ++j) grow[j] = static_cast<T>(w * (e[j] * inv));
      if (valid) grow[k] = static_cast<T>(w * (e[k] * inv - S(1)));
    }
    if (valid) {
      a.row_loss[r] = static_cast<double>(std::log(sum) + mx - static_cast<S>(row[k])) * a.scale;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_boundary_cpu(const at::Tensor& logits,
                                                                          const at::Tensor& target,
                                                                          int64_t ignore_index, double scale,
                                                                          bool want_g) {
  check_ce_args(logits, target);
  auto x = logits.contiguous();
  auto t = target.contiguous();
  const int64_t n = x.size(0), c = x.size(1);
  auto g = want_g ? at::empty_like(x) : at::empty({0}, x.options());
  auto h = at::empty_like(x);
  std::vector<double> row_loss(n, 0.0);
  const int64_t* tp = t.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r)
    TORCH_CHECK(tp[r] == ignore_index || (tp[r] >= 0 && tp[r] < c), "obd_ext.cross_entropy_boundary: target[",
                r, "] = ", tp[r], " is not a class in [0, ", c, ")");
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using S = std::conditional_t<std::is_same_v<T, double>, double, float>;
    const CeArgs<T> a{x.const_data_ptr<T>(), tp, want_g ? g.mutable_data_ptr<T>() : nullptr, h.mutable_data_ptr<T>(),
                      row_loss.data(), c, ignore_index, scale};
    parallel_for_simd<T>(n, 1, [&](int64_t rb, int64_t re) OBD_INLINE_LAMBDA {
      std::vector<S> e(c);  // exp(x - max) of one row
      ce_rows<T, S>(a, rb, re, e.data());
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
