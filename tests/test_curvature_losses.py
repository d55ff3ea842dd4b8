"""The loss is part of the graph: obd / lm / fisher for every common loss, a
regulariser term and a user's own loss, against autograd (float64, small models).

Each case here raised before the sweep went through the loss's own ops
(label smoothing, class weights, pos_weight, NLLLoss, Huber, SmoothL1, KLDiv,
regularisers, hand-written losses: "no second-order rule for the loss";
fisher on Huber, SmoothL1 and KLDiv: "fisher and ggn-mc need a loss ...").
"""


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from testing import brute_rule_diagonal, fisher_by_loop, float64_by_default  # noqa: F401  (autouse fixture: every test in float64)
from obd_ext.curvature import CurvatureAccumulator, UnsupportedOpError, hessian_diag
from obd_ext.curvature import losses as losses_mod
from obd_ext.curvature.rules import RULES, Ctx


pytestmark = pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss")


def close(a, b, tol=1e-10):
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


class Head(nn.Module):
    """A small MLP (or a conv net on 3 x 3 maps) whose last layer gives the logits;
    ``end``: what the model applies to them (nothing, log_softmax, sigmoid)."""

    def __init__(self, d_out=4, end=None, conv=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = conv
        if conv:
            self.body = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.Tanh())
            self.last = nn.Conv2d(5, d_out, 1)
        else:
            self.body = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
            self.last = nn.Linear(6, d_out)
        self.end = end

    def logits(self, x):
        return self.last(self.body(x))

    def forward(self, x):
        z = self.logits(x)
        if self.end == "log_softmax":
            return torch.log_softmax(z, 1)
        if self.end == "sigmoid":
            return torch.sigmoid(z)
        return z


N, C = 7, 4


N_CONV = 3  # samples of 3 x 3 maps: 27 rows of logits


