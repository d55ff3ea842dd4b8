// squared_conv: the convolution rule's squared-operand products.
//
// Registered as CompositeExplicitAutograd, so the same code serves CPU and
// CUDA tensors: it squares the operand each product needs (the input for h_W,
// the weight for H_x) and hands them to aten::convolution_backward, i.e. to
// oneDNN / cuDNN. A square-on-load convolution would have to re-implement
// those libraries' algorithms; the measured GEMM case (bench_squared_mm.py,
// RESULTS.md) shows the squared copy costs one elementwise pass and the
// library product is as fast as the plain one.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"

namespace obd {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> squared_conv(
    const at::Tensor& h, const at::Tensor& input, const at::Tensor& weight, at::OptionalSymIntArrayRef bias_sizes,
    c10::SymIntArrayRef stride, c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation, bool transposed,
    c10::SymIntArrayRef output_padding, c10::SymInt groups, std::array<bool, 3> output_mask) {
  const char* op = "squared_conv";
  check_float(op, "h", h);
  check_same_device(op, "h", h, "input", input);
  check_same_device(op, "h", h, "weight", weight);
  // Only the operand a requested product reads is squared; the other one
  // only lends its shape to convolution_backward.
  const at::Tensor x = output_mask[1] ? input * input : input;
  const at::Tensor w = output_mask[0] ? weight * weight : weight;
  return at::convolution_backward_symint(h, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding,
                                         std::move(groups), output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(obd_ext, CompositeExplicitAutograd, m) { m.impl("squared_conv", &squared_conv); }

}  // namespace obd
