"""Cases where the curvature engine must be exact (float64, against autograd):
average pools of every kind, elementwise regions (one tensor entering an
elementwise expression more than once), and the per-sample estimators on
every target form of cross-entropy; plus the clear errors that replace
silently wrong numbers (reentrant checkpoints)."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from testing import brute_rule_diagonal, float64_by_default  # noqa: F401  (autouse fixture: every test in float64)
from obd_ext.curvature import hessian_diag, rules


def close(a, b, tol=1e-10):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def rule_on(fn, x, g, h, lm):
    """(g_in, h_in) of the rule of fn's last node, summed to x's shape."""
    y = fn(x)
    ctx = rules.Ctx(lm)
    ctx.g_wanted = [True] * len(y.grad_fn.next_functions)
    g_in, h_in = rules.rule_for(y.grad_fn)(y.grad_fn, [g], [h], ctx)
    return g_in[0], h_in[0]


# ---------------------------------------------------------------------------
# Average pools: every window's own divisor
# ---------------------------------------------------------------------------

POOLS = {
    "ceil": lambda v: F.avg_pool2d(v, 2, ceil_mode=True),
    "ceil_stride": lambda v: F.avg_pool2d(v, 3, 2, ceil_mode=True),
    "pad": lambda v: F.avg_pool2d(v, 3, 2, padding=1),
    "pad_exclude": lambda v: F.avg_pool2d(v, 3, 2, padding=1, count_include_pad=False),
    "pad_ceil_exclude": lambda v: F.avg_pool2d(v, 3, 2, padding=1, ceil_mode=True, count_include_pad=False),
    "pad_ceil_include": lambda v: F.avg_pool2d(v, 3, 2, padding=1, ceil_mode=True),
    "divisor": lambda v: F.avg_pool2d(v, 2, 1, divisor_override=3),
    "divisor_pad": lambda v: F.avg_pool2d(v, 3, 2, padding=1, divisor_override=5),
    "overlap": lambda v: F.avg_pool2d(v, 3, 1),
    "1d_ceil": lambda v: F.avg_pool1d(v.flatten(2), 4, 3, padding=1, ceil_mode=True, count_include_pad=False),
    "3d_ceil": lambda v: F.avg_pool3d(v.reshape(2, 1, 2, 5, 5), 2, ceil_mode=True),
    "3d_pad": lambda v: F.avg_pool3d(v.unsqueeze(2), (1, 3, 3), (1, 2, 2), (0, 1, 1), count_include_pad=False),
    "adaptive_uneven": lambda v: F.adaptive_avg_pool2d(v, (2, 3)),
    "adaptive_1d": lambda v: F.adaptive_avg_pool1d(v.flatten(2), 4),
    "adaptive_3d": lambda v: F.adaptive_avg_pool3d(v.unsqueeze(2), (1, 3, 2)),
}


class Scaled(nn.Module):
    """y = fn(s * x), s of x's full shape (one scale per entry): each s_i touches
    one input entry, so the exact Hessian diagonal of s is x_i^2 times the
    diagonal of J^T diag(H_y) J at fn's input, with nothing dropped."""

    def __init__(self, fn, shape):
        super().__init__()
        self.fn = fn
        self.s = nn.Parameter(torch.rand(shape) + 0.5)

    def forward(self, x):
        return self.fn(self.s * x)


@pytest.mark.parametrize("which", list(POOLS))
def test_average_pools_are_exact(which):
    torch.manual_seed(0)
    fn = POOLS[which]
    x = torch.randn(2, 2, 5, 5)
    model = Scaled(fn, x.shape)
    t = torch.randn(fn(x).shape)
    ex = hessian_diag(model, nn.MSELoss(reduction="sum"), (x, t), method="exact", progress=False)["s"]
    for method in ("obd", "lm"):  # a linear map under MSE: the Gauss-Newton diagonal is the Hessian's
        got = hessian_diag(model, nn.MSELoss(reduction="sum"), (x, t), method=method, progress=False)["s"]
        assert close(got, ex), (which, method, float((got - ex).abs().max()))


