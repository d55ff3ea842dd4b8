"""The bad-input matrix of the selection entry points (issue 14, item 8).

Every public selection entry point x every bad input: each call must raise a
clear TypeError/ValueError that names the argument and the tensor (with the
user's name where ``names=`` is given), and leave every weight and mask
exactly as it was: same values, same version counters.
"""

from __future__ import annotations

import math
import re
import tempfile
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import pytest
import torch
import torch.distributed as dist

import obd_ext
from obd_ext import distributed as D

NAMES = ["a", "b"]


@dataclass
class Case:
    ws: list
    hs: list
    ms: Optional[list]
    names: Optional[list] = field(default_factory=lambda: list(NAMES))
    k: Optional[int] = 3
    sparsity: Optional[float] = None
    nonfinite: str = "error"
    factor: Optional[float] = 0.0
    dim: int = 0


def fresh() -> Case:
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(4, 8, generator=g), torch.randn(6, 8, generator=g)]
    hs = [torch.rand(w.shape, generator=g) for w in ws]
    ms = [torch.ones(w.shape, dtype=torch.bool) for w in ws]
    return Case(ws, hs, ms)


@dataclass
class Entry:
    name: str
    call: Callable[[Case], object]
    single: bool = False       # one tensor (index 1 of the case)
    scores: bool = False       # precomputed scores: no weights
    takes_k: bool = True       # k accepted (else sparsity only, or neither)
    takes_count: bool = True   # k or sparsity accepted at all (N:M: neither)
    writes_weights: bool = True
    named: bool = True         # names= accepted


def _count(c: Case, e: Entry) -> dict:
    if not e.takes_count:
        return {}
    if e.takes_k and c.sparsity is None:
        return {"k": c.k}
    return {"sparsity": 0.5 if c.sparsity is None else c.sparsity}


def _i(xs, i=1):
    return xs if not isinstance(xs, list) else xs[i]


ENTRIES = [
    Entry("prune_global_", lambda c, e: obd_ext.prune_global_(c.ws, c.hs, masks=c.ms, names=c.names,
                                                              nonfinite=c.nonfinite, factor=c.factor, **_count(c, e))),
    Entry("select_global", lambda c, e: obd_ext.select_global(c.ws, c.hs, masks=c.ms, names=c.names,
                                                              nonfinite=c.nonfinite, **_count(c, e)),
          writes_weights=False),
    Entry("select_scores", lambda c, e: obd_ext.select_scores(c.hs, masks=c.ms, names=c.names,
                                                              nonfinite=c.nonfinite, **_count(c, e)),
          scores=True, writes_weights=False),
    Entry("prune_layers_", lambda c, e: obd_ext.prune_layers_(c.ws, c.hs, masks=c.ms, names=c.names,
                                                              nonfinite=c.nonfinite, factor=c.factor, **_count(c, e)),
          takes_k=False),
    Entry("prune_rows_", lambda c, e: obd_ext.prune_rows_(_i(c.ws), _i(c.hs), mask=None if c.ms is None else _i(c.ms),
                                                          name=None if c.names is None else _i(c.names),
                                                          nonfinite=c.nonfinite, factor=c.factor, **_count(c, e)),
          single=True),
    Entry("prune_nm_", lambda c, e: obd_ext.prune_nm_(_i(c.ws), _i(c.hs), "2:4", mask=None if c.ms is None else
                                                      _i(c.ms), name=None if c.names is None else _i(c.names),
                                                      nonfinite=c.nonfinite, factor=c.factor),
          single=True, takes_count=False),
    Entry("prune_groups_", lambda c, e: obd_ext.prune_groups_(c.ws, c.hs, masks=c.ms, names=c.names, dim=c.dim,
                                                              nonfinite=c.nonfinite, factor=c.factor, **_count(c, e))),
    Entry("prune_", lambda c, e: obd_ext.prune_(c.ws, c.hs, masks=c.ms, names=c.names, nonfinite=c.nonfinite,
                                                factor=c.factor, **_count(c, e)), takes_k=False),
    Entry("prune_ layer", lambda c, e: obd_ext.prune_(c.ws, c.hs, scope="layer", masks=c.ms, names=c.names,
                                                      nonfinite=c.nonfinite, factor=c.factor, **_count(c, e)),
          takes_k=False),
    Entry("prune_ row", lambda c, e: obd_ext.prune_(c.ws, c.hs, scope="row", masks=c.ms, names=c.names,
                                                    nonfinite=c.nonfinite, factor=c.factor, **_count(c, e)),
          takes_k=False),
    Entry("prune_ group", lambda c, e: obd_ext.prune_(c.ws, c.hs, scope="group", masks=c.ms, names=c.names,
                                                      nonfinite=c.nonfinite, factor=c.factor, dim=c.dim,
                                                      **_count(c, e)), takes_k=False),
    Entry("prune_ 2:4", lambda c, e: obd_ext.prune_(c.ws, c.hs, pattern="2:4", masks=c.ms, names=c.names,
                                                    nonfinite=c.nonfinite, factor=c.factor), takes_count=False),
    Entry("prune_global_sharded_", lambda c, e: D.prune_global_sharded_(c.ws, c.hs, masks=c.ms, nonfinite=c.nonfinite,
                                                                       factor=c.factor, **_count(c, e)),
          named=False),
    Entry("select_global_sharded", lambda c, e: D.select_global_sharded(c.ws, c.hs, masks=c.ms,
                                                                       nonfinite=c.nonfinite, **_count(c, e)),
          named=False, writes_weights=False),
]


