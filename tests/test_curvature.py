"""The curvature engine against exact autograd (float64, small problems)."""


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import obd_ext
from testing import brute_rule_diagonal, float64_by_default  # noqa: F401  (autouse fixture: every test in float64)
from obd_ext import reference
from obd_ext.curvature import CurvatureAccumulator, UnsupportedOpError, hessian_diag
from obd_ext.curvature import rules





ACTS = [nn.Tanh, nn.Sigmoid, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, lambda: nn.GELU(approximate="tanh"), nn.SiLU,
        nn.Softplus, nn.Hardtanh]


def mlp(act=nn.Tanh, sizes=(5, 4, 3), seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).double()


def data(n=9, d_in=5, d_out=3, classes=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    y = torch.randint(0, d_out, (n,), generator=g) if classes else torch.randn(n, d_out, generator=g)
    return x, y


def close(a, b, tol=1e-10):
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("act", ACTS, ids=lambda a: getattr(a, "__name__", "GELU-tanh"))
def test_exact_for_the_last_two_layers_under_mse(act, reduction):
    model = mlp(act)
    x, y = data()
    loss = nn.MSELoss(reduction=reduction)
    ex = hessian_diag(model, loss, (x, y), method="exact", progress=False)
    ob = hessian_diag(model, loss, (x, y), method="obd", progress=False)
    for name in ex:
        assert close(ob[name], ex[name]), (name, ob[name], ex[name])


@pytest.mark.parametrize("act", [nn.Tanh, nn.GELU, nn.SiLU])
def test_exact_for_the_last_layer_under_cross_entropy(act):
    model = mlp(act, sizes=(5, 6, 4, 3))
    x, y = data(classes=True)
    ex = hessian_diag(model, nn.CrossEntropyLoss(), (x, y), method="exact", progress=False)
    ob = hessian_diag(model, nn.CrossEntropyLoss(), (x, y), method="obd", progress=False)
    for name in ("4.weight", "4.bias"):
        assert close(ob[name], ex[name]), name


def test_exact_for_squashed_outputs_eq8_and_bce():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 3), nn.Tanh()).double()  # eq. 8: MSE after a squashing function
    x, y = data()
    ex = hessian_diag(model, nn.MSELoss(), (x, y), method="exact", progress=False)
    ob = hessian_diag(model, nn.MSELoss(), (x, y), method="obd", progress=False)
    assert all(close(ob[k], ex[k]) for k in ex)
    model = mlp(nn.Tanh)
    yb = (torch.rand(9, 3) > 0.5).double()
    ex = hessian_diag(model, nn.BCEWithLogitsLoss(), (x, yb), method="exact", progress=False)
    ob = hessian_diag(model, nn.BCEWithLogitsLoss(), (x, yb), method="obd", progress=False)
    assert all(close(ob[k], ex[k]) for k in ("2.weight", "2.bias"))


def test_exact_when_every_unit_feeds_one_unit():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(1, 1), nn.Tanh(), nn.Linear(1, 1), nn.Sigmoid(), nn.Linear(1, 1)).double()
    x, y = torch.randn(6, 1), torch.randn(6, 1)
    ex = hessian_diag(model, nn.MSELoss(), (x, y), method="exact", progress=False)
    ob = hessian_diag(model, nn.MSELoss(), (x, y), method="obd", progress=False)
    assert all(close(ob[k], ex[k]) for k in ex)


def test_lm_is_never_negative_and_obd_reports_negatives():
    model = mlp(nn.Tanh, sizes=(5, 8, 8, 3))
    x, y = data()
    lm = hessian_diag(model, nn.MSELoss(), (x, y * 10), method="lm", progress=False)
    assert all((v >= 0).all() for v in lm.values()) and lm.total_negative == 0
    ob = hessian_diag(model, nn.MSELoss(), (x, y * 10), method="obd", progress=False)
    assert ob.total_negative == sum(int((v < 0).sum()) for v in ob.values())
    assert ob.total_negative > 0  # far from a minimum, f'' terms make some entries negative


