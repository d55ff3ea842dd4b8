// Argument checks shared by the CPU and CUDA bindings: one place for each rule,
// each message naming the op, the argument and the offending value.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/irange.h>

#include <sstream>
#include <string>
#include <vector>

#include "kernels/common.h"

namespace obd {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline Dtype to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return Dtype::F32;
    case at::kDouble: return Dtype::F64;
    case at::kHalf: return Dtype::F16;
    case at::kBFloat16: return Dtype::BF16;
    default: TORCH_CHECK(false, "obd_ext: unsupported dtype ", t);
  }
}

inline std::string arg_name(const char* name, int64_t index) {
  if (index < 0) return name;
  return std::string(name) + "[" + std::to_string(index) + "]";
}

inline void check_float(const char* op, const std::string& arg, const at::Tensor& t) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), "obd_ext.", op, ": ", arg,
              " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_same_shape(const char* op, const std::string& a, const at::Tensor& ta,
                             const std::string& b, const at::Tensor& tb) {
  TORCH_CHECK(ta.sizes() == tb.sizes(), "obd_ext.", op, ": ", b, " must have the shape of ", a,
              " ", ta.sizes(), ", got ", tb.sizes());
}

inline void check_same_device(const char* op, const std::string& a, const at::Tensor& ta,
                              const std::string& b, const at::Tensor& tb) {
  TORCH_CHECK(ta.device() == tb.device(), "obd_ext.", op, ": all tensors must be on one device; ",
              a, " is on ", ta.device(), " but ", b, " is on ", tb.device());
}

inline void check_mask(const char* op, const std::string& arg, const at::Tensor& mask) {
  TORCH_CHECK(mask.scalar_type() == at::kBool, "obd_ext.", op, ": ", arg,
              " must be a bool keep-mask (True = kept), got ", mask.scalar_type());
}

inline void check_factor(const char* op, const c10::optional<double>& factor) {
  if (!factor.has_value()) return;
  TORCH_CHECK(std::isfinite(*factor), "obd_ext.", op, ": factor must be finite, got ", *factor);
}

// "(2, 3)" for a flat row-major index into `sizes`.
inline std::string unravel(int64_t flat, at::IntArrayRef sizes) {
  std::vector<int64_t> idx(sizes.size());
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    int64_t s = sizes[d] > 0 ? sizes[d] : 1;
    idx[d] = flat % s;
    flat /= s;
  }
  std::ostringstream os;
  os << "(";
  for (size_t d = 0; d < idx.size(); ++d) os << (d ? ", " : "") << idx[d];
  if (idx.size() == 1) os << ",";
  os << ")";
  return os.str();
}

// Raises the error for the first non-finite entry that a kernel found at flat
// index `flat` of pool member `index`: it names the tensor (weight or
// curvature), the position and the value.
[[noreturn]] inline void throw_nonfinite(const char* op, const char* wname, const char* hname,
                                         int64_t index, const at::Tensor& w, const at::Tensor& h,
                                         int64_t flat) {
  auto value_at = [&](const at::Tensor& t) {
    return t.reshape({-1}).select(0, flat).to(at::kDouble).cpu().item<double>();
  };
  std::string which = hname;
  const at::Tensor* bad = &h;
  if (w.defined() && !std::isfinite(value_at(w))) {
    which = wname;
    bad = &w;
  }
  TORCH_CHECK(false, "obd_ext.", op, ": ", arg_name(which.c_str(), index),
              " has a non-finite value (", value_at(*bad), ") at position ",
              unravel(flat, bad->sizes()), " (flat index ", flat,
              "); pass skip_nonfinite=True (nonfinite='keep' in the Python API) to treat "
              "non-finite entries as never prunable");
}