def label(e: Entry, arg: str, i: int) -> str:
    """A regex for the tensor's label in ``e``'s messages."""
    if e.scores and arg == "curvature":
        arg = "scores"
    base = re.escape(arg if e.single else f"{arg}[{i}]") if not e.single else re.escape(
        {"weights": "weight", "masks": "mask"}.get(arg, arg))
    return base + (re.escape(f" ('{NAMES[i]}')") if e.named else "")


@dataclass
class Bad:
    name: str
    make: Callable[[Case], None]   # spoils a fresh case in place
    exc: type
    pattern: Callable[[Entry], str]
    applies: Callable[[Entry], bool] = lambda e: True


def _set(c: Case, attr: str, i: int, value) -> None:
    getattr(c, attr)[i] = value


def _nan_weight(c):
    c.ws[1][2, 3] = math.nan


def _inf_curv(c):
    c.hs[1][1, 5] = -math.inf


def _overlap_weights(c):
    base = torch.randn(8, 8)
    c.ws[0], c.ws[1] = base[:4], base[2:8]  # rows 2..3 in both


def _mask_on_weight(c):
    w = c.ws[1]
    c.ms[1] = torch.empty(0, dtype=torch.bool).set_(w.untyped_storage(), 0, w.shape, (8, 1))


def _keep_too_many(c):
    c.nonfinite = "keep"
    c.hs[0][:] = math.nan
    c.hs[1][:] = math.nan
    c.k, c.sparsity = 1, None


