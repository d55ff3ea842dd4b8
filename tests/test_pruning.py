"""Pruner: deleted weights stay exactly zero through any optimizer; selection criteria; persistence."""

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import obd_ext
from obd_ext.pruning import Pruner, default_prunable

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.05),
    "adam-wd": lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.1),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.5),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1),
}

# The second moments held at 2^-63 (not zero) at deleted float32 entries on the CPU, by optimizer.
HELD = {"adam": {"exp_avg_sq"}, "adam-wd": {"exp_avg_sq"}, "adamw": {"exp_avg_sq"}, "rmsprop": {"square_avg"},
        "adagrad": {"sum"}}


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(opt=st.sampled_from(list(OPTIMIZERS)), warmup=st.integers(0, 3), steps=st.integers(1, 6),
       sparsity=st.floats(0, 1), method=st.sampled_from(["magnitude", "random", "obd"]), seed=st.integers(0, 5))
def test_deleted_weights_stay_exactly_zero(opt, warmup, steps, sparsity, method, seed):
    """Pruning after some training (momentum and moments already built up) and training on."""
    model = net(seed)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    optimizer = OPTIMIZERS[opt](model.parameters())
    for _ in range(warmup):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    pruner = Pruner(model)
    curv = obd_ext.hessian_diag(model, nn.CrossEntropyLoss(), (x, y), method="lm", progress=False) \
        if method == "obd" else None
    pruner.attach(optimizer)
    pruner.prune(sparsity, method=method, curvature=curv, generator=torch.Generator().manual_seed(seed))
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for name, m in pruner.masks.items():
            assert not model.get_parameter(name).grad[~m].any()  # masked gradients
        optimizer.step()
        for name, m in pruner.masks.items():
            p = model.get_parameter(name)
            assert (p[~m] == 0).all()
            for key, v in optimizer.state[p].items():
                if torch.is_tensor(v) and v.shape == p.shape:
                    if key in HELD.get(opt, ()):  # divides a zero update: held positive and normal (frozen_state)
                        assert (v[~m] >= torch.finfo(v.dtype).tiny).all() and (v[~m] <= 2.0 ** -63).all(), key
                    else:
                        assert not v[~m].any(), key
    total = sum(m.numel() for m in pruner.masks.values())
    assert sum(int((~m).sum()) for m in pruner.masks.values()) == round(sparsity * total)


def test_default_prunable_and_counts():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3), nn.LayerNorm(3))
    assert default_prunable(model) == ["0.weight", "3.weight"]
    pruner = Pruner(model)
    pruner.prune(0.5, method="magnitude")
    assert sum(pruner.counts().values()) == round(0.5 * (18 + 24))
    assert pruner.sparsity == pytest.approx(21 / 42)


def test_steps_keep_earlier_deletions_and_factor_variant():
    model = net()
    pruner = Pruner(model)
    pruner.prune(0.3, method="magnitude")
    first = pruner.state_dict()
    pruner.prune(0.6, method="magnitude")
    for k, m in pruner.masks.items():
        assert not (m & ~first[k]).any()
    w0 = {k: p.detach().clone() for k, p in model.named_parameters()}
    p2 = Pruner(net())
    model2 = p2.model
    before = {k: v.detach().clone() for k, v in model2.named_parameters()}
    p2.prune(0.5, method="magnitude", factor=0.5)
    for k, m in p2.masks.items():
        torch.testing.assert_close(model2.get_parameter(k)[~m], before[k][~m] * 0.5)
    p2.revive()
    assert p2.sparsity == 0.0
    assert w0  # the first model is untouched by the second pruner


def test_state_dict_roundtrip_and_deepcopy():
    model = net()
    pruner = Pruner(model)
    pruner.prune(0.5, method="magnitude")
    state = pruner.state_dict()
    other = Pruner(net(1))
    other.load_state_dict(state)
    for k in state:
        assert torch.equal(other.masks[k], state[k])
        assert (other.model.get_parameter(k)[~state[k]] == 0).all()
    clone = copy.deepcopy(model)
    assert all(torch.equal(a, b) for a, b in zip(clone.parameters(), model.parameters()))
    with pytest.raises(ValueError, match="has shape"):
        other.load_state_dict({k: v[:1] for k, v in state.items()})


def test_errors():
    model = net()
    pruner = Pruner(model)
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\], got 1.5"):
        pruner.prune(1.5, method="magnitude")
    with pytest.raises(ValueError, match="method must be one of"):
        pruner.prune(0.5, method="taylor")
    with pytest.raises(ValueError, match="not accepted by Pruner.prune"):
        pruner.prune(0.5, method="layerwise-obd")
    with pytest.raises(ValueError, match="needs curvature"):
        pruner.prune(0.5, method="obd")
    with pytest.raises(ValueError, match="no parameter named 'nope'"):
        Pruner(model, params=["nope"])