// ---------------------------------------------------------------------------
// Saliency ops
// ---------------------------------------------------------------------------
inline void check_saliency_args(const char* op, const at::Tensor& w, const at::Tensor& h) {
  check_float(op, "weight", w);
  check_float(op, "hessian_diag", h);
  check_same_shape(op, "weight", w, "hessian_diag", h);
  check_same_device(op, "weight", w, "hessian_diag", h);
}

// float64 if either operand is float64, float32 otherwise.
inline at::ScalarType saliency_dtype(const at::Tensor& w, const at::Tensor& h) {
  return (w.scalar_type() == at::kDouble || h.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

inline int64_t normalize_group_dim(const at::Tensor& w, int64_t dim) {
  const int64_t nd = w.dim();
  TORCH_CHECK(nd >= 1, "obd_ext.group_saliency: weight must have at least one dimension, got a scalar");
  TORCH_CHECK(dim >= -nd && dim < nd, "obd_ext.group_saliency: dim must be in [", -nd, ", ", nd - 1,
              "] for a weight of shape ", w.sizes(), ", got ", dim);
  return dim < 0 ? dim + nd : dim;
}

// A contiguous tensor seen as outer x groups x inner around the group dim.
struct GroupShape {
  int64_t outer, groups, inner;
};

inline GroupShape group_shape(const at::Tensor& w, int64_t dim) {
  GroupShape g{1, w.size(dim), 1};
  for (int64_t d = 0; d < dim; ++d) g.outer *= w.size(d);
  for (int64_t d = dim + 1; d < w.dim(); ++d) g.inner *= w.size(d);
  return g;
}

// What every elementwise or per-row rule of the sweep receives (activation,
// softmax, layer norm): the forward tensor it reads (`ref`), h of its shape,
// device and dtype, and the first-order gradient g, needed unless the rule
// drops the f'' term (lm) and returns no gradient, and then like h.
inline void check_rule_tensors(const char* op, const char* ref_name, const at::Tensor& ref, const at::Tensor& h,
                               const c10::optional<at::Tensor>& g, bool lm, bool want_g) {
  check_float(op, ref_name, ref);
  check_same_shape(op, ref_name, ref, "h", h);
  check_same_device(op, ref_name, ref, "h", h);
  TORCH_CHECK(h.scalar_type() == ref.scalar_type(), "obd_ext.", op, ": ", ref_name, " and h must have one dtype, got ",
              ref.scalar_type(), " and ", h.scalar_type());
  const bool has_g = g.has_value() && g->defined();
  TORCH_CHECK(has_g || (lm && !want_g), "obd_ext.", op, ": g is required unless lm=True and want_g=False");
  if (!has_g) return;
  check_same_shape(op, ref_name, ref, "g", *g);
  check_same_device(op, ref_name, ref, "g", *g);
  TORCH_CHECK(g->scalar_type() == ref.scalar_type(), "obd_ext.", op, ": g must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", g->scalar_type());
}

// ---------------------------------------------------------------------------
// activation_hessian
// ---------------------------------------------------------------------------
inline void check_activation_args(const at::Tensor& saved, const at::Tensor& h, const c10::optional<at::Tensor>& g,
                                  int64_t kind, bool lm, bool want_g) {
  const char* op = "activation_hessian";
  TORCH_CHECK(kind >= 0 && kind < kNumActKinds, "obd_ext.", op, ": kind must be in [0, ", int(kNumActKinds),
              "), got ", kind);
  check_rule_tensors(op, "saved", saved, h, g, lm, want_g);
}

// ---------------------------------------------------------------------------
// softmax_hessian
// ---------------------------------------------------------------------------
inline void check_softmax_args(const at::Tensor& y, const at::Tensor& h, const c10::optional<at::Tensor>& g,
                               bool lm, bool want_g) {
  const char* op = "softmax_hessian";
  check_rule_tensors(op, "y", y, h, g, lm, want_g);
  TORCH_CHECK(y.dim() >= 1, "obd_ext.", op, ": y must have at least one dimension (the softmax's), got a scalar");
}

// ---------------------------------------------------------------------------
// layer_norm_hessian
// ---------------------------------------------------------------------------
inline void check_layer_norm_args(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
                                  const c10::optional<at::Tensor>& weight, const at::Tensor& h,
                                  const c10::optional<at::Tensor>& g, bool lm, bool want_g) {
  const char* op = "layer_norm_hessian";
  check_rule_tensors(op, "x", x, h, g, lm, want_g);
  TORCH_CHECK(x.dim() >= 1, "obd_ext.", op, ": x must have at least one dimension (the normalized one), got a scalar");
  const int64_t n = x.size(-1);
  const int64_t rows = n == 0 ? 0 : x.numel() / n;
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"mean", mean}, {"rstd", rstd}}) {
    check_float(op, name, t);
    check_same_device(op, "x", x, name, t);
    TORCH_CHECK(t.numel() == rows, "obd_ext.", op, ": ", name, " must have one entry per row of x (", rows,
                "), got shape ", t.sizes());
  }
  if (weight.has_value() && weight->defined()) {
    check_float(op, "weight", *weight);
    check_same_device(op, "x", x, "weight", *weight);
    TORCH_CHECK(weight->numel() == n, "obd_ext.", op, ": weight must have ", n, " entries (x's last dimension), got shape ",
                weight->sizes());
  }
}

