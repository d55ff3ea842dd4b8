"""obd_ext.ops.layer_norm_hessian (the sweep's fused layer-norm rule) against the reference and autograd."""

import pytest
import torch
import torch.nn.functional as F

from obd_ext import ops, reference
from testing import DTYPES, noncontiguous, param_device, require_kernels

TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 5e-2}
FLAGS = [(False, True, True), (False, False, True), (True, False, False), (True, True, True)]  # lm, want_g, with_g


def stats(x: torch.Tensor, eps: float = 1e-5):
    """mean and rstd over the last dimension, as native_layer_norm returns them."""
    xd = x.double()
    mean = xd.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xd.var(-1, unbiased=False, keepdim=True) + eps)
    return mean, rstd


@param_device
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 8, 33, 512])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("lm,want_g,with_g", FLAGS)
def test_matches_reference(device, dtype, n, affine, lm, want_g, with_g):
    require_kernels(device)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(2, 5, n, generator=gen, dtype=torch.float64) * 2 + 0.5
    h = torch.rand(x.shape, generator=gen, dtype=torch.float64)
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64) if with_g else None
    w = torch.randn(n, generator=gen, dtype=torch.float64) if affine else None
    mean, rstd = stats(x)
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x, h = x.to(dtype).to(device), h.to(dtype).to(device)
    g = g.to(dtype).to(device) if g is not None else None
    w = w.to(dtype).to(device) if w is not None else None
    mean, rstd = mean.to(stat_dtype).to(device), rstd.to(stat_dtype).to(device)
    h_x, g_x = ops.layer_norm_hessian(x, mean, rstd, w, h, g, lm, want_g)
    h_ref, g_ref = reference.layer_norm_hessian(x, mean, rstd, w, h, g, lm, want_g)
    assert h_x.dtype == dtype and h_x.shape == x.shape
    scale = 1.0 + float(h_ref.abs().max())
    torch.testing.assert_close(h_x, h_ref, rtol=TOL[dtype], atol=TOL[dtype] * scale)
    assert g_x.numel() == (x.numel() if want_g else 0)
    if want_g:
        torch.testing.assert_close(g_x, g_ref, rtol=TOL[dtype], atol=TOL[dtype] * (1.0 + float(g_ref.abs().max())))
    # layouts: non-contiguous and empty inputs
    h2, _ = ops.layer_norm_hessian(noncontiguous(x), mean, rstd, w, noncontiguous(h),
                                   None if g is None else noncontiguous(g), lm, want_g)
    torch.testing.assert_close(h2, h_x, rtol=TOL[dtype], atol=TOL[dtype] * scale)
    e = x[:0]
    eh, eg = ops.layer_norm_hessian(e, mean[:0], rstd[:0], w, e, e if with_g else None, lm, want_g)
    assert eh.shape == e.shape and eg.numel() == 0


@pytest.mark.parametrize("n", [2, 6, 33])
@pytest.mark.parametrize("affine", [True, False])
def test_equals_autograd_where_the_loss_is_diagonal_in_y(n, affine):
    """L = sum(a y + b y^2 / 2) of y = layer_norm(x) has dL/dy = a + b y and a diagonal
    d2L/dy2 = diag(b), so the rule (eq. 7 through the layer norm) is the exact diagonal
    of d2L/dx2 and g_x is dL/dx."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, generator=gen, dtype=torch.float64) * 2
    a, b = torch.randn(3, n, generator=gen, dtype=torch.float64), torch.randn(3, n, generator=gen,
                                                                              dtype=torch.float64)
    w = torch.randn(n, generator=gen, dtype=torch.float64) if affine else None
    bias = torch.randn(n, generator=gen, dtype=torch.float64) if affine else None

    def loss(z):
        y = F.layer_norm(z, (n,), w, bias, 1e-5)
        return (a * y + 0.5 * b * y * y).sum()

    y = F.layer_norm(x, (n,), w, bias, 1e-5)
    mean, rstd = stats(x)
    h_x, g_x = ops.layer_norm_hessian(x, mean, rstd, w, b.clone(), a + b * y, False, True)
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss(xg), xg)
    hess = torch.autograd.functional.hessian(lambda z: loss(z.reshape(3, n)), x.reshape(-1))
    torch.testing.assert_close(g_x, grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h_x, hess.diagonal().reshape(3, n), rtol=1e-9, atol=1e-11)


def test_opcheck_and_errors():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    h, g = torch.rand(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    w = torch.randn(6, dtype=torch.float64)
    mean, rstd = stats(x)
    torch.library.opcheck(torch.ops.obd_ext.layer_norm_hessian.default, (x, mean, rstd, w, h, g, False, True))
    torch.library.opcheck(torch.ops.obd_ext.layer_norm_hessian.default, (x, mean, rstd, None, h, None, True, False))
    with pytest.raises(RuntimeError, match="g is required unless lm=True and want_g=False"):
        ops.layer_norm_hessian(x, mean, rstd, w, h, None, False, False)
    with pytest.raises(RuntimeError, match=r"h must have the shape of x \[4, 6\], got \[6, 4\]"):
        ops.layer_norm_hessian(x, mean, rstd, w, h.t().contiguous(), None, True, False)
    with pytest.raises(RuntimeError, match=r"rstd must have one entry per row of x \(4\), got shape \[3, 1\]"):
        ops.layer_norm_hessian(x, mean, rstd[:3], w, h, None, True, False)
    with pytest.raises(RuntimeError, match=r"weight must have 6 entries .*got shape \[5\]"):
        ops.layer_norm_hessian(x, mean, rstd, w[:5], h, None, True, False)
    with pytest.raises(RuntimeError, match="x and h must have one dtype"):
        ops.layer_norm_hessian(x, mean, rstd, w, h.float(), None, True, False)
    with pytest.raises(RuntimeError, match="g must have the dtype of x"):
        ops.layer_norm_hessian(x, mean, rstd, w, h, g.float(), False, False)
    with pytest.raises(RuntimeError, match="x must be float32, float64, float16 or bfloat16, got Long"):
        ops.layer_norm_hessian(x.long(), mean, rstd, None, h.long(), None, True, False)
