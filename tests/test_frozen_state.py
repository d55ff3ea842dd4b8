"""Second moments held positive at deleted entries (obd_ext/frozen_state.py): free, invisible, released."""

import copy
import math

import pytest
import torch
import torch.nn as nn

from obd_ext import frozen_state
from obd_ext.pruning import Pruner

# Optimizers whose square-rooted state is held on the CPU, with the key, built on a parameter list.
HOLDING = {
    "adam": (lambda p: torch.optim.Adam(p, lr=0.05), "exp_avg_sq"),
    "adam-amsgrad": (lambda p: torch.optim.Adam(p, lr=0.05, amsgrad=True, weight_decay=0.1), "max_exp_avg_sq"),
    "adamw": (lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.5), "exp_avg_sq"),
    "nadam": (lambda p: torch.optim.NAdam(p, lr=0.05), "exp_avg_sq"),
    "radam": (lambda p: torch.optim.RAdam(p, lr=0.05), "exp_avg_sq"),
    "rmsprop-centered": (lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True), "square_avg"),
    "adagrad": (lambda p: torch.optim.Adagrad(p, lr=0.1), "sum"),
}


def _net(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _train(model, opt, steps, seed=1, after=None):
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=g).to(dtype), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step()
        if after is not None:
            after()


def _pruned(seed=0, make=None, sparsity=0.6, dtype=torch.float32, warmup=0):
    model = _net(seed, dtype)
    opt = make(list(model.parameters()))
    _train(model, opt, warmup, seed=7)
    pruner = Pruner(model).attach(opt)
    pruner.prune(sparsity, method="magnitude")
    return model, opt, pruner


def test_held_value_and_period_rules():
    assert frozen_state.held_value(torch.float32) == 2.0 ** -63
    assert frozen_state.held_value(torch.bfloat16) == 2.0 ** -63
    assert frozen_state.held_value(torch.float16) == 2.0 ** -7
    assert frozen_state.held_value(torch.float64) == 2.0 ** -511
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):  # exact in its own dtype
        c = frozen_state.held_value(dtype)
        assert torch.tensor(c, dtype=dtype).item() == c
    # half the headroom between 2^-63 and 2^-126, in steps of decay 0.999
    assert frozen_state.rearm_period(0.999, torch.float32) == int(63 * math.log(2) / (2 * -math.log(0.999)))
    assert frozen_state.rearm_period(1.0, torch.float32) == 0  # never decays (Adagrad)
    assert frozen_state.rearm_period(0.0, torch.float32) is None  # beta2 = 0: nothing to hold
    assert frozen_state.rearm_period(0.1, torch.float32) is None  # re-arming nearly every step: not worth it
    assert frozen_state.held_keys(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1)) == ()


@pytest.mark.parametrize("name", list(HOLDING))
def test_holding_changes_no_weight(name, monkeypatch):
    """The same training with held second moments and with zeros there: every weight bitwise equal."""
    make, key = HOLDING[name]
    model, opt, pruner = _pruned(make=make, warmup=2)
    ref_model, ref_opt, ref_pruner = _pruned(make=make, warmup=2)
    monkeypatch.setattr(frozen_state, "holds", lambda *args: None)  # the reference holds nothing: zeros
    ref_pruner.apply_masks()
    monkeypatch.undo()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        m = pruner.masks.get(next(k for k, v in model.named_parameters() if v is p))
        if m is not None:
            assert (opt.state[p][key][~m] == 2.0 ** -63).all()
            assert not ref_opt.state[q][key][~m].any()
    _train(model, opt, 12)
    with monkeypatch.context() as mp:
        mp.setattr(frozen_state, "holds", lambda *args: None)
        _train(ref_model, ref_opt, 12)
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), n
        if n in pruner.masks:
            assert not p[~pruner.masks[n]].any()
            held = opt.state[p][key][~pruner.masks[n]]
            assert (held >= torch.finfo(torch.float32).tiny).all() and (held <= 2.0 ** -63).all()


def test_rearmed_before_it_can_turn_subnormal():
    """beta2 = 0.3 gives a period of 18 steps: held values stay normal over several re-arms."""
    make = lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.9, 0.3))  # noqa: E731
    period = frozen_state.rearm_period(0.3, torch.float32)
    assert period == 18
    model, opt, pruner = _pruned(make=make)
    seen = []

    def check():
        for n, m in pruner.masks.items():
            p = model.get_parameter(n)
            v = opt.state[p]["exp_avg_sq"][~m]
            step = int(opt.state[p]["step"])
            assert (v >= torch.finfo(torch.float32).tiny).all(), (n, step)
            if (step - 1) % period == 0:
                assert (v == 2.0 ** -63).all(), (n, step)  # just re-armed
            seen.append(float(v.min()))

    _train(model, opt, 4 * period, after=check)
    # without re-arming it would be 2^-63 * 0.3^72, about 1e-57: zero in float32
    assert min(seen) < 2.0 ** -63 * 0.3 ** (period - 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_hold_their_own_value(dtype):
    make = lambda p: torch.optim.Adam(p, lr=0.01, eps=1e-3)  # noqa: E731
    model, opt, pruner = _pruned(make=make, dtype=dtype)
    _train(model, opt, 5)
    for n, m in pruner.masks.items():
        p = model.get_parameter(n)
        assert not p[~m].any()
        v = opt.state[p]["exp_avg_sq"][~m]
        assert v.dtype == dtype
        assert (v >= torch.finfo(dtype).tiny).all() and (v <= frozen_state.held_value(dtype)).all()


def test_revive_remove_hooks_and_finalize_release_held_state():
    make = HOLDING["adamw"][0]
    for release in ("revive", "remove_hooks", "finalize"):
        model, opt, pruner = _pruned(make=make, warmup=1)
        _train(model, opt, 3)
        deleted = {n: ~m.clone() for n, m in pruner.masks.items()}
        getattr(pruner, release)()
        for n, d in deleted.items():
            state = opt.state[model.get_parameter(n)]
            assert not state["exp_avg_sq"][d].any(), (release, n)
            assert not state["exp_avg"][d].any(), (release, n)


def test_resume_rearms_at_the_same_steps():
    """A run saved and resumed mid-way matches the straight run bitwise, optimizer state included."""
    make = lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.9, 0.3))  # noqa: E731  period 18
    model, opt, pruner = _pruned(make=make)
    _train(model, opt, 30, seed=3)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), pruner.state_dict()))
    _train(model, opt, 30, seed=4)

    model2 = _net(5)
    opt2 = make(list(model2.parameters()))
    pruner2 = Pruner(model2).attach(opt2)
    model2.load_state_dict(saved[0])
    pruner2.load_state_dict(saved[2])
    opt2.load_state_dict(saved[1])
    _train(model2, opt2, 30, seed=4)
    for (n, p), p2 in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, p2), n
        for key, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[p2][key]), (n, key)


def test_subclass_and_fast_decay_hold_zeros():
    class MyAdam(torch.optim.Adam):  # may use its state otherwise: zeros are always safe
        pass

    for make in (lambda p: MyAdam(p, lr=0.05), lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.9, 0.0))):
        model, opt, pruner = _pruned(make=make, warmup=2)
        _train(model, opt, 4)
        for n, m in pruner.masks.items():
            p = model.get_parameter(n)
            assert not p[~m].any()
            assert not opt.state[p]["exp_avg_sq"][~m].any()