def test_tied_weights_sum_over_uses():
    """A weight used twice gets the sum of what its two uses would get as separate copies (eq. 5)."""
    torch.manual_seed(5)
    w = torch.randn(4, 4)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(w.clone())

        def forward(self, x):
            return torch.tanh(x @ self.w.t()) @ self.w

    class Untied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(w.clone())
            self.b = nn.Parameter(w.clone())

        def forward(self, x):
            return torch.tanh(x @ self.a.t()) @ self.b

    x, y = torch.randn(7, 4), torch.randn(7, 4)
    for method in ("obd", "lm"):
        tied = hessian_diag(Tied(), nn.MSELoss(), (x, y), method=method, progress=False)
        untied = hessian_diag(Untied(), nn.MSELoss(), (x, y), method=method, progress=False)
        assert close(tied["w"], untied["a"] + untied["b"])


def test_convnet_runs_and_is_exact_in_the_last_layer():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 3, stride=2),
                          nn.ReLU(), nn.AvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 3, (5,))
    ex = hessian_diag(model, nn.CrossEntropyLoss(), (x, y), method="exact", progress=False)
    ob = hessian_diag(model, nn.CrossEntropyLoss(), (x, y), method="obd", progress=False)
    assert close(ob["7.weight"], ex["7.weight"]) and close(ob["7.bias"], ex["7.bias"])
    for k in ex:
        assert ob[k].shape == ex[k].shape


def test_accumulator_in_a_training_loop_matches_hessian_diag():
    model = mlp(nn.Tanh)
    batches = [data(seed=s) for s in range(3)]
    loss_fn = nn.MSELoss()
    ref = hessian_diag(model, loss_fn, batches, method="lm", progress=False)
    acc = CurvatureAccumulator(model, loss_fn, method="lm")
    for x, y in batches:
        out = model(x)
        acc.accumulate(out, y)
        loss_fn(out, y).backward()  # the graph is intact after the sweep
    res = acc.result()
    assert all(close(res[k], ref[k]) for k in ref) and res.batches == 3
    assert all(p.grad is not None for p in model.parameters())


class TwoFullBiases(nn.Module):
    """y = x W + b1 + b2 with full-shape biases: the add rule hands both biases
    the same H tensor, so their sums share memory after one batch."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = nn.Parameter(torch.randn(5, 3, generator=g))
        self.b1 = nn.Parameter(torch.randn(9, 3, generator=g))
        self.b2 = nn.Parameter(torch.randn(9, 3, generator=g))

    def forward(self, x):
        return x @ self.w + self.b1 + self.b2


@pytest.mark.parametrize("batches", [1, 2, 3])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_hessian_diag_hands_over_sums_without_aliasing(batches, reduction):
    """hessian_diag returns the accumulator's sums without a copy: shared sums are
    copied first (never scaled twice, never one tensor under two names), and the
    values equal result()'s and the exact diagonal."""
    model = TwoFullBiases()
    data_ = [data(seed=s) for s in range(batches)]
    loss_fn = nn.MSELoss(reduction="sum")
    res = hessian_diag(model, loss_fn, data_, method="obd", reduction=reduction, progress=False)
    acc = CurvatureAccumulator(model, loss_fn, method="obd")
    for x, y in data_:
        acc.accumulate(model(x), y)
    ref = acc.result(reduction)
    assert res["b1"].untyped_storage().data_ptr() != res["b2"].untyped_storage().data_ptr()
    exact = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for x, y in data_:
        part = obd_ext.hessian_diag(model, loss_fn, (x, y), method="exact", reduction="sum", progress=False)
        for k in exact:
            exact[k] += part[k]
    for k in ref:
        assert close(res[k], ref[k])
        assert close(res[k], exact[k] / (batches if reduction == "mean" else 1))  # MSE on a linear map: exact


def test_frozen_parameters_are_skipped_and_params_selects():
    model = mlp(nn.Tanh)
    model[0].weight.requires_grad_(False)
    x, y = data()
    res = hessian_diag(model, nn.MSELoss(), (x, y), method="obd", progress=False)
    assert "0.weight" not in res and "0.bias" in res
    res = hessian_diag(model, nn.MSELoss(), (x, y), method="obd", params=["2.weight"], progress=False)
    assert list(res) == ["2.weight"]


