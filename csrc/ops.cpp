// The one TORCH_LIBRARY of obd_ext: every schema, nothing else.
//
// Each op's implementation is in a file named after it, one per backend:
//   csrc/cpu/<op>.cpp      CPU kernel + TORCH_LIBRARY_IMPL(obd_ext, CPU)
//   csrc/cuda/<op>.cpp     CUDA binding (checks, allocation, stream) + TORCH_LIBRARY_IMPL(obd_ext, CUDA)
//   csrc/kernels/<op>.cu   torch-free CUDA kernels, launched through <op>.cuh
//   csrc/generic/<op>.cpp  device-generic ops (CompositeExplicit/ImplicitAutograd)
// with <op> the op's name without a trailing underscore, except:
//   saliency        saliency and group_saliency
//   squared_mm      squared_mm and _squared_mm_direct
//   segment_select  row_select_ and nm_select_ (a segment is a row or an N:M group)
//   block_cache     _block_cache_enter, _block_cache_exit, _block_cache_stats
// Shared by the bindings of both backends: checks.h (argument checks),
// select_common.h (selection pools and statistics), rule_common.h (working
// tensors of the sweep rules). Fake (meta) kernels and autograd are
// registered from Python (obd_ext/ops.py).
#include <Python.h>
#include <torch/library.h>

