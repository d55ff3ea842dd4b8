"""torch.library.opcheck on every op, and the ops inside torch.compile(fullgraph=True)."""

import torch

import obd_ext
from obd_ext import reference
from testing import param_device, require_kernels



def _pool(device):
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(6, 5, generator=g).to(device), torch.randn(11, generator=g, dtype=torch.float64).to(device)]
    hs = [torch.rand(6, 5, generator=g).to(device), torch.rand(11, generator=g).to(device)]
    ms = [torch.ones_like(h, dtype=torch.bool) for h in hs]
    return ws, hs, ms


@param_device
def test_opcheck_saliency(device):
    require_kernels(device)
    for rg in (False, True):
        w = torch.randn(5, 4, device=device, dtype=torch.float64, requires_grad=rg)
        h = torch.rand(5, 4, device=device, dtype=torch.float64, requires_grad=rg)
        torch.library.opcheck(torch.ops.obd_ext.saliency.default, (w, h))
        torch.library.opcheck(torch.ops.obd_ext.group_saliency.default, (w, h, 1))
    w16 = torch.randn(3, 3, device=device, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.obd_ext.saliency.default, (w16, torch.rand(3, 3, device=device)))


@param_device
def test_opcheck_selection(device):
    require_kernels(device)
    ws, hs, ms = _pool(device)
    torch.library.opcheck(torch.ops.obd_ext.global_select_.default, (ws, hs, ms, 20, 0.0, False))
    torch.library.opcheck(torch.ops.obd_ext.global_select_.default, ([], hs, ms, 20, None, False))
    w, h, m = ws[0], hs[0], ms[0]
    torch.library.opcheck(torch.ops.obd_ext.row_select_.default, (w, h, m, 2, 0.5, False))
    w8, h8 = torch.randn(3, 8, device=device), torch.rand(3, 8, device=device)
    m8 = torch.ones(3, 8, dtype=torch.bool, device=device)
    torch.library.opcheck(torch.ops.obd_ext.nm_select_.default, (w8, h8, m8, 2, 4, 0.0, False))


@param_device
def test_compile_fullgraph(device):
    require_kernels(device)

    def prune_step(w1, h1, w2, h2, m1, m2):
        s = obd_ext.ops.saliency(w1, h1)
        g = obd_ext.ops.group_saliency(w1, h1, 0)
        stats = obd_ext.ops.global_select_([w1, w2], [h1, h2], [m1, m2], 25, 0.0, False)
        return s.sum() + g.sum(), stats

    compiled = torch.compile(prune_step, fullgraph=True, backend="aot_eager")
    ws, hs, ms = _pool(device)
    eager_w, eager_m = [w.clone() for w in ws], [m.clone() for m in ms]
    out_c = compiled(ws[0], hs[0], ws[1], hs[1], ms[0], ms[1])
    out_e = prune_step(eager_w[0], hs[0], eager_w[1], hs[1], eager_m[0], eager_m[1])
    torch.testing.assert_close(out_c[0], out_e[0])
    assert torch.equal(out_c[1], out_e[1])
    for a, b in zip(ms + ws, eager_m + eager_w):
        assert torch.equal(a, b)  # the in-place updates happened under compile too
    ref_w, ref_m = _pool(device)[0], _pool(device)[2]
    reference.global_select_(ref_w, hs, ref_m, 25, 0.0, False)
    assert all(torch.equal(a, b) for a, b in zip(ms, ref_m))


def test_compile_inductor_saliency_with_grad():
    @torch.compile(fullgraph=True)
    def f(w, h):
        return obd_ext.ops.saliency(w, h).sum()

    w = torch.randn(8, 3, requires_grad=True)
    h = torch.rand(8, 3)
    f(w, h).backward()
    torch.testing.assert_close(w.grad, h * w.detach())