@pytest.mark.parametrize("which", list(POOLS))
def test_average_pool_rules_against_brute_force(which):
    torch.manual_seed(1)
    x = torch.randn(2, 2, 5, 5, requires_grad=True)
    node = POOLS[which](x).grad_fn
    while "Pool" not in type(node).__name__:  # the pool itself, under views
        node = node.next_functions[0][0]
    shape = node._input_metadata[0].shape
    g, h = torch.randn(shape), torch.rand(shape)
    ctx = rules.Ctx(False)
    ctx.g_wanted = [True]
    g_in, h_in = rules.rule_for(node)(node, [g], [h], ctx)
    v = node._saved_self.detach().requires_grad_()
    full, gn = brute_rule_diagonal(lambda t: _pool_of(node, t), v, g, h)
    assert close(h_in[0], full) and close(h_in[0], gn), which  # linear: no second-derivative term
    assert close(g_in[0], torch.autograd.grad(_pool_of(node, v), v, g)[0]), which


def _pool_of(node, v):
    """Re-run the pool of ``node`` on v with the node's own settings."""
    name = type(node).__name__
    if name.startswith("Adaptive"):
        shape = tuple(node._input_metadata[0].shape)
        nd = 3 if "3D" in name else 2
        return (F.adaptive_avg_pool3d if nd == 3 else F.adaptive_avg_pool2d)(v, shape[-nd:])
    nd = 3 if "3D" in name else 2
    pool = F.avg_pool3d if nd == 3 else F.avg_pool2d
    ks = list(node._saved_kernel_size)
    return pool(v, ks, list(node._saved_stride) or ks, list(node._saved_padding), bool(node._saved_ceil_mode),
                bool(node._saved_count_include_pad), node._saved_divisor_override)


# ---------------------------------------------------------------------------
# Checkpointed blocks: a clear error for the reentrant kind, equal results otherwise
# ---------------------------------------------------------------------------

METHODS = ("obd", "lm", "fisher", "ggn-mc", "hutchinson", "exact")


class Checkpointed(nn.Module):
    """A block under torch.utils.checkpoint (or not: mode None), first or in the middle."""

    def __init__(self, mode, first):
        super().__init__()
        torch.manual_seed(4)
        self.a = nn.Linear(4, 4)
        self.block = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
        self.b = nn.Linear(5, 3)
        self.mode, self.first = mode, first

    def forward(self, x):
        h = x if self.first else torch.tanh(self.a(x))
        if self.mode is None:
            h = self.block(h)
        else:
            from torch.utils.checkpoint import checkpoint

            h = checkpoint(self.block, h, use_reentrant=self.mode == "reentrant")
        return self.b(h)


@pytest.mark.parametrize("first", [True, False], ids=["block-first", "block-inside"])
@pytest.mark.parametrize("method", METHODS)
def test_reentrant_checkpoint_is_one_clear_error_for_every_method(method, first):
    """fisher / ggn-mc gave exactly 0 for the block's parameters (block first) or failed
    inside PyTorch; now every method raises the same error naming the fix."""
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    from obd_ext.curvature import UnsupportedOpError

    with pytest.raises(UnsupportedOpError, match=r"use_reentrant=True.*use_reentrant=False"):
        hessian_diag(Checkpointed("reentrant", first), nn.CrossEntropyLoss(), (x, y), method=method, progress=False)


@pytest.mark.parametrize("method", METHODS)
def test_non_reentrant_checkpoint_gives_the_unchecked_numbers(method):
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    plain = hessian_diag(Checkpointed(None, False), nn.CrossEntropyLoss(), (x, y), method=method, progress=False)
    ck = hessian_diag(Checkpointed("plain", False), nn.CrossEntropyLoss(), (x, y), method=method, progress=False)
    for k in plain:
        assert close(ck[k], plain[k]), (method, k)
    assert float(ck["block.0.weight"].abs().max()) > 0


