"""The vectorisable float exp/erfc/tanh of csrc/cpu/vec_math.h against double libm.

The header is torch-free, so tests/vec_math_check.cpp includes it directly; it
is compiled with the extension's floating-point flags, for baseline x86-64 and
for AVX2 (the two copies of every fused loop), and must meet the accuracy the
header states: exp within 1 ulp (denormals within one unit of the smallest),
erfc within 6e-7 and tanh within 1.2e-7 absolute, libm's special values.
"""

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FLAGS = ["-O3", "-std=c++17", "-fno-trapping-math", "-ffp-contract=off"]
TARGETS = {"baseline": []}
if platform.machine() in ("x86_64", "AMD64"):
    TARGETS["avx2"] = ["-mavx2"]


@pytest.mark.parametrize("target", list(TARGETS))
def test_accuracy_and_special_values(tmp_path, target):
    cxx = shutil.which("g++") or shutil.which("c++")
    assert cxx, "a C++ compiler is needed to build the extension, and this check"
    exe = tmp_path / "vec_math_check"
    subprocess.run([cxx, *FLAGS, *TARGETS[target], str(HERE / "vec_math_check.cpp"), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    got = {k: float(v) for k, v in (line.split() for line in out.strip().splitlines())}
    assert got["exp_ulp"] <= 1.0, got
    assert got["exp_denormal"] <= 1.0, got
    assert got["erfc_abs"] <= 6e-7, got
    assert got["tanh_abs"] <= 1.2e-7, got
    assert got["special"] == 1.0, got
