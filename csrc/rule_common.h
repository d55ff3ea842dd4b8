// Argument handling shared by the CPU and CUDA bindings of the sweep's
// elementwise and per-row rules (activation_hessian, softmax_hessian,
// layer_norm_hessian): contiguous working copies and the two outputs, after
// the op's own check (check_*_args in checks.h).
#pragma once

#include <ATen/ATen.h>

namespace obd {

struct RuleTensors {
  at::Tensor ref;    // the forward tensor the rule reads, contiguous
  at::Tensor h;      // contiguous curvature of ref's shape
  at::Tensor g;      // contiguous first-order gradient, undefined when none was given
  at::Tensor h_out;  // like h: the curvature passed back
  at::Tensor g_out;  // like h when want_g, else empty: the gradient passed back
  bool has_g = false;
  bool want_g = false;

  template <typename T>
  const T* g_data() const {
    return has_g ? g.const_data_ptr<T>() : nullptr;
  }
  template <typename T>
  T* g_out_data() const {
    return want_g ? g_out.mutable_data_ptr<T>() : nullptr;
  }
  const void* g_raw() const { return has_g ? g.data_ptr() : nullptr; }
  void* g_out_raw() const { return want_g ? g_out.data_ptr() : nullptr; }
};

inline RuleTensors prepare_rule(const at::Tensor& ref, const at::Tensor& h, const c10::optional<at::Tensor>& g,
                                bool want_g) {
  RuleTensors t;
  t.ref = ref.contiguous();
  t.h = h.contiguous();
  t.has_g = g.has_value() && g->defined();
  t.want_g = want_g;
  if (t.has_g) t.g = g->contiguous();
  t.h_out = at::empty_like(t.h);
  t.g_out = want_g ? at::empty_like(t.h) : at::empty({0}, t.h.options());
  return t;
}

}  // namespace obd
