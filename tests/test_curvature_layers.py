"""Curvature rules for common layers (issue 13, item 3): every rule against
autograd in float64.

Two checks per rule:

- the rule alone: for y = op(x) with random g, H at y, the rule's H at x equals
  diag(J^T diag(H) J) + sum_j g_j d2y_j/dx^2 (OBD) and diag(J^T diag(H) J) (LM),
  by brute force (testing.brute_rule_diagonal);
- in a model where the sweep's result is exact: a per-entry scale s before the
  op and an elementwise loss after it (``L = mse(op(s * x0), t)``), so the
  Hessian in s is diag(x0)^2 times the op's own squared-Jacobian rule: ``obd``
  equals the Hessian's diagonal (method='exact') and ``lm`` the Gauss-Newton
  diagonal; and a layer's own parameters directly under the loss.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from obd_ext.curvature import hessian_diag, rules
from testing import brute_rule_diagonal, float64_by_default  # noqa: F401  (autouse fixture: every test in float64)


def _gn_diag(fn, s: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The Gauss-Newton diagonal in s of mse(fn(s * x0), t, 'sum')."""
    jac = torch.autograd.functional.jacobian(lambda v: fn(v.reshape(s.shape) * x0).reshape(-1), s.detach().reshape(-1))
    return (2.0 * jac ** 2).sum(0).reshape(s.shape)


class Scaled(nn.Module):
    """y = fn(s * x): a per-entry scale before the op under test."""

    def __init__(self, fn, shape, gen):
        super().__init__()
        self.fn = fn
        self.s = nn.Parameter(1.0 + 0.3 * torch.randn(shape, generator=gen))

    def forward(self, x):
        return self.fn(self.s * x)


