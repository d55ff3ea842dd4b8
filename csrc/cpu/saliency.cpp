// CPU kernels: saliency (s = h w^2 / 2, as (h * w) * w * 0.5: see
// csrc/kernels/common.h) and group saliency (sum of s over every dimension but
// one).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../checks.h"
#include "dispatch.h"

namespace obd {
namespace cpu {
namespace {

at::Tensor saliency_cpu(const at::Tensor& weight, const at::Tensor& hess) {
  check_saliency_args("saliency", weight, hess);
  auto w = weight.contiguous();
  auto h = hess.contiguous();
  auto out = at::empty(w.sizes(), w.options().dtype(saliency_dtype(w, h)));
  const int64_t n = w.numel();
  dispatch_pair(w.scalar_type(), h.scalar_type(), [&](auto wt, auto ht) {
    using W = typename decltype(wt)::type;
    using H = typename decltype(ht)::type;
    using S = acc_t<W, H>;
    const W* wp = w.const_data_ptr<W>();
    const H* hp = h.const_data_ptr<H>();
    S* op = out.mutable_data_ptr<S>();
    // Plain loop over contiguous data: the compiler vectorises it at -O3.
    at::parallel_for(0, n, 1 << 15, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) op[i] = saliency_of<S>(static_cast<S>(wp[i]), static_cast<S>(hp[i]));
    });
  });
  return out;
}

at::Tensor group_saliency_cpu(const at::Tensor& weight, const at::Tensor& hess, int64_t dim) {
  check_saliency_args("group_saliency", weight, hess);
  const int64_t d = normalize_group_dim(weight, dim);
  auto w = weight.contiguous();
  auto h = hess.contiguous();
  const GroupShape g = group_shape(w, d);
  auto out = at::empty({g.groups}, w.options().dtype(saliency_dtype(w, h)));
  dispatch_pair(w.scalar_type(), h.scalar_type(), [&](auto wt, auto ht) {
    using W = typename decltype(wt)::type;
    using H = typename decltype(ht)::type;
    using S = acc_t<W, H>;
    const W* wp = w.const_data_ptr<W>();
    const H* hp = h.const_data_ptr<H>();
    S* op = out.mutable_data_ptr<S>();
    // One group per task, summed in double in a fixed order: deterministic for
    // any thread count, and accurate for groups of millions of entries. The
    // terms are double too (common.h, group_term), so only float64 inputs can
    // overflow one; such a group is summed again from split terms.
    at::parallel_for(0, g.groups, 1, [&](int64_t gb, int64_t ge) {
      for (int64_t j = gb; j < ge; ++j) {
        auto for_each = [&](auto&& f) {
          for (int64_t o = 0; o < g.outer; ++o) {
            const int64_t base = (o * g.groups + j) * g.inner;
            for (int64_t i = 0; i < g.inner; ++i) f(static_cast<double>(wp[base + i]), static_cast<double>(hp[base + i]));
          }
        };
        double acc = 0.0;
        for_each([&](double w, double h) { acc += group_term(w, h); });
        if (!std::isfinite(acc)) {
          int top = INT32_MIN;
          for_each([&](double w, double h) {
            int e;
            group_term_split(w, h, &e);
            top = std::max(top, e);
          });
          double scaled = 0.0;
          for_each([&](double w, double h) {
            int e;
            const double m = group_term_split(w, h, &e);
            if (m != 0.0) scaled += std::ldexp(m, e - top);
          });
          acc = std::ldexp(scaled, top);
        }
        op[j] = static_cast<S>(acc);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(obd_ext, CPU, m) {
  m.impl("saliency", &saliency_cpu);
  m.impl("group_saliency", &group_saliency_cpu);
}

}  // namespace cpu
}  // namespace obd
