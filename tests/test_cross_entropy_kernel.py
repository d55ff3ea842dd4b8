"""obd_ext.ops.cross_entropy_boundary against the reference and autograd."""

import pytest
import torch
import torch.nn.functional as F

from obd_ext import ops, reference
from testing import DTYPES, param_device, require_kernels

TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@param_device
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,c", [(0, 5), (1, 1), (7, 3), (33, 1000)])
def test_matches_reference(device, dtype, n, c):
    require_kernels(device)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(n, c, generator=gen, dtype=torch.float64) * 4).to(dtype).to(device)
    t = torch.randint(0, c, (n,), generator=gen).to(device)
    if n > 2:
        t[1] = -100  # ignored row
    scale = 1.0 / max(int((t != -100).sum()), 1)
    loss, g, h = ops.cross_entropy_boundary(x, t, -100, scale)
    rl, rg, rh = reference.cross_entropy_boundary(x, t, -100, scale)
    assert loss.dtype == torch.float64 and g.dtype == h.dtype == dtype
    torch.testing.assert_close(loss, rl, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(g, rg, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(h, rh, rtol=TOL[dtype], atol=TOL[dtype])
    # without the gradient (the Gauss-Newton sweep): g is empty, loss and h are the same
    loss2, g2, h2 = ops.cross_entropy_boundary(x, t, -100, scale, want_g=False)
    assert g2.numel() == 0 and g2.dtype == dtype
    assert torch.equal(loss2, loss) and torch.equal(h2, h)
    if dtype == torch.float64 and n:
        xg = x.clone().requires_grad_()
        ref_loss = F.cross_entropy(xg, t, ignore_index=-100)
        (grad,) = torch.autograd.grad(ref_loss, xg)
        torch.testing.assert_close(loss, ref_loss.detach())
        torch.testing.assert_close(g, grad)


def test_opcheck_and_errors():
    x, t = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 5, 2, 1])
    torch.library.opcheck(torch.ops.obd_ext.cross_entropy_boundary.default, (x, t, -100, 0.25))
    torch.library.opcheck(torch.ops.obd_ext.cross_entropy_boundary.default, (x, t, -100, 0.25, False))
    with pytest.raises(RuntimeError, match=r"target\[1\] = 9 is not a class in \[0, 6\)"):
        ops.cross_entropy_boundary(x, torch.tensor([0, 9, 2, 1]), -100, 1.0)
    with pytest.raises(RuntimeError, match="logits must be N x C"):
        ops.cross_entropy_boundary(x.reshape(2, 2, 6), t, -100, 1.0)
    with pytest.raises(RuntimeError, match="target must be int64 class indices"):
        ops.cross_entropy_boundary(x, t.int(), -100, 1.0)


@param_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("c", [5, 17, 300])
def test_masked_and_extreme_logits(device, dtype, c):
    """-inf logits (a masked vocabulary) get exactly zero gradient and curvature;
    logits spread over +-1e4 (exp underflows to 0 for most) match the reference."""
    require_kernels(device)
    gen = torch.Generator().manual_seed(c)
    x = (torch.randn(6, c, generator=gen, dtype=torch.float64) * 1e4).to(dtype)
    x[:, ::3] = float("-inf")
    t = torch.tensor([1, 2, 4, 1, -100, 2])[: 6] % c
    t[t % 3 == 0] = 1  # targets are never masked classes
    x, t = x.to(device), t.to(device)
    loss, g, h = ops.cross_entropy_boundary(x, t, -100, 0.2)
    rl, rg, rh = reference.cross_entropy_boundary(x, t, -100, 0.2)
    assert torch.isfinite(loss)
    assert (g[:, ::3] == 0).all() and (h[:, ::3] == 0).all()
    torch.testing.assert_close(loss, rl, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g, rg, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h, rh, rtol=1e-6, atol=1e-6)
