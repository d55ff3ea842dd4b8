"""obd_ext.ops.activation_hessian (the sweep's fused activation rule) against the reference."""

import pytest
import torch

from obd_ext import ops, reference
from testing import DTYPES, noncontiguous, param_device, require_kernels

PARAMS = {"leaky_relu": (0.1, 0, 0), "elu": (1.3, 1.05, 0.7), "softplus": (2.0, 5.0, 0), "hardtanh": (-0.5, 0.8, 0)}
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@param_device
@pytest.mark.parametrize("kind", list(reference.ACT_KINDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lm,want_g,with_g", [(False, True, True), (True, False, False), (True, True, True),
                                              (False, False, True)])
def test_matches_reference(device, kind, dtype, lm, want_g, with_g):
    require_kernels(device)
    g0 = torch.Generator().manual_seed(0)
    v = torch.randn(7, 33, generator=g0, dtype=torch.float64) * 3
    if kind in ("tanh", "sigmoid"):
        v = torch.tanh(v) if kind == "tanh" else torch.sigmoid(v)
    v, h = v.to(dtype).to(device), torch.rand(7, 33, generator=g0, dtype=torch.float64).to(dtype).to(device)
    g = torch.randn(7, 33, generator=g0, dtype=torch.float64).to(dtype).to(device) if with_g else None
    ps = PARAMS.get(kind, (0.0, 0.0, 0.0))
    k = reference.ACT_KINDS[kind]
    h_in, g_in = ops.activation_hessian(v, h, g, k, *ps, lm, want_g)
    h_ref, g_ref = reference.activation_hessian(v, h, g, k, *ps, lm, want_g)
    assert h_in.dtype == dtype and h_in.shape == h.shape
    torch.testing.assert_close(h_in, h_ref, rtol=TOL[dtype], atol=TOL[dtype])
    assert g_in.numel() == (h.numel() if want_g else 0)
    if want_g:
        torch.testing.assert_close(g_in, g_ref, rtol=TOL[dtype], atol=TOL[dtype])
    # layouts: non-contiguous and empty inputs
    h2, _ = ops.activation_hessian(noncontiguous(v), noncontiguous(h), None if g is None else noncontiguous(g), k, *ps,
                                   lm, False)
    torch.testing.assert_close(h2, h_in)
    e, _ = ops.activation_hessian(v[:0], h[:0], None if g is None else g[:0], k, *ps, lm, want_g)
    assert e.shape == (0, 33)


def test_opcheck_and_errors():
    v, h, g = torch.randn(4, 5, dtype=torch.float64), torch.rand(4, 5, dtype=torch.float64), torch.randn(4, 5,
                                                                                                           dtype=torch.float64)
    torch.library.opcheck(torch.ops.obd_ext.activation_hessian.default, (v, h, g, 0, 0.0, 0.0, 0.0, False, True))
    torch.library.opcheck(torch.ops.obd_ext.activation_hessian.default, (v, h, None, 2, 0.0, 0.0, 0.0, True, False))
    with pytest.raises(RuntimeError, match=r"kind must be in \[0, 10\), got 12"):
        ops.activation_hessian(v, h, g, 12)
    with pytest.raises(RuntimeError, match="g is required unless lm=True and want_g=False"):
        ops.activation_hessian(v, h, None, 0, lm=False)
    with pytest.raises(RuntimeError, match=r"h must have the shape of saved \[4, 5\], got \[5, 4\]"):
        ops.activation_hessian(v, h.t().contiguous(), None, 0, lm=True)
    with pytest.raises(RuntimeError, match="saved and h must have one dtype"):
        ops.activation_hessian(v, h.float(), None, 0, lm=True)


@param_device
@pytest.mark.parametrize("kind", ["gelu", "gelu_tanh", "silu", "elu", "softplus", "tanh", "sigmoid"])
def test_extreme_and_special_inputs_float32(device, kind):
    """The CPU kernel evaluates exp/erf/tanh with vectorised float approximations
    (csrc/cpu/vec_math.h): far tails, infinities and NaN must come out as the
    reference's (libm) values, NaN where it has NaN."""
    require_kernels(device)
    big = [-1e30, -200.0, -104.0, -88.0, -87.0, -30.0, -9.5, -1e-30, 0.0, 1e-30, 9.5, 30.0, 87.0, 88.5, 89.0, 200.0,
           1e30, float("inf"), float("-inf"), float("nan")]
    v = torch.tensor(big, dtype=torch.float32)
    if kind in ("tanh", "sigmoid"):
        v = torch.tanh(v) if kind == "tanh" else torch.sigmoid(v)
    v = v.repeat(5).to(device)  # several vector widths and a tail
    h = torch.full_like(v, 0.5)
    g = torch.full_like(v, -1.5)
    ps = PARAMS.get(kind, (1.0, 20.0, 1.0) if kind == "softplus" else (0.0, 0.0, 0.0))
    k = reference.ACT_KINDS[kind]
    h_in, g_in = ops.activation_hessian(v, h, g, k, *ps, False, True)
    h_ref, g_ref = reference.activation_hessian(v, h, g, k, *ps, False, True)
    torch.testing.assert_close(h_in, h_ref, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(g_in, g_ref, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_dense_range_float32_error_like_torchs():
    """Over a dense grid the float32 kernel's error against float64 is at most twice
    that of the same formula in torch's float32 (libm-grade exp/erf/tanh), or 1e-6."""
    v = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
    h, g = torch.ones_like(v), torch.ones_like(v)
    for kind in ["gelu", "gelu_tanh", "silu", "elu", "softplus", "tanh", "sigmoid"]:
        k = reference.ACT_KINDS[kind]
        ps = PARAMS.get(kind, (0.0, 0.0, 0.0))
        x = torch.tanh(v) if kind == "tanh" else torch.sigmoid(v) if kind == "sigmoid" else v
        ours = ops.activation_hessian(x.float(), h.float(), g.float(), k, *ps, False, True)
        torch32 = reference.activation_hessian(x.float(), h.float(), g.float(), k, *ps, False, True)
        exact = reference.activation_hessian(x, h, g, k, *ps, False, True)
        for o, t, e in zip(ours, torch32, exact):
            err, bar = (o.double() - e).abs().max(), (t.double() - e).abs().max()
            assert err <= max(2 * bar, 1e-6), (kind, float(err), float(bar))
