"""The user-facing selection API: scopes, sparsity, names in errors, results."""

import math

import pytest
import torch

import obd_ext
from obd_ext import reference


def layers(seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(8, 6, generator=g), torch.randn(4, 3, 2, 2, generator=g), torch.randn(10, 8, generator=g)]
    hs = [torch.rand(w.shape, generator=g) for w in ws]
    return ws, hs


def test_global_by_sparsity_and_prediction():
    ws, hs = layers()
    sal = torch.cat([reference.saliency(w, h).reshape(-1) for w, h in zip(ws, hs)])
    n = sal.numel()
    sel = obd_ext.prune_global_(ws, hs, sparsity=0.4)
    k = round(0.4 * n)
    assert sel.deleted_now == k and sel.deleted_before == 0
    assert sel.sparsity == pytest.approx(k / n)
    lowest = torch.sort(sal).values[:k]
    assert sel.predicted_increase == pytest.approx(float(lowest.double().sum()), rel=1e-9)
    assert sel.max_saliency == pytest.approx(float(lowest[-1]))
    for w, m in zip(ws, sel.masks):
        assert (w[~m] == 0).all()
    # a second call to a higher target keeps what was deleted
    sel2 = obd_ext.prune_global_(ws, hs, sparsity=0.6, masks=sel.masks)
    assert sel2.deleted_before == k and sel2.deleted_now == round(0.6 * n) - k


def test_select_global_touches_nothing():
    ws, hs = layers()
    ws0 = [w.clone() for w in ws]
    masks = [torch.ones_like(w, dtype=torch.bool) for w in ws]
    sel = obd_ext.select_global(ws, hs, k=30, masks=masks)
    assert all(torch.equal(a, b) for a, b in zip(ws, ws0))
    assert all(m.all() for m in masks)
    assert sum(int((~m).sum()) for m in sel.masks) == 30


@pytest.mark.parametrize("scope", (*obd_ext.SCOPES, "2:4"))
def test_every_scope_through_prune_(scope):
    ws, hs = layers()
    ws = [w for w in ws if w.shape[1] % 4 == 0] if scope == "2:4" else ws
    hs = [h for h in hs if h.shape[1] % 4 == 0] if scope == "2:4" else hs
    if scope == "2:4":
        sel = obd_ext.prune_(ws, hs, pattern="2:4")
    else:
        sel = obd_ext.prune_(ws, hs, sparsity=0.5, scope=scope)
    total = sum(w.numel() for w in ws)
    if scope == "group":
        for m in sel.masks:  # whole units: each row all kept or all deleted
            rows = m.reshape(m.shape[0], -1)
            assert ((rows.all(1)) | (~rows).all(1)).all()
        groups = sum(w.shape[0] for w in ws)
        assert sel.deleted_now == round(0.5 * groups)
    else:
        deleted = sum(int((~m).sum()) for m in sel.masks)
        assert abs(deleted - total / 2) <= len(ws) * 8  # rounding per tensor / row
    for w, m in zip(ws, sel.masks):
        assert (w[~m] == 0).all()


def test_layer_scope_each_tensor_to_sparsity():
    ws, hs = layers()
    sel = obd_ext.prune_layers_(ws, hs, sparsity=0.25)
    for w, m, part in zip(ws, sel.masks, sel.per_tensor):
        assert int((~m).sum()) == round(0.25 * w.numel()) == part.deleted_now


def test_rows_and_nm_functions():
    w, h = torch.randn(6, 16), torch.rand(6, 16)
    sel = obd_ext.prune_rows_(w.clone(), h, sparsity=0.5)
    assert ((~sel.masks[0]).sum(1) == 8).all()
    sel = obd_ext.prune_nm_(w.clone(), h, "2:4")
    assert (sel.masks[0].reshape(6, 4, 4).sum(-1) == 2).all()
    sel = obd_ext.prune_nm_(w.clone(), curvature=h, pattern="1:4")
    assert (sel.masks[0].reshape(6, 4, 4).sum(-1) == 1).all()


def test_groups_match_group_saliency_order():
    w, h = torch.randn(10, 5), torch.rand(10, 5)
    gs = obd_ext.group_saliency(w, h, 0)
    sel = obd_ext.prune_groups_([w.clone()], [h], k=3)
    deleted_rows = (~sel.masks[0]).all(1).nonzero().reshape(-1)
    assert set(deleted_rows.tolist()) == set(torch.sort(gs).indices[:3].tolist())
    # channels of a conv, by output channel (dim 0) and by input channel (dim 1)
    wc, hc = torch.randn(6, 4, 3, 3), torch.rand(6, 4, 3, 3)
    sel = obd_ext.prune_groups_([wc.clone()], [hc], k=2, dim=1)
    assert int((~sel.masks[0]).all(dim=(0, 2, 3)).sum()) == 2


