// squared_mm on the CPU: BLAS on a squared temporary.
//
// Why BLAS and not a square-on-load kernel: bench/bench_squared_mm.py times
// both on the layer shapes of the curvature benchmark; MKL's GEMM on a squared
// copy is many times faster than a portable blocked loop that squares as it
// loads, and the copy costs one elementwise pass over the smaller operand
// (bench/RESULTS.md). The square-on-load loop is kept as obd_ext::_squared_mm_direct
// for that measurement and as a second implementation for the tests.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "dispatch.h"

namespace obd {
namespace cpu {
namespace {

at::Tensor squared_mm_cpu(const at::Tensor& a, const at::Tensor& b, bool square_a, bool square_b) {
  check_squared_mm_args(a, b);
  return at::matmul(square_a ? a * a : a, square_b ? b * b : b);
}

// Blocked i-k-j loop that squares operands as it loads them (2-D only).
at::Tensor squared_mm_direct_cpu(const at::Tensor& a, const at::Tensor& b, bool square_a, bool square_b) {
  check_squared_mm_args(a, b);
  TORCH_CHECK(a.dim() == 2, "obd_ext._squared_mm_direct: 2-D operands only, got ", a.dim(), "-D");
  auto ac = a.contiguous();
  auto bc = b.contiguous();
  const int64_t m = ac.size(0), k = ac.size(1), n = bc.size(1);
  auto out = at::zeros({m, n}, ac.options());
  dispatch_float(ac.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using S = std::conditional_t<std::is_same_v<T, double>, double, float>;
    const T* ap = ac.const_data_ptr<T>();
    const T* bp = bc.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    constexpr int64_t kBlockK = 256, kBlockN = 512;
    at::parallel_for(0, m, 8, [&](int64_t rb, int64_t re) {
      std::vector<S> acc(kBlockN);
      for (int64_t j0 = 0; j0 < n; j0 += kBlockN) {
        const int64_t jn = std::min(kBlockN, n - j0);
        for (int64_t i = rb; i < re; ++i) {
          std::fill(acc.begin(), acc.begin() + jn, S(0));
          for (int64_t k0 = 0; k0 < k; k0 += kBlockK) {
            const int64_t kn = std::min(kBlockK, k - k0);
            for (int64_t kk = 0; kk < kn; ++kk) {
              S av = static_cast<S>(ap[i * k + k0 + kk]);
              if (square_a) av *= av;
              const T* brow = bp + (k0 + kk) * n + j0;
              if (square_b) {
                for (int64_t j = 0; j < jn; ++j) {
                  const S bv = static_cast<S>(brow[j]);
                  acc[j] += av * bv * bv;
                }
              } else {
                for (int64_t j = 0; j < jn; ++j) acc[j] += av * static_cast<S>(brow[j]);
              }
            }
          }
          for (int64_t j = 0; j < jn; ++j) op[i * n + j0 + j] = static_cast<T>(acc[j]);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(obd_ext, CPU, m) {
  m.impl("squared_mm", &squared_mm_cpu);
  m.impl("_squared_mm_direct", &squared_mm_direct_cpu);
}

}  // namespace cpu
}  // namespace obd
