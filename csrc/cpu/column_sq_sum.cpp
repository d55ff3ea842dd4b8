// column_sq_sum_ on the CPU: acc[j] += sum_r x[r, j]^2 (layer-wise OBD statistics).
//
// Threads split the columns, not the rows, so every column is summed by one
// thread in a fixed order and the result does not depend on the thread count.
// Within a column chunk, rows are summed in blocks of kRowBlock into a small
// block accumulator that is then added to the chunk's total: the rounding
// error grows with the number of blocks rather than the number of rows. The
// inner loop runs over contiguous columns, so it vectorises, and float16 /
// bfloat16 are widened as they are loaded (no upcast copy of x).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "dispatch.h"

namespace obd {
namespace cpu {
namespace {

constexpr int64_t kColChunk = 256;  // columns per task: 1 KiB of float accumulators
constexpr int64_t kRowBlock = 256;  // rows summed before folding into the total

template <typename T, typename S>
void column_sq_sum_kernel(S* acc, const T* x, int64_t rows, int64_t cols) {
  const int64_t chunks = (cols + kColChunk - 1) / kColChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    S block[kColChunk], total[kColChunk];
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t c0 = c * kColChunk, w = std::min(kColChunk, cols - c0);
      std::fill(total, total + w, S(0));
      for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
        const int64_t r1 = std::min(rows, r0 + kRowBlock);
        std::fill(block, block + w, S(0));
        for (int64_t r = r0; r < r1; ++r) {
          const T* row = x + r * cols + c0;
          for (int64_t j = 0; j < w; ++j) {
            const S v = static_cast<S>(row[j]);
            block[j] += v * v;
          }
        }
        for (int64_t j = 0; j < w; ++j) total[j] += block[j];
      }
      for (int64_t j = 0; j < w; ++j) acc[c0 + j] += total[j];
    }
  });
}

void column_sq_sum_cpu(const at::Tensor& acc, const at::Tensor& x) {
  check_column_sq_sum_args(acc, x);
  const int64_t cols = acc.size(0);
  if (cols == 0 || x.numel() == 0) return;
  auto xc = x.contiguous();  // a no-op for activations; never a dtype change
  const int64_t rows = xc.numel() / cols;
  dispatch_float(xc.scalar_type(), [&](auto xt) {
    using T = typename decltype(xt)::type;
    if (acc.scalar_type() == at::kDouble)
      column_sq_sum_kernel<T, double>(acc.mutable_data_ptr<double>(), xc.const_data_ptr<T>(), rows, cols);
    else
      column_sq_sum_kernel<T, float>(acc.mutable_data_ptr<float>(), xc.const_data_ptr<T>(), rows, cols);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(obd_ext, CPU, m) { m.impl("column_sq_sum_", &column_sq_sum_cpu); }

}  // namespace cpu
}  // namespace obd