def check_scaled(fn, shape, seed=0, x0=None, ref=None):
    """obd equals the Hessian's diagonal and lm the Gauss-Newton diagonal in s, exactly
    (``ref``: the same function written with ops that have a double backward)."""
    gen = torch.Generator().manual_seed(seed)
    model = Scaled(fn, shape, gen)
    x0 = torch.randn(shape, generator=gen) if x0 is None else x0
    with torch.no_grad():
        t = torch.randn(fn(x0).shape, generator=gen)
    loss = nn.MSELoss(reduction="sum")
    oracle = model if ref is None else Scaled(ref, shape, torch.Generator().manual_seed(seed))
    ex = hessian_diag(oracle, loss, (x0, t), method="exact", progress=False)["s"]
    ob = hessian_diag(model, loss, (x0, t), method="obd", progress=False)["s"]
    lm = hessian_diag(model, loss, (x0, t), method="lm", progress=False)["s"]
    torch.testing.assert_close(ob, ex, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(lm, _gn_diag(ref or fn, model.s, x0, t), rtol=1e-9, atol=1e-10)
    return ob


def check_rule(fn, x, idx=0, ref=None, g_rtol=1e-9):
    """The node's rule alone against brute force, OBD and LM, and its gradient."""
    x = x.detach().requires_grad_()
    y = fn(x)
    gen = torch.Generator().manual_seed(3)
    g, h = torch.randn(y.shape, generator=gen), torch.rand(y.shape, generator=gen)
    full, gn = brute_rule_diagonal(ref or fn, x, g, h)
    for lm in (False, True):
        ctx = rules.Ctx(lm)
        ctx.g_wanted = [True] * len(y.grad_fn.next_functions)
        g_in, h_in = rules.rule_for(y.grad_fn)(y.grad_fn, [g], [h], ctx)
        got = h_in[idx]
        got = got if got.shape == x.shape else got.sum_to_size(x.shape)
        torch.testing.assert_close(got, gn if lm else full, rtol=1e-9, atol=1e-10)
        if not lm:
            vjp = torch.autograd.grad(y, x, g, retain_graph=True)[0]
            gi = g_in[idx] if g_in[idx].shape == x.shape else g_in[idx].sum_to_size(x.shape)
            torch.testing.assert_close(gi, vjp, rtol=g_rtol, atol=1e-12)


# ---------------------------------------------------------------------------
# Normalisations with statistics of the input
# ---------------------------------------------------------------------------

NORMS = {
    "group_norm": lambda v: F.group_norm(v, 2, torch.linspace(0.5, 2, 4), torch.linspace(-1, 1, 4)),
    "group_norm_plain": lambda v: F.group_norm(v, 4),
    "instance_norm": lambda v: F.instance_norm(v, weight=torch.linspace(0.5, 2, 4), bias=torch.zeros(4)),
    "batch_norm_train": lambda v: F.batch_norm(v, None, None, torch.linspace(0.5, 2, 4), None, training=True),
}


@pytest.mark.parametrize("op", list(NORMS))
def test_norm_rules(op):
    x = torch.randn(2, 4, 3, 2, generator=torch.Generator().manual_seed(1))
    if op != "instance_norm":  # a batch norm between two views: not one node
        check_rule(NORMS[op], x)
    check_scaled(NORMS[op], (2, 4, 3, 2))


@pytest.mark.parametrize("layer", ["group", "instance", "batch_train"])
def test_norm_layer_parameters_under_the_loss(layer):
    torch.manual_seed(0)
    norm = {"group": nn.GroupNorm(2, 4), "instance": nn.InstanceNorm2d(4, affine=True),
            "batch_train": nn.BatchNorm2d(4)}[layer]
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), norm).train()
    x, t = torch.randn(3, 3, 5, 5), torch.randn(3, 4, 3, 3)
    names = ["1.weight", "1.bias"]
    ex = hessian_diag(model, nn.MSELoss(), (x, t), method="exact", params=names, progress=False)
    for method in ("obd", "lm"):
        got = hessian_diag(model, nn.MSELoss(), (x, t), method=method, progress=False)
        for k in names:
            torch.testing.assert_close(got[k], ex[k], rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------
# Resampling, index maps, reductions with ties, where
# ---------------------------------------------------------------------------

_IDX = torch.tensor([[[2, 0], [1, 1], [0, 0]], [[1, 2], [2, 2], [0, 1]]])  # 2 x 3 x 2, into dim 1 of size 3

MAPS = {
    "nearest": (lambda v: F.interpolate(v, scale_factor=2), (2, 2, 3, 2)),
    "nearest_size": (lambda v: F.interpolate(v, size=(5, 3)), (2, 2, 3, 2)),
    "nearest_exact": (lambda v: F.interpolate(v, size=(5, 3), mode="nearest-exact"), (2, 2, 3, 2)),
    "bilinear": (lambda v: F.interpolate(v, scale_factor=2, mode="bilinear"), (2, 2, 3, 2)),
    "bilinear_align": (lambda v: F.interpolate(v, size=(5, 4), mode="bilinear", align_corners=True), (2, 2, 3, 2)),
    "bilinear_down_aa": (lambda v: F.interpolate(v, size=(2, 3), mode="bilinear", antialias=True), (1, 2, 5, 4)),
    "bicubic": (lambda v: F.interpolate(v, scale_factor=1.5, mode="bicubic"), (1, 2, 3, 4)),
    "linear": (lambda v: F.interpolate(v, size=7, mode="linear"), (2, 2, 4)),
    "trilinear": (lambda v: F.interpolate(v, scale_factor=2, mode="trilinear"), (1, 1, 2, 3, 2)),
    "pixel_shuffle": (lambda v: F.pixel_shuffle(v, 2), (2, 4, 2, 3)),
    "pixel_unshuffle": (lambda v: F.pixel_unshuffle(v, 2), (2, 1, 4, 2)),
    "gather": (lambda v: v.gather(1, _IDX), (2, 3, 2)),
    "index_select": (lambda v: v.index_select(1, torch.tensor([2, 0, 2, 1])), (2, 3, 2)),
    "as_strided": (lambda v: v.as_strided((3, 3), (2, 1)), (2, 4)),  # overlapping windows
    "as_strided_": (lambda v: (v * 1.0).as_strided_((2, 3), (1, 2), 1), (2, 4)),  # in place (AdaptiveAvgPool1d in Swin)
    "unsafe_split": (lambda v: v.unsafe_split(2, 1)[1], (2, 4, 3)),
    "amax": (lambda v: v.amax(1), (2, 3, 4)),
    "amin_keepdim": (lambda v: v.amin((0, 2), keepdim=True), (2, 3, 4)),
    "max_all": (lambda v: v.max(), (2, 3)),
    "max_dim": (lambda v: v.max(1)[0], (2, 3, 4)),
    "min_dim": (lambda v: v.min(2)[0], (2, 3, 4)),
    "adaptive_max_pool1d": (lambda v: F.adaptive_max_pool1d(v, 3), (2, 2, 7)),
    "where": (lambda v: torch.where(v > 0, v, 0.0), (2, 3, 2)),
    "unfold": (lambda v: F.unfold(v, 2), (1, 2, 3, 3)),  # overlapping patches
    "fold": (lambda v: F.fold(v, (3, 3), 2), (1, 8, 4)),  # overlapping patches summed
    "tensor_unfold": (lambda v: v.unfold(1, 3, 1), (2, 5)),
    "roll_flip": (lambda v: v.roll(1, 1).flip(0), (2, 3)),
    "in_place_views": (lambda v: (v * 1.0).transpose_(0, 2).unsqueeze_(0).squeeze_(2).squeeze_(), (2, 1, 3)),
}


def _with_ties(x: torch.Tensor) -> torch.Tensor:
    """Every other entry rounded to -0.5 or 0.5: reductions meet ties (the gradient is shared)."""
    x = x.clone()
    flat = x.reshape(-1)
    flat[::2] = torch.where(flat[::2] > 0, 0.5, -0.5)
    return x


@pytest.mark.parametrize("op", list(MAPS))
def test_linear_maps(op):
    fn, shape = MAPS[op]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    if op.startswith(("amax", "amin", "max_all")):
        x = _with_ties(x)
        assert (x == 0.5).sum() > 1
    y = fn(x.requires_grad_())
    one_node = all(c is None or hasattr(c, "variable") for c, _ in y.grad_fn.next_functions)
    if one_node and len(y.grad_fn._input_metadata) == 1:  # the harness feeds one output
        check_rule(fn, x)
    # the scale s keeps the ties of x0 only where it is 1: ties of the reductions are met by x0 = 0 in s * x0
    x0 = x.detach().clone()
    if op.startswith(("amax", "amin", "max_all")):
        x0[x0.abs() == 0.5] = 0.0
    check_scaled(fn, shape, x0=x0)


ELEMENTWISE = {
    "mish": F.mish,
    "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid,
    "clamp": lambda v: v.clamp(-0.5, 0.7),
    "clamp_min": lambda v: v.clamp(min=0.1),
    "logsigmoid": F.logsigmoid,
    "erf": torch.erf,
    "sin": torch.sin,
    "cos": torch.cos,
    "topk": lambda v: v.topk(2, dim=1)[0],
    "sort": lambda v: v.sort(dim=0)[0],
    "median_dim": lambda v: v.median(1)[0],
    "median_all": lambda v: v.median(),
    "kthvalue": lambda v: v.kthvalue(2, 1)[0],
}


@pytest.mark.parametrize("op", list(ELEMENTWISE))
def test_more_elementwise_functions_and_selections(op):
    fn = ELEMENTWISE[op]
    # PyTorch has no double backward for hardsigmoid: the oracle is relu6(x + 3) / 6
    ref = (lambda v: F.relu6(v + 3) / 6) if op == "hardsigmoid" else None
    x = 2.5 * torch.randn(3, 4, generator=torch.Generator().manual_seed(4))  # both sides of hardswish's kinks
    check_rule(fn, x, ref=ref, g_rtol=1e-7 if ref else 1e-9)  # PyTorch's hardsigmoid gradient: 1/6 in float32
    check_scaled(fn, (3, 4), x0=x, ref=ref)
    if op in ("mish", "hardswish", "sin"):  # inside a region: x enters twice
        check_scaled(lambda v: fn(v) * v, (3, 4), x0=x)


@pytest.mark.parametrize("which", ["maximum", "minimum"])
def test_maximum_minimum(which):
    """Two inputs (ties split the gradient in halves); in a region with one tensor entering twice."""
    f = getattr(torch, which)
    other = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
    check_rule(lambda v: f(v, other), torch.randn(3, 4))
    check_scaled(lambda v: f(v, other), (3, 4))
    check_scaled(lambda v: f(v, 0.3 * v) * torch.tanh(v), (3, 4))  # leaky ReLU written with maximum
    x = torch.randn(3, 4)
    check_rule(lambda v: f(v, x), x)  # every entry a tie: halves


def test_where_in_an_elementwise_region():
    """where(x > 0, x, 0.1 x): x enters twice, a leaky ReLU written out (its second
    derivative is 0: obd and lm are both the exact diagonal)."""
    check_scaled(lambda v: torch.sigmoid(torch.where(v > 0, v, 0.1 * v)) * v, (3, 4))


@pytest.mark.parametrize("mode", ["sum", "mean", "max", "sum_weighted", "mean_padding"])
def test_embedding_bag(mode):
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(7, 3, mode=mode.split("_")[0], padding_idx=0 if "padding" in mode else None)
    ids = torch.tensor([1, 2, 4, 1, 0, 5, 6, 1, 0])
    offsets = torch.tensor([0, 3, 5, 5])  # one empty bag
    psw = torch.rand(9) + 0.5 if "weighted" in mode else None

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag = bag

        def forward(self, x):
            return self.bag(x, offsets, per_sample_weights=psw)

    class Composite(nn.Module):
        """The same bags from differentiable ops (embedding_bag has no double backward)."""

        def __init__(self):
            super().__init__()
            self.bag = bag

        def forward(self, x):
            rows = self.bag.weight[x] * (psw.unsqueeze(1) if psw is not None else 1.0)
            keep = (x != 0) if "padding" in mode else torch.ones_like(x, dtype=torch.bool)
            which = torch.repeat_interleave(torch.arange(4), torch.diff(offsets, append=torch.tensor([len(x)])))
            out = []
            for b in range(4):
                sel = rows[(which == b) & keep]
                if len(sel) == 0:
                    out.append(torch.zeros(3))
                elif mode.startswith("max"):
                    out.append(sel.max(0)[0])
                else:
                    out.append(sel.mean(0) if mode.startswith("mean") else sel.sum(0))
            return torch.stack(out)

    model = Model()
    t = torch.randn(4, 3)
    torch.testing.assert_close(Composite()(ids), model(ids))
    ex = hessian_diag(Composite(), nn.MSELoss(), (ids, t), method="exact", progress=False)["bag.weight"]
    for method in ("obd", "lm"):
        got = hessian_diag(model, nn.MSELoss(), (ids, t), method=method, progress=False)["bag.weight"]
        torch.testing.assert_close(got, ex, rtol=1e-9, atol=1e-12)
    assert ex.abs().sum() > 0


# ---------------------------------------------------------------------------
# RMS normalisation: nn.RMSNorm, F.rms_norm and the hand-written forms
# ---------------------------------------------------------------------------


class LlamaStyleRMSNorm(nn.Module):
    """Llama's RMSNorm as transformers writes it (without the float32 cast)."""

    def __init__(self, d: int, eps: float = 1e-6, form: str = "rsqrt"):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 2.0, d))
        self.eps, self.form = eps, form

    def forward(self, x):
        if self.form == "rsqrt":
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        if self.form == "div":  # x / sqrt(mean(x * x))
            return self.weight * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.eps))
        # a cast to float32 and back around the statistics, as transformers' Llama does
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


