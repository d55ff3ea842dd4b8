"""row_select_ and nm_select_ against the reference."""

import math

import pytest
import torch

from obd_ext import ops, reference
from testing import DISTRIBUTIONS, DTYPES, assert_stats_close, make_pair, noncontiguous, param_device, random_masks, require_kernels


def run_both(fn, ref, w, h, mask, *args):
    w_k, w_r, m_k, m_r = w.clone(), w.clone(), mask.clone(), mask.clone()
    st_k = fn(w_k, h, m_k, *args)
    st_r = ref(w_r, h, m_r, *args)
    assert torch.equal(m_k, m_r)
    assert torch.equal(w_k, w_r)
    assert_stats_close(st_k, st_r)
    return m_k, st_k


@param_device
@pytest.mark.parametrize("shape", [(1, 1), (5, 8), (3, 1000), (6, 4, 3, 3), (0, 4), (4,)], ids=str)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows(device, shape, dist, dtype):
    require_kernels(device)
    w, h = make_pair(shape, dist, dtype, torch.float32, device)
    cols = math.prod(shape[1:])
    for p_deleted in (0.0, 0.3):
        mask = random_masks([w], p_deleted, seed=2)[0]
        for k in sorted({0, min(1, cols), cols // 2, max(cols - 1, 0), cols}):
            m, _ = run_both(ops.row_select_, reference.row_select_, w, h, mask, k, 0.0, False)
            if shape[0]:
                deleted = (~m).reshape(shape[0], -1).sum(1)
                assert (deleted == torch.clamp((~mask).reshape(shape[0], -1).sum(1), min=k)).all()


@param_device
@pytest.mark.parametrize("shape,n,m", [((4, 8), 2, 4), ((3, 16), 1, 4), ((5, 8, 3), 2, 4), ((2, 16), 4, 8),
                                       ((8,), 2, 4), ((3, 6), 0, 3), ((3, 6), 3, 3), ((0, 8), 2, 4)], ids=str)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nm(device, shape, n, m, dist, dtype):
    require_kernels(device)
    w, h = make_pair(shape, dist, dtype, dtype, device)
    for p_deleted in (0.0, 0.25):
        mask = random_masks([w], p_deleted, seed=5)[0]
        out, _ = run_both(ops.nm_select_, reference.nm_select_, w, h, mask, n, m, 0.0, False)
        if p_deleted == 0.0 and out.numel():
            d = 1 if len(shape) >= 2 else 0
            groups = out.movedim(d, -1).reshape(-1, m)
            assert (groups.sum(1) == n).all()  # exactly n kept in every group


@param_device
@pytest.mark.parametrize("factor", [None, 0.25])
def test_factor_noncontiguous_and_stats(device, factor):
    require_kernels(device)
    w, h = make_pair((8, 12), "normal", torch.float32, torch.float32, device)
    mask = torch.ones_like(w, dtype=torch.bool)
    run_both(ops.row_select_, reference.row_select_, w, h, mask, 5, factor, False)
    run_both(ops.nm_select_, reference.nm_select_, w, h, mask, 2, 4, factor, False)
    w_nc, m_nc = noncontiguous(w.clone()), noncontiguous(mask.clone())
    ops.row_select_(w_nc, noncontiguous(h), m_nc, 5, factor, False)
    w_c, m_c = w.clone(), mask.clone()
    ops.row_select_(w_c, h, m_c, 5, factor, False)
    assert torch.equal(w_nc, w_c) and torch.equal(m_nc, m_c)


@param_device
def test_nonfinite(device):
    require_kernels(device)
    w, h = make_pair((4, 8), "normal", torch.float32, torch.float32, device)
    h[1, 2] = math.nan
    mask = torch.ones_like(w, dtype=torch.bool)
    for call in (lambda: ops.row_select_(w, h, mask, 2, 0.0, False), lambda: ops.nm_select_(w, h, mask, 2, 4, 0.0, False)):
        with pytest.raises(RuntimeError, match=r"curvature has a non-finite value \(nan\) at position \(1, 2\)"):
            call()
        assert mask.all()
    run_both(ops.row_select_, reference.row_select_, w, h, mask, 7, 0.0, True)
    run_both(ops.nm_select_, reference.nm_select_, w, h, mask, 1, 4, 0.0, True)
    w2, m2 = w.clone(), mask.clone()
    with pytest.raises(RuntimeError, match=r"segment 1 has too few deletable entries .* for the 8 to delete"):
        ops.row_select_(w2, h, m2, 8, 0.0, True)
    assert m2.all() and torch.equal(w2, w)  # checked before anything was written


def test_bad_arguments():
    w, h = torch.randn(4, 6), torch.rand(4, 6)
    m = torch.ones(4, 6, dtype=torch.bool)
    with pytest.raises(RuntimeError, match=r"k \(entries to delete per row\) must be in \[0, 6\] .* got 7"):
        ops.row_select_(w, h, m, 7, None, False)
    with pytest.raises(RuntimeError, match=r"the input dimension \(dim 1, size 6\) .* must be a multiple of m=4"):
        ops.nm_select_(w, h, m, 2, 4, None, False)
    with pytest.raises(RuntimeError, match=r"n \(entries kept per group\) must be in \[0, m=3\], got 5"):
        ops.nm_select_(w, h, m, 5, 3, None, False)
    other = "cuda" if torch.cuda.is_available() else "meta"
    with pytest.raises(RuntimeError, match="one device"):
        ops.row_select_(w, h.to(other), m, 1, None, False)
    with pytest.raises(RuntimeError, match="one device"):
        ops.nm_select_(w, h, m.to(other), 2, 2, None, False)
    with pytest.raises(RuntimeError, match=r"mask must have the shape of weight"):
        ops.row_select_(w, h, m[:2], 1, None, False)


@param_device
@pytest.mark.parametrize("wdtype", [torch.float32, torch.float64], ids=str)
def test_overflowing_saliency_from_finite_inputs_is_ordered(device, wdtype):
    """h = 0 with w^2 overflowing: the saliency (h * w) * w / 2 is 0, never 0 * inf = NaN, so it is deleted
    first (as float64 orders it); h = 1 with the same w overflows to +inf and is deleted last. Same in the
    global, row and N:M selections and the reference."""
    require_kernels(device)
    big = 1e20 if wdtype == torch.float32 else 1e160
    w = torch.linspace(1, 2, 32, dtype=wdtype).reshape(4, 8)
    h = torch.ones(4, 8, dtype=wdtype)
    w[:, 1], h[:, 1] = big, 0.0  # saliency 0 in every row and in the first group of 4
    w[:, 6] = big  # saliency +inf
    w, h = w.to(device), h.to(device)
    s = ops.saliency(w, h)
    assert (s[:, 1] == 0).all() and torch.isinf(s[:, 6]).all() and not torch.isnan(s).any()
    mask = torch.ones(4, 8, dtype=torch.bool, device=device)
    m, _ = run_both(ops.row_select_, reference.row_select_, w, h, mask, 1, None, False)
    assert (~m[:, 1]).all() and (~m).sum() == 4
    m, _ = run_both(ops.row_select_, reference.row_select_, w, h, mask, 7, None, False)
    assert m[:, 6].all() and (~m).sum() == 28
    m, _ = run_both(ops.nm_select_, reference.nm_select_, w, h, mask, 3, 4, None, False)
    assert (~m[:, 1]).all() and m[:, 6].all()
    mg_k, mg_r = mask.clone(), mask.clone()
    ops.global_select_([w], [h], [mg_k], 28, None, False)
    reference.global_select_([w], [h], [mg_r], 28, None, False)
    assert torch.equal(mg_k, mg_r) and (~mg_k[:, 1]).all() and mg_k[:, 6].all()