def test_fisher_equals_a_loop_over_per_sample_gradients():
    model = mlp(nn.Tanh)
    x, y = data(classes=True)
    res = hessian_diag(model, nn.CrossEntropyLoss(), (x, y), method="fisher", progress=False)
    acc = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        for k, p in model.named_parameters():
            acc[k] += p.grad ** 2
    assert all(close(res[k], acc[k] / len(x)) for k in acc)


def _exact_ggn_diag_mse(model, x, reduction_scale):
    params = dict(model.named_parameters())
    names = list(params)

    def f(*ps):
        return torch.func.functional_call(model, dict(zip(names, ps)), (x,))

    jac = torch.autograd.functional.jacobian(f, tuple(params.values()))
    return {k: 2 * reduction_scale * (j ** 2).sum(dim=tuple(range(j.dim() - params[k].dim())))
            for k, j in zip(names, jac)}


def test_ggn_mc_converges_to_the_exact_ggn_and_hutchinson_to_the_hessian():
    model = mlp(nn.Tanh)
    x, y = data()
    ggn = _exact_ggn_diag_mse(model, x, 1.0)
    mc = hessian_diag(model, nn.MSELoss(reduction="sum"), (x, y), method="ggn-mc", samples=400, progress=False)
    for k in ggn:
        assert float((mc[k] - ggn[k]).abs().max()) < 0.15 * float(ggn[k].abs().max()), k
    ex = hessian_diag(model, nn.MSELoss(reduction="sum"), (x, y), method="exact", progress=False)
    hu = hessian_diag(model, nn.MSELoss(reduction="sum"), (x, y), method="hutchinson", samples=2000, progress=False)
    for k in ex:
        assert float((hu[k] - ex[k]).abs().max()) < 0.15 * float(ex[k].abs().max()), k


def test_unsupported_op_is_a_clear_error():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return torch.cumsum(self.lin(x), dim=1)

    with pytest.raises(UnsupportedOpError, match=r"CumsumBackward0.*method='hutchinson'"):
        hessian_diag(Odd().double(), nn.MSELoss(), (torch.randn(4, 3), torch.randn(4, 3)), progress=False)
    # a loss is swept through its own ops (L1Loss: abs, mean); one of them without a rule names the loss
    with pytest.raises(UnsupportedOpError, match=r"the loss .*<lambda> uses logcumsumexp"):
        hessian_diag(mlp(), lambda o, t: torch.logcumsumexp(o - t, 1).abs().mean(), data(), progress=False)
    res = hessian_diag(Odd().double(), nn.L1Loss(), (torch.randn(4, 3), torch.randn(4, 3)), method="hutchinson",
                       progress=False)
    assert set(res) == {"lin.weight", "lin.bias"}


def test_bad_arguments():
    with pytest.raises(ValueError, match="method must be one of"):
        hessian_diag(mlp(), nn.MSELoss(), data(), method="newton", progress=False)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum', got 'max'"):
        hessian_diag(mlp(), nn.MSELoss(), data(), reduction="max", progress=False)
    with pytest.raises(ValueError, match="samples must be a positive integer, got 0"):
        hessian_diag(mlp(), nn.MSELoss(), data(), method="hutchinson", samples=0, progress=False)
    with pytest.raises(ValueError, match="no parameter named 'nope'"):
        hessian_diag(mlp(), nn.MSELoss(), data(), params=["nope"], progress=False)


# ---------------------------------------------------------------------------
# Rules checked one op at a time against brute-force autograd
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("act", ACTS, ids=lambda a: getattr(a, "__name__", "GELU-tanh"))
def test_activation_derivatives(act):
    x = (torch.randn(200) * 3).requires_grad_()
    y = act()(x)
    v, kind, ps = rules.ACTIVATIONS[type(y.grad_fn).__name__](y.grad_fn)
    d1, d2 = reference.activation_derivatives(kind, v, *ps)
    g1 = torch.autograd.grad(y.sum(), x, create_graph=True)[0]
    assert torch.allclose(d1, g1.detach(), atol=1e-12)
    g2 = torch.autograd.grad(g1.sum(), x, allow_unused=True)[0]
    assert torch.allclose(d2, torch.zeros_like(d2) if g2 is None else g2, atol=1e-10)
    # the fused kernel applies them: h_in = d1^2 h + d2 g, g_in = d1 g
    h, g = torch.rand(200), torch.randn(200)
    h_in, g_in = obd_ext.ops.activation_hessian(v.detach(), h, g, kind, *ps, False, True)
    assert torch.allclose(h_in, d1 * d1 * h + d2 * g, atol=1e-12) and torch.allclose(g_in, d1 * g, atol=1e-12)


