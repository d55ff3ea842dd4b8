"""Property tests (hypothesis): the kernels agree with the reference on arbitrary
pools, select exactly k, never bring entries back, and pruning in steps equals
pruning at once."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from obd_ext import ops, reference

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Few distinct magnitudes make ties (equal saliencies) common.
VALUES = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 3.0, 1e-3, -2.0, 1e4, 1e-30])


@st.composite
def pools(draw, max_tensors=4, max_elems=40):
    n_t = draw(st.integers(1, max_tensors))
    ws, hs, ms = [], [], []
    for _ in range(n_t):
        shape = tuple(draw(st.lists(st.integers(0, 5), min_size=1, max_size=3)))
        n = 1
        for s in shape:
            n *= s
        if n > max_elems:
            shape, n = (max_elems,), max_elems
        wd, hd = draw(st.sampled_from(DTYPES)), draw(st.sampled_from(DTYPES))
        w = torch.tensor(draw(st.lists(VALUES, min_size=n, max_size=n)), dtype=torch.float64).reshape(shape)
        h = torch.tensor(draw(st.lists(VALUES, min_size=n, max_size=n)), dtype=torch.float64).reshape(shape)
        m = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool).reshape(shape)
        if draw(st.booleans()):
            m.fill_(True)
        ws.append(w.to(wd))
        hs.append(h.to(hd))
        ms.append(m)
    return ws, hs, ms


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(pool=pools(), frac=st.floats(0, 1), factor=st.sampled_from([None, 0.0, 0.5]))
def test_global_matches_reference_and_is_exact(pool, frac, factor):
    ws, hs, ms = pool
    n = sum(h.numel() for h in hs)
    k = round(frac * n)
    wk, wr = [w.clone() for w in ws], [w.clone() for w in ws]
    mk, mr = [m.clone() for m in ms], [m.clone() for m in ms]
    st_k = ops.global_select_(wk, hs, mk, k, factor, False)
    reference.global_select_(wr, hs, mr, k, factor, False)
    assert all(torch.equal(a, b) for a, b in zip(mk, mr))
    assert all(torch.equal(a, b) for a, b in zip(wk, wr))
    before = sum(int((~m).sum()) for m in ms)
    after = sum(int((~m).sum()) for m in mk)
    assert after == max(k, before)
    assert int(st_k[0]) == after - before
    assert all(not (new & ~old).any() for old, new in zip(ms, mk))  # never brought back


@SETTINGS
@given(pool=pools(), f1=st.floats(0, 1), f2=st.floats(0, 1))
def test_steps_equal_one_shot(pool, f1, f2):
    ws, hs, _ = pool
    n = sum(h.numel() for h in hs)
    k1, k2 = sorted((round(f1 * n), round(f2 * n)))
    m_steps = [torch.ones_like(h, dtype=torch.bool) for h in hs]
    w_steps = [w.clone() for w in ws]
    ops.global_select_(w_steps, hs, m_steps, k1, 0.0, False)
    ops.global_select_(w_steps, hs, m_steps, k2, 0.0, False)
    m_once = [torch.ones_like(h, dtype=torch.bool) for h in hs]
    w_once = [w.clone() for w in ws]
    ops.global_select_(w_once, hs, m_once, k2, 0.0, False)
    assert all(torch.equal(a, b) for a, b in zip(m_steps, m_once))
    assert all(torch.equal(a, b) for a, b in zip(w_steps, w_once))


@SETTINGS
@given(rows=st.integers(0, 6), groups=st.integers(1, 4), m=st.sampled_from([1, 2, 4, 8]), data=st.data())
def test_rows_and_nm_match_reference(rows, groups, m, data):
    cols = groups * m
    n = data.draw(st.integers(0, m))
    k = data.draw(st.integers(0, cols))
    dt = data.draw(st.sampled_from(DTYPES))
    w = torch.tensor(data.draw(st.lists(VALUES, min_size=rows * cols, max_size=rows * cols)), dtype=dt)
    h = torch.tensor(data.draw(st.lists(VALUES, min_size=rows * cols, max_size=rows * cols)), dtype=dt)
    w, h = w.reshape(rows, cols), h.reshape(rows, cols)
    mask = torch.rand(rows, cols) > 0.2
    for op, ref, args in [(ops.row_select_, reference.row_select_, (k,)), (ops.nm_select_, reference.nm_select_, (n, m))]:
        wk, wr, mk, mr = w.clone(), w.clone(), mask.clone(), mask.clone()
        op(wk, h, mk, *args, 0.0, False)
        ref(wr, h, mr, *args, 0.0, False)
        assert torch.equal(mk, mr) and torch.equal(wk, wr)
