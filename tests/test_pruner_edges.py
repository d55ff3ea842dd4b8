"""Pruner cases an outside audit found wrong without an error (stop 14): each now right or a clear error."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import obd_ext
from obd_ext import frozen_state
from obd_ext.pruning import Pruner, default_prunable


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))


def _steps(model, opt, n=3, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(16, 8, generator=g).to(dtype)
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()


def _assert_frozen(pruner):
    for name, m in pruner.masks.items():
        w = pruner.params[name]
        assert not w[~m].isnan().any(), name
        assert not w[~m].any(), name


# --------------------------------------------------------------------------- default list


def test_default_list_covers_gpt2_conv1d_attention_and_rnn_weights():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32))
    names = default_prunable(gpt2)
    for block in range(2):
        for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            assert f"transformer.h.{block}.{layer}.weight" in names
    pruner = Pruner(gpt2)
    pruner.prune(0.5, method="magnitude")
    assert pruner.counts()["transformer.h.0.mlp.c_fc.weight"] > 0  # the blocks are pruned, not only embeddings

    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32), 1, enable_nested_tensor=False)
    assert "layers.0.self_attn.in_proj_weight" in default_prunable(enc)
    mha = nn.MultiheadAttention(16, 2, kdim=8, vdim=8)  # separate q/k/v projections
    assert default_prunable(mha) == ["q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"]
    assert default_prunable(nn.LSTM(4, 8, 2)) == ["weight_ih_l0", "weight_hh_l0", "weight_ih_l1", "weight_hh_l1"]
    assert default_prunable(nn.Bilinear(3, 4, 5)) == ["weight"]


def test_weights_outside_the_default_list_are_named_in_a_warning():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(16, 16))
            self.lin = nn.Linear(16, 16)

    with pytest.warns(UserWarning, match=r"\['W'\]\) are not in a layer the default list knows"):
        Pruner(Custom())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Pruner(Custom(), params=["W", "lin.weight"])  # listed: no warning
        Pruner(_net())


# --------------------------------------------------------------------------- freezing


def test_a_weight_unfrozen_after_the_pruner_is_built_stays_pruned():
    net = _net()
    net[0].weight.requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    pruner = Pruner(net).attach(opt)
    pruner.prune(0.5, method="magnitude")
    net[0].weight.requires_grad_(True)
    _steps(net, opt)
    _assert_frozen(pruner)
    assert (net[0].weight[pruner.masks["0.weight"]] != 0).any()  # and it does train


@pytest.mark.parametrize("make, dtype", [
    (lambda p: torch.optim.Adamax(p, lr=1e-2), torch.float16),  # eps 1e-8 is 0 in float16
    (lambda p: torch.optim.Adamax(p, lr=1e-2, eps=0.0), torch.float32),
    (lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.9, 0.1), eps=0.0), torch.float32),  # too fast to hold
    (lambda p: torch.optim.RMSprop(p, lr=1e-2, alpha=0.1, eps=0.0), torch.float32),
    (lambda p: torch.optim.Adagrad(p, lr=1e-2, eps=0.0), torch.float64),
])
def test_an_eps_of_zero_gives_no_nan_at_deletions(make, dtype):
    net = _net().to(dtype)
    opt = make(list(net.parameters()))
    assert not frozen_state.preserves_zero(opt)
    pruner = Pruner(net).attach(opt)
    pruner.prune(0.5, method="magnitude")
    _steps(net, opt, dtype=dtype)
    _assert_frozen(pruner)


def test_random_method_checks_factor_before_writing():
    pruner = Pruner(nn.Linear(8, 4), params=["weight"])
    before = pruner.params["weight"].detach().clone()
    for bad in (float("nan"), float("inf"), "a"):
        with pytest.raises(ValueError, match="factor"):
            pruner.prune(0.5, method="random", factor=bad)
        assert torch.equal(pruner.params["weight"], before) and pruner.masks["weight"].all()


def test_load_state_dict_restarts_lbfgs_and_revives_with_fresh_state():
    net = _net()
    x = torch.randn(32, 8)

    def closure():
        opt.zero_grad()
        loss = net(x).square().mean()
        loss.backward()
        for name, m in pruner.masks.items():  # every evaluation, inside the line search too
            assert not net.get_parameter(name)[~m].any(), name
        return loss

    opt = torch.optim.LBFGS(net.parameters(), lr=0.5, max_iter=5)
    pruner = Pruner(net).attach(opt)
    opt.step(closure)  # history from before the masks
    state = pruner.state_dict()
    state["0.weight"] = torch.rand(8, 8, generator=torch.Generator().manual_seed(0)) > 0.5
    pruner.load_state_dict(state)
    assert not opt.state  # history cleared
    for _ in range(3):
        opt.step(closure)

    net2 = _net()
    adam = torch.optim.Adam(net2.parameters(), lr=1e-2)
    p2 = Pruner(net2).attach(adam)
    p2.prune(0.5, method="magnitude")
    _steps(net2, adam)
    state = {k: torch.ones_like(m) for k, m in p2.masks.items()}
    deleted = {k: ~m.clone() for k, m in p2.masks.items()}
    p2.load_state_dict(state)  # revives everything
    for k, d in deleted.items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert not adam.state[net2.get_parameter(k)][key][d].any(), (k, key)


def test_tied_names_with_different_curvatures_are_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

    pruner = Pruner(Tied())
    h = torch.rand(10, 4)
    with pytest.raises(ValueError, match=r"curvature\['emb.weight'\] and curvature\['head.weight'\] differ"):
        pruner.prune(0.5, method="obd", curvature={"emb.weight": h, "head.weight": h + 1})
    assert pruner.masks["emb.weight"].all()
    pruner.prune(0.5, method="obd", curvature={"emb.weight": h, "head.weight": h.clone()})  # equal: fine
    assert pruner.sparsity == 0.5


def test_revived_entries_get_the_state_a_fresh_parameter_has():
    for make, key, fresh in ((lambda p: torch.optim.Rprop(p, lr=1e-2, step_sizes=(0.0, 50.0)), "step_size", 1e-2),
                             (lambda p: torch.optim.Adagrad(p, lr=1e-2, initial_accumulator_value=1.0), "sum", 1.0)):
        net = _net()
        opt = make(list(net.parameters()))
        pruner = Pruner(net).attach(opt)
        _steps(net, opt, 1)
        pruner.prune(0.5, method="magnitude")
        _steps(net, opt, 2)
        deleted = {k: ~m.clone() for k, m in pruner.masks.items()}
        pruner.revive()
        for k, d in deleted.items():
            v = opt.state[net.get_parameter(k)][key][d]
            assert torch.allclose(v, torch.full_like(v, fresh)), (key, k)
        _steps(net, opt, 3)
        for k, d in deleted.items():  # and the revived weights train
            assert net.get_parameter(k)[d].any(), k


def test_optimizer_or_parameters_that_are_not_the_models_are_refused():
    net = _net()
    pruner = Pruner(net)
    other = torch.optim.Adam(_net().parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="holds none of the 2 pruned parameters"):
        pruner.attach(other)
    assert not pruner._optimizers
    net.load_state_dict({k: v.clone() for k, v in net.state_dict().items()}, assign=True)
    with pytest.raises(RuntimeError, match="'0.weight' is no longer the one this Pruner masks"):
        pruner.prune(0.5, method="magnitude")
    with pytest.raises(RuntimeError, match="no longer the one"):
        pruner.attach(torch.optim.Adam(net.parameters(), lr=1e-2))
    assert obd_ext.Pruner(net, adopt_zeros=True).sparsity == 0.0


# --------------------------------------------------------------------------- second audit


def test_gpt2_conv1d_is_pruned_along_its_inputs():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    fc = m.transformer.h[0].mlp.c_fc  # Conv1D: weight [in 32, out 128]
    pr = Pruner(m, params=["transformer.h.0.mlp.c_fc.weight", "transformer.h.0.attn.c_attn.weight"])
    sel = pr.prune(method="magnitude", pattern="2:4")
    as_linear = fc.weight.detach().t()  # [out, in]
    assert int((as_linear.reshape(128, -1, 4) != 0).sum(-1).max()) == 2
    assert sel.masks[0].shape == fc.weight.shape and sel.per_tensor[0].masks[0].shape == fc.weight.shape
    pr.revive()
    pr.prune(0.5, method="magnitude", scope="row")
    per_output = (as_linear == 0).float().mean(1)
    assert torch.equal(per_output, torch.full_like(per_output, 0.5))
    # the scheduler's width check reads the inputs too (c_fc: 32, c_proj: 128, shown as the [out, in] view)
    obd_ext.OBDScheduler(m, nn.CrossEntropyLoss(), [(torch.zeros(1, 32), torch.zeros(1, dtype=torch.long))],
                         lambda r: None, schedule=[0.5], pattern="2:4", params=["transformer.h.0.mlp.c_fc.weight"])
    with pytest.raises(ValueError, match=r"input dimension \(dim 1\) of parameter 'transformer.h.0.mlp.c_proj.weight' "
                                         r"\(stored inputs first, shown with dims 0 and 1 swapped\) to be a multiple "
                                         r"of 3, got shape \(32, 128\)"):
        obd_ext.OBDScheduler(m, nn.CrossEntropyLoss(), [(torch.zeros(1, 32), torch.zeros(1, dtype=torch.long))],
                             lambda r: None, schedule=[1 / 3], pattern="2:3",
                             params=["transformer.h.0.mlp.c_proj.weight"])


def test_a_subclass_of_a_zero_preserving_optimizer_is_re_zeroed():
    class NoisySGD(torch.optim.SGD):  # SGLD-like: the step adds noise to every weight
        def step(self, closure=None):
            super().step(closure)
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.add_(torch.randn_like(p), alpha=1e-3)

    net = _net()
    opt = NoisySGD(net.parameters(), lr=1e-2)
    assert not frozen_state.preserves_zero(opt)
    pruner = Pruner(net).attach(opt)
    pruner.prune(0.5, method="magnitude")
    _steps(net, opt)
    _assert_frozen(pruner)


def test_attach_and_prune_zero_weights_written_while_unhooked():
    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    pruner = Pruner(net).attach(opt)
    pruner.prune(0.5, method="magnitude")
    pruner.remove_hooks()
    _steps(net, opt)  # unfrozen: deleted weights move
    assert any(net.get_parameter(n)[~m].any() for n, m in pruner.masks.items())
    pruner.attach(opt)
    _assert_frozen(pruner)
    _steps(net, opt)
    _assert_frozen(pruner)
    with torch.no_grad():
        net[0].weight.add_(1.0)  # written by hand
    pruner.prune(0.5, method="magnitude")  # same sparsity: nothing new, the old deletions zeroed again
    _assert_frozen(pruner)


def test_optimizer_state_loaded_after_attaching_is_frozen_too():
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    _steps(net, opt)
    dense_state = copy.deepcopy(opt.state_dict())  # from before pruning: momentum everywhere (a copy, as if saved)
    pruner = Pruner(net).attach(opt)
    pruner.prune(0.5, method="magnitude")
    opt.load_state_dict(dense_state)
    for n, m in pruner.masks.items():
        state = opt.state[net.get_parameter(n)]
        assert not state["exp_avg"][~m].any()
        assert (state["exp_avg_sq"][~m] >= torch.finfo(torch.float32).tiny).all()
    _steps(net, opt)
    _assert_frozen(pruner)
    saved = copy.deepcopy(opt.state_dict())  # saved while attached: loads back bit for bit
    before = {k: v.clone() for k, v in opt.state[net[0].weight].items()}
    opt.load_state_dict(saved)
    for k, v in opt.state[net[0].weight].items():
        assert torch.equal(v, before[k]), k


def test_assigned_and_edited_gradients_are_masked_before_the_step():
    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    pruner = Pruner(net).attach(opt)
    pruner.prune(0.5, method="magnitude")
    x = torch.randn(16, 8)
    for _ in range(3):
        grads = torch.autograd.grad(net(x).square().mean(), list(net.parameters()))
        for p, g in zip(net.parameters(), grads):
            p.grad = g  # assignment: no accumulation, no hook
        opt.step()
        _assert_frozen(pruner)
        opt.zero_grad()
        net(x).square().mean().backward()
        net[0].weight.grad.add_(1.0)  # edited after the hook
        opt.step()
        _assert_frozen(pruner)
        opt.zero_grad()


def test_unfrozen_weight_is_masked_from_its_first_backward():
    net = _net()
    net[0].weight.requires_grad_(False)
    pruner = Pruner(net).attach(torch.optim.SGD(net.parameters(), lr=0.1))
    pruner.prune(0.5, method="magnitude", scope="layer")
    net[0].weight.requires_grad_(True)
    net(torch.randn(16, 8)).square().mean().backward()
    assert not net[0].weight.grad[~pruner.masks["0.weight"]].any()  # what clip_grad_norm_ would see


def test_weight_norm_spectral_norm_and_lazy_layers():
    from torch.nn.utils import parametrizations

    model = nn.Sequential(nn.utils.weight_norm(nn.Linear(8, 8)), parametrizations.spectral_norm(nn.Linear(8, 8)),
                          nn.Linear(8, 2))
    with pytest.warns(UserWarning, match=r"weight_v.*are not in a layer the default list knows"):
        pruner = Pruner(model)
    assert pruner.names == ["2.weight"]
    pruner = Pruner(model, params=["0.weight_v", "2.weight"])  # the underlying parameter can be named
    pruner.prune(0.5, method="magnitude")
    model(torch.randn(2, 8))  # weight_norm recomputes the weight in its forward pre-hook
    assert (model[0].weight[~pruner.masks["0.weight_v"]] == 0).all()
    with pytest.raises(ValueError, match="'0.weight' is not initialised yet"):
        Pruner(nn.Sequential(nn.LazyLinear(4)))


def test_finalize_refuses_replaced_parameters_and_prune_names_itself():
    net = _net()
    pruner = Pruner(net)
    pruner.prune(0.5, method="magnitude")
    net.load_state_dict({k: v.clone() for k, v in _net(1).state_dict().items()}, assign=True)
    with pytest.raises(RuntimeError, match="finalize: the model's parameter '0.weight' is no longer"):
        pruner.finalize("dense")
    other = Pruner(_net())
    h = {n: torch.ones_like(p) for n, p in other.params.items()}
    h["0.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"Pruner.prune: .*nonfinite='keep'"):
        other.prune(0.5, method="obd", curvature=h)
    sel = other.prune(0.5, method="obd", curvature=h, nonfinite="keep")
    assert sel.skipped_nonfinite == 1 and other.masks["0.weight"][0, 0]


# --------------------------------------------------------------------------- third audit


def test_gradients_edited_through_data_are_masked_before_the_step():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    pruner = Pruner(net).attach(opt)
    pruner.prune(0.5, method="magnitude")
    net(torch.randn(16, 8)).square().mean().backward()
    for p in net.parameters():
        p.grad.data.add_(1.0)  # .data has a version counter of its own
    opt.step()
    _assert_frozen(pruner)


def test_lbfgs_history_loaded_after_pruning_is_cleared_and_its_own_reloads():
    net = _net()
    x = torch.randn(32, 8)
    seen = []

    def closure():
        opt.zero_grad()
        loss = net(x).square().mean()
        loss.backward()
        seen.append(sum(int(net.get_parameter(n)[~m].ne(0).sum()) for n, m in pruner.masks.items()))
        return loss

    opt = torch.optim.LBFGS(net.parameters(), lr=0.1, max_iter=4)
    pruner = Pruner(net).attach(opt)
    opt.step(closure)
    before_pruning = copy.deepcopy(opt.state_dict())
    pruner.prune(0.6, method="magnitude")
    opt.step(closure)
    own = copy.deepcopy(opt.state_dict())
    reference = copy.deepcopy(own)
    opt.load_state_dict(own)  # its own history: kept
    assert opt.state and all(torch.equal(a, b) for a, b in zip(opt.state_dict()["state"][0]["old_dirs"],
                                                                reference["state"][0]["old_dirs"]))
    opt.load_state_dict(before_pruning)  # history from before: it would move deleted weights inside the step
    assert not opt.state
    seen.clear()
    opt.step(closure)
    assert seen and not any(seen)


def test_rprop_state_saved_under_the_pruner_reloads_bit_for_bit():
    net = _net()
    opt = torch.optim.Rprop(net.parameters(), lr=1e-2)
    pruner = Pruner(net).attach(opt)
    pruner.prune(0.5, method="magnitude")
    _steps(net, opt)
    saved = copy.deepcopy(opt.state_dict())
    reference = copy.deepcopy(saved)  # load_state_dict adopts saved's tensors, and the hook writes in place
    opt.load_state_dict(saved)
    for i, p in enumerate(net.parameters()):
        for key, v in opt.state[p].items():
            assert torch.equal(v, reference["state"][i][key]), key


def test_raw_stacked_tensors_refuse_row_nm_and_group_scopes_and_transposed_convs_flip():
    class Experts(nn.Module):  # MoE-style: [experts, out, in] as one raw parameter
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(2, 8, 16))

    pruner = Pruner(Experts(), params=["w"])
    for kw in ({"pattern": "2:4"}, {"sparsity": 0.5, "scope": "row"}, {"sparsity": 0.5, "scope": "group"}):
        with pytest.raises(ValueError, match="'w' \\(3 dims\\) is not a known layer's weight"):
            pruner.prune(method="magnitude", **kw)
    assert pruner.masks["w"].all()
    pruner.prune(0.5, method="magnitude", scope="layer")  # orientation-free scopes work
    assert pruner.sparsity == 0.5

    deconv = nn.ConvTranspose2d(8, 4, 3)  # weight [in 8, out 4, 3, 3]
    Pruner(deconv).prune(method="magnitude", pattern="2:4")
    per_group = (deconv.weight.detach().transpose(0, 1) != 0).reshape(4, 2, 4, 9).sum(2)  # 4 inputs per group
    assert int(per_group.max()) == 2


def test_random_factor_shrinks_only_the_new_deletions():
    lin = nn.Linear(8, 4, bias=False)
    w0 = lin.weight.detach().clone()
    pruner = Pruner(lin)
    g = torch.Generator().manual_seed(0)
    pruner.prune(0.25, method="random", factor=0.5, generator=g)
    first = ~pruner.masks["weight"].clone()
    pruner.prune(0.5, method="random", factor=0.5, generator=g)
    second = ~pruner.masks["weight"] & ~first
    torch.testing.assert_close(lin.weight[first], w0[first] * 0.5, rtol=0, atol=0)
    torch.testing.assert_close(lin.weight[second], w0[second] * 0.5, rtol=0, atol=0)


def test_first_backward_masked_after_reattach_and_through_submodules():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    pruner = Pruner(net).attach(opt)
    pruner.prune(0.5, method="magnitude")
    pruner.remove_hooks()
    pruner.attach(opt)
    net(torch.randn(16, 8)).square().mean().backward()
    assert not any(net.get_parameter(n).grad[~m].any() for n, m in pruner.masks.items())

    net2 = _net()
    net2[0].weight.requires_grad_(False)
    pruner2 = Pruner(net2).attach(torch.optim.SGD(net2.parameters(), lr=0.1))
    pruner2.prune(0.5, method="magnitude", scope="layer")
    net2[0].weight.requires_grad_(True)
    net2[2](net2[1](net2[0](torch.randn(16, 8)))).square().mean().backward()  # the root's forward never runs
    assert not net2[0].weight.grad[~pruner2.masks["0.weight"]].any()


def test_rnn_cells_listed_and_weight_norm_gain_not_called_a_matrix():
    assert default_prunable(nn.LSTMCell(4, 8)) == ["weight_ih", "weight_hh"]
    model = nn.Sequential(nn.utils.weight_norm(nn.Linear(8, 8)), nn.Linear(8, 2))
    with pytest.warns(UserWarning) as record:
        Pruner(model)
    message = str(next(r.message for r in record if "default list" in str(r.message)))
    assert "weight_v" in message and "weight_g" not in message


# --------------------------------------------------------------------------- fourth audit


def test_finalize_csr_keeps_a_tied_weight_dense_and_tied():
    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.out = nn.Linear(16, 20, bias=False)
            self.emb = nn.Embedding(20, 16)
            self.emb.weight = self.out.weight

    model = HeadFirst()
    pruner = Pruner(model)
    pruner.prune(0.7, method="magnitude")
    result = pruner.finalize("csr")
    assert model.out.weight is model.emb.weight and model.out.weight.layout == torch.strided
    assert result.converted == [] and result.kept_dense == ["out.weight"]


def test_factor_outside_zero_one_is_refused():
    pruner = Pruner(_net())
    for bad in (2.0, -0.5):
        with pytest.raises(ValueError, match=r"factor must be in \[0, 1\]"):
            pruner.prune(0.5, method="magnitude", factor=bad)
    assert pruner.sparsity == 0.0


def test_a_finalized_sparse_model_is_refused_clearly():
    net = _net()
    pruner = Pruner(net)
    pruner.prune(0.7, method="magnitude")
    pruner.finalize("csr")
    with pytest.raises(ValueError, match=r"'0.weight' is a torch.sparse_csr tensor .*prune the dense model"):
        Pruner(net, adopt_zeros=True)