def _brute(fn, x_row, g_row, h_row):
    """diag(J^T diag(h) J) + sum_j g_j d2 y_j / dx_i^2 for one row."""
    jac = torch.autograd.functional.jacobian(fn, x_row)
    hes = torch.autograd.functional.hessian(lambda v: (fn(v) * g_row).sum(), x_row)
    return (jac ** 2 * h_row[:, None]).sum(0) + torch.diagonal(hes), (jac ** 2 * h_row[:, None]).sum(0)


@pytest.mark.parametrize("which", ["softmax", "layer_norm", "layer_norm_affine"])
def test_row_rules_closed_forms(which):
    torch.manual_seed(7)
    n = 6
    gamma, beta = torch.randn(n), torch.randn(n)
    fns = {
        "softmax": lambda v: torch.softmax(v, -1),
        "layer_norm": lambda v: F.layer_norm(v, (n,)),
        "layer_norm_affine": lambda v: F.layer_norm(v, (n,), gamma, beta),
    }
    fn = fns[which]
    x = torch.randn(3, n, requires_grad=True)
    y = fn(x)
    g, h = torch.randn(3, n), torch.rand(3, n)
    for lm in (False, True):
        h_in = rules.RULES[type(y.grad_fn).__name__](y.grad_fn, [g], [h], rules.Ctx(lm))[1][0]
        for r in range(3):
            full, gn = _brute(fn, x[r].detach(), g[r], h[r])
            assert torch.allclose(h_in[r], gn if lm else full, atol=1e-10), (which, lm, r)


@pytest.mark.parametrize("op", ["mul", "div_num", "div_den", "batch_norm_eval", "layer_norm_3d", "mean", "avg_pool",
                                "pow3", "square", "rsqrt", "sqrt", "exp", "log", "reciprocal", "neg", "rsub",
                                "mul_scalar"])
def test_more_rules_against_brute_force(op):
    torch.manual_seed(8)
    other = torch.rand(2, 3, 4) + 0.5
    bn = nn.BatchNorm2d(3).double().eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 2)
    fns = {
        "mul": lambda v: v * other,
        "div_num": lambda v: v / other,
        "div_den": lambda v: other / v,
        "batch_norm_eval": lambda v: bn(v.reshape(2, 3, 2, 2)),
        "layer_norm_3d": lambda v: F.layer_norm(v, (3, 4)),
        "mean": lambda v: v.mean(dim=1),
        "avg_pool": lambda v: F.avg_pool2d(v.reshape(2, 3, 2, 2), 2),
        "pow3": lambda v: v ** 3,
        "square": lambda v: v.square(),
        "rsqrt": torch.rsqrt,
        "sqrt": torch.sqrt,
        "exp": torch.exp,
        "log": torch.log,
        "reciprocal": torch.reciprocal,
        "neg": lambda v: -v,
        "rsub": lambda v: torch.rsub(v, 1.0, alpha=2),
        "mul_scalar": lambda v: v * 0.3,
    }
    fn = fns[op]
    x = (torch.rand(2, 3, 4) + 0.5).requires_grad_()
    y = fn(x)
    g, h = torch.randn(y.shape), torch.rand(y.shape)
    idx = 1 if op == "div_den" else 0
    for lm in (False, True):
        ctx = rules.Ctx(lm)
        ctx.g_wanted = [True] * len(y.grad_fn.next_functions)
        g_in, h_in = rules.RULES[type(y.grad_fn).__name__](y.grad_fn, [g], [h], ctx)
        fit = lambda t: t.reshape(x.shape) if t.numel() == x.numel() else t.sum_to_size(x.shape)  # noqa: E731
        h_rule = fit(h_in[idx])
        full, gn = brute_rule_diagonal(fn, x, g, h)
        assert torch.allclose(h_rule.reshape(x.shape), gn if lm else full, atol=1e-10), (op, lm)
        if not lm:  # the first-order part is the ordinary gradient
            vjp = torch.autograd.grad(y, x, g, retain_graph=True)[0]
            assert torch.allclose(fit(g_in[idx]), vjp, atol=1e-12), op