# ---------------------------------------------------------------------------
# Elementwise regions: one tensor entering an elementwise expression twice
# ---------------------------------------------------------------------------

GELU_C = math.sqrt(2.0 / math.pi)

EXPRESSIONS = {
    "u+u": lambda u: u + u,
    "u-2u": lambda u: u - 2 * u,
    "u*u": lambda u: u * u,
    "u*u*u": lambda u: u * u * u,
    "u*sigmoid(u)": lambda u: u * torch.sigmoid(u),
    "mish": lambda u: u * torch.tanh(F.softplus(u)),
    "u/(1+u^2)": lambda u: u / (1 + u ** 2),
    "gelu_new": lambda u: 0.5 * u * (1.0 + torch.tanh(GELU_C * (u + 0.044715 * torch.pow(u, 3.0)))),
    "exp(-u^2)": lambda u: torch.exp(-u * u),
    "sqrt(u^2+1)": lambda u: torch.sqrt(u * u + 1.0),
    "u-tanh(u)": lambda u: u - torch.tanh(u),
    "tanh(u)/sigmoid(u)": lambda u: torch.tanh(u) / torch.sigmoid(u),
    "log(u^2+1)*u": lambda u: torch.log(u.square() + 1) * u,
    "u*sigmoid(u.clone())": lambda u: u * torch.sigmoid(u.clone()),
}


class PerFeature(nn.Module):
    """y = F(s * x + b) with per-feature s, b (broadcast over the batch): under an
    elementwise loss the Hessian of s (and of b) is exactly diagonal."""

    def __init__(self, fn, features=4, twice=False):
        super().__init__()
        self.fn, self.twice = fn, twice
        self.s = nn.Parameter(torch.rand(features) + 0.5)
        self.b = nn.Parameter(torch.randn(features) * 0.3)

    def forward(self, x):
        u = self.s * x * self.s if self.twice else self.s * x  # twice: the parameter itself enters twice
        return self.fn(u + self.b)


def gauss_newton_diag(model, x, loss_scale):
    """diag(J^T (2c I) J): the Gauss-Newton diagonal under MSE with factor c."""
    from torch.func import functional_call, jacrev

    params = {k: p.detach() for k, p in model.named_parameters()}
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    return {k: 2.0 * loss_scale * (j.reshape(-1, *params[k].shape) ** 2).sum(0) for k, j in jac.items()}


