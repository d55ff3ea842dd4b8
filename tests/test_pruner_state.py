"""Pruner state: every torch.optim optimizer keeps deleted weights frozen, tied weights,
masks that travel with the model, adoption of torch.nn.utils.prune, all-or-nothing calls."""

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import prune as torch_prune

import obd_ext
from obd_ext.pruning import ZERO_PRESERVING, Pruner


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _optimizers():
    """Every optimizer class torch.optim has, built for a list of parameters."""
    o = torch.optim
    table = {
        "SGD": lambda p: o.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True),
        "Adam": lambda p: o.Adam(p, lr=0.05, weight_decay=0.1, amsgrad=True),
        "AdamW": lambda p: o.AdamW(p, lr=0.05, weight_decay=0.5),
        "Adamax": lambda p: o.Adamax(p, lr=0.05, weight_decay=0.1),
        "NAdam": lambda p: o.NAdam(p, lr=0.05, weight_decay=0.1, decoupled_weight_decay=True),
        "RAdam": lambda p: o.RAdam(p, lr=0.05, weight_decay=0.1),
        "Adagrad": lambda p: o.Adagrad(p, lr=0.1, initial_accumulator_value=0.1, weight_decay=0.1),
        "Adadelta": lambda p: o.Adadelta(p, lr=1.0, weight_decay=0.1),
        "RMSprop": lambda p: o.RMSprop(p, lr=0.01, momentum=0.5, centered=True, weight_decay=0.1),
        "Rprop": lambda p: o.Rprop(p, lr=0.01),
        "ASGD": lambda p: o.ASGD(p, lr=0.1, t0=0, weight_decay=0.1),
        "LBFGS": lambda p: o.LBFGS(p, lr=0.5, history_size=5, max_iter=4),
    }
    if hasattr(o, "Adafactor"):
        table["Adafactor"] = lambda p: o.Adafactor(p, lr=0.05, weight_decay=0.1)
    if hasattr(o, "Muon"):
        table["Muon"] = lambda p: o.Muon([q for q in p if q.dim() == 2], lr=0.05)
    return table


OPTS = _optimizers()


def test_every_torch_optimizer_is_covered():
    """A new optimizer in torch.optim must be added to the property test below."""
    classes = {n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type)
               and issubclass(getattr(torch.optim, n), torch.optim.Optimizer) and n != "Optimizer"}
    assert classes - {"SparseAdam"} <= set(OPTS), sorted(classes - set(OPTS))


@pytest.mark.parametrize("name", list(OPTS))
@pytest.mark.parametrize("warmup", [0, 3])
def test_deleted_weights_stay_zero_inside_and_after_every_step(name, warmup):
    """History built before prune() (LBFGS's flat history, Adam's moments) must not revive anything,
    not even inside an LBFGS step (its closure sees the weights)."""
    model = _mlp(1)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    params = list(model.parameters())
    opt = OPTS[name](params)
    pruner = Pruner(model)
    checking = {"on": False, "evals": 0}

    def closure():
        if checking["on"]:
            checking["evals"] += 1
            for k, m in pruner.masks.items():
                assert (model.get_parameter(k)[~m] == 0).all(), f"{name}: {k} revived inside the step"
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(warmup):  # state and history from before the masks exist
        opt.step(closure)
    pruner.attach(opt)
    pruner.prune(0.6, method="magnitude")
    checking["on"] = True
    for _ in range(5):
        opt.step(closure)
        for k, m in pruner.masks.items():
            p = model.get_parameter(k)
            assert (p[~m] == 0).all(), f"{name}: {k} revived by the step"
            assert (p[m] != 0).any()  # the kept weights do train
    assert checking["evals"] >= 5


