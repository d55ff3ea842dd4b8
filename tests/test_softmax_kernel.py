"""obd_ext.ops.softmax_hessian (the sweep's fused softmax rule) against the reference and autograd."""

import pytest
import torch

from obd_ext import ops, reference
from testing import DTYPES, noncontiguous, param_device, require_kernels

TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}
FLAGS = [(False, True, True), (False, False, True), (True, False, False), (True, True, True)]  # lm, want_g, with_g


def scores(rows: int, n: int, gen: torch.Generator, masked: bool = True) -> torch.Tensor:
    """Softmax outputs as attention makes them: some entries exactly zero (masked)."""
    x = torch.randn(rows, n, generator=gen, dtype=torch.float64) * 3
    if masked and n > 1:
        x = x.masked_fill(torch.ones(rows, n, dtype=torch.bool).triu(1)[:, :n], float("-inf"))
    return torch.softmax(x, dim=-1)


@param_device
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 16, 33, 256])
@pytest.mark.parametrize("lm,want_g,with_g", FLAGS)
def test_matches_reference(device, dtype, n, lm, want_g, with_g):
    require_kernels(device)
    gen = torch.Generator().manual_seed(n)
    y = scores(2 * 3 * 5, n, gen).reshape(2, 3, 5, n)
    h = torch.rand(y.shape, generator=gen, dtype=torch.float64)
    g = torch.randn(y.shape, generator=gen, dtype=torch.float64) if with_g else None
    y, h = y.to(dtype).to(device), h.to(dtype).to(device)
    g = g.to(dtype).to(device) if g is not None else None
    h_in, g_in = ops.softmax_hessian(y, h, g, lm, want_g)
    h_ref, g_ref = reference.softmax_hessian(y, h, g, lm, want_g)
    assert h_in.dtype == dtype and h_in.shape == y.shape
    torch.testing.assert_close(h_in, h_ref, rtol=TOL[dtype], atol=TOL[dtype])
    assert g_in.numel() == (y.numel() if want_g else 0)
    if want_g:
        torch.testing.assert_close(g_in, g_ref, rtol=TOL[dtype], atol=TOL[dtype])
    # masked entries (y = 0) get exactly zero curvature and gradient
    zero = y == 0
    assert (h_in[zero] == 0).all()
    if want_g:
        assert (g_in[zero] == 0).all()
    # layouts: non-contiguous and empty inputs
    h2, g2 = ops.softmax_hessian(noncontiguous(y), noncontiguous(h), None if g is None else noncontiguous(g), lm,
                                 want_g)
    torch.testing.assert_close(h2, h_in, rtol=TOL[dtype], atol=TOL[dtype])
    for shape in [(0, n), (3, 0)]:
        e = torch.empty(shape, dtype=dtype, device=device)
        eh, eg = ops.softmax_hessian(e, e, e if with_g else None, lm, want_g)
        assert eh.shape == shape and eg.numel() == (e.numel() if want_g else 0)


@pytest.mark.parametrize("n", [1, 5, 40])
def test_equals_autograd_where_the_loss_is_diagonal_in_y(n):
    """L = sum(a y + b y^2 / 2) of y = softmax(x) has dL/dy = a + b y and a diagonal
    d2L/dy2 = diag(b), so the rule (eq. 7 through the softmax) is the exact diagonal of
    d2L/dx2 and g_in is dL/dx."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(4, n, generator=gen, dtype=torch.float64) * 2
    a, b = torch.randn(4, n, generator=gen, dtype=torch.float64), torch.randn(4, n, generator=gen,
                                                                              dtype=torch.float64)

    def loss(z):
        y = torch.softmax(z, dim=-1)
        return (a * y + 0.5 * b * y * y).sum()

    y = torch.softmax(x, dim=-1)
    h_in, g_in = ops.softmax_hessian(y, b.clone(), a + b * y, False, True)
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss(xg), xg)
    hess = torch.autograd.functional.hessian(lambda z: loss(z.reshape(4, n)), x.reshape(-1))
    torch.testing.assert_close(g_in, grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_in, hess.diagonal().reshape(4, n), rtol=1e-10, atol=1e-12)


def test_opcheck_and_errors():
    gen = torch.Generator().manual_seed(0)
    y = scores(4, 6, gen)
    h, g = torch.rand(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    torch.library.opcheck(torch.ops.obd_ext.softmax_hessian.default, (y, h, g, False, True))
    torch.library.opcheck(torch.ops.obd_ext.softmax_hessian.default, (y, h, None, True, False))
    with pytest.raises(RuntimeError, match="g is required unless lm=True and want_g=False"):
        ops.softmax_hessian(y, h, None, False, False)
    with pytest.raises(RuntimeError, match=r"h must have the shape of y \[4, 6\], got \[6, 4\]"):
        ops.softmax_hessian(y, h.t().contiguous(), None, True, False)
    with pytest.raises(RuntimeError, match="y and h must have one dtype"):
        ops.softmax_hessian(y, h.float(), None, True, False)
    with pytest.raises(RuntimeError, match="g must have the dtype of y"):
        ops.softmax_hessian(y, h, g.float(), False, False)
    with pytest.raises(RuntimeError, match="y must have at least one dimension"):
        ops.softmax_hessian(y[0, 0], h[0, 0], None, True, False)
    with pytest.raises(RuntimeError, match="y must be float32, float64, float16 or bfloat16, got Long"):
        ops.softmax_hessian(y.long(), h.long(), None, True, False)