@pytest.mark.parametrize("twice", [False, True], ids=["s", "s-twice"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("expr", list(EXPRESSIONS))
def test_elementwise_regions_are_exact(expr, reduction, twice):
    """obd equals the Hessian's diagonal and lm the Gauss-Newton diagonal (both were
    off by up to 233%: the product, sum and quotient rules dropped their cross terms)."""
    torch.manual_seed(5)
    model = PerFeature(EXPRESSIONS[expr], twice=twice)
    x, t = torch.randn(7, 4), torch.randn(7, 4)
    loss = nn.MSELoss(reduction=reduction)
    ex = hessian_diag(model, loss, (x, t), method="exact", progress=False)
    ob = hessian_diag(model, loss, (x, t), method="obd", progress=False)
    lm = hessian_diag(model, loss, (x, t), method="lm", progress=False)
    gn = gauss_newton_diag(model, x, 1.0 if reduction == "sum" else 1.0 / t.numel())
    for k in ex:
        assert close(ob[k], ex[k]), (expr, k, ob[k], ex[k])
        assert close(lm[k], gn[k]), (expr, k, lm[k], gn[k])


def test_a_dtype_copy_inside_a_region():
    """x * sigmoid(x.float()).double(), as mixed-precision code writes it: the copies are
    identities of the region (exact to float32's rounding), and the input keeps its dtype."""
    torch.manual_seed(11)
    model = PerFeature(lambda u: u * torch.sigmoid(u.float()).double())
    x, t = torch.randn(7, 4), torch.randn(7, 4)
    ex = hessian_diag(model, nn.MSELoss(), (x, t), method="exact", progress=False)
    ob = hessian_diag(model, nn.MSELoss(), (x, t), method="obd", progress=False)
    for k in ex:
        assert ob[k].dtype == torch.float64 and close(ob[k], ex[k], 1e-6), k


class HandWritten(nn.Module):
    """An activation module written out of elementwise ops."""

    def __init__(self, expr):
        super().__init__()
        self.fn = EXPRESSIONS[expr]

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("expr", ["gelu_new", "mish", "u*sigmoid(u)"])
def test_hand_written_activations_exact_in_the_last_two_layers(expr):
    """Under MSE the layer before the last is exact (docs/math.md, "Where the result is exact"):
    with a written-out activation only if the activation is swept as one function."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 6), HandWritten(expr), nn.Linear(6, 4), HandWritten(expr), nn.Linear(4, 3))
    x, t = torch.randn(9, 5), torch.randn(9, 3)
    ex = hessian_diag(model, nn.MSELoss(), (x, t), method="exact", progress=False)
    ob = hessian_diag(model, nn.MSELoss(), (x, t), method="obd", progress=False)
    for k in ("2.weight", "2.bias", "4.weight", "4.bias"):
        assert close(ob[k], ex[k]), (expr, k)


def test_written_out_and_fused_activations_agree_everywhere():
    """The same function as one node (GELU tanh) or written out (gelu_new): equal
    obd and lm in every layer, not just the exact ones."""
    torch.manual_seed(7)
    fused = nn.Sequential(nn.Linear(5, 6), nn.GELU(approximate="tanh"), nn.Linear(6, 6),
                          nn.GELU(approximate="tanh"), nn.Linear(6, 3))
    written = nn.Sequential(nn.Linear(5, 6), HandWritten("gelu_new"), nn.Linear(6, 6), HandWritten("gelu_new"),
                            nn.Linear(6, 3))
    written.load_state_dict(fused.state_dict())
    x, y = torch.randn(9, 5), torch.randint(0, 3, (9,))
    for method in ("obd", "lm"):
        a = hessian_diag(fused, nn.CrossEntropyLoss(), (x, y), method=method, progress=False)
        b = hessian_diag(written, nn.CrossEntropyLoss(), (x, y), method=method, progress=False)
        for k in a:
            assert close(b[k], a[k]), (method, k)


def test_hf_gpt2_gelu_new_equals_gelu_pytorch_tanh():
    """GPT-2's default activation gelu_new is written out of elementwise ops; on the same
    weights obd was 136% and lm 20% away from the one-node gelu_pytorch_tanh."""
    transformers = pytest.importorskip("transformers")

    class Logits(nn.Module):
        def __init__(self, act):
            super().__init__()
            torch.manual_seed(0)
            cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                          activation_function=act, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                          bos_token_id=0, eos_token_id=0)
            self.m = transformers.GPT2LMHeadModel(cfg).double().eval()

        def forward(self, ids):
            out = self.m(input_ids=ids).logits
            return out.reshape(-1, out.shape[-1])

    new, fused = Logits("gelu_new"), Logits("gelu_pytorch_tanh")
    fused.load_state_dict(new.state_dict())
    g = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, 40, (3, 8), generator=g), torch.randint(0, 40, (24,), generator=g)
    for method in ("obd", "lm"):
        a = hessian_diag(new, nn.CrossEntropyLoss(), (ids, y), method=method, progress=False)
        b = hessian_diag(fused, nn.CrossEntropyLoss(), (ids, y), method=method, progress=False)
        for k in b:
            assert close(a[k], b[k], 1e-9), (method, k)


# ---------------------------------------------------------------------------
# The result object and the method names
# ---------------------------------------------------------------------------


def test_curvature_repr_summarises_without_values():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    res = hessian_diag(model, nn.MSELoss(), (torch.randn(5, 3), torch.randn(5, 2)), method="obd", progress=False)
    text = repr(res)
    assert text.startswith("Curvature(method='obd', tensors=4, entries=26, dtype=float64, reduction='mean', "
                           "batches=1, negative="), text
    assert "tensor(" not in text and len(text) < 200


def test_methods_come_from_the_vocabulary():
    from obd_ext import curvature, vocabulary

    assert curvature.METHODS is vocabulary.CURVATURE_METHODS
    data = (torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"method='magnitude' is not accepted by obd_ext.hessian_diag.*Pruner"):
        hessian_diag(nn.Linear(3, 2), nn.MSELoss(), data, method="magnitude", progress=False)
    with pytest.raises(ValueError, match=r"method must be one of .* for obd_ext.hessian_diag, got 'newton'"):
        hessian_diag(nn.Linear(3, 2), nn.MSELoss(), data, method="newton", progress=False)


class ReEntering(nn.Module):
    """u * (v + W v) with v = u * u: a path leaves the elementwise region (through W)
    and comes back into it, so the region is left to the per-node rules."""

    def __init__(self):
        super().__init__()
        self.a, self.w, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        u = self.a(x)
        v = u * u
        return self.out(u * (v + self.w(v)))


def test_a_region_that_a_path_re_enters_falls_back_to_per_node_rules():
    torch.manual_seed(9)
    model = ReEntering()
    x, t = torch.randn(6, 4), torch.randn(6, 2)
    ex = hessian_diag(model, nn.MSELoss(), (x, t), method="exact", progress=False)
    ob = hessian_diag(model, nn.MSELoss(), (x, t), method="obd", progress=False)
    for k in ("out.weight", "out.bias", "w.weight", "w.bias"):  # the last two layers: still exact
        assert close(ob[k], ex[k]), k
    assert all(bool(torch.isfinite(v).all()) for v in ob.values())


def test_regions_found_only_where_a_tensor_rejoins():
    """Plain models have no region (the sweep is unchanged for them); RMSNorm's
    x * rsqrt(mean(x^2)) rejoins through the mean, not elementwise: not an
    elementwise region but a unit of its own (patterns.py)."""
    import sys

    regions = sys.modules["obd_ext.curvature.regions"]

    def found(model, x):
        out = model(x)
        order, consumers, seen, stack = [], {}, {out.grad_fn}, [out.grad_fn]
        while stack:
            n = stack.pop()
            order.append(n)
            for slot, (c, _) in enumerate(n.next_functions):
                if c is not None:
                    consumers.setdefault(c, []).append((n, slot))
                    if c not in seen:
                        seen.add(c)
                        stack.append(c)
        return regions.find_regions(order, consumers)

    x = torch.randn(3, 4)
    assert found(nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2)), x) == []
    (norm,) = found(nn.Sequential(nn.Linear(4, 4), nn.RMSNorm(4), nn.Linear(4, 2)), x)
    assert type(norm).__name__ == "RMSNormUnit" and len(norm.inputs) == 1
    (r,) = found(nn.Sequential(nn.Linear(4, 4), HandWritten("gelu_new")), x)
    assert len(r.nodes) == 8 and len(r.inputs) == 1


# ---------------------------------------------------------------------------
# Errors name the user's modules; the fallbacks run where obd runs
# ---------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.cumsum(self.lin(x), 1)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_unsupported_op_names_the_users_modules():
    from obd_ext.curvature import UnsupportedOpError

    with pytest.raises(UnsupportedOpError, match=r"no second-order rule for cumsum \(the autograd node "
                                                 r"CumsumBackward0\), used in layers\.0 \(Block\), layers\.1 \(Block\);"
                                                 r".*method='hutchinson'"):
        hessian_diag(Encoder(), nn.MSELoss(), (torch.randn(3, 4), torch.randn(3, 3)), progress=False)
    res = hessian_diag(Encoder(), nn.MSELoss(), (torch.randn(3, 4), torch.randn(3, 3)), method="hutchinson",
                       progress=False)
    assert set(res) == {k for k, _ in Encoder().named_parameters()}


class Attention(nn.Module):
    """Scaled-dot-product attention through nn.MultiheadAttention (need_weights=False)
    or nn.TransformerEncoderLayer: fused kernels unless recorded through the math path."""

    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(10)
        self.kind = kind
        self.body = (nn.MultiheadAttention(8, 2, batch_first=True) if kind == "mha"
                     else nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.body(x, x, x, need_weights=False)[0] if self.kind == "mha" else self.body(x)
        return self.head(h).reshape(-1, 3)


@pytest.mark.parametrize("kind", ["mha", "encoder-layer"])
def test_fallbacks_run_on_scaled_dot_product_attention(kind):
    """hutchinson and exact failed with "derivative for
    _scaled_dot_product_flash_attention_for_cpu_backward is not implemented"."""
    model = Attention(kind).eval()
    x, y = torch.randn(2, 5, 8), torch.randint(0, 3, (10,))
    ex = hessian_diag(model, nn.CrossEntropyLoss(), (x, y), method="exact", progress=False)
    ob = hessian_diag(model, nn.CrossEntropyLoss(), (x, y), method="obd", progress=False)
    hu = hessian_diag(model, nn.CrossEntropyLoss(), (x, y), method="hutchinson", samples=2, progress=False)
    assert close(ob["head.weight"], ex["head.weight"]) and close(ob["head.bias"], ex["head.bias"])
    assert set(hu) == set(ex) and all(bool(torch.isfinite(v).all()) for v in hu.values())


# ---------------------------------------------------------------------------
# Max selections (0/1 Jacobians) and the batch-statistics error
# ---------------------------------------------------------------------------

MAXES = {
    "max_pool3d": lambda v: F.max_pool3d(v.unsqueeze(2), (1, 2, 2)),
    "max_pool1d": lambda v: F.max_pool1d(v.flatten(2), 3),
    "adaptive_max_pool2d": lambda v: F.adaptive_max_pool2d(v, (2, 3)),
    "adaptive_max_pool1d": lambda v: F.adaptive_max_pool1d(v.flatten(2), 4),
    "adaptive_max_pool3d": lambda v: F.adaptive_max_pool3d(v.unsqueeze(2), (1, 2, 2)),
    "max_dim": lambda v: v.max(dim=1)[0],
}


@pytest.mark.parametrize("which", list(MAXES))
def test_max_selections_are_exact(which):
    torch.manual_seed(12)
    fn = MAXES[which]
    x = torch.randn(2, 2, 5, 5)
    model = Scaled(fn, x.shape)
    t = torch.randn(fn(x).shape)
    ex = hessian_diag(model, nn.MSELoss(reduction="sum"), (x, t), method="exact", progress=False)["s"]
    for method in ("obd", "lm"):
        got = hessian_diag(model, nn.MSELoss(reduction="sum"), (x, t), method=method, progress=False)["s"]
        assert close(got, ex), (which, method)


def test_instance_norm_runs_in_eval_mode():
    """InstanceNorm normalises with the input's own statistics in eval mode too (it was an
    error sending the user to model.eval()): the per-row closed form (rules_layers.py)."""
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.InstanceNorm2d(3), nn.Flatten(), nn.Linear(27, 2)).eval()
    data = (torch.randn(2, 1, 5, 5), torch.tensor([0, 1]))
    ex = hessian_diag(model, nn.CrossEntropyLoss(), data, method="exact", params=["3.weight"], progress=False)
    ob = hessian_diag(model, nn.CrossEntropyLoss(), data, progress=False)
    assert close(ob["3.weight"], ex["3.weight"]) and ob["0.weight"].abs().sum() > 0