def test_zero_preserving_optimizers_need_no_step_hook():
    """The proof behind the free fast path: with masked gradients alone (no re-zeroing after the
    step), each optimizer in ZERO_PRESERVING leaves deleted weights and their state at exactly zero."""
    for cls in ZERO_PRESERVING:
        model = _mlp(2)
        name = cls.__name__
        opt = OPTS[name](list(model.parameters()))
        pruner = Pruner(model)
        pruner.prune(0.5, method="magnitude")
        pruner.attach(opt)
        pruner._hooks[-1].remove()  # only the gradient masks remain
        x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
        for _ in range(6):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        for k, m in pruner.masks.items():
            p = model.get_parameter(k)
            assert (p[~m] == 0).all(), name
            for key in ("momentum_buffer", "exp_avg", "ax"):  # states that carry an update: stay zero
                v = opt.state[p].get(key)
                if torch.is_tensor(v) and v.shape == p.shape:
                    assert not v[~m].any(), (name, k, key)
            # (denominators such as Adamax's exp_inf = eps or Adagrad's initial accumulator are
            # positive there; they divide a zero, which is why the weight stays zero)


def test_sparse_adam_is_refused_before_anything_changes():
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True))
    pruner = Pruner(model)
    with pytest.raises(ValueError, match="SparseAdam"):
        pruner.attach(torch.optim.SparseAdam(model.parameters()))
    assert not pruner._optimizers


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(12, 6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 12, bias=False)
        self.head.weight = self.emb.weight  # tied, as in GPT-2 and many LMs

    def forward(self, t):
        return self.head(torch.tanh(self.mid(self.emb(t))))


def test_tied_weights_are_pruned_once_under_every_name():
    model = _Tied()
    pruner = Pruner(model)
    assert pruner.names == ["emb.weight", "mid.weight"]
    assert pruner.aliases["head.weight"] == "emb.weight"
    h = {"head.weight": torch.rand(12, 6), "mid.weight": torch.rand(6, 6)}  # curvature under the other name
    sel = pruner.prune(0.5, method="obd", curvature=h)
    total = 12 * 6 + 6 * 6
    assert sel.deleted_now == round(0.5 * total)
    assert model.head.weight is model.emb.weight
    assert (model.head.weight[~pruner.masks["emb.weight"]] == 0).all()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    pruner.attach(opt)
    t = torch.randint(0, 12, (4, 5))
    for _ in range(3):
        opt.zero_grad()
        model(t).square().mean().backward()
        opt.step()
    assert (model.emb.weight[~pruner.masks["emb.weight"]] == 0).all()


def test_tied_names_listed_twice_are_one_parameter():
    model = _Tied()
    pruner = Pruner(model, params=["emb.weight", "head.weight"])
    assert pruner.names == ["emb.weight"] and len(pruner.masks) == 1


@pytest.mark.parametrize("params, match", [
    ([], "no parameters to prune"),
    (["0.weight", "0.weight"], "each name may appear once"),
    (["0.weight", "nope"], "no parameter named 'nope'"),
])
def test_bad_params_change_nothing(params, match):
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        Pruner(model, params=params)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_less_sparsity_than_already_deleted_is_an_error():
    model = _mlp()
    pruner = Pruner(model)
    pruner.prune(0.5, method="magnitude")
    before = pruner.state_dict()
    with pytest.raises(ValueError, match="below the 0.5 already deleted.*revive"):
        pruner.prune(0.3, method="magnitude")
    assert all(torch.equal(before[k], m) for k, m in pruner.masks.items())
    pruner.prune(0.5, method="magnitude")  # the same target is fine (schedules repeat it)
    pruner.revive()
    pruner.prune(0.3, method="magnitude")
    assert pruner.sparsity == pytest.approx(round(0.3 * 72) / 72)  # the two weights: 48 + 24


def test_nm_pattern_with_conflicting_sparsity_is_an_error():
    model = nn.Sequential(nn.Linear(8, 4))
    pruner = Pruner(model)
    with pytest.raises(ValueError, match="conflicts"):
        pruner.prune(0.7, method="magnitude", pattern="2:4")
    pruner.prune(method="magnitude", pattern="2:4")
    obd_ext.check_nm_pattern(model[0].weight, "2:4")