// ---------------------------------------------------------------------------
// cross_entropy_boundary
// ---------------------------------------------------------------------------
inline void check_ce_args(const at::Tensor& logits, const at::Tensor& target) {
  const char* op = "cross_entropy_boundary";
  check_float(op, "logits", logits);
  TORCH_CHECK(logits.dim() == 2, "obd_ext.", op, ": logits must be N x C, got shape ", logits.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, "obd_ext.", op, ": target must be int64 class indices, got ",
              target.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), "obd_ext.", op,
              ": target must have shape [", logits.size(0), "], got ", target.sizes());
  check_same_device(op, "logits", logits, "target", target);
}

// ---------------------------------------------------------------------------
// squared_mm
// ---------------------------------------------------------------------------
inline void check_squared_mm_args(const at::Tensor& a, const at::Tensor& b) {
  const char* op = "squared_mm";
  check_float(op, "a", a);
  check_float(op, "b", b);
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "obd_ext.", op, ": a and b must have one dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
  check_same_device(op, "a", a, "b", b);
  TORCH_CHECK((a.dim() == 2 || a.dim() == 3) && a.dim() == b.dim(), "obd_ext.", op,
              ": a and b must both be 2-D or both 3-D (batched), got shapes ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.size(-1) == b.size(-2) && (a.dim() == 2 || a.size(0) == b.size(0)), "obd_ext.", op,
              ": shapes ", a.sizes(), " and ", b.sizes(), " cannot be multiplied");
}

// ---------------------------------------------------------------------------
// column_sq_sum_
// ---------------------------------------------------------------------------
inline void check_column_sq_sum_args(const at::Tensor& acc, const at::Tensor& x) {
  const char* op = "column_sq_sum_";
  TORCH_CHECK(acc.scalar_type() == at::kFloat || acc.scalar_type() == at::kDouble, "obd_ext.", op,
              ": acc must be float32 or float64 (the accumulation precision), got ", acc.scalar_type());
  TORCH_CHECK(acc.dim() == 1 && acc.is_contiguous(), "obd_ext.", op,
              ": acc must be a contiguous 1-D tensor (one entry per input feature), got shape ", acc.sizes());
  check_float(op, "x", x);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == acc.size(0), "obd_ext.", op, ": x must have ", acc.size(0),
              " features in its last dimension (acc's size), got shape ", x.sizes());
  check_same_device(op, "acc", acc, "x", x);
}

inline at::Tensor make_stats(const at::Tensor& like) {
  return at::zeros({kNumStats}, like.options().dtype(at::kDouble));
}

}  // namespace obd