def test_torch_prune_method_and_importance_scores():
    from torch.nn.utils import prune

    from obd_ext.pruning import OBDUnstructured

    model = net()
    w = model[0].weight.detach().clone()
    h = torch.rand_like(w)
    OBDUnstructured.apply(model[0], "weight", amount=0.25, curvature=h)
    mask = model[0].weight_mask.bool()
    s = obd_ext.saliency(w, h)
    assert int((~mask).sum()) == round(0.25 * w.numel())
    assert s[~mask].max() <= s[mask].min()  # the lowest saliencies went
    OBDUnstructured.apply(model[0], "weight", amount=0.5, curvature=h)  # of the rest, as torch's methods do
    assert int((~model[0].weight_mask.bool()).sum()) == round(0.25 * w.numel()) + round(0.5 * round(0.75 * w.numel()))
    prune.remove(model[0], "weight")
    # the global form: OBD saliency as importance scores
    model2 = net()
    hs = {m: torch.rand_like(m.weight) for m in (model2[0], model2[2])}
    prune.global_unstructured([(m, "weight") for m in hs], pruning_method=prune.L1Unstructured,
                              importance_scores={(m, "weight"): obd_ext.saliency(m.weight.detach(), h2)
                                                 for m, h2 in hs.items()}, amount=20)
    assert sum(int((m.weight_mask == 0).sum()) for m in hs) == 20


def test_pruned_model_under_torch_compile():
    model = net()
    x = torch.randn(5, 6)
    pruner = Pruner(model)
    pruner.prune(0.5, method="magnitude")
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x))
    pruner.finalize()  # finalised: a plain model with zeros in place, no hooks
    m = pruner.masks["0.weight"]
    assert (model[0].weight[~m] == 0).all()
    model(x).square().sum().backward()
    assert model[0].weight.grad[~m].abs().sum() > 0  # gradients no longer masked: the hooks are gone



class _Unflat(nn.Module):
    def forward(self, x):
        return x[:, None, :]


def _conv_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), _Unflat(), nn.Conv1d(1, 1, 3), nn.Flatten(), nn.Linear(30, 8))


def test_finalize_dense_leaves_zeros_and_no_hooks():
    model = _conv_mlp()
    pruner = Pruner(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner.attach(opt)
    pruner.prune(0.6, method="magnitude", factor=0.5)  # the "decrease" variant: finalising still zeros them
    report = pruner.finalize()
    assert report.format == "dense" and report.converted == [] and report.kept_dense == pruner.names
    for name, keep in pruner.masks.items():
        assert (model.get_parameter(name)[~keep] == 0).all()
        assert not model.get_parameter(name)._backward_hooks
    assert not opt._optimizer_step_post_hooks
    clone = copy.deepcopy(model)
    x = torch.randn(4, 16)
    torch.testing.assert_close(clone(x), model(x))


def test_finalize_csr_matches_dense_and_saves_bytes(tmp_path):
    model = _conv_mlp()
    pruner = Pruner(model)
    pruner.prune(0.9, method="magnitude")
    dense = copy.deepcopy(model)
    Pruner(dense).finalize()
    report = pruner.finalize("csr")
    assert report.converted == ["0.weight", "5.weight"] and report.kept_dense == ["3.weight"]
    for name in report.converted:
        w = model.get_parameter(name)
        assert w.layout == torch.sparse_csr and w.col_indices().dtype == torch.int32 and not w.requires_grad
        assert torch.equal(w.to_dense(), dense.get_parameter(name))
    assert report.bytes_after < report.bytes_before
    x = torch.randn(3, 16)
    torch.testing.assert_close(model(x), dense(x))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt")
    assert loaded["0.weight"].layout == torch.sparse_csr


def test_finalize_errors_name_the_layer():
    model = _conv_mlp()
    pruner = Pruner(model)
    pruner.prune(0.5, method="magnitude")
    with pytest.raises(ValueError, match="format must be one of"):
        pruner.finalize("coo")
    assert pruner._hooks  # a wrong format changes nothing
    with pytest.raises(ValueError, match=r"0.weight is not 2:4 sparse: row \d+, inputs \d+\.\.\d+ hold [34] nonzeros"):
        pruner.finalize("semi_structured")
    nm = _conv_mlp()
    p = Pruner(nm, params=["0.weight"])
    p.prune(0.5, method="magnitude", pattern="2:4")
    obd_ext.check_nm_pattern(nm[0].weight, "2:4")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="0.weight: 2:4 semi-structured tensors run on CUDA only"):
            p.finalize("semi_structured")
    with pytest.raises(ValueError, match="CPU CSR matmul supports float32/float64 only, got torch.bfloat16"):
        b = _conv_mlp().bfloat16()
        Pruner(b).finalize("csr")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 semi-structured tensors are CUDA-only in torch")
def test_finalize_semi_structured_on_cuda():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64)).cuda().half()
    pruner = Pruner(model)
    pruner.prune(0.5, method="magnitude", pattern="2:4")
    dense = copy.deepcopy(model)
    Pruner(dense).finalize()
    report = pruner.finalize("semi_structured")
    assert report.converted == ["0.weight", "2.weight"] and report.bytes_after < report.bytes_before
    x = torch.randn(64, 128, device="cuda", dtype=torch.half)
    torch.testing.assert_close(model(x), dense(x), rtol=1e-2, atol=1e-2)
