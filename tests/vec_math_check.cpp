// Accuracy of csrc/cpu/vec_math.h against double-precision libm on dense
// grids, compiled and run by tests/test_vec_math.py (the header is torch-free).
// Prints one "name value" line per measured quantity.
#include <cmath>
#include <cstdio>

#include "../csrc/cpu/vec_math.h"

using obd::cpu::fast_erfc;
using obd::cpu::fast_exp;
using obd::cpu::fast_tanh;

static double ulps(float got, double want) {
  const float w = static_cast<float>(want);
  const double ulp = static_cast<double>(std::nextafter(w, INFINITY)) - w;
  return std::fabs(got - want) / ulp;
}

int main() {
  double exp_ulp = 0, exp_denormal = 0, erfc_abs = 0, tanh_abs = 0;
  for (float x = -87.3f; x < 88.72f; x += 1e-4f + 1e-5f * std::fabs(x))
    exp_ulp = std::fmax(exp_ulp, ulps(fast_exp(x), std::exp(static_cast<double>(x))));
  for (float x = -103.9f; x < -87.3f; x += 1e-4f)
    exp_denormal = std::fmax(exp_denormal, std::fabs(fast_exp(x) - std::exp(static_cast<double>(x))) / 1.401298464e-45);
  for (float x = -10.0f; x < 10.0f; x += 1e-5f) {
    erfc_abs = std::fmax(erfc_abs, std::fabs(fast_erfc(x) - std::erfc(static_cast<double>(x))));
    tanh_abs = std::fmax(tanh_abs, std::fabs(fast_tanh(x) - std::tanh(static_cast<double>(x))));
  }
  std::printf("exp_ulp %g\nexp_denormal %g\nerfc_abs %g\ntanh_abs %g\n", exp_ulp, exp_denormal, erfc_abs, tanh_abs);
  const float inf = INFINITY, nan = NAN;
  const bool special = fast_exp(-inf) == 0.0f && fast_exp(inf) == inf && std::isnan(fast_exp(nan)) &&
                       fast_exp(-110.0f) == 0.0f && fast_exp(88.8f) == inf && std::isfinite(fast_exp(88.72f)) &&
                       std::isnan(fast_erfc(nan)) && fast_erfc(inf) == 0.0f && fast_erfc(-inf) == 2.0f &&
                       fast_erfc(0.0f) == 1.0f && std::isnan(fast_tanh(nan)) && fast_tanh(inf) == 1.0f &&
                       fast_tanh(-inf) == -1.0f && fast_tanh(0.0f) == 0.0f;
  std::printf("special %d\n", special ? 1 : 0);
  return 0;
}