BADS: List[Bad] = [
    Bad("nan_in_weight", _nan_weight, ValueError,
        lambda e: label(e, "weights", 1) + r"[^;]* has a non-finite value \(nan\)", lambda e: not e.scores),
    Bad("inf_in_curvature", _inf_curv, ValueError,
        lambda e: label(e, "curvature", 1) + r"[^;]* has a non-finite value \(-inf\)"),
    Bad("int_weight", lambda c: _set(c, "ws", 1, c.ws[1].to(torch.int32)), TypeError,
        lambda e: label(e, "weights", 1) + " must be float32, float64, float16 or bfloat16, got torch.int32",
        lambda e: not e.scores),
    Bad("int_curvature", lambda c: _set(c, "hs", 1, c.hs[1].to(torch.int64)), TypeError,
        lambda e: label(e, "curvature", 1) + " must be float32, float64, float16 or bfloat16, got torch.int64"),
    Bad("float_mask", lambda c: _set(c, "ms", 1, c.ms[1].float()), TypeError,
        lambda e: label(e, "masks", 1) + r" must be a bool keep-mask \(True = kept\), got torch.float32"),
    Bad("curvature_shape", lambda c: _set(c, "hs", 1, torch.rand(8, 6)), ValueError,
        lambda e: label(e, "curvature", 1) + " must have the shape of " + label(e, "weights", 1)
        + r" \(6, 8\), got \(8, 6\)", lambda e: not e.scores),
    Bad("mask_shape", lambda c: _set(c, "ms", 1, torch.ones(6, 4, dtype=torch.bool)), ValueError,
        lambda e: label(e, "masks", 1) + r" must have the shape of .*\(6, 8\), got \(6, 4\)"),
    Bad("device", lambda c: _set(c, "hs", 1, c.hs[1].to("meta")), ValueError,
        lambda e: "every tensor must be on one device: .* on cpu, " + label(e, "curvature", 1) + " on meta"),
    Bad("two_weights_one_curvature", lambda c: c.hs.pop(), ValueError,
        lambda e: "weights and curvature must pair up one to one, got 2 weights and 1 curvature",
        lambda e: not (e.single or e.scores)),
    Bad("one_mask_for_two", lambda c: c.ms.pop(), ValueError,
        lambda e: "masks must have one tensor per .*: got 1 masks for 2 tensors", lambda e: not e.single),
    Bad("names_count", lambda c: c.names.pop(), ValueError,
        lambda e: "names must have one name per tensor, got 1 names for 2 tensors",
        lambda e: e.named and not e.single),
    Bad("duplicate_names", lambda c: _set(c, "names", 1, "a"), ValueError,
        lambda e: r"names\[0\] and names\[1\] are both 'a'", lambda e: e.named and not e.single),
    Bad("names_a_string", lambda c: setattr(c, "names", "ab"), TypeError,
        lambda e: "names must be a list of str, got str", lambda e: e.named and not e.single),
    Bad("name_not_str", lambda c: _set(c, "names", 1, 7), TypeError,
        lambda e: ("name" if e.single else r"names\[1\]") + " must be a str, got int", lambda e: e.named),
    Bad("single_tensor_not_list", lambda c: setattr(c, "ws", c.ws[0]), TypeError,
        lambda e: "weights must be a list of tensors, got a single Tensor", lambda e: not (e.single or e.scores)),
    Bad("same_weight_twice", lambda c: (_set(c, "ws", 1, c.ws[0]), _set(c, "hs", 1, c.hs[0]),
                                        _set(c, "ms", 1, c.ms[0].clone())), ValueError,
        lambda e: label(e, "weights", 0) + " and " + label(e, "weights", 1) + " are the same tensor",
        lambda e: not (e.single or e.scores)),
    Bad("same_mask_twice", lambda c: (_set(c, "ws", 1, c.ws[1][:4]), _set(c, "hs", 1, c.hs[1][:4]),
                                      _set(c, "ms", 1, c.ms[0])), ValueError,
        lambda e: label(e, "masks", 0) + " and " + label(e, "masks", 1) + " are the same tensor",
        lambda e: not e.single),
    Bad("overlapping_weight_views", _overlap_weights, ValueError,
        lambda e: label(e, "weights", 0) + " and " + label(e, "weights", 1) + r" share memory \(overlapping views\)",
        lambda e: not (e.single or e.scores)),
    Bad("mask_on_weight_memory", _mask_on_weight, ValueError,
        lambda e: label(e, "weights", 1) + " and " + label(e, "masks", 1) + r" share memory",
        lambda e: not e.scores),
    Bad("curvature_is_weight", lambda c: _set(c, "hs", 1, c.ws[1]), ValueError,
        lambda e: label(e, "weights", 1) + " and " + label(e, "curvature", 1) + " are the same tensor",
        lambda e: e.writes_weights),
    Bad("expanded_mask", lambda c: _set(c, "ms", 1, torch.ones(1, 8, dtype=torch.bool).expand(6, 8)), ValueError,
        lambda e: label(e, "masks", 1) + r" has elements that share memory"),
    Bad("sparsity_above_1", lambda c: setattr(c, "sparsity", 1.5), ValueError,
        lambda e: r"sparsity must be a number in \[0, 1\], got 1.5", lambda e: e.takes_count),
    Bad("sparsity_nan", lambda c: setattr(c, "sparsity", math.nan), ValueError,
        lambda e: r"sparsity must be a number in \[0, 1\], got nan", lambda e: e.takes_count),
    Bad("k_too_large", lambda c: setattr(c, "k", 10**6), ValueError,
        lambda e: r"k must be in \[0, \d+\] \(.*\), got 1000000", lambda e: e.takes_k and e.takes_count),
    Bad("k_negative", lambda c: setattr(c, "k", -1), ValueError,
        lambda e: r"k must be in \[0, \d+\] \(.*\), got -1", lambda e: e.takes_k and e.takes_count),
    Bad("k_float", lambda c: setattr(c, "k", 2.5), ValueError,
        lambda e: r"k must be an integer, got 2.5", lambda e: e.takes_k and e.takes_count),
    Bad("empty_lists_k1", lambda c: (c.ws.clear(), c.hs.clear(), c.ms.clear(), c.names and c.names.clear(),
                                     setattr(c, "k", 1)), ValueError,
        lambda e: r"k must be in \[0, 0\]", lambda e: e.takes_k and e.takes_count and not e.single),
    Bad("nonfinite_word", lambda c: setattr(c, "nonfinite", "drop"), ValueError,
        lambda e: "nonfinite must be 'error' or 'keep', got 'drop'"),
    Bad("factor_inf", lambda c: setattr(c, "factor", math.inf), ValueError,
        lambda e: r"factor must be a finite number .*got inf", lambda e: e.writes_weights),
    Bad("keep_too_many_nonfinite", _keep_too_many, ValueError,
        lambda e: r"only 0 of \d+ .*can be deleted|too few finite entries",
        lambda e: e.takes_count and not e.scores or e.name in ("prune_nm_", "prune_ 2:4")),
    Bad("nm_shape", lambda c: (_set(c, "ws", 1, torch.randn(6, 6)), _set(c, "hs", 1, torch.rand(6, 6)),
                               _set(c, "ms", 1, torch.ones(6, 6, dtype=torch.bool))), ValueError,
        lambda e: "pattern '2:4' needs the input dimension \\(dim 1\\) of " + label(e, "weights", 1)
        + r" to be a multiple of 4, got shape \(6, 6\)", lambda e: e.name in ("prune_nm_", "prune_ 2:4")),
    Bad("group_dim", lambda c: setattr(c, "dim", 2), ValueError,
        lambda e: "dim=2 is out of range for " + label(e, "weights", 0) + r" of shape \(4, 8\)",
        lambda e: e.name in ("prune_groups_", "prune_ group")),
]