def test_factor_decreases_instead_of_deleting():
    ws, hs = layers()
    ws0 = [w.clone() for w in ws]
    sel = obd_ext.prune_global_(ws, hs, k=20, factor=0.1)
    for w, w0, m in zip(ws, ws0, sel.masks):
        torch.testing.assert_close(w[~m], w0[~m] * 0.1)
        assert torch.equal(w[m], w0[m])


def test_names_in_errors():
    ws, hs = layers()
    hs[1][0, 1, 0, 1] = math.nan
    with pytest.raises(ValueError, match=r"curvature\[1\] \('conv.weight'\) has a non-finite value \(nan\) "
                                         r"at position \(0, 1, 0, 1\)"):
        obd_ext.prune_global_(ws, hs, sparsity=0.5, names=["fc1.weight", "conv.weight", "fc2.weight"])
    sel = obd_ext.prune_global_(ws, hs, sparsity=0.5, nonfinite="keep")
    assert sel.skipped_nonfinite == 1 and bool(sel.masks[1][0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"prune_rows_: weight \('fc'\) has a non-finite value \(nan\)"):
        obd_ext.prune_rows_(hs[1].clone(), hs[1], k=1, name="fc")
    hs[1][0, 1, 0, 1] = 1.0
    ws[2][3, 4] = math.inf  # the weight, not its curvature, is named
    with pytest.raises(ValueError, match=r"weights\[2\] \('fc2.weight'\) has a non-finite value \(inf\) "
                                         r"at position \(3, 4\)"):
        obd_ext.prune_(ws, hs, sparsity=0.5, scope="layer", nonfinite="error",
                       names=["fc1.weight", "conv.weight", "fc2.weight"])


@pytest.mark.parametrize("sparsity", [-0.1, 1.5, math.nan, "0.5", True])
def test_sparsity_outside_unit_interval(sparsity):
    ws, hs = layers()
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\], got"):
        obd_ext.prune_global_(ws, hs, sparsity=sparsity)
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\]"):
        obd_ext.prune_(ws, hs, sparsity=sparsity, scope="row")


def test_other_bad_arguments():
    ws, hs = layers()
    n = sum(w.numel() for w in ws)
    with pytest.raises(ValueError, match=rf"k must be in \[0, {n}\] \(the number of entries\), got {n + 1}"):
        obd_ext.prune_global_(ws, hs, k=n + 1)
    with pytest.raises(ValueError, match="exactly one of k and sparsity"):
        obd_ext.prune_global_(ws, hs, k=1, sparsity=0.5)
    with pytest.raises(ValueError, match="exactly one of k and sparsity"):
        obd_ext.prune_global_(ws, hs)
    with pytest.raises(ValueError, match="k must be an integer, got 2.5"):
        obd_ext.prune_global_(ws, hs, k=2.5)
    with pytest.raises(ValueError, match="nonfinite must be 'error' or 'keep', got 'drop'"):
        obd_ext.prune_global_(ws, hs, k=1, nonfinite="drop")
    with pytest.raises(ValueError, match="scope must be one of"):
        obd_ext.prune_(ws, hs, sparsity=0.5, scope="block")
    with pytest.raises(ValueError, match=r"pattern='2:4' deletes 2 of every 4 \(sparsity 0.5\); "
                                         r"sparsity=0.3 conflicts"):
        obd_ext.prune_(ws[:1], hs[:1], sparsity=0.3, pattern="2:4")
    with pytest.raises(ValueError, match="scope must be None or 'row', got 'global'"):
        obd_ext.prune_(ws[:1], hs[:1], scope="global", pattern="2:4")
    with pytest.raises(ValueError, match="scope must be one of"):
        obd_ext.prune_(ws[:1], hs[:1], sparsity=0.5, scope="nm")
    with pytest.raises(ValueError, match="sparsity is required with pattern='unstructured'"):
        obd_ext.prune_(ws, hs)
    with pytest.raises(ValueError, match="masks must have one tensor per weight: got 1 masks for 3"):
        obd_ext.prune_global_(ws, hs, k=1, masks=[torch.ones(1, dtype=torch.bool)])
    with pytest.raises(ValueError, match=r"factor must be a finite number .*got inf"):
        obd_ext.prune_global_(ws, hs, k=1, factor=math.inf)
    with pytest.raises(TypeError, match=r"weight must be float32, float64, float16 or bfloat16, got torch.int32"):
        obd_ext.prune_rows_(ws[0].int(), hs[0], k=1)


def test_empty_pool():
    sel = obd_ext.prune_global_([], [], k=0)
    assert sel.deleted_now == 0 and sel.masks == []
    with pytest.raises(ValueError, match=r"k must be in \[0, 0\]"):
        obd_ext.prune_global_([], [], k=1)


