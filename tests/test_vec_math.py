"""The vectorisable float exp/erfc/tanh of csrc/cpu/vec_math.h against double libm.

The header is torch-free, so tests/vec_math_check.cpp includes it directly; it
is compiled with the extension's floating-point flags, for baseline x86-64 and
for AVX2 (the two copies of every fused loop), and must meet the accuracy the
header states: exp within 1 ulp (denormals within one unit of the smallest),
erfc within 6e-7 and tanh within 1.2e-7 absolute, libm's special values.
The extension's two copies of each fused loop (OBD_EXT_DISABLE_AVX2) must give
the same bits.
"""

import os
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

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


def test_baseline_and_avx2_loops_give_the_same_bits(tmp_path):
    """The fused sweep kernels have a baseline and an AVX2 copy of each loop, chosen
    at run time (OBD_EXT_DISABLE_AVX2=1 forces the baseline). Both round every
    operation (no FMA contraction, fixed reduction lanes), so results are equal bit
    for bit whichever copy a machine runs."""
    script = textwrap.dedent("""
        import sys, torch
        from obd_ext import ops, reference
        g0 = torch.Generator().manual_seed(0)
        v = torch.randn(37, 129, generator=g0) * 3
        h, g = torch.rand(37, 129, generator=g0), torch.randn(37, 129, generator=g0)
        y = torch.softmax(v, -1)
        mean, rstd = v.mean(-1, keepdim=True), torch.rsqrt(v.var(-1, unbiased=False, keepdim=True) + 1e-5)
        out = {}
        for kind in reference.ACT_KINDS.values():
            out[f"act{kind}"] = ops.activation_hessian(torch.tanh(v) if kind == 0 else v, h, g, kind, 0.1, 1.0, 1.0,
                                                       False, True)
        out["softmax"] = ops.softmax_hessian(y, h, g, False, True)
        out["layer_norm"] = ops.layer_norm_hessian(v, mean, rstd, g[0], h, g, False, True)
        out["ce"] = ops.cross_entropy_boundary(v, torch.arange(37) % 129, -100, 0.1)
        torch.save(out, sys.argv[1])
    """)
    runs = {}
    for flag in ("0", "1"):
        path = tmp_path / f"out{flag}.pt"
        env = dict(os.environ, OBD_EXT_DISABLE_AVX2=flag)
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=env)
        runs[flag] = torch.load(path)
    for key, a in runs["0"].items():
        for x, y in zip(a, runs["1"][key]):
            assert torch.equal(x, y), key
