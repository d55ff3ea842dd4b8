"""global_select_ against reference.global_select_: exact masks, weights and counts."""

import math

import pytest
import torch

from obd_ext import ops, reference
from testing import (
    DISTRIBUTIONS,
    DTYPES,
    assert_stats_close,
    k_values,
    make_pair,
    noncontiguous,
    param_device,
    random_masks,
    require_kernels,
)

SHAPES = [[()], [(0,)], [(1,)], [(7, 5), (13,), (3, 4, 2)], [(0, 3), (257,), (31, 33)]]


def run_both(ws, hs, masks, k, factor, skip, score_mode=False):
    ws_k = [] if score_mode else [w.clone() for w in ws]
    ws_r = [] if score_mode else [w.clone() for w in ws]
    m_k = [m.clone() for m in masks]
    m_r = [m.clone() for m in masks]
    st_k = ops.global_select_(ws_k, hs, m_k, k, factor, skip)
    st_r = reference.global_select_(ws_r, hs, m_r, k, factor, skip)
    for a, b in zip(m_k, m_r):
        assert torch.equal(a, b)
    for a, b in zip(ws_k, ws_r):
        assert torch.equal(a, b)
    assert_stats_close(st_k, st_r)
    return m_k, st_k


@param_device
@pytest.mark.parametrize("shapes", SHAPES, ids=str)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(device, shapes, dist, dtype):
    require_kernels(device)
    pairs = [make_pair(s, dist, dtype, dtype, device, seed=i) for i, s in enumerate(shapes)]
    ws, hs = [p[0] for p in pairs], [p[1] for p in pairs]
    n = sum(h.numel() for h in hs)
    for k in k_values(n):
        masks = [torch.ones_like(h, dtype=torch.bool) for h in hs]
        m, st = run_both(ws, hs, masks, k, 0.0, False)
        assert sum(int((~x).sum()) for x in m) == k  # exact count
        assert int(st[0]) == k


@param_device
@pytest.mark.parametrize("cap", [None, "0"])
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_every_path(device, cap, dist, monkeypatch):
    """Large enough for multi-digit refinement; cap=0 forces the tie-quota path."""
    require_kernels(device)
    if cap is not None:
        monkeypatch.setenv("OBD_EXT_CANDIDATE_CAP", cap)
    ws, hs = zip(*[make_pair(s, dist, torch.float32, torch.float32, device, seed=i)
                   for i, s in enumerate([(300, 301), (70_001,)])])
    masks = random_masks(hs, 0.1, seed=3)
    n = sum(h.numel() for h in hs)
    for k in [n // 3, n // 2 + 1, n - 5]:
        run_both(list(ws), list(hs), masks, k, 0.0, False)


@param_device
@pytest.mark.parametrize("wdtype,hdtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float64),
                                           (torch.float32, torch.bfloat16)], ids=str)
def test_mixed_dtypes_one_pool(device, wdtype, hdtype):
    require_kernels(device)
    p1 = make_pair((40, 9), "normal", wdtype, hdtype, device, seed=1)
    p2 = make_pair((17,), "negative_curvature", torch.float32, torch.float32, device, seed=2)
    p3 = make_pair((5, 5), "half_zeros", torch.float64, torch.float16, device, seed=3)
    ws, hs = [p1[0], p2[0], p3[0]], [p1[1], p2[1], p3[1]]
    n = sum(h.numel() for h in hs)
    for k in k_values(n):
        run_both(ws, hs, [torch.ones_like(h, dtype=torch.bool) for h in hs], k, 0.0, False)