RMS = {
    "nn.RMSNorm": lambda: nn.RMSNorm(5, elementwise_affine=True),
    "F.rms_norm_2d": lambda: (lambda v: F.rms_norm(v, (2, 5), eps=1e-5)),
    "llama": lambda: LlamaStyleRMSNorm(5),
    "div": lambda: LlamaStyleRMSNorm(5, form="div"),
}


@pytest.mark.parametrize("form", list(RMS))
def test_rms_norm_exact(form):
    """The layer below an RMS norm was up to 3.4x off (per-node rules drop the
    cross terms through the mean); the unit's closed form is exact."""
    norm = RMS[form]()
    if isinstance(norm, nn.RMSNorm):
        with torch.no_grad():
            norm.weight.copy_(torch.linspace(0.5, 2.0, 5))
    check_scaled(norm, (3, 2, 5))


def test_rms_norm_weight_and_cast():
    """The weight under the loss is exact; with the float32 cast the unit still
    matches (to float32 rounding) and the input gets the float64 dtype back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), LlamaStyleRMSNorm(5, form="cast"))
    x, t = torch.randn(6, 4), torch.randn(6, 5)
    ex = hessian_diag(model, nn.MSELoss(), (x, t), method="exact", progress=False)
    for method in ("obd", "lm"):
        got = hessian_diag(model, nn.MSELoss(), (x, t), method=method, progress=False)
        assert got["0.weight"].dtype == torch.float64
        torch.testing.assert_close(got["1.weight"], ex["1.weight"], rtol=1e-5, atol=1e-7)
    got = hessian_diag(model, nn.MSELoss(), (x, t), method="obd", progress=False)
    # the Linear's bias: per-entry exactness does not hold (shared over rows), but the
    # cross terms through the mean are there: within 1e-5 of a float64 run of the same unit
    ref = nn.Sequential(model[0], LlamaStyleRMSNorm(5))
    ref[1].weight = model[1].weight
    want = hessian_diag(ref, nn.MSELoss(), (x, t), method="obd", progress=False)
    torch.testing.assert_close(got["0.bias"], want["0.bias"], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# Fallbacks that work (issue 13, item 4)
# ---------------------------------------------------------------------------


def test_hutchinson_and_exact_with_a_parameter_outside_the_loss():
    """An untied embedding the forward never uses (T5's `shared`): zeros, not PyTorch's
    'appears to not have been used in the graph'."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Embedding(4, 3)})
    run = lambda x: model["used"](x)  # noqa: E731

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            return run(x)

    x, t = torch.randn(5, 3), torch.randn(5, 2)
    for method in ("hutchinson", "exact"):
        res = hessian_diag(M(), nn.MSELoss(), (x, t), method=method, progress=False)
        assert torch.equal(res["m.unused.weight"], torch.zeros(4, 3))
        assert res["m.used.weight"].abs().sum() > 0


def test_exact_on_group_norm_equals_autograd():
    """exact on GroupNorm (PyTorch's batched double backward fails there): one row at a time."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh())
    x, t = torch.randn(2, 2, 5, 5), torch.randn(2, 4, 3, 3)
    got = hessian_diag(model, nn.MSELoss(), (x, t), method="exact", params=["0.bias"], progress=False)["0.bias"]
    loss = nn.MSELoss()(model(x), t)
    (g,) = torch.autograd.grad(loss, model[0].bias, create_graph=True)
    want = torch.stack([torch.autograd.grad(g[i], model[0].bias, retain_graph=True)[0][i] for i in range(4)])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_no_double_backward_is_a_clear_error():
    """EmbeddingBag has no double backward in PyTorch: exact / hutchinson say so and name
    the methods that run (obd, lm, fisher)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(7, 3, mode="mean"), nn.Linear(3, 2))
    ids, t = torch.randint(0, 7, (4, 3)), torch.randn(4, 2)
    for method in ("exact", "hutchinson"):
        with pytest.raises(rules.UnsupportedOpError, match=r"embedding_bag.*method='obd' or 'lm'.*'fisher'"):
            hessian_diag(model, nn.MSELoss(), (ids, t), method=method, progress=False)
    for method in ("obd", "lm"):
        assert hessian_diag(model, nn.MSELoss(), (ids, t), method=method, progress=False)["0.weight"].abs().sum() > 0
    model = nn.Sequential(nn.Linear(3, 3), nn.Hardsigmoid())
    with pytest.raises(rules.UnsupportedOpError, match=r"hardsigmoid_backward.*method='obd' or 'lm'"):
        hessian_diag(model, nn.MSELoss(), (torch.randn(4, 3), torch.randn(4, 3)), method="exact", progress=False)


