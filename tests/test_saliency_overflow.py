"""Saliency at the extremes of each dtype (issue 14, item 5).

The rule ``s = (h * w) * w * 0.5`` in the saliency dtype never gives NaN for
finite ``w`` and ``h`` and keeps the order of the exact values; squaring ``w``
first gave ``w = 1e30, h = 0 -> 0 * inf = NaN`` in float32, an entry whose
exact saliency is 0 and which was then deleted last. Every selection scope
(global, row, N:M, layer, group) and the sharded global select must delete
that zero-saliency entry first, and the CPU kernel must equal the reference
bit for bit.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import List, Tuple

import pytest
import torch

import obd_ext
from obd_ext import ops, reference
from testing import DEVICES, require_kernels

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16

# (weight dtype, curvature dtype): every low-precision weight with a float32
# and a float64 curvature, and the plain pairs.
COMBOS = [(F32, F32), (F64, F64), (BF16, F32), (F16, F32), (BF16, F64), (F16, F64), (F32, F64), (F64, F32)]
COMBO_IDS = [f"{str(w)[6:]}-{str(h)[6:]}" for w, h in COMBOS]


def _sdtype(wdtype: torch.dtype, hdtype: torch.dtype) -> torch.dtype:
    return F64 if F64 in (wdtype, hdtype) else F32


def _representable(x: float, dtype: torch.dtype) -> bool:
    return x <= torch.finfo(dtype).max


def _smallest_subnormal(dtype: torch.dtype) -> float:
    fi = torch.finfo(dtype)
    return fi.tiny * fi.eps


def _extremes(dtype: torch.dtype, for_weight: bool) -> List[float]:
    """0, subnormal, tiny, 1, 1e30 (if it fits), max, and their negatives where they matter."""
    fi = torch.finfo(dtype)
    vals = [0.0, _smallest_subnormal(dtype), fi.tiny, 1e-30, 1e-3, 1.0, 2.0, 1e30, 1e200, fi.max]
    vals = [v for v in vals if _representable(v, dtype) and (v == 0.0 or v >= _smallest_subnormal(dtype))]
    if for_weight:
        return vals + [-v for v in vals if v != 0.0]
    return vals + [-1.0, -fi.max]


def _grid(wdtype: torch.dtype, hdtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    ws, hs = _extremes(wdtype, True), _extremes(hdtype, False)
    w = torch.tensor([a for a in ws for _ in hs], dtype=F64).to(wdtype)
    h = torch.tensor([b for _ in ws for b in hs], dtype=F64).to(hdtype)
    assert torch.isfinite(w).all() and torch.isfinite(h).all()
    return w, h


def _show(x: Fraction) -> str:
    """An exact value for a message (beyond float64's range as a power of two)."""
    try:
        return repr(float(x))
    except OverflowError:
        return f"{'-' if x < 0 else ''}2^{abs(x.numerator).bit_length() - x.denominator.bit_length()}"


def _exact(w: torch.Tensor, h: torch.Tensor) -> List[Fraction]:
    """h w^2 / 2 as exact rationals of the stored (finite) values."""
    return [Fraction(float(b)) * Fraction(float(a)) ** 2 / 2 for a, b in zip(w.double().tolist(), h.double().tolist())]


@pytest.mark.parametrize("wdtype,hdtype", COMBOS, ids=COMBO_IDS)
def test_saliency_extremes_never_nan_and_ordered(wdtype, hdtype):
    w, h = _grid(wdtype, hdtype)
    s = obd_ext.saliency(w, h)
    sdt = _sdtype(wdtype, hdtype)
    assert s.dtype == sdt
    assert not torch.isnan(s).any(), [(float(a), float(b)) for a, b, v in zip(w, h, s) if math.isnan(v)]
    assert torch.equal(s, reference.saliency(w, h))  # CPU kernel == reference, bit for bit
    exact = _exact(w, h)
    fi = torch.finfo(sdt)
    vals = s.tolist()
    for a, b, v, x in zip(w.tolist(), h.tolist(), vals, exact):
        where = f"w={a!r} h={b!r}: s={v!r}, exact={_show(x)}"
        if x == 0:
            assert v == 0.0, where
        elif v != 0.0:
            assert (v > 0) == (x > 0), where  # the sign is the exact value's
        else:
            assert abs(x) < fi.tiny, where  # only an underflowing value becomes 0
        if math.isinf(v):
            # (h * w) * w overflows only when h w^2 is above the largest finite value
            assert abs(x) >= Fraction(fi.max) / 2 * (1 - 4 * Fraction(fi.eps)), where
        elif abs(x) >= fi.tiny:
            assert abs(Fraction(v) - x) <= 4 * Fraction(fi.eps) * abs(x), where
    # Monotone: an exactly smaller saliency never gets a larger float.
    order = sorted(range(len(exact)), key=lambda i: exact[i])
    ordered = [vals[i] for i in order]
    assert all(a <= b for a, b in zip(ordered, ordered[1:]))


def _big(dtype: torch.dtype) -> float:
    return 1e30 if _representable(1e30, dtype) and dtype != F64 else torch.finfo(dtype).max


def _pool(wdtype: torch.dtype, hdtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Four entries, the last with exact saliency 0 (w huge, h = 0); the others positive and distinct."""
    big = _big(wdtype)
    w = torch.tensor([1.0, big, 0.5, big], dtype=F64).to(wdtype)
    h = torch.tensor([1.0, _smallest_subnormal(hdtype), 3.0, 0.0], dtype=F64).to(hdtype)
    s = reference.saliency(w, h)
    assert (s[:3] > 0).all() and s[3] == 0
    return w, h


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wdtype,hdtype", COMBOS, ids=COMBO_IDS)
def test_every_scope_deletes_the_zero_saliency_entry_first(device, wdtype, hdtype):
    require_kernels(device)
    w1, h1 = _pool(wdtype, hdtype)
    w1, h1 = w1.to(device), h1.to(device)
    last = torch.tensor([True, True, True, False], device=device)

    # global: one pool, k = 1; the kernel matches the reference bit for bit
    w, m = w1.clone(), torch.ones(4, dtype=torch.bool, device=device)
    st = ops.global_select_([w], [h1], [m], 1, 0.0, False)
    assert torch.equal(m, last)
    assert w[3] == 0 and torch.equal(w[:3], w1[:3])
    wr, mr = w1.cpu().clone(), torch.ones(4, dtype=torch.bool)
    st_ref = reference.global_select_([wr], [h1.cpu()], [mr], 1, 0.0, False)
    assert torch.equal(mr, m.cpu()) and torch.equal(wr, w.cpu())
    assert st[4].item() == st_ref[4].item() == 0.0  # the deleted saliency sum is exactly 0

    # row: two rows, one entry deleted per row
    w2, h2 = w1.repeat(2, 1), h1.repeat(2, 1)
    m2 = torch.ones(2, 4, dtype=torch.bool, device=device)
    obd_ext.prune_rows_(w2, h2, k=1, mask=m2)
    assert torch.equal(m2, last.repeat(2, 1))

    # N:M: 3 of every 4 kept
    w3, m3 = w1.repeat(2, 1), torch.ones(2, 4, dtype=torch.bool, device=device)
    ops.nm_select_(w3, h1.repeat(2, 1), m3, 3, 4, 0.0, False)
    assert torch.equal(m3, last.repeat(2, 1))

    # layer: each tensor its own pool
    wa, wb = w1.clone(), w1.flip(0).clone()
    sel = obd_ext.prune_layers_([wa, wb], [h1, h1.flip(0)], sparsity=0.25)
    assert torch.equal(sel.masks[0], last) and torch.equal(sel.masks[1], last.flip(0))

    # group: rows of a matrix; the last row is all (huge w, h = 0), summed saliency exactly 0
    wg = w1.unsqueeze(1).repeat(1, 3)
    hg = h1.unsqueeze(1).repeat(1, 3)
    gs = obd_ext.group_saliency(wg, hg, 0)
    assert not torch.isnan(gs).any() and gs[3] == 0 and (gs[:3] > 0).all()
    # A group sum beyond float64's range is +inf, which the group scope reports
    # as non-finite unless told to keep such groups (they are the most salient).
    keep = "keep" if torch.isinf(gs).any() else "error"
    sel = obd_ext.prune_groups_([wg], [hg], k=1, dim=0, nonfinite=keep)
    assert torch.equal(sel.masks[0], last.unsqueeze(1).repeat(1, 3))


def test_sharded_select_deletes_the_zero_saliency_entry_first(tmp_path):
    """The distributed select computes keys from the same saliency op (one rank here)."""
    import torch.distributed as dist

    from obd_ext import distributed

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        for wdtype, hdtype in COMBOS:
            w, h = _pool(wdtype, hdtype)
            m = torch.ones(4, dtype=torch.bool)
            distributed.prune_global_sharded_([w], [h], k=1, masks=[m])
            assert m.tolist() == [True, True, True, False], (wdtype, hdtype)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("wdtype,hdtype", COMBOS, ids=COMBO_IDS)
def test_group_saliency_extremes_match_exact_sums(wdtype, hdtype):
    """Group terms in float64: no NaN, and the exact sum's value (and sign) where it is finite."""
    w, h = _grid(wdtype, hdtype)
    n = w.numel()
    cols = 4
    rows = n // cols
    w, h = w[: rows * cols].reshape(rows, cols), h[: rows * cols].reshape(rows, cols)
    gs = obd_ext.group_saliency(w, h, 0)
    ref = reference.group_saliency(w, h, 0)
    assert not torch.isnan(gs).any() and not torch.isnan(ref).any()
    torch.testing.assert_close(gs, ref, rtol=1e-12 if gs.dtype == F64 else 1e-6, atol=0.0)
    sdt = _sdtype(wdtype, hdtype)
    fi = torch.finfo(sdt)
    for r in range(rows):
        terms = _exact(w[r], h[r])
        x, scale = sum(terms, Fraction(0)), sum((abs(t) for t in terms), Fraction(0))
        v = gs[r].item()
        # a float64 sum's error bound, plus the final rounding (or underflow) to the saliency dtype
        slack = 8 * Fraction(torch.finfo(F64).eps) * scale + Fraction(fi.eps) * abs(x) + Fraction(_smallest_subnormal(sdt))
        if math.isinf(v):
            assert (v > 0) == (x > 0) and abs(x) + slack >= Fraction(fi.max), (r, v, _show(x))
        else:
            assert abs(Fraction(v) - x) <= slack, (r, v, _show(x))


def test_float64_group_with_opposite_infinite_terms_is_not_nan():
    """Two float64 terms overflowing with opposite signs: summed from split terms, never NaN."""
    w = torch.tensor([[1e200, 1e200, 1.0], [1e200, 1e200, 1.0]], dtype=F64)
    h = torch.tensor([[2.0, -1.0, 1.0], [1.0, -1.0, 4.0]], dtype=F64)
    for fn in (obd_ext.group_saliency, reference.group_saliency):
        gs = fn(w, h, 0)
        assert gs[0].item() == math.inf  # exactly 5e399 + 0.5: overflows, with its sign
        # the infinities cancel; 4 * 1 / 2 is below float64's rounding of 5e399 terms, as in any float64 sum
        assert gs[1].item() == 0.0
    sel = obd_ext.prune_groups_([w.clone()], [h], k=1, dim=0, nonfinite="keep")  # group 0 is +inf
    assert sel.masks[0][:, 0].tolist() == [True, False]


def test_old_rule_would_fail():
    """The case of the issue: w = 1e30, h = 0 in float32 was NaN with w * w first."""
    w = torch.tensor([1e30, 1.0])
    h = torch.tensor([0.0, 1.0])
    old = h * (w * w) * 0.5
    assert torch.isnan(old[0])  # what the kernels computed before
    s = obd_ext.saliency(w, h)
    assert s.tolist() == [0.0, 0.5]


# ---------------------------------------------------------------------------
# Overflowed saliencies tie at +-inf: a selection whose boundary reaches them says so
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("call", [
    lambda w, h, k: obd_ext.prune_global_([w], [h], k=k),
    lambda w, h, k: obd_ext.prune_layers_([w], [h], sparsity=k / w.numel()),
    lambda w, h, k: obd_ext.prune_rows_(w.reshape(1, -1), h.reshape(1, -1), k=k),
])
def test_a_boundary_among_overflowed_saliencies_warns(call):
    # 1e21 and 1e20 both overflow float32 (h w^2 / 2 > 3.4e38): they tie at +inf.
    w, h = torch.tensor([1e21, 1e20, 1.0, 2.0]), torch.ones(4)
    with pytest.warns(UserWarning, match="overflowed to inf .* index order"):
        call(w.clone(), h, 3)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call(w.clone(), h, 2)  # the boundary stays below the overflow: exact, no warning
        exact = w.double()
        sel = obd_ext.prune_global_([exact], [h.double()], k=3)  # float64 holds them: the exact order
        assert sel.masks[0].tolist() == [True, False, False, False]