# ---------------------------------------------------------------------------
# The model families of the issue: ResNet blocks and a GPT with a tied head
# ---------------------------------------------------------------------------

from obd_ext.models import GPT, LeNet5, SmallResNet  # noqa: E402


def test_lenet5_and_resnet():
    torch.manual_seed(9)
    lenet = LeNet5().double()
    x, y = torch.randn(3, 1, 28, 28), torch.randint(0, 10, (3,))
    ob = hessian_diag(lenet, nn.CrossEntropyLoss(), (x, y), method="obd", progress=False)
    assert set(ob) == {k for k, _ in lenet.named_parameters()}
    net = SmallResNet(widths=(4, 6), blocks=(1, 1), classes=3).double()
    for m in net.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    net.eval()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
    ex = hessian_diag(net, nn.CrossEntropyLoss(), (x, y), method="exact", progress=False)
    ob = hessian_diag(net, nn.CrossEntropyLoss(), (x, y), method="obd", progress=False)
    lm = hessian_diag(net, nn.CrossEntropyLoss(), (x, y), method="lm", progress=False)
    assert set(ob) == set(ex)
    assert close(ob["head.weight"], ex["head.weight"]) and close(ob["head.bias"], ex["head.bias"])
    assert all((v >= 0).all() for v in lm.values())
    net.train()  # batch statistics: the closed form per channel (rules_layers.py); the head stays exact
    ex = hessian_diag(net, nn.CrossEntropyLoss(), (x, y), method="exact", params=["head.weight"], progress=False)
    ob = hessian_diag(net, nn.CrossEntropyLoss(), (x, y), method="obd", progress=False)
    assert close(ob["head.weight"], ex["head.weight"])


