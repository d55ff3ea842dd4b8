"""The mutating ops and prune_* functions are real in-place operations.

Like torch's own in-place ops they bump the version counter of every tensor
they write, so autograd refuses a backward through a graph that saved a
pruned weight (instead of silently using the pruned values); in grad mode
they refuse to write a tensor that requires grad. Checked in eager mode,
under torch.compile (functionalization) and with torch.library.opcheck.
"""

import pytest
import torch

import obd_ext
from obd_ext import ops
from testing import param_device, require_kernels

MODIFIED = "modified by an inplace operation"


def _pair(device, shape=(6, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device), torch.rand(shape, generator=g).to(device)


# Every public call that writes weights, as (name, fn(weight, curvature, mask)).
PRUNERS = [
    ("prune_global_", lambda w, h, m: obd_ext.prune_global_([w], [h], sparsity=0.5, masks=[m])),
    ("prune_layers_", lambda w, h, m: obd_ext.prune_layers_([w], [h], sparsity=0.5, masks=[m])),
    ("prune_rows_", lambda w, h, m: obd_ext.prune_rows_(w, h, sparsity=0.5, mask=m)),
    ("prune_nm_", lambda w, h, m: obd_ext.prune_nm_(w, h, "2:4", mask=m)),
    ("prune_groups_", lambda w, h, m: obd_ext.prune_groups_([w], [h], k=2, masks=[m])),
    ("prune_ global", lambda w, h, m: obd_ext.prune_([w], [h], sparsity=0.5, masks=[m])),
    ("prune_ layer", lambda w, h, m: obd_ext.prune_([w], [h], sparsity=0.5, scope="layer", masks=[m])),
    ("prune_ row", lambda w, h, m: obd_ext.prune_([w], [h], sparsity=0.5, scope="row", masks=[m])),
    ("prune_ group", lambda w, h, m: obd_ext.prune_([w], [h], sparsity=0.5, scope="group", masks=[m])),
    ("prune_ 2:4", lambda w, h, m: obd_ext.prune_([w], [h], pattern="2:4", masks=[m])),
    ("prune_ factor", lambda w, h, m: obd_ext.prune_global_([w], [h], k=5, masks=[m], factor=0.5)),
]


@param_device
@pytest.mark.parametrize("name,fn", PRUNERS, ids=[p[0] for p in PRUNERS])
def test_backward_through_saved_weight_raises(device, name, fn):
    require_kernels(device)
    w0, h = _pair(device)
    w = w0.clone().requires_grad_()
    m = torch.ones_like(w, dtype=torch.bool)
    loss = (w * w).sum()  # mul saves w
    v_w, v_m = w._version, m._version
    with torch.no_grad():  # how a training loop calls it (the functions also work without)
        fn(w, h, m)
    assert w._version > v_w and m._version > v_m
    assert not m.all() and (w.detach()[~m] == 0).all() or name == "prune_ factor"
    with pytest.raises(RuntimeError, match=MODIFIED):
        loss.backward()
    # The same with a parameter outside no_grad: the functions write without recording.
    p = torch.nn.Parameter(w0.clone())
    loss = (p * p).sum()
    fn(p, h, torch.ones_like(m))
    with pytest.raises(RuntimeError, match=MODIFIED):
        loss.backward()


@param_device
def test_same_as_torch_in_place(device):
    """The pruned weight behaves as if torch's masked_fill_ had written it."""
    require_kernels(device)
    w0, h = _pair(device)
    ours, theirs = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    loss_ours, loss_theirs = (ours * 2).sum(), (theirs * theirs).sum()
    with torch.no_grad():
        sel = obd_ext.prune_global_([ours], [h], sparsity=0.5)
        theirs.masked_fill_(~sel.masks[0], 0.0)
    assert ours._version == theirs._version == 1
    loss_ours.backward()  # mul by a constant saved nothing: fine, as for torch
    with pytest.raises(RuntimeError, match=MODIFIED):
        loss_theirs.backward()


@param_device
def test_select_functions_leave_versions_alone(device):
    """Calls that write no weight keep the weight's version (a saved graph stays valid)."""
    require_kernels(device)
    w0, h = _pair(device)
    w = w0.clone().requires_grad_()
    loss = (w * w).sum()
    m = torch.ones_like(w, dtype=torch.bool)
    obd_ext.select_global([w], [h], sparsity=0.5, masks=[m])
    obd_ext.prune_global_([w], [h], sparsity=0.5, factor=None)
    obd_ext.prune_rows_(w, h, k=2, factor=None)
    assert w._version == 0 and m._version == 0 and m.all()
    loss.backward()
    torch.testing.assert_close(w.grad, 2 * w0)
    # scores: only the mask is written, and it is bumped
    s = torch.rand(10, device=device)
    sm = torch.ones(10, dtype=torch.bool, device=device)
    obd_ext.select_scores([s], k=3, masks=[sm])
    assert sm._version == 1 and s._version == 0


@param_device
def test_ops_bump_and_refuse_grad_mode(device):
    require_kernels(device)
    w, h = _pair(device, (4, 8))
    m = torch.ones_like(w, dtype=torch.bool)
    for call in (lambda: ops.global_select_([w], [h], [m], 5, 0.0, False),
                 lambda: ops.row_select_(w, h, m, 2, 0.0, False),
                 lambda: ops.nm_select_(w, h, m, 2, 4, 0.0, False)):
        v = w._version, m._version
        call()
        assert w._version == v[0] + 1 and m._version == v[1] + 1
    acc = torch.zeros(8, device=device)
    ops.column_sq_sum_(acc, w)
    assert acc._version == 1
    # A failing call changes nothing, so it bumps nothing.
    v = w._version, m._version
    with pytest.raises(RuntimeError):
        ops.global_select_([w], [h], [m], 10**6, 0.0, False)
    assert (w._version, m._version) == v
    # Grad mode and a weight that requires grad: refused, as torch refuses in-place ops on such leaves.
    p = torch.randn(4, 8, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="writes a tensor that requires grad in place"):
        ops.row_select_(p, h, torch.ones_like(m), 2, 0.0, False)
    assert p._version == 0
    with torch.no_grad():
        ops.row_select_(p, h, torch.ones_like(m), 2, 0.0, False)
    assert p._version == 1


def test_inference_tensors():
    w, h = _pair("cpu")
    with torch.inference_mode():
        wi, mi = w.clone(), torch.ones_like(w, dtype=torch.bool)
        obd_ext.prune_global_([wi], [h], sparsity=0.5, masks=[mi])  # inside inference mode: fine
        assert int((~mi).sum()) == 24
    before = wi.clone()
    with pytest.raises(RuntimeError, match="inference tensor outside InferenceMode"):
        ops.row_select_(wi, h, torch.ones_like(mi), 2, 0.0, False)
    assert torch.equal(wi, before)


@param_device
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_bumps_versions(device, backend):
    require_kernels(device)

    def step(w1, h1, w2, h2, m1, m2):
        st = ops.global_select_([w1], [h1], [m1], 20, 0.0, False)
        st2 = ops.row_select_(w2, h2, m2, 3, 0.0, False)
        return st + st2

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    w1, h1 = _pair(device, seed=1)
    w2, h2 = _pair(device, seed=2)
    eager = [w1.clone(), w2.clone(), torch.ones_like(w1, dtype=torch.bool), torch.ones_like(w2, dtype=torch.bool)]
    step(eager[0], h1, eager[1], h2, eager[2], eager[3])
    p1, p2 = w1.clone().requires_grad_(), w2.clone().requires_grad_()
    m1, m2 = torch.ones_like(w1, dtype=torch.bool), torch.ones_like(w2, dtype=torch.bool)
    loss = (p1 * p1).sum() + (p2 * p2).sum()
    with torch.no_grad():
        compiled(p1, h1, p2, h2, m1, m2)
    for got, want in zip((p1.detach(), p2.detach(), m1, m2), eager):
        assert torch.equal(got, want)
    assert min(p1._version, p2._version, m1._version, m2._version) >= 1
    with pytest.raises(RuntimeError, match=MODIFIED):
        loss.backward()


def test_compile_public_function():
    w, h = _pair("cpu")
    p = w.clone().requires_grad_()
    loss = (p * p).sum()
    compiled = torch.compile(obd_ext.prune_global_, backend="aot_eager")
    with torch.no_grad():
        sel = compiled([p], [h], sparsity=0.5)
    ref = obd_ext.prune_global_([w.clone()], [h], sparsity=0.5)
    assert torch.equal(sel.masks[0], ref.masks[0]) and p._version >= 1
    with pytest.raises(RuntimeError, match=MODIFIED):
        loss.backward()


@param_device
def test_opcheck_mutating_ops(device):
    """opcheck (schema, fake, autograd registration, dynamo) on every mutating op, also with grad-requiring
    weights under no_grad (how the prune_* functions call them)."""
    require_kernels(device)
    w, h = _pair(device, (4, 8))
    for rg in (False, True):
        ww = w.clone().requires_grad_(rg)
        m = torch.ones_like(w, dtype=torch.bool)
        with torch.no_grad():
            torch.library.opcheck(torch.ops.obd_ext.global_select_.default, ([ww], [h], [m], 9, 0.0, False))
            torch.library.opcheck(torch.ops.obd_ext.global_select_.default, ([ww], [h], [m], 9, None, False))
            torch.library.opcheck(torch.ops.obd_ext.row_select_.default, (ww, h, m, 2, 0.5, False))
            torch.library.opcheck(torch.ops.obd_ext.nm_select_.default, (ww, h, m, 2, 4, 0.0, False))
    torch.library.opcheck(torch.ops.obd_ext.column_sq_sum_.default, (torch.zeros(8, device=device), w))


def test_every_mutable_schema_is_registered():
    for name in ("global_select_", "row_select_", "nm_select_", "column_sq_sum_"):
        schema = getattr(torch.ops.obd_ext, name).default._schema
        assert schema.is_mutable and name in ops.MUTATING_OPS