@pytest.fixture(scope="module")
def process_group():
    """A one-process gloo group for the sharded entry points, torn down after this module."""
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def _snapshot(c: Case):
    tensors = []
    for xs in (c.ws, c.hs, c.ms or []):
        for t in (xs if isinstance(xs, list) else [xs]):
            if isinstance(t, torch.Tensor):
                tensors.append(t)
    return [(t, t.clone() if t.device.type != "meta" else None, t._version) for t in tensors]


CASES = [(e, b) for e in ENTRIES for b in BADS if b.applies(e)]


@pytest.mark.parametrize("entry,bad", CASES, ids=[f"{e.name}-{b.name}" for e, b in CASES])
def test_bad_input_raises_and_changes_nothing(entry, bad, process_group):
    c = fresh()
    if not entry.named:
        c.names = None
    bad.make(c)
    if not entry.named:
        c.names = None
    snap = _snapshot(c)
    pattern = bad.pattern(entry)
    with pytest.raises(bad.exc, match=pattern):
        entry.call(c, entry)
    for t, before, version in snap:
        assert t._version == version, f"{entry.name}: a version counter changed despite the error"
        if before is not None:
            assert torch.equal(t, before) or (t.is_floating_point() and torch.equal(t.isnan(), before.isnan())
                                              and torch.equal(t.nan_to_num(), before.nan_to_num())), \
                f"{entry.name}: a tensor changed despite the error"


def test_matrix_covers_every_entry_point():
    # Every public selection function that takes tensors is in the matrix.
    public = {n for n in obd_ext.selection.__all__ if n.startswith(("prune", "select"))}
    public |= {n for n in D.__all__ if n.startswith(("prune", "select"))}
    assert public <= {e.name.split(" ")[0] for e in ENTRIES}
    assert len(CASES) > 250


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_good_input_works(entry, process_group):
    """The fresh case itself is valid for every entry point (so each bad case fails for its own reason)."""
    c = fresh()
    if not entry.named:
        c.names = None
    sel = entry.call(c, entry)
    assert isinstance(sel, obd_ext.Selection) and len(repr(sel)) < 300


def test_loosely_written_patterns_are_refused():
    w = torch.randn(4, 8)
    for bad in (" 2:4", "02:04", "2:4 ", "+2:4", "2: 4", 24):
        with pytest.raises(ValueError, match="pattern must be"):
            obd_ext.prune_nm_(w.clone(), torch.ones(4, 8), bad)


def test_scheduler_refuses_an_nm_pattern_a_layer_cannot_take_at_construction():
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 2))
    data = [(torch.randn(3, 6), torch.randn(3, 2))]
    with pytest.raises(ValueError, match=r"OBDScheduler: pattern '2:4' needs the input dimension \(dim 1\) of "
                                         r"parameter '0.weight'"):
        obd_ext.OBDScheduler(model, torch.nn.MSELoss(), data, lambda r: None, schedule=[0.5], pattern="2:4")