@param_device
def test_existing_masks_count_and_stay_deleted(device):
    require_kernels(device)
    ws, hs = zip(*[make_pair(s, "normal", torch.float32, torch.float32, device, seed=i)
                   for i, s in enumerate([(20, 10), (55,)])])
    masks = random_masks(hs, 0.3, seed=1)
    before = sum(int((~m).sum()) for m in masks)
    n = sum(h.numel() for h in hs)
    # k below what is already deleted: nothing changes, nothing comes back
    m, st = run_both(list(ws), list(hs), masks, before // 2, 0.0, False)
    assert all(torch.equal(a, b) for a, b in zip(m, masks))
    assert int(st[0]) == 0 and int(st[1]) == before
    for k in [before, before + 1, (before + n) // 2, n]:
        m, st = run_both(list(ws), list(hs), masks, k, 0.0, False)
        assert sum(int((~x).sum()) for x in m) == k
        for old, new in zip(masks, m):
            assert not (new & ~old).any()  # never brought back


@param_device
@pytest.mark.parametrize("factor", [None, 0.0, 0.5, -2.0])
def test_factor_and_weights(device, factor):
    require_kernels(device)
    ws, hs = zip(*[make_pair(s, "normal", dt, torch.float32, device, seed=i)
                   for i, (s, dt) in enumerate([((9, 8), torch.float32), ((33,), torch.bfloat16)])])
    ws0 = [w.clone() for w in ws]
    run_both(list(ws), list(hs), [torch.ones_like(h, dtype=torch.bool) for h in hs], 40, factor, False)
    masks = [torch.ones_like(h, dtype=torch.bool) for h in hs]
    ws1 = [w.clone() for w in ws]
    ops.global_select_(ws1, list(hs), masks, 40, factor, False)
    for w0, w1, m in zip(ws0, ws1, masks):
        assert torch.equal(w1[m], w0[m])  # kept weights untouched
        if factor is None:
            assert torch.equal(w1, w0)
        elif factor == 0.0:
            assert (w1[~m] == 0).all() and not torch.signbit(w1[~m]).any()  # exact +0.0


@param_device
def test_score_mode(device):
    require_kernels(device)
    scores = [torch.randn(50, device=device), torch.randn(7, 3, device=device, dtype=torch.float64)]
    for k in k_values(71):
        run_both([], scores, [torch.ones_like(s, dtype=torch.bool) for s in scores], k, None, False, score_mode=True)


@param_device
def test_noncontiguous_inputs_and_outputs(device):
    require_kernels(device)
    w, h = make_pair((12, 10), "normal", torch.float32, torch.float32, device)
    w_nc, h_nc = noncontiguous(w.clone()), noncontiguous(h)
    m_nc = noncontiguous(torch.ones_like(h, dtype=torch.bool))
    assert not w_nc.is_contiguous() and not m_nc.is_contiguous()
    ops.global_select_([w_nc], [h_nc], [m_nc], 55, 0.0, False)
    w_c, m_c = w.clone(), torch.ones_like(h, dtype=torch.bool)
    ops.global_select_([w_c], [h], [m_c], 55, 0.0, False)
    assert torch.equal(m_nc, m_c) and torch.equal(w_nc, w_c)


@param_device
def test_nonfinite(device):
    require_kernels(device)
    w, h = make_pair((6, 7), "normal", torch.float32, torch.float32, device)
    w2 = w.clone()
    h2 = h.clone()
    h2[2, 3] = math.nan
    w2[4, 1] = math.inf
    masks = [torch.ones_like(h, dtype=torch.bool) for _ in range(2)]
    with pytest.raises(RuntimeError, match=r"curvatures\[1\] has a non-finite value \(nan\) at position \(2, 3\)"):
        ops.global_select_([w, w.clone()], [h, h2], masks, 3, 0.0, False)
    assert all(m.all() for m in masks)  # nothing written on error
    with pytest.raises(RuntimeError, match=r"weights\[0\] has a non-finite value \(inf\) at position \(4, 1\)"):
        ops.global_select_([w2], [h], [masks[0]], 3, 0.0, False)
    with pytest.raises(RuntimeError, match=r"curvatures\[0\] has a non-finite value \(nan\) at position \(2, 3\)"):
        ops.global_select_([w2], [h2], [masks[0]], 3, 0.0, False)  # the first in flat order
    # "keep": never prunable, even with k = everything else
    m = [torch.ones_like(h, dtype=torch.bool)]
    st = run_both([w2], [h2], m, 40, 0.0, True)[1]
    assert int(st[2]) == 2
    with pytest.raises(RuntimeError, match=r"k must be in \[0, 40\]"):
        ops.global_select_([w2.clone()], [h2], [torch.ones_like(h, dtype=torch.bool)], 41, 0.0, True)


@param_device
def test_deterministic_across_runs_and_threads(device):
    require_kernels(device)
    ws, hs = zip(*[make_pair(s, "few_ulps", torch.float32, torch.float32, device, seed=i)
                   for i, s in enumerate([(256, 300), (70_000,)])])
    n = sum(h.numel() for h in hs)
    results = []
    threads = torch.get_num_threads()
    try:
        for t in [1, 2, 1, 2]:
            torch.set_num_threads(t)
            masks = [torch.ones_like(h, dtype=torch.bool) for h in hs]
            st = ops.global_select_(list(ws), list(hs), masks, n // 2, None, False)
            results.append((masks, st))
    finally:
        torch.set_num_threads(threads)
    for masks, st in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(masks, results[0][0]))
        assert torch.equal(st, results[0][1])  # the saliency sum too, bit for bit


def test_bad_arguments():
    w, h = torch.randn(4, 5), torch.rand(4, 5)
    m = torch.ones(4, 5, dtype=torch.bool)
    with pytest.raises(RuntimeError, match=r"curvatures\[0\] must be float32, float64, float16 or bfloat16, got Int"):
        ops.global_select_([w], [h.int()], [m], 1, None, False)
    with pytest.raises(RuntimeError, match=r"masks\[0\] must be a bool keep-mask"):
        ops.global_select_([w], [h], [m.float()], 1, None, False)
    with pytest.raises(RuntimeError, match=r"curvatures\[0\] must have the shape of weights\[0\] \[4, 5\], got \[5, 4\]"):
        ops.global_select_([w], [h.t().contiguous()], [m.t().contiguous()], 1, None, False)
    with pytest.raises(RuntimeError, match=r"k must be in \[0, 20\].*got 21"):
        ops.global_select_([w], [h], [m], 21, None, False)
    with pytest.raises(RuntimeError, match=r"k must be in \[0, 20\].*got -1"):
        ops.global_select_([w], [h], [m], -1, None, False)
    with pytest.raises(RuntimeError, match="same length"):
        ops.global_select_([w, w], [h], [m], 1, None, False)
    with pytest.raises(RuntimeError, match="factor must be finite"):
        ops.global_select_([w], [h], [m], 1, math.nan, False)
    with pytest.raises(RuntimeError, match="factor needs weights"):
        ops.global_select_([], [h], [m], 1, 0.0, False)
    other = "cuda" if torch.cuda.is_available() else "meta"  # meta: checked by the fake kernel
    with pytest.raises(RuntimeError, match="one device"):
        ops.global_select_([w], [h.to(other)], [m], 1, None, False)