// `import obd_ext._C` must find a module init function; the ops register
// themselves through static initialisers when the shared library loads.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(obd_ext, m) {
  // s = h * w^2 / 2, float32 (float64 for float64 input), shape of weight.
  m.def("saliency(Tensor weight, Tensor hessian_diag) -> Tensor");

  // Sum of saliencies over every dimension but `dim`: the saliency of a unit
  // (dim=0 of a Linear weight: its incoming weights) or of a conv channel.
  m.def("group_saliency(Tensor weight, Tensor hessian_diag, int dim) -> Tensor");

  // Exact global selection. Deletes the lowest-saliency entries of the pool
  // formed by ALL the tensors until exactly max(k, already deleted) entries
  // are deleted. `masks` are bool keep-masks (True = kept), read and written
  // in place; deleted entries stay deleted. With `factor` given, deleted
  // weights are multiplied by it in the same pass (0: zeroed). An empty
  // `weights` list means `curvatures` are precomputed scores.
  // Ties: equal saliencies are deleted in order of tensor index, then flat
  // (row-major) index. Returns float64[5] statistics (csrc/kernels/common.h).
  m.def(
      "global_select_(Tensor(a!)[] weights, Tensor[] curvatures, Tensor(b!)[] masks, "
      "SymInt k, float? factor, bool skip_nonfinite) -> Tensor");

  // Per output row: each row of the weight (dim 0; the rest flattened) is its
  // own pool, with k deleted entries wanted in every row.
  m.def(
      "row_select_(Tensor(a!) weight, Tensor curvature, Tensor(b!) mask, SymInt k, "
      "float? factor, bool skip_nonfinite) -> Tensor");

  // N:M: in every group of m consecutive entries along the last dimension,
  // keep the n most salient (at least m - n deleted per group).
  // Curvature sweep, activation rule (OBD eq. 7) in one pass:
  //   h_in = f'(v)^2 h + f''(v) g (lm: f'' term dropped), g_in = f'(v) g.
  // `saved` is what autograd saved for the activation (see ActKind in
  // csrc/kernels/common.h); p0..p2 its parameters. g may be undefined (lm, or
  // no gradient needed); g_in is empty unless want_g.
  m.def(
      "activation_hessian(Tensor saved, Tensor h, Tensor? g, int kind, float p0, float p1, float p2, "
      "bool lm, bool want_g) -> (Tensor, Tensor)");

  // Curvature sweep, softmax rule (OBD eq. 7) over the last dimension, per
  // row of y = softmax(x) with s = sum_j y_j^2 h_j and t = sum_j g_j y_j:
  //   h_in = y^2 ((1 - 2y) h + s) + y (2y - 1)(t - g)   (lm: the last term dropped)
  //   g_in = y (g - t).
  // g may be undefined when lm and not want_g; g_in is empty unless want_g.
  m.def("softmax_hessian(Tensor y, Tensor h, Tensor? g, bool lm, bool want_g) -> (Tensor, Tensor)");

  // Curvature sweep, layer-norm rule for the input (OBD eq. 7 through
  // y = gamma * xh + beta, xh = (x - mean) * rstd, over the last n entries of
  // each row): the diagonal of J^T diag(h) J plus the f'' term, and g_x = J^T g,
  // in closed form per row. x, h, g: [..., n]; mean, rstd: one per row (as
  // native_layer_norm returns them); weight: n entries or undefined (gamma = 1).
  // g may be undefined when lm and not want_g; g_x is empty unless want_g.
  m.def(
      "layer_norm_hessian(Tensor x, Tensor mean, Tensor rstd, Tensor? weight, Tensor h, Tensor? g, bool lm, "
      "bool want_g) -> (Tensor, Tensor)");

  // Curvature sweep, cross-entropy boundary for logits (N x C, class dim 1)
  // and class targets (N): per row p = softmax(x), and with c = scale for
  // rows whose target != ignore_index (0 otherwise): loss = c * sum(lse - x_t),
  // g = c * (p - onehot(t)), h = c * p * (1 - p). Loss is float64. g is
  // empty unless want_g (the Gauss-Newton sweep never reads it, and at a
  // large vocabulary it is the size of the logits).
  m.def(
      "cross_entropy_boundary(Tensor logits, Tensor target, int ignore_index, float scale, bool want_g=True) "
      "-> (Tensor, Tensor, Tensor)");

  // Curvature sweep, the squared-operand product of the linear rule:
  // (a*a if square_a else a) @ (b*b if square_b else b), 2-D or batched 3-D.
  // h_W = H_y^T (X*X) and H_x = H_y (W*W) are both of this form.
  m.def("squared_mm(Tensor a, Tensor b, bool square_a, bool square_b) -> Tensor");
  // The same product by a loop that squares on load (for the benchmark that
  // chose BLAS, and as a second implementation in the tests).
  m.def("_squared_mm_direct(Tensor a, Tensor b, bool square_a, bool square_b) -> Tensor");

  // Curvature sweep, the squared-operand products of the convolution rule
  // (eq. 5-6 with weight sharing): with out_mask = (input, weight, bias),
  //   H_x = conv_transpose(H, W*W),  h_W = weight-grad conv of (X*X, H),  h_b = sum of H,
  // i.e. aten::convolution_backward with `h` as the output gradient and the
  // squared operands. Device-generic (CompositeExplicitAutograd): cuDNN /
  // oneDNN on squared copies, for the same reason squared_mm uses BLAS.
  m.def(
      "squared_conv(Tensor h, Tensor input, Tensor weight, SymInt[]? bias_sizes, SymInt[] stride, "
      "SymInt[] padding, SymInt[] dilation, bool transposed, SymInt[] output_padding, SymInt groups, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // Layer-wise OBD calibration statistics (docs/math.md, "Layer-wise form for large models"):
  // acc[j] += sum over rows r of x[r, j]^2, x seen as rows x acc.numel()
  // (its last dimension). x may be float32/float64/float16/bfloat16 and is
  // read as it is (no upcast copy); acc is float32 or float64 and sets the
  // accumulation precision. Deterministic: rows are summed in fixed blocks.
  m.def("column_sq_sum_(Tensor(a!) acc, Tensor x) -> ()");

  // The CPU block cache of the curvature sweep (csrc/generic/block_cache.cpp):
  // open and close a scope (nested scopes count), and read depth, cached
  // bytes, hits, misses, live bytes and their high-water mark.
  m.def("_block_cache_enter() -> ()");
  m.def("_block_cache_exit() -> ()");
  m.def("_block_cache_stats() -> int[]");

  m.def(
      "nm_select_(Tensor(a!) weight, Tensor curvature, Tensor(b!) mask, int n, int m, "
      "float? factor, bool skip_nonfinite) -> Tensor");
}