def test_default_scope_is_global():
    ws, hs = layers()
    a = obd_ext.prune_([w.clone() for w in ws], hs, sparsity=0.3)
    b = obd_ext.prune_global_([w.clone() for w in ws], hs, sparsity=0.3)
    assert all(torch.equal(x, y) for x, y in zip(a.masks, b.masks))
    assert obd_ext.SCOPES == obd_ext.vocabulary.SCOPES and "nm" not in obd_ext.SCOPES


def test_pattern_implied_sparsity_and_row_scope():
    w, h = torch.randn(6, 16), torch.rand(6, 16)
    for kw in ({}, {"sparsity": 0.5}, {"scope": "row"}, {"scope": "row", "sparsity": 0.5}):
        sel = obd_ext.prune_([w.clone()], [h], pattern="2:4", **kw)
        assert (sel.masks[0].reshape(6, 4, 4).sum(-1) == 2).all() and len(sel.per_tensor) == 1
    with pytest.raises(ValueError, match="needs an N:M pattern"):
        obd_ext.prune_nm_(w.clone(), h, "unstructured")
    with pytest.raises(ValueError, match=r"multiple of 4, got shape \(6, 6\)"):
        obd_ext.prune_nm_(torch.randn(6, 6), torch.rand(6, 6), "2:4", name="fc")


def test_curvature_keyword_everywhere():
    ws, hs = layers()
    obd_ext.prune_global_([w.clone() for w in ws], curvature=hs, k=3)
    obd_ext.select_global(ws, curvature=hs, k=3)
    obd_ext.prune_layers_([w.clone() for w in ws], curvature=hs, sparsity=0.2)
    obd_ext.prune_groups_([w.clone() for w in ws], curvature=hs, k=1)
    obd_ext.prune_([w.clone() for w in ws], curvature=hs, sparsity=0.2)
    obd_ext.prune_rows_(ws[0].clone(), curvature=hs[0], k=1)
    obd_ext.prune_nm_(ws[2].clone(), curvature=hs[2])


def test_repr_summarises():
    ws = [torch.randn(512, 512) for _ in range(8)]
    hs = [torch.rand(512, 512) for _ in range(8)]
    sel = obd_ext.prune_(ws, hs, sparsity=0.5, scope="layer")
    text = repr(sel)
    assert len(text) < 300, text
    assert text.startswith("Selection(tensors=8, numel=2097152, deleted_now=1048576, deleted_before=0, sparsity=0.5")
    assert "tensor(" not in text and str(sel) == text


def test_group_scores_that_overflow_float32_are_ordered_in_float64():
    # Saliencies of 5e39 overflow float32 (inf), and +inf + -inf would be NaN: the group scope sums those
    # groups in float64 instead of raising or ordering them wrongly.
    w = torch.tensor([[1e20, 1.0], [3e19, 1.0], [1.0, 1.0], [1e20, 1e20]])
    h = torch.tensor([[1.0, -1.0], [1.0, 1.0], [1.0, 1.0], [1.0, -1.0]])
    exact = [reference.group_saliency(w.double(), h.double(), 0)[i].item() for i in range(4)]
    assert exact[3] == 0.0 and exact[2] < exact[1] < exact[0]
    for scope_call in (lambda wc: obd_ext.prune_groups_([wc], [h], k=3),
                       lambda wc: obd_ext.prune_([wc], [h], sparsity=0.75, scope="group")):
        wc = w.clone()
        sel = scope_call(wc)
        assert sel.masks[0].all(1).tolist() == [True, False, False, False]
        assert (wc[1:] == 0).all() and torch.equal(wc[0], w[0])


def test_sparsity_checked_once_per_call(monkeypatch):
    from obd_ext import selection_checks

    calls = []
    real = selection_checks.check_sparsity
    monkeypatch.setattr(selection_checks, "check_sparsity", lambda *a, **k: calls.append(a) or real(*a, **k))
    ws, hs = layers()
    for scope in obd_ext.SCOPES:
        calls.clear()
        obd_ext.prune_([w.clone() for w in ws], hs, sparsity=0.5, scope=scope)
        assert len(calls) == 1, (scope, calls)


def test_disjoint_views_of_one_tensor_are_fine():
    # Column halves of one weight interleave in memory but share no element: a valid pool.
    g = torch.Generator().manual_seed(3)
    base, h = torch.randn(6, 8, generator=g), torch.rand(6, 8, generator=g)
    ref = obd_ext.prune_global_([base.clone()], [h], k=20)
    halves = [base[:, :4], base[:, 4:]]
    sel = obd_ext.prune_global_(halves, [h[:, :4], h[:, 4:]], k=20)
    assert torch.equal(torch.cat(sel.masks, 1), ref.masks[0])
    assert (base[~torch.cat(sel.masks, 1)] == 0).all()
    with pytest.raises(ValueError, match=r"weights\[0\] and weights\[1\] share memory \(overlapping views\)"):
        obd_ext.prune_global_([base[:, :5], base[:, 4:]], [h[:, :5], h[:, 4:]], k=2)