def _inputs(conv=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((N_CONV, 2, 3, 3) if conv else (N, 5), generator=g)


def _targets(kind, conv=False, seed=2):
    g = torch.Generator().manual_seed(seed)
    shape = (N_CONV, C, 3, 3) if conv else (N, C)
    if kind == "index":
        t = torch.randint(0, C, (N_CONV, 3, 3) if conv else (N,), generator=g)
        t.view(-1)[1] = -100  # one ignored position (ignore_index)
        return t
    if kind == "probs":
        return torch.softmax(torch.randn(shape, generator=g), 1)
    if kind == "logprobs":
        return torch.log_softmax(torch.randn(shape, generator=g), 1)
    if kind == "binary":
        return (torch.rand(shape, generator=g) > 0.5).double()
    if kind == "sign":
        return (torch.rand(shape, generator=g) > 0.5).double() * 2 - 1
    return 2 * torch.randn(shape, generator=g)  # real: residuals both inside and outside Huber's delta


WEIGHT = torch.tensor([0.5, 2.0, 1.0, 3.0])
POS_WEIGHT = torch.tensor([1.0, 3.0, 0.5, 2.0])

# name -> (loss for a reduction, target kind, what the model applies to its logits)
LOSSES = {
    "ce_label_smoothing": (lambda r: nn.CrossEntropyLoss(label_smoothing=0.2, reduction=r), "index", None),
    "ce_weight": (lambda r: nn.CrossEntropyLoss(weight=WEIGHT.double(), reduction=r), "index", None),
    "ce_weight_smoothing": (lambda r: nn.CrossEntropyLoss(weight=WEIGHT.double(), label_smoothing=0.1, reduction=r),
                            "index", None),
    "ce_probabilities": (lambda r: nn.CrossEntropyLoss(reduction=r), "probs", None),
    "bce_pos_weight": (lambda r: nn.BCEWithLogitsLoss(pos_weight=POS_WEIGHT.double(), reduction=r), "binary", None),
    "bce_weight_pos_weight": (lambda r: nn.BCEWithLogitsLoss(weight=WEIGHT.double(), pos_weight=POS_WEIGHT.double(),
                                                             reduction=r), "binary", None),
    "nll": (lambda r: nn.NLLLoss(reduction=r), "index", "log_softmax"),
    "nll_weight": (lambda r: nn.NLLLoss(weight=WEIGHT.double(), reduction=r), "index", "log_softmax"),
    "huber": (lambda r: nn.HuberLoss(delta=0.7, reduction=r), "real", None),
    "smooth_l1": (lambda r: nn.SmoothL1Loss(beta=0.7, reduction=r), "real", None),
    "kldiv": (lambda r: nn.KLDivLoss(reduction=r), "probs", "log_softmax"),
    "kldiv_log_target": (lambda r: nn.KLDivLoss(reduction=r, log_target=True), "logprobs", "log_softmax"),
    "bce_probabilities": (lambda r: nn.BCELoss(reduction=r), "binary", "sigmoid"),
    "soft_margin": (lambda r: nn.SoftMarginLoss(reduction=r), "sign", None),
    "l1": (lambda r: nn.L1Loss(reduction=r), "real", None),
    # reduction "none", then the user's own weighting of the entries
    "huber_none_weighted": (lambda r: (lambda o, t: getattr(torch, r)(
        F.huber_loss(o, t, reduction="none", delta=0.7) * torch.linspace(0.5, 2.0, o.shape[-1]))), "real", None),
    "bce_none_weighted": (lambda r: (lambda o, t: getattr(torch, r)(
        F.binary_cross_entropy_with_logits(o, t, reduction="none") * torch.linspace(0.5, 2.0, o.shape[-1]))),
        "binary", None),
    "own_cross_entropy": (lambda r: (lambda o, t: getattr(torch, r)(
        torch.logsumexp(o, 1) - o.gather(1, t.clamp_min(0).unsqueeze(1)).squeeze(1))), "index", None),
    "mse_regulariser": (None, "real", None),  # built per model: it reads the model's parameters
    "own_loss": (lambda r: (lambda o, t: getattr(torch, r)(torch.log1p((o - t) ** 2) * (1 + 0.5 * torch.tanh(o)))),
                 "real", None),
}
REDUCTIONS = {"kldiv": ("batchmean", "sum", "mean"), "kldiv_log_target": ("batchmean", "sum")}


def make_loss(name, reduction, model):
    if name == "mse_regulariser":
        return lambda o, t: F.mse_loss(o, t, reduction=reduction) + 1e-3 * sum((p ** 2).sum()
                                                                              for p in model.parameters())
    return LOSSES[name][0](reduction)


# losses over a class dimension, run on per-pixel conv outputs too (NllLoss2d, log_softmax over dim 1)
CONV = ("ce_label_smoothing", "ce_weight", "ce_weight_smoothing", "ce_probabilities", "nll", "nll_weight", "huber",
        "smooth_l1", "kldiv", "kldiv_log_target")


def cases(names=LOSSES):
    """(name, reduction, conv) for every loss and reduction; the conv net for CONV's."""
    return [pytest.param(name, r, conv, id=f"{name}-{r}-{'conv' if conv else 'mlp'}") for name in names
            for r in REDUCTIONS.get(name, ("mean", "sum")) for conv in ((False, True) if name in CONV else (False,))]


def ggn_diag_last(model, loss_fn, x, t):
    """diag(J^T H J) for the last layer's parameters, by autograd: J the Jacobian of
    the model output, H the Hessian of the loss with respect to it; the model ends
    at the logits when it applies log_softmax to them (losses.py, "Where the model
    ends"), else at what it returns (a sigmoid's output included)."""
    params = {k: v.detach() for k, v in model.last.named_parameters()}
    squash = torch.sigmoid if model.end == "sigmoid" else (lambda v: v)

    def logits(p):
        return squash(functional_call(model.last, p, (model.body(x).detach(),))).reshape(-1)

    z = logits(params).detach()
    shape = model.logits(x).shape

    def post(zz):
        zz = zz.reshape(shape)
        return torch.log_softmax(zz, 1) if model.end == "log_softmax" else zz

    hess = torch.autograd.functional.hessian(lambda zz: loss_fn(post(zz), t), z, vectorize=True)
    jac = torch.func.jacrev(logits)(params)
    out = {}
    for k, jk in jac.items():
        j = jk.reshape(z.numel(), -1)
        out["last." + k] = torch.einsum("ap,ab,bp->p", j, hess, j).reshape(params[k].shape)
    return out


@pytest.mark.parametrize("name,reduction,conv", cases())
def test_obd_and_lm_exact_on_the_last_layer(name, reduction, conv):
    _, kind, end = LOSSES[name]
    model = Head(end=end, conv=conv).double()
    x, t = _inputs(conv), _targets(kind, conv)
    loss_fn = make_loss(name, reduction, model)
    last = ["last.weight", "last.bias"]
    ex = hessian_diag(model, loss_fn, (x, t), method="exact", params=last, progress=False)
    ob = hessian_diag(model, loss_fn, (x, t), method="obd", progress=False)
    for k in last:
        assert close(ob[k], ex[k]), (k, ob[k], ex[k])
    lm = hessian_diag(model, loss_fn, (x, t), method="lm", progress=False)
    ref = ggn_diag_last(model, loss_fn, x, t)
    if name == "mse_regulariser":  # the regulariser's own Hessian, 2e-3 per entry, is added (losses.py)
        ref = {k: v + 2e-3 for k, v in ref.items()}
    for k in ref:
        assert close(lm[k], ref[k]), (k, lm[k], ref[k])


class Scale(nn.Module):
    """y = x * s + b per feature: under an elementwise loss the Hessian is diagonal,
    so obd must equal it everywhere and lm the Gauss-Newton diagonal."""

    def __init__(self, d=C):
        super().__init__()
        torch.manual_seed(4)
        self.s = nn.Parameter(torch.randn(d))
        self.b = nn.Parameter(0.5 * torch.randn(d))

    def forward(self, x):
        return x[:, :C] * self.s + self.b


ELEMENTWISE = ["bce_pos_weight", "bce_weight_pos_weight", "huber", "smooth_l1", "soft_margin", "l1", "own_loss",
               "huber_none_weighted", "bce_none_weighted",
               "mse_regulariser"]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", ELEMENTWISE)
def test_per_feature_scales_are_exact(name, reduction):
    _, kind, _ = LOSSES[name]
    model = Scale().double()
    x, t = 2 * _inputs(), _targets(kind)
    loss_fn = make_loss(name, reduction, model)
    ps = dict(model.named_parameters())
    full = torch.autograd.functional.hessian(
        lambda s, b: loss_fn(functional_call(model, {"s": s, "b": b}, (x,)), t), (ps["s"].detach(), ps["b"].detach()))
    # the Hessian is diagonal within each parameter: the diagonal is the whole story
    for i, k in enumerate(("s", "b")):
        blk = full[i][i]
        assert close(blk - torch.diag(torch.diagonal(blk)), torch.zeros_like(blk)), k
    # the regulariser reads model.parameters(), not functional_call's: its Hessian 2e-3 by hand
    reg = 2e-3 if name == "mse_regulariser" else 0.0
    ob = hessian_diag(model, loss_fn, (x, t), method="obd", progress=False)
    for i, k in enumerate(("s", "b")):
        assert close(ob[k], torch.diagonal(full[i][i]) + reg), (k, ob[k], torch.diagonal(full[i][i]))
    # lm: J^T H_loss J with J = d out / d (s, b) (diagonal per feature and sample)
    out = model(x).detach()
    h_out = torch.autograd.functional.hessian(lambda o: loss_fn(o.reshape(out.shape), t), out.reshape(-1))
    assert close(h_out - torch.diag(torch.diagonal(h_out)), torch.zeros_like(h_out))
    h_out = torch.diagonal(h_out).reshape(out.shape)
    lm = hessian_diag(model, loss_fn, (x, t), method="lm", progress=False)
    assert close(lm["s"], (x[:, :C] ** 2 * h_out).sum(0) + reg)
    assert close(lm["b"], h_out.sum(0) + reg)


class ScaleAct(Scale):
    """u = x * s + b, then u * tanh(u) (u twice: an elementwise region in the model)."""

    def forward(self, x):
        u = super().forward(x)
        return u * torch.tanh(u)


def test_regions_on_both_sides_of_the_model_output():
    """The model's region (u * tanh(u)) and the loss's (the output entering the loss
    twice) meet at one join; obd sweeps them as one, lm apart (the model's f'' dropped,
    the loss's kept): both exact here, where everything is elementwise."""
    model = ScaleAct().double()
    x, t = _inputs(), _targets("real")
    loss_fn = LOSSES["own_loss"][0]("mean")
    ps = {k: v.detach() for k, v in model.named_parameters()}
    full = torch.autograd.functional.hessian(
        lambda s, b: loss_fn(functional_call(model, {"s": s, "b": b}, (x,)), t), (ps["s"], ps["b"]))
    ob = hessian_diag(model, loss_fn, (x, t), method="obd", progress=False)
    for i, k in enumerate(("s", "b")):
        assert close(ob[k], torch.diagonal(full[i][i])), k
    out = model(x).detach()
    h_out = torch.autograd.functional.hessian(lambda o: loss_fn(o.reshape(out.shape), t), out.reshape(-1))
    h_out = torch.diagonal(h_out).reshape(out.shape)
    jac = torch.func.jacrev(lambda p: functional_call(model, p, (x,)))(ps)  # (N, C, C): diagonal in C
    lm = hessian_diag(model, loss_fn, (x, t), method="lm", progress=False)
    for k in ("s", "b"):
        j = torch.diagonal(jac[k], dim1=1, dim2=2)
        assert close(lm[k], (j * j * h_out).sum(0)), k


def test_regulariser_adds_its_own_hessian_to_every_parameter():
    model = Head().double()
    x, t = _inputs(), _targets("real")
    lam = 1e-3
    reg_loss = lambda o, y: F.mse_loss(o, y) + lam * sum((p ** 2).sum() for p in model.parameters())  # noqa: E731
    for method in ("obd", "lm"):
        plain = hessian_diag(model, nn.MSELoss(), (x, t), method=method, progress=False)
        with_reg = hessian_diag(model, reg_loss, (x, t), method=method, progress=False)
        for k in plain:
            assert close(with_reg[k], plain[k] + 2 * lam), (method, k)


@pytest.mark.parametrize("method", ["obd", "lm"])
def test_sweep_through_the_loss_equals_the_fast_paths(method):
    """The closed forms (fast paths) and the sweep through the loss's own ops agree on
    every layer, not only the last; and NLL after a model's log_softmax is cross-entropy."""
    x = _inputs()
    cases_ = [
        (nn.CrossEntropyLoss(), lambda o, y: F.cross_entropy(o, y), _targets("index"), None),
        (nn.MSELoss(reduction="sum"), lambda o, y: ((o - y) ** 2).sum(), _targets("real"), None),
        (nn.BCEWithLogitsLoss(), lambda o, y: F.binary_cross_entropy_with_logits(o, y, pos_weight=torch.ones(C)),
         _targets("binary"), None),
        (nn.CrossEntropyLoss(), nn.NLLLoss(), _targets("index"), "log_softmax"),
    ]
    for fast, slow, t, end in cases_:
        model = Head().double()
        a = hessian_diag(model, fast, (x, t), method=method, progress=False)
        model.end = end
        b = hessian_diag(model, slow, (x, t), method=method, progress=False)
        for k in a:
            assert close(b[k], a[k]), (type(fast).__name__, k)


def test_plain_losses_stay_on_the_fast_path(monkeypatch):
    """Plain CE / MSE / BCE never build the sweep through the loss (speed)."""
    def boom(*a, **k):
        raise AssertionError("the plain loss left its fast path")

    monkeypatch.setattr("obd_ext.curvature.loss_sweep_seed", boom)
    x = _inputs()
    for loss_fn, kind in ((nn.CrossEntropyLoss(), "index"), (F.cross_entropy, "index"), (nn.MSELoss(), "real"),
                          (nn.BCEWithLogitsLoss(), "binary")):
        for method in ("obd", "lm"):
            hessian_diag(Head().double(), loss_fn, (x, _targets(kind)), method=method, progress=False)
    with pytest.raises(AssertionError, match="left its fast path"):
        hessian_diag(Head().double(), nn.CrossEntropyLoss(label_smoothing=0.1), (x, _targets("index")),
                     progress=False)


@pytest.mark.parametrize("op", [
    lambda v: torch.log_softmax(v, 1), lambda v: torch.log_softmax(v, -1), lambda v: torch.log_softmax(v, 0),
    lambda v: torch.logsumexp(v, 1), lambda v: torch.logsumexp(v, (0, 2)), lambda v: torch.logsumexp(v, -1, True)],
    ids=["log_softmax1", "log_softmax-1", "log_softmax0", "logsumexp1", "logsumexp02", "logsumexp-1keep"])
def test_log_softmax_and_logsumexp_rules_against_autograd(op):
    torch.manual_seed(5)
    x = torch.randn(2, 3, 4, requires_grad=True)
    y = op(x)
    g_out, h_out = torch.randn(y.shape), torch.rand(y.shape)
    from obd_ext.curvature.rules import Ctx

    for lm in (False, True):
        ctx = Ctx(lm)
        ctx.g_wanted = [True]
        with torch.no_grad():
            g_in, h_in = RULES[type(y.grad_fn).__name__](y.grad_fn, [g_out], [h_out], ctx)
        full, gn = brute_rule_diagonal(op, x, g_out, h_out)
        assert close(h_in[0], gn if lm else full)
        if not lm:
            assert close(g_in[0], torch.autograd.grad(op(x), x, g_out)[0])


POINTWISE = {
    "mse": lambda x, t, r: F.mse_loss(x, t, reduction=r),
    "huber": lambda x, t, r: F.huber_loss(x, t, reduction=r, delta=0.7),
    "smooth_l1": lambda x, t, r: F.smooth_l1_loss(x, t, reduction=r, beta=0.7),
    "bce_logits": lambda x, t, r: F.binary_cross_entropy_with_logits(x, t.sigmoid(), reduction=r),
    "bce_logits_weights": lambda x, t, r: F.binary_cross_entropy_with_logits(
        x, t.sigmoid(), reduction=r, weight=torch.linspace(0.5, 2, 5), pos_weight=torch.linspace(2, 0.5, 5)),
    "bce": lambda x, t, r: F.binary_cross_entropy(x, t.sigmoid(), reduction=r),
    "soft_margin": lambda x, t, r: F.soft_margin_loss(x, t, reduction=r),
    "nll": lambda x, t, r: F.nll_loss(x, torch.tensor([0, 3, 1, 4]), reduction=r),
}
NO_TARGET_RULE = ("bce_logits", "bce_logits_weights", "bce", "nll", "soft_margin")  # target: no gradient here


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("name", list(POINTWISE))
def test_loss_node_rules_against_autograd(name, reduction):
    """Each loss node's rule (rules_losses.py) for its input, and for a target that
    requires grad, against autograd, with random g and H at its output."""
    torch.manual_seed(8)
    fn = POINTWISE[name]
    x = torch.rand(4, 5) * 0.9 + 0.05 if name == "bce" else 2 * torch.randn(4, 5)  # bce: probabilities
    t = 2 * torch.randn(4, 5)
    for slot in ((0,) if name in NO_TARGET_RULE else (0, 1)):
        xx = x.clone().requires_grad_(slot == 0)
        tt = t.clone().requires_grad_(slot == 1)
        y = fn(xx, tt, reduction)
        g_out, h_out = torch.randn(y.shape), torch.rand(y.shape)
        op = (lambda v: fn(v, t, reduction)) if slot == 0 else (lambda v: fn(x, v, reduction))
        wrt = (x, t)[slot]
        for lm in (False, True):
            ctx = Ctx(lm)
            ctx.g_wanted = [True, True]
            with torch.no_grad():
                g_in, h_in = RULES[type(y.grad_fn).__name__](y.grad_fn, [g_out], [h_out], ctx)
            full, gn = brute_rule_diagonal(op, wrt, g_out, h_out)
            assert close(h_in[slot], gn if lm else full), (name, slot, lm)
            if not lm:
                v = wrt.clone().requires_grad_()
                assert close(g_in[slot], torch.autograd.grad(op(v), v, g_out)[0]), (name, slot)


# the cross-entropy, NLL and BCE forms are test_curvature_fisher.py's
FISHER = ["huber", "smooth_l1", "kldiv", "kldiv_log_target"]


@pytest.mark.parametrize("name,reduction,conv", cases(FISHER))
def test_fisher_equals_a_per_sample_loop(name, reduction, conv):
    make, kind, end = LOSSES[name]
    model = Head(end=end, conv=conv).double()
    x, t = _inputs(conv), _targets(kind, conv)
    loss_fn = make(reduction)
    res = hessian_diag(model, loss_fn, (x, t), method="fisher", progress=False)
    ref = fisher_by_loop(model, loss_fn, x, t)
    for k in ref:
        assert close(res[k], ref[k]), (k, float((res[k] - ref[k]).abs().max()))


@pytest.mark.parametrize("conv", [False, True], ids=["mlp", "conv"])
def test_ggn_mc_with_nll_after_log_softmax(conv):
    """ggn-mc draws classes from the model's log-probabilities: the same as cross-entropy
    on the logits with the same draws (ignored positions stay ignored)."""
    model = Head(end="log_softmax", conv=conv).double()
    x, t = _inputs(conv), _targets("index", conv)
    res = hessian_diag(model, nn.NLLLoss(), (x, t), method="ggn-mc", seed=3, progress=False)
    with torch.no_grad():
        drawn = losses_mod.sampled_targets(model(x), nn.NLLLoss(), torch.Generator().manual_seed(3), t)
    assert bool((drawn.view(-1)[1] == -100)) and bool((drawn >= 0).sum() == drawn.numel() - 1)
    ref = fisher_by_loop(model, nn.NLLLoss(), x, drawn)
    for k in ref:
        assert close(res[k], ref[k]), k
    model.end = None
    ce = hessian_diag(model, nn.CrossEntropyLoss(), (x, t), method="ggn-mc", seed=3, progress=False)
    for k in ref:
        assert close(res[k], ce[k]), k
    with pytest.raises(NotImplementedError, match="ggn-mc.*NLLLoss with class weights"):
        hessian_diag(model, nn.NLLLoss(weight=WEIGHT.double()), (x, t), method="ggn-mc", progress=False)


@pytest.mark.parametrize("name,reduction", [("huber", "mean"), ("smooth_l1", "sum"), ("kldiv", "batchmean"),
                                            ("kldiv_log_target", "sum"), ("kldiv", "mean")])
def test_fisher_through_torch_func_too(name, reduction, monkeypatch):
    """The per-sample gradients of the whole model (torch.func), where the layer-wise
    path does not apply, use the same scale."""
    from obd_ext.curvature import estimators

    monkeypatch.setattr(estimators, "_rows_fast_path", lambda *a: (None, None))
    make, kind, end = LOSSES[name]
    model = Head(end=end).double()
    x, t = _inputs(), _targets(kind)
    loss_fn = make(reduction)
    res = hessian_diag(model, loss_fn, (x, t), method="fisher", progress=False)
    ref = fisher_by_loop(model, loss_fn, x, t)
    for k in ref:
        assert close(res[k], ref[k]), k


def test_functional_losses_for_fisher():
    model = Head().double()
    x, t = _inputs(), _targets("real")
    res = hessian_diag(model, F.huber_loss, (x, t), method="fisher", progress=False)
    ref = fisher_by_loop(model, nn.HuberLoss(), x, t)
    assert all(close(res[k], ref[k]) for k in ref)


def test_clear_errors_for_unsupported_cases():
    model = Head().double()
    x, t = _inputs(), _targets("real")

    def reg_loss(o, y):
        return F.mse_loss(o, y) + 1e-3 * sum((p ** 2).sum() for p in model.parameters())

    with pytest.raises(NotImplementedError, match=r"fisher and ggn-mc need.*reg_loss.*regulariser"):
        hessian_diag(model, reg_loss, (x, t), method="fisher", progress=False)
    with pytest.raises(NotImplementedError, match=r"ggn-mc has no predictive distribution for HuberLoss"):
        hessian_diag(model, nn.HuberLoss(), (x, t), method="ggn-mc", progress=False)
    with pytest.raises(ValueError, match=r"reduction must be 'mean' or 'sum'.*'none'.*HuberLoss"):
        hessian_diag(model, nn.HuberLoss(reduction="none"), (x, t), method="fisher", progress=False)
    with pytest.raises(ValueError, match=r"the loss HuberLoss returned a tensor of shape \(7, 4\).*scalar"):
        hessian_diag(model, nn.HuberLoss(reduction="none"), (x, t), method="obd", progress=False)

    def odd_loss(o, y):
        return torch.logcumsumexp(o - y, 1).pow(2).mean()

    for method in ("obd", "lm"):
        with pytest.raises(UnsupportedOpError, match=r"the loss .*odd_loss uses logcumsumexp .*LogcumsumexpBackward0"
                                                     r".*hutchinson"):
            hessian_diag(model, odd_loss, (x, t), method=method, progress=False)
    with pytest.raises(ValueError, match=r"does not depend on the model output"):
        hessian_diag(model, lambda o, y: F.mse_loss(o.detach(), y) + (model.last.bias ** 2).sum(), (x, t),
                     progress=False)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        CurvatureAccumulator(model, "mse")
    # the closed forms' own errors are kept
    assert losses_mod.boundary_for(nn.CrossEntropyLoss(label_smoothing=0.1)) is None


def test_lm_keeps_the_sign_of_a_non_convex_loss():
    """lm's boundary is the loss's own Hessian diagonal: for a loss concave in the output
    it is negative, and Curvature.negative says so (never clipped to a silent zero)."""
    model = Head().double()
    x, t = _inputs(), _targets("real")
    lm = hessian_diag(model, lambda o, y: -F.mse_loss(o, y), (x, t), method="lm", progress=False)
    ref = hessian_diag(model, nn.MSELoss(), (x, t), method="lm", progress=False)
    for k in ref:
        assert close(lm[k], -ref[k]), k
    assert lm.total_negative > 0


class TwoHeads(nn.Module):
    """A dict output (as Hugging Face models return): the loss reads both heads."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.body = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
        self.cls = nn.Linear(6, C)
        self.reg = nn.Linear(6, 3)

    def forward(self, x):
        h = self.body(x)
        return {"logits": self.cls(h), "aux": self.reg(h)}


def test_an_output_of_several_tensors_and_the_accumulator():
    """The model ends at every tensor handed to the loss; CurvatureAccumulator in the
    user's own loop gives what hessian_diag gives."""
    model = TwoHeads().double()
    x, y = _inputs(), _targets("index")
    aux = torch.randn(N, 3, generator=torch.Generator().manual_seed(7))

    def loss_fn(out, t):
        return F.cross_entropy(out["logits"], t[0], label_smoothing=0.1) + 0.5 * F.huber_loss(out["aux"], t[1])

    heads = ["cls.weight", "cls.bias", "reg.weight", "reg.bias"]
    data = [(x, (y, aux))]
    ex = hessian_diag(model, loss_fn, data, method="exact", params=heads, progress=False)
    for method in ("obd", "lm"):  # linear heads: the Gauss-Newton and the Hessian diagonals agree
        res = hessian_diag(model, loss_fn, data, method=method, progress=False)
        for k in heads:
            assert close(res[k], ex[k]), (method, k)
        acc = CurvatureAccumulator(model, loss_fn, method=method)
        halves = [(x[s], (y[s], aux[s])) for s in (slice(0, 3), slice(3, N))]
        for xs, ts in halves:
            acc.accumulate(model(xs), ts)
        two = hessian_diag(model, loss_fn, halves, method=method, progress=False)
        got = acc.result()
        for k in two:
            assert close(got[k], two[k]), (method, k)