def test_fisher_on_lstm_equals_a_loop_over_samples():
    """nn.LSTM cannot be batched by vmap (its hidden state): per-sample gradients one
    sample at a time, equal to a plain loop."""
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(3, 4, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    model = M()
    x, t = torch.randn(3, 5, 3), torch.randn(3, 2)
    got = hessian_diag(model, nn.MSELoss(reduction="sum"), (x, t), method="fisher", progress=False)
    for k, p in model.named_parameters():
        want = torch.zeros_like(p)
        for n in range(3):
            (gr,) = torch.autograd.grad(nn.MSELoss(reduction="sum")(model(x[n:n + 1]), t[n:n + 1]), p)
            want += gr * gr
        torch.testing.assert_close(got[k], want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_recurrent_layers_run_and_the_head_is_exact(cell):
    """On CPU PyTorch records nn.LSTM / GRU / RNN as cell ops (addmm, unsafe_split,
    sigmoid, tanh, products): obd / lm run, exact on the linear head under MSE."""
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = getattr(nn, cell)(3, 4, num_layers=2, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0])

    model = M()
    x, t = torch.randn(2, 4, 3), torch.randn(2, 4, 2)
    ex = hessian_diag(model, nn.MSELoss(), (x, t), method="exact", params=["head.weight", "head.bias"],
                      progress=False)
    for method in ("obd", "lm"):
        got = hessian_diag(model, nn.MSELoss(), (x, t), method=method, progress=False)
        assert set(got) == {k for k, _ in model.named_parameters()}
        assert all(bool(torch.isfinite(v).all()) and v.abs().sum() > 0 for v in got.values())
        for k in ex:
            torch.testing.assert_close(got[k], ex[k], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_recurrent_layers_in_float32_record_cell_ops(cell):
    """In float32 on CPU PyTorch runs nn.LSTM / GRU as one oneDNN node (cuDNN on GPU),
    which no rule can read and which has no double backward: recordable(model) runs
    them as cell ops (same outputs to rounding), for every method."""
    from obd_ext.curvature import recordable

    torch.manual_seed(0)
    model = nn.Sequential()
    model.rnn = getattr(nn, cell)(3, 4, batch_first=True)
    model = model.float()
    head = nn.Linear(4, 2).float()

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = model.rnn, head

        def forward(self, x):
            return self.head(self.rnn(x)[0])

    m = M()
    x, t = torch.randn(2, 5, 3, dtype=torch.float32), torch.randn(2, 5, 2, dtype=torch.float32)
    with recordable(m):
        y = m(x)
    torch.testing.assert_close(y, m(x), rtol=1e-5, atol=1e-6)
    ex = hessian_diag(m, nn.MSELoss(), (x, t), method="exact", params=["head.weight"], progress=False)
    for method in ("obd", "lm", "hutchinson", "fisher"):
        got = hessian_diag(m, nn.MSELoss(), (x, t), method=method, progress=False)
        assert all(bool(torch.isfinite(v).all()) for v in got.values()) and got["rnn.weight_hh_l0"].abs().sum() > 0
        if method in ("obd", "lm"):
            torch.testing.assert_close(got["head.weight"], ex["head.weight"], rtol=1e-4, atol=1e-6)