def test_masks_travel_with_the_state_dict_to_a_fresh_process(tmp_path):
    model = _mlp()
    pruner = Pruner(model)
    pruner.prune(0.7, method="magnitude")
    pruner.finalize()
    torch.save(model.state_dict(), tmp_path / "pruned.pt")
    torch.save(pruner.state_dict(), tmp_path / "masks.pt")
    script = f"""
import torch, torch.nn as nn, warnings, obd_ext
torch.manual_seed(5)
model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
model.load_state_dict(torch.load({str(tmp_path / 'pruned.pt')!r}))
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    obd_ext.Pruner(model)
    assert any("adopt_zeros=True" in str(x.message) for x in w), "no warning about the zeros"
pruner = obd_ext.Pruner(model, adopt_zeros=True)
expected = torch.load({str(tmp_path / 'masks.pt')!r})
assert all(torch.equal(pruner.masks[k], expected[k]) for k in expected)
opt = torch.optim.Adam(model.parameters(), lr=0.1)
pruner.attach(opt)
x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
for _ in range(3):
    opt.zero_grad(); nn.functional.cross_entropy(model(x), y).backward(); opt.step()
assert all((model.get_parameter(k)[~m] == 0).all() for k, m in pruner.masks.items())
print("ok", pruner)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok Pruner(2 parameters")


def test_masks_travel_through_save_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    pruner = Pruner(model)  # GPT-2's Conv1D layers are not default-prunable; its tied embedding is
    assert "transformer.wte.weight" in pruner.names and "lm_head.weight" not in pruner.names
    pruner.prune(0.5, method="magnitude")
    masks = pruner.state_dict()
    pruner.finalize()
    model.save_pretrained(tmp_path)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    again = Pruner(loaded, adopt_zeros=True)
    assert all(torch.equal(again.masks[k], masks[k]) for k in masks)


def test_adopts_a_model_pruned_with_torch_nn_utils_prune():
    model = _mlp()
    torch_prune.l1_unstructured(model[0], "weight", amount=0.5)
    torch_prune.random_unstructured(model[2], "weight", amount=0.25)
    torch_masks = {"0.weight": model[0].weight_mask.bool().clone(), "2.weight": model[2].weight_mask.bool().clone()}
    x = torch.randn(4, 6)
    out = model(x)
    pruner = Pruner(model)
    assert pruner.names == ["0.weight", "2.weight"]
    assert all(torch.equal(pruner.masks[k], torch_masks[k]) for k in torch_masks)
    assert not hasattr(model[0], "weight_orig") and isinstance(model[0].weight, nn.Parameter)
    torch.testing.assert_close(model(x), out)
    pruner.prune(0.6, method="magnitude")  # more, on top of torch's
    assert all((~pruner.masks[k] >= ~torch_masks[k]).all() for k in torch_masks)


def test_finalize_is_all_or_nothing():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    model[1].to(torch.bfloat16)
    pruner = Pruner(model)
    pruner.prune(0.5, method="magnitude")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="1.weight: torch's CPU CSR matmul supports float32/float64 only"):
        pruner.finalize("csr")
    assert model[0].weight.layout == torch.strided  # layer 0 was not converted
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert pruner._hooks  # and the hooks are still there


def test_repr_summarises():
    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512))
    pruner = Pruner(model)
    pruner.prune(0.25, method="magnitude")
    r = repr(pruner)
    assert len(r) < 200 and "sparsity 0.2500" in r and "2 parameters" in r


def test_gradient_masking_allocates_no_mask_per_backward():
    """The grad hook masks in place with a mask kept from prune(): no conversion per backward."""
    model = _mlp()
    pruner = Pruner(model)
    pruner.prune(0.5, method="magnitude")
    deleted = dict(pruner._deleted)
    model(torch.randn(3, 6)).sum().backward()
    assert all(pruner._deleted[k] is deleted[k] for k in deleted)
    for k, m in pruner.masks.items():
        assert not model.get_parameter(k).grad[~m].any()


# ---------------------------------------------------------------------------
# The bad-input matrix for the Pruner's entry points: each call raises a clear
# error naming the argument, and no weight, mask, gradient hook, optimizer
# state or version counter changed.
# ---------------------------------------------------------------------------

def _snapshot(model, pruner, opt):
    return {
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "versions": {k: p._version for k, p in model.named_parameters()},
        "masks": {k: m.clone() for k, m in pruner.masks.items()},
        "hooks": len(pruner._hooks),
        "state": {id(p): {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for p, s in opt.state.items()},
    }


def _same(a, b):
    assert a["weights"].keys() == b["weights"].keys()
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    assert a["versions"] == b["versions"]
    assert all(torch.equal(a["masks"][k], b["masks"][k]) for k in a["masks"])
    assert a["hooks"] == b["hooks"]
    assert a["state"].keys() == b["state"].keys()
    for p in a["state"]:
        assert all(torch.equal(a["state"][p][k], b["state"][p][k]) for k in a["state"][p])


def _h(model, **override):
    h = {k: torch.rand_like(p) for k, p in model.named_parameters() if k.endswith("weight")}
    h.update(override)
    return h


BAD_CALLS = {
    "prune: sparsity > 1": (lambda m, p: p.prune(1.5, method="magnitude"), ValueError, "sparsity"),
    "prune: sparsity NaN": (lambda m, p: p.prune(float("nan"), method="magnitude"), ValueError, "sparsity"),
    "prune: sparsity str": (lambda m, p: p.prune("0.5", method="magnitude"), ValueError, "sparsity"),
    "prune: unknown method": (lambda m, p: p.prune(0.5, method="taylor"), ValueError, "method"),
    "prune: layer-wise method": (lambda m, p: p.prune(0.5, method="layerwise-obd"), ValueError, "method"),
    "prune: unknown scope": (lambda m, p: p.prune(0.5, method="magnitude", scope="nm"), ValueError, "scope"),
    "prune: bad pattern": (lambda m, p: p.prune(0.5, method="magnitude", pattern="4:2"), ValueError, "pattern"),
    "prune: pattern vs sparsity": (lambda m, p: p.prune(0.7, method="magnitude", pattern="2:4"), ValueError,
                                   "conflicts"),
    "prune: no curvature": (lambda m, p: p.prune(0.5, method="obd"), ValueError, "curvature"),
    "prune: curvature not a mapping": (lambda m, p: p.prune(0.5, method="obd", curvature=[1]), TypeError,
                                       "curvature"),
    "prune: curvature missing a name": (lambda m, p: p.prune(0.5, method="obd", curvature={"0.weight": None}),
                                        ValueError, "2.weight"),
    "prune: curvature wrong shape": (lambda m, p: p.prune(0.5, method="obd", curvature=_h(
        m, **{"2.weight": torch.rand(3)})), ValueError, "2.weight"),
    "prune: NaN in the second curvature": (lambda m, p: p.prune(0.5, method="obd", curvature=_h(
        m, **{"2.weight": torch.full((3, 8), float("nan"))})), ValueError, "2.weight"),
    "prune: int curvature": (lambda m, p: p.prune(0.5, method="obd", curvature=_h(
        m, **{"2.weight": torch.ones(3, 8, dtype=torch.int64)})), TypeError, "2.weight"),
    "prune: less than deleted": (lambda m, p: p.prune(0.1, method="magnitude"), ValueError, "revive"),
    "prune: random with row scope": (lambda m, p: p.prune(0.5, method="random", scope="row"), ValueError,
                                     "random"),
    "finalize: unknown format": (lambda m, p: p.finalize("coo"), ValueError, "format"),
    "finalize: 2:4 on an unstructured model": (lambda m, p: p.finalize("semi_structured"), ValueError,
                                                "0.weight"),
    "load_state_dict: missing mask": (lambda m, p: p.load_state_dict({"0.weight": p.masks["0.weight"]}), KeyError,
                                      "2.weight"),
    "load_state_dict: float mask": (lambda m, p: p.load_state_dict(
        {k: v.float() for k, v in p.masks.items()}), TypeError, "bool"),
    "load_state_dict: wrong shape": (lambda m, p: p.load_state_dict(
        {k: v[:1] for k, v in p.masks.items()}), ValueError, "shape"),
    "load_state_dict: unknown name": (lambda m, p: p.load_state_dict(
        dict(p.masks, **{"1.weight": torch.ones(2, dtype=torch.bool)})), KeyError, "1.weight"),
    "attach: SparseAdam": (lambda m, p: p.attach(torch.optim.SparseAdam([nn.Parameter(torch.ones(2))])),
                           ValueError, "SparseAdam"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_changes_nothing(case):
    call, error, word = BAD_CALLS[case]
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    pruner = Pruner(model).attach(opt)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    pruner.prune(0.3, method="magnitude")
    before = _snapshot(model, pruner, opt)
    with pytest.raises(error, match=word):
        call(model, pruner)
    _same(before, _snapshot(model, pruner, opt))


@pytest.mark.parametrize("factor", [None, 0.5])
def test_weights_left_or_shrunk_by_prune_are_zero_after_the_first_step(factor):
    """factor=None leaves deleted weights and 0.5 shrinks them; a zero-preserving optimizer would keep
    them at that value, so the first step after prune() zeroes them."""
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    pruner = Pruner(model).attach(opt)
    pruner.prune(0.5, method="magnitude", factor=factor)
    assert any((model.get_parameter(k)[~m] != 0).any() for k, m in pruner.masks.items())
    opt.zero_grad()
    nn.functional.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
    opt.step()
    assert all((model.get_parameter(k)[~m] == 0).all() for k, m in pruner.masks.items())


# --- the gradient hook: an integer AND with the keep-mask ---------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_grad_hook_zeroes_deleted_entries_exactly_and_keeps_the_rest_bit_for_bit(dtype):
    lin = nn.Linear(6, 4).to(dtype)
    pruner = Pruner(lin, ["weight"])
    pruner.prune(0.5, method="magnitude")
    keep = pruner.masks["weight"]
    g = torch.randn(4, 6).to(dtype)
    g[~keep] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0] * 3)[: int((~keep).sum())].to(dtype)
    lin.weight.grad = None
    lin.weight.backward(g)  # accumulates g as the gradient: the post-accumulate hook runs
    got = lin.weight.grad
    assert torch.equal(got[keep], g[keep])
    assert bool((got[~keep] == 0).all()) and not bool(torch.signbit(got[~keep]).any())  # +0.0, NaN/Inf included


def test_grad_hook_follows_in_place_edits_of_the_masks():
    lin = nn.Linear(5, 3)
    pruner = Pruner(lin, ["weight"])
    pruner.prune(0.4, method="magnitude")
    lin(torch.randn(2, 5)).sum().backward()  # builds the cached integer mask
    with torch.no_grad():
        lin.weight[0, 0] = 0.0
    pruner.masks["weight"][0, 0] = False  # an in-place edit: the cached mask must not be used
    lin.weight.grad = None
    lin(torch.randn(2, 5)).sum().backward()
    assert lin.weight.grad[0, 0] == 0 and bool((lin.weight.grad[~pruner.masks["weight"]] == 0).all())
    pruner.revive()  # masks replaced: every gradient entry flows again
    lin.weight.grad = None
    lin(torch.ones(2, 5)).sum().backward()
    assert bool((lin.weight.grad != 0).all())


def test_sparse_gradient_is_a_clear_error():
    emb = nn.Embedding(10, 4, sparse=True)
    pruner = Pruner(emb, ["weight"])
    pruner.prune(0.5, method="magnitude")
    with pytest.raises(RuntimeError, match=r"gradient of 'weight' is torch.sparse_coo.*sparse=False"):
        emb(torch.tensor([1, 2])).sum().backward()