def test_gpt_tied_head_and_exact_untied_head():
    torch.manual_seed(10)
    idx = torch.randint(0, 11, (2, 5))
    target = torch.randint(0, 11, (10,))
    untied = GPT(vocab=11, d=8, layers=1, heads=2, seq=5, tied=False).double()
    ex = hessian_diag(untied, nn.CrossEntropyLoss(), (idx, target), method="exact", progress=False)
    ob = hessian_diag(untied, nn.CrossEntropyLoss(), (idx, target), method="obd", progress=False)
    assert set(ob) == set(ex)
    assert close(ob["head.weight"], ex["head.weight"])  # the last layer is exact
    assert all(torch.isfinite(v).all() for v in ob.values())
    # Tied: the embedding's curvature is the sum of its two uses.
    tied = GPT(vocab=11, d=8, layers=1, heads=2, seq=5, tied=True).double()
    state = {k: v for k, v in untied.state_dict().items() if not k.startswith("head")}
    tied.load_state_dict(state)
    untied.head.weight.data.copy_(tied.tok.weight.data)
    for method in ("obd", "lm"):
        t = hessian_diag(tied, nn.CrossEntropyLoss(), (idx, target), method=method, progress=False)
        u = hessian_diag(untied, nn.CrossEntropyLoss(), (idx, target), method=method, progress=False)
        assert close(t["tok.weight"], u["tok.weight"] + u["head.weight"])
        if method == "lm":
            assert all((v >= 0).all() for v in t.values())


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = torch.argsort(torch.argsort(a)).double()
    rb = torch.argsort(torch.argsort(b)).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def test_saliency_ranking_on_a_trained_digits_convnet():
    """OBD saliency from eq. 7 ranks like the exact diagonal (above 0.99 on digits)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    n = 200
    x = torch.tensor(x[:n] / 16.0).reshape(-1, 1, 8, 8)
    t = -torch.ones(n, 10)
    t[torch.arange(n), torch.tensor(y[:n])] = 1.0  # +-1 targets, MSE, tanh: as in the paper
    torch.manual_seed(11)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(),
                          nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10), nn.Tanh()).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        F.mse_loss(model(x), t).backward()
        opt.step()
    params = {k: v.detach() for k, v in model.named_parameters()}
    # obd against the exact Hessian diagonal; lm against the exact Gauss-Newton diagonal
    # (2/M) sum_rows J^2 of the outputs' Jacobian, which is what lm approximates.
    exact_h = hessian_diag(model, nn.MSELoss(), (x, t), method="exact", progress=False)
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (x,)))(params)
    exact_ggn = {k: (2.0 / t.numel()) * (j ** 2).sum(dim=(0, 1)) for k, j in jac.items()}

    def saliencies(h):
        return torch.cat([(h[k] * params[k] ** 2 / 2).reshape(-1) for k in params])

    for method, oracle in (("obd", exact_h), ("lm", exact_ggn)):
        est = hessian_diag(model, nn.MSELoss(), (x, t), method=method, progress=False)
        rho = _spearman(saliencies(est), saliencies(oracle))
        assert rho > 0.95, (method, rho)


# ---------------------------------------------------------------------------
# Against an independent implementation of the same recursion
# (tests/oracle_recursion.py, written apart from obd_ext/curvature)
# ---------------------------------------------------------------------------

from oracle_recursion import recursion_diag  # noqa: E402

ORACLE_MODELS = {
    "mlp-" + name: (lambda a=a: nn.Sequential(nn.Linear(6, 7), a(), nn.Linear(7, 5), a(), nn.Linear(5, 4)), (9, 6))
    for name, a in [("tanh", nn.Tanh), ("sigmoid", nn.Sigmoid), ("relu", nn.ReLU), ("leaky", nn.LeakyReLU),
                    ("elu", nn.ELU), ("gelu", nn.GELU), ("silu", nn.SiLU), ("softplus", nn.Softplus),
                    ("hardtanh", nn.Hardtanh)]
}
ORACLE_MODELS["convnet"] = (lambda: nn.Sequential(
    nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.SiLU(),
    nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4, 4)), (5, 2, 8, 8))


@pytest.mark.parametrize("name", list(ORACLE_MODELS))
@pytest.mark.parametrize("loss,reduction", [("mse", "sum"), ("mse", "mean"), ("ce", "mean")])
def test_sweep_equals_the_independent_recursion(name, loss, reduction):
    make, shape = ORACLE_MODELS[name]
    torch.manual_seed(12)
    model = make().double()
    x = torch.randn(*shape)
    y = torch.randn(shape[0], 4) if loss == "mse" else torch.randint(0, 4, (shape[0],))
    loss_fn = nn.MSELoss(reduction=reduction) if loss == "mse" else nn.CrossEntropyLoss(reduction=reduction)
    for lm in (False, True):
        ours = hessian_diag(model, loss_fn, (x, y), method="lm" if lm else "obd", reduction="sum", progress=False)
        oracle = recursion_diag(model, x, y, loss, reduction, lm)
        for k in oracle:
            assert close(ours[k], oracle[k], 1e-12), (name, loss, lm, k)


def test_scaled_dot_product_attention_through_the_math_path():
    """F.scaled_dot_product_attention (used by nn.MultiheadAttention and most HF models) is walked
    through its math decomposition; the result equals the same attention written out by hand."""
    torch.manual_seed(13)

    class Attn(nn.Module):
        def __init__(self, sdpa: bool):
            super().__init__()
            self.sdpa = sdpa
            self.qkv = nn.Linear(8, 24)
            self.o = nn.Linear(8, 3)

        def forward(self, x):
            q, k, v = (t.view(2, 5, 2, 4).transpose(1, 2) for t in self.qkv(x).split(8, -1))
            if self.sdpa:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                att = (q @ k.transpose(-2, -1)) * (1.0 / 2.0)
                att = att.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
                y = torch.softmax(att, -1) @ v
            return self.o(y.transpose(1, 2).reshape(2, 5, 8)).reshape(10, 3)

    a, b = Attn(True).double(), Attn(False).double()
    b.load_state_dict(a.state_dict())
    x, y = torch.randn(2, 5, 8), torch.randint(0, 3, (10,))
    for method in ("obd", "lm"):
        ha = hessian_diag(a, nn.CrossEntropyLoss(), (x, y), method=method, progress=False)
        hb = hessian_diag(b, nn.CrossEntropyLoss(), (x, y), method=method, progress=False)
        assert all(close(ha[k], hb[k]) for k in ha), method


def test_llama_style_block_rmsnorm_swiglu():
    """RMSNorm (pow, mean, add, rsqrt, mul) and a SwiGLU MLP (silu(a) * b): every op has a rule."""
    torch.manual_seed(14)

    class RMSNorm(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.w = nn.Parameter(torch.rand(d) + 0.5)

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w

    class Block(nn.Module):
        def __init__(self, d=6):
            super().__init__()
            self.norm = RMSNorm(d)
            self.gate, self.up, self.down = nn.Linear(d, 8, bias=False), nn.Linear(d, 8, bias=False), nn.Linear(8, d)
            self.head = nn.Linear(d, 4)

        def forward(self, x):
            h = self.norm(x)
            x = x + self.down(F.silu(self.gate(h)) * self.up(h))
            return self.head(x)

    model = Block().double()
    x, y = torch.randn(9, 6), torch.randint(0, 4, (9,))
    ex = hessian_diag(model, nn.CrossEntropyLoss(), (x, y), method="exact", progress=False)
    ob = hessian_diag(model, nn.CrossEntropyLoss(), (x, y), method="obd", progress=False)
    lm = hessian_diag(model, nn.CrossEntropyLoss(), (x, y), method="lm", progress=False)
    assert set(ob) == set(ex)
    assert close(ob["head.weight"], ex["head.weight"])
    assert all((v >= 0).all() for v in lm.values())


GPU_DEVICES = [d for d in ("cuda",) if torch.cuda.is_available()]


@pytest.mark.parametrize("device", GPU_DEVICES)
def test_cuda_matches_cpu(device):
    """Runs where a GPU is: the sweep and its kernels on CUDA agree with the CPU (float64)."""
    from testing import require_kernels

    require_kernels(device)
    torch.manual_seed(15)
    model = GPT(vocab=11, d=8, layers=1, heads=2, seq=5, tied=True).double()
    idx, target = torch.randint(0, 11, (2, 5)), torch.randint(0, 11, (10,))
    for method in ("obd", "lm"):
        cpu = hessian_diag(model, nn.CrossEntropyLoss(), (idx, target), method=method, progress=False)
        gpu = hessian_diag(model.to(device), nn.CrossEntropyLoss(), (idx.to(device), target.to(device)),
                           method=method, progress=False)
        model.cpu()
        for k in cpu:
            assert close(gpu[k].cpu(), cpu[k], 1e-9), (method, k)


@pytest.mark.parametrize("method", ["fisher", "ggn-mc"])
@pytest.mark.parametrize("loss", ["ce", "mse-sum", "mse-mean"])
def test_fisher_fast_path_equals_per_sample_gradients(method, loss, monkeypatch):
    """The squared-operand form (G*G)^T (X*X) on row-per-sample models equals per-sample gradients."""
    from obd_ext.curvature import estimators

    model = mlp(nn.Tanh, sizes=(5, 7, 6, 3))
    x, y = data(classes=(loss == "ce"))
    loss_fn = {"ce": nn.CrossEntropyLoss(), "mse-sum": nn.MSELoss(reduction="sum"), "mse-mean": nn.MSELoss()}[loss]
    fast = hessian_diag(model, loss_fn, (x, y), method=method, seed=3, progress=False)
    monkeypatch.setattr(estimators, "_rows_fast_path", lambda *a: (None, None))
    slow = hessian_diag(model, loss_fn, (x, y), method=method, seed=3, progress=False)
    assert all(close(fast[k], slow[k], 1e-9) for k in slow)
