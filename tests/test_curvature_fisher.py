"""fisher / ggn-mc by per-layer per-sample gradients (curvature/per_sample.py)
against an explicit loop over samples with autograd.grad, in float64."""

import math

import pytest
import torch
import torch.nn as nn

from obd_ext.curvature import estimators, hessian_diag
from obd_ext.curvature.losses import sampled_targets
from obd_ext.curvature.per_sample import layerwise_squared
from obd_ext.models import GPT, LeNet5, SmallResNet, mlp
from testing import fisher_by_loop, float64_by_default  # noqa: F401  (autouse fixture: every test in float64)




def close(a, b, tol=1e-10):
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def _per_sample_loss(loss_fn):
    return type(loss_fn)(reduction="sum")


def _scale(loss_fn, out, t):
    if loss_fn.reduction == "sum":
        return 1.0
    return 1.0 / (t.numel() if isinstance(loss_fn, nn.CrossEntropyLoss) else out.numel())


def loop_reference(model, loss_fn, x, t):
    """c * sum_n (d l_n / d theta)^2, one sample at a time (the definition)."""
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    acc = {k: torch.zeros_like(p) for k, p in params.items()}
    batch = x.shape[0]
    rows = t.shape[0] // batch
    summed = _per_sample_loss(loss_fn)
    for b in range(batch):
        loss = summed(model(x[b:b + 1]), t[b * rows:(b + 1) * rows])
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for k, g in zip(params, grads):
            if g is not None:
                acc[k] += g * g
    with torch.no_grad():
        c = _scale(loss_fn, model(x), t)
    return {k: v * c for k, v in acc.items()}


def targets_for(method, model, loss_fn, x, y, seed):
    """The targets hessian_diag uses: y, or the first draw of the seeded generator."""
    if method == "fisher":
        return y
    with torch.no_grad():
        return sampled_targets(model(x), loss_fn, torch.Generator().manual_seed(seed))


def handled(model, loss_fn, x, y, budget=None):
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    kw = {} if budget is None else {"budget": budget}
    res, _ = layerwise_squared(model, loss_fn, x, y, params, False, None, **kw)
    return set(res or {}), set(params)


# ---------------------------------------------------------------------------
# The four reference families
# ---------------------------------------------------------------------------


def _mlp():
    torch.manual_seed(0)
    return mlp((6, 7, 5, 3), act=nn.Tanh), torch.randn(7, 6), torch.randint(0, 3, (7,))


def _lenet():
    torch.manual_seed(1)
    return LeNet5(), torch.randn(5, 1, 28, 28), torch.randint(0, 10, (5,))


def _resnet():
    torch.manual_seed(2)
    model = SmallResNet(widths=(4, 6), blocks=(1, 1)).eval()
    with torch.no_grad():  # non-trivial running statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model, torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))


def _gpt():
    torch.manual_seed(3)
    return GPT(vocab=13, d=8, layers=2, heads=2, seq=6), torch.randint(0, 13, (3, 6)), torch.randint(0, 13, (18,))


FAMILIES = {"mlp": _mlp, "lenet": _lenet, "resnet": _resnet, "gpt": _gpt}


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("method", ["fisher", "ggn-mc"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_equals_a_loop_over_samples(family, method, reduction):
    model, x, y = FAMILIES[family]()
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    done, wanted = handled(model, loss_fn, x, y)
    assert done == wanted  # every parameter by the layer-wise path, none by torch.func
    res = hessian_diag(model, loss_fn, (x, y), method=method, seed=7, progress=False)
    ref = loop_reference(model, loss_fn, x, targets_for(method, model, loss_fn, x, y, 7))
    assert set(res) == set(ref)
    for k in ref:
        assert close(res[k], ref[k]), (family, method, k)


@pytest.mark.parametrize("family", ["lenet", "gpt"])
def test_equals_the_torch_func_path_over_batches_and_draws(family, monkeypatch):
    """Two batches, both reductions of hessian_diag, ggn-mc with 3 draws: the same
    numbers (and so the same sampled targets) as per-sample gradients of the whole model."""
    model, x, y = FAMILIES[family]()
    batches = [(x, y), (x.flip(0), y.reshape(x.shape[0], -1).flip(0).reshape(-1))]
    loss_fn = nn.CrossEntropyLoss()
    runs = [("fisher", 1, "mean"), ("ggn-mc", 3, "sum")]
    ours = [hessian_diag(model, loss_fn, batches, method=m, samples=s, reduction=r, seed=11, progress=False)
            for m, s, r in runs]
    monkeypatch.setattr(estimators, "_rows_fast_path", lambda *a: (None, None))
    for res, (m, s, r) in zip(ours, runs):
        ref = hessian_diag(model, loss_fn, batches, method=m, samples=s, reduction=r, seed=11, progress=False)
        for k in ref:
            assert close(res[k], ref[k]), (m, k)


@pytest.mark.parametrize("loss", ["mse-sum", "mse-mean", "bce"])
def test_other_losses(loss):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(15, 4))
    x = torch.randn(6, 2, 5)
    y = (torch.rand(6, 4) > 0.5).double() if loss == "bce" else torch.randn(6, 4)
    loss_fn = {"mse-sum": nn.MSELoss(reduction="sum"), "mse-mean": nn.MSELoss(),
               "bce": nn.BCEWithLogitsLoss()}[loss]
    assert handled(model, loss_fn, x, y)[0] == {k for k, _ in model.named_parameters()}
    for method in ("fisher", "ggn-mc"):
        res = hessian_diag(model, loss_fn, (x, y), method=method, seed=1, progress=False)
        ref = loop_reference(model, loss_fn, x, targets_for(method, model, loss_fn, x, y, 1))
        assert all(close(res[k], ref[k]) for k in ref), (loss, method)


# ---------------------------------------------------------------------------
# Other layers and uses
# ---------------------------------------------------------------------------


class Zoo(nn.Module):
    """Grouped / dilated / strided convolutions, GroupNorm, BatchNorm (eval), an
    RMSNorm-style scale, a free bias, x @ W without a transpose, a Linear on rows
    of a sequence, a position table broadcast through unsqueeze + expand, and an
    embedding with padding_idx."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 6, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(5, 6))
        self.conv = nn.Conv1d(6, 4, 3, padding=2, dilation=2, groups=2)
        self.gn = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(1, 2, 3, stride=2)
        self.bn = nn.BatchNorm1d(4)
        self.scale = nn.Parameter(torch.rand(4) + 0.5)
        self.free_bias = nn.Parameter(torch.randn(4))
        self.w = nn.Parameter(torch.randn(4, 3) * 0.5)
        self.seq = nn.Linear(4, 4)

    def forward(self, idx):
        b, t = idx.shape
        h = self.emb(idx) + self.pos.unsqueeze(0).expand(b, t, 6)       # (b, t, 6)
        c = self.gn(self.conv(h.transpose(1, 2)))                        # (b, 4, t)
        c = torch.tanh(self.bn(c)).transpose(1, 2)                       # (b, t, 4)
        ms = c.pow(2).mean(-1, keepdim=True)
        c = c * torch.rsqrt(ms + 1e-6) * self.scale + self.free_bias     # RMSNorm-like
        c = torch.tanh(self.seq(c))                                      # rows of a sequence
        img = self.conv2(c.unsqueeze(1)).flatten(1).sum(-1)[:, None, None]
        return (c @ self.w + img).reshape(b * t, 3)


def test_more_layers_and_uses():
    torch.manual_seed(5)
    model = Zoo().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.3, 0.3)
        model.bn.running_var.uniform_(0.5, 2.0)
    idx = torch.randint(0, 9, (4, 5))
    idx[0, 1] = 0  # a padding entry
    y = torch.randint(0, 3, (20,))
    loss_fn = nn.CrossEntropyLoss()
    done, wanted = handled(model, loss_fn, idx, y)
    assert done == wanted
    for method in ("fisher", "ggn-mc"):
        res = hessian_diag(model, loss_fn, (idx, y), method=method, seed=2, progress=False)
        ref = loop_reference(model, loss_fn, idx, targets_for(method, model, loss_fn, idx, y, 2))
        for k in ref:
            assert close(res[k], ref[k]), (method, k)


class Frames(nn.Module):
    """Convolutions on frames folded into the batch (several rows per sample),
    the second one used twice (a Siamese pair), and a weight reshaped before a
    matmul."""

    def __init__(self):
        super().__init__()
        self.big = nn.Conv2d(2, 3, 3, padding=1)
        self.small = nn.Conv2d(3, 4, 3, stride=4, padding=1)
        self.v = nn.Parameter(torch.randn(12) * 0.3)

    def forward(self, x):  # (b, frames, 2, 16, 16)
        b, f = x.shape[:2]
        h = torch.tanh(self.big(x.reshape((b * f,) + x.shape[2:])))
        a = self.small(h)                      # (b f, 4, 4, 4)
        s = torch.tanh(self.small(h.flip(-1)))  # the same weights again
        z = (a * s).mean((-1, -2)).reshape(b, f * 4)[:, :4]
        return z @ self.v.view(4, 3)


def test_folded_rows_shared_convolutions_and_reshaped_weights():
    torch.manual_seed(10)
    model, loss_fn = Frames(), nn.CrossEntropyLoss(reduction="sum")
    x, y = torch.randn(5, 2, 2, 16, 16), torch.randint(0, 3, (5,))
    done, wanted = handled(model, loss_fn, x, y)
    assert done == wanted
    for method in ("fisher", "ggn-mc"):
        res = hessian_diag(model, loss_fn, (x, y), method=method, seed=4, progress=False)
        ref = loop_reference(model, loss_fn, x, targets_for(method, model, loss_fn, x, y, 4))
        for k in ref:
            assert close(res[k], ref[k]), (method, k)
    params = dict(model.named_parameters())
    tiny, _ = layerwise_squared(model, loss_fn, x, y, params, False, None, budget=1)
    assert all(close(tiny[k], res_k) for k, res_k in hessian_diag(model, loss_fn, (x, y), method="fisher",
                                                                     progress=False).items())


def test_untied_gpt_head_batch_of_one_and_tiny_chunks():
    torch.manual_seed(6)
    model = GPT(vocab=11, d=8, layers=1, heads=2, seq=5, tied=False)
    x, y = torch.randint(0, 11, (3, 5)), torch.randint(0, 11, (15,))
    loss_fn = nn.CrossEntropyLoss()
    ref = loop_reference(model, loss_fn, x, y)
    params = dict(model.named_parameters())
    for budget in (1, 1 << 30):  # one sample at a time, or all at once
        res, _ = layerwise_squared(model, loss_fn, x, y, params, False, None, budget=budget)
        assert set(res) == set(params)
        assert all(close(res[k], ref[k]) for k in ref)
    one = hessian_diag(model, loss_fn, (x[:1], y[:5]), method="fisher", progress=False)
    ref1 = loop_reference(model, loss_fn, x[:1], y[:5])
    assert all(close(one[k], ref1[k]) for k in ref1)


def test_selected_and_unused_parameters():
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = mlp((5, 4, 3), act=nn.Tanh)
            self.unused = nn.Linear(2, 2)

        def forward(self, x):
            return self.body(x)

    torch.manual_seed(7)
    model = WithUnused()
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    res = hessian_diag(model, nn.CrossEntropyLoss(), (x, y), method="fisher", params=["body.2.weight", "unused.bias"],
                       progress=False)
    ref = loop_reference(model, nn.CrossEntropyLoss(), x, y)
    assert set(res) == {"body.2.weight", "unused.bias"}
    assert close(res["body.2.weight"], ref["body.2.weight"]) and float(res["unused.bias"].abs().max()) == 0.0


# ---------------------------------------------------------------------------
# What the layer-wise path leaves to per-sample gradients of the whole model
# ---------------------------------------------------------------------------


class TokensFirst(nn.Module):
    """Runs its Linear on (token, batch) rows: the rows of a sample are not
    contiguous, which the probe must notice."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):  # x: (b, t, 4)
        h = torch.tanh(self.lin(x.transpose(0, 1).contiguous()))  # (t, b, 4) rows
        return self.out(h.transpose(0, 1).contiguous()).reshape(-1, 3)


class Deconv(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 2, 2, stride=2)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.up(x)).flatten(1))


def test_fallbacks_stay_exact():
    torch.manual_seed(8)
    loss_fn = nn.CrossEntropyLoss()
    # Rows in (token, batch) order: the probe rejects the first Linear; the second is fine.
    model, x, y = TokensFirst(), torch.randn(3, 5, 4), torch.randint(0, 3, (15,))
    done, wanted = handled(model, loss_fn, x, y)
    assert done == wanted - {"lin.weight", "lin.bias"}
    res = hessian_diag(model, loss_fn, (x, y), method="fisher", progress=False)
    ref = loop_reference(model, loss_fn, x, y)
    assert all(close(res[k], ref[k]) for k in ref)
    # A transposed convolution has no layer-wise rule here: torch.func for its parameters only.
    model, x, y = Deconv(), torch.randn(4, 2, 2, 2), torch.randint(0, 3, (4,))
    done, wanted = handled(model, loss_fn, x, y)
    assert done == {"head.weight", "head.bias"}
    res = hessian_diag(model, loss_fn, (x, y), method="ggn-mc", seed=3, progress=False)
    ref = loop_reference(model, loss_fn, x, targets_for("ggn-mc", model, loss_fn, x, y, 3))
    assert all(close(res[k], ref[k]) for k in ref)


def test_batch_norm_in_training_mode_is_left_to_per_sample_gradients(monkeypatch):
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    res, _ = layerwise_squared(model, nn.CrossEntropyLoss(), x, y, dict(model.named_parameters()), False, None)
    assert res is None  # the samples of a batch interact: no per-sample split of G


def test_categorical_draw_matches_the_distribution_and_never_draws_a_zero():
    """ggn-mc's class draws (inverse CDF, not torch.multinomial): frequencies within
    5 sigma of the probabilities over 60,000 draws per row, classes of probability 0
    (leading, inner, trailing: -inf logits) never drawn, seeded draws repeatable."""
    from obd_ext.curvature.losses import categorical_draw

    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0, 0.5],
                           [-math.inf, 0.0, -math.inf, 3.0, -math.inf],
                           [5.0, -math.inf, -math.inf, -math.inf, -math.inf]])
    probs = torch.softmax(logits, dim=1)
    n = 60_000
    draws = categorical_draw(probs.repeat(n, 1), torch.Generator().manual_seed(0)).reshape(n, 3)
    for r in range(3):
        counts = torch.bincount(draws[:, r], minlength=5).double()
        p = probs[r].double()
        sigma = (n * p * (1 - p)).sqrt()
        assert ((counts - n * p).abs() <= 5 * sigma + 1e-9).all(), (r, counts, n * p)
        assert (counts[p == 0] == 0).all()
    again = categorical_draw(probs.repeat(n, 1), torch.Generator().manual_seed(0)).reshape(n, 3)
    assert torch.equal(draws, again)


# ---------------------------------------------------------------------------
# Every target form and reduction of the classification losses
# ---------------------------------------------------------------------------


class Pixels(nn.Module):
    """Per-pixel classification: logits (N, C, H, W), a target per pixel."""

    def __init__(self, classes=4, log_probs=False):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(5, classes, 1)
        self.log_probs = log_probs

    def forward(self, x):
        y = self.conv2(torch.tanh(self.conv1(x)))
        return torch.log_softmax(y, 1) if self.log_probs else y


def _target_case(form, classes=4, n=5):
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, classes, (n, 3, 3), generator=g)
    if form == "probabilities":
        return torch.softmax(torch.randn(n, classes, 3, 3, generator=g), 1)
    if form == "ignored":
        idx[0] = -100  # a whole sample ignored, and some pixels of another
        idx[1, 0] = -100
    return idx


LOSS_CASES = {
    "indices": (dict(), "indices"),
    "probabilities": (dict(), "probabilities"),
    "ignore_index": (dict(), "ignored"),
    "label_smoothing": (dict(label_smoothing=0.2), "ignored"),
    "weights": (dict(weight=torch.tensor([0.5, 2.0, 1.0, 3.0])), "ignored"),
    "weights_probabilities": (dict(weight=torch.tensor([0.5, 2.0, 1.0, 3.0])), "probabilities"),
    "weights_smoothing": (dict(weight=torch.tensor([0.5, 2.0, 1.0, 3.0]), label_smoothing=0.1), "indices"),
}


@pytest.mark.parametrize("path", ["layerwise", "torch.func"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_fisher_on_every_cross_entropy_form(case, reduction, path, monkeypatch):
    """Class-probability targets under "mean" were C times too large (the scale counted
    N x C target entries instead of N rows); class weights and label smoothing raised."""
    torch.manual_seed(0)
    model = Pixels().double()
    x = torch.randn(5, 2, 3, 3)
    kw, form = LOSS_CASES[case]
    kw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    loss_fn = nn.CrossEntropyLoss(reduction=reduction, **kw)
    t = _target_case(form)
    if path == "torch.func":
        monkeypatch.setattr(estimators, "_rows_fast_path", lambda *a: (None, None))
    res = hessian_diag(model, loss_fn, (x, t), method="fisher", progress=False)
    ref = fisher_by_loop(model, loss_fn, x, t)
    for k in ref:
        assert close(res[k], ref[k]), (case, reduction, path, k, float((res[k] / ref[k]).max()))


def test_fisher_with_nll_loss_and_bce_weights():
    torch.manual_seed(1)
    model = Pixels(log_probs=True).double()
    x, t = torch.randn(5, 2, 3, 3), _target_case("ignored")
    for reduction in ("mean", "sum"):
        loss_fn = nn.NLLLoss(weight=torch.tensor([0.5, 2.0, 1.0, 3.0]), reduction=reduction)
        res = hessian_diag(model, loss_fn, (x, t), method="fisher", progress=False)
        ref = fisher_by_loop(model, loss_fn, x, t)
        assert all(close(res[k], ref[k]) for k in ref), reduction
    model = Pixels(classes=3).double()
    yb = (torch.rand(5, 3, 3, 3) > 0.5).double()
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([1.0, 3.0, 0.5]).reshape(3, 1, 1))
    res = hessian_diag(model, loss_fn, (x, yb), method="fisher", progress=False)
    ref = fisher_by_loop(model, loss_fn, x, yb)
    assert all(close(res[k], ref[k]) for k in ref)


def test_ggn_mc_keeps_ignored_positions_ignored():
    """Drawn targets used to replace ignore_index, so padded positions entered the curvature."""
    torch.manual_seed(2)
    model = Pixels().double()
    x, t = torch.randn(5, 2, 3, 3), _target_case("ignored")
    loss_fn = nn.CrossEntropyLoss()
    res = hessian_diag(model, loss_fn, (x, t), method="ggn-mc", seed=5, progress=False)
    with torch.no_grad():
        drawn = sampled_targets(model(x), loss_fn, torch.Generator().manual_seed(5), t)
    assert bool((drawn[t == -100] == -100).all()) and bool((drawn[t != -100] >= 0).all())
    ref = fisher_by_loop(model, loss_fn, x, drawn)
    assert all(close(res[k], ref[k]) for k in ref)


def test_losses_fisher_cannot_split_are_clear_errors():
    model, x = Pixels().double(), torch.randn(5, 2, 3, 3)
    with pytest.raises(NotImplementedError, match="fisher and ggn-mc need a loss.*L1Loss"):
        hessian_diag(model, nn.L1Loss(), (x, torch.randn(5, 4, 3, 3)), method="fisher", progress=False)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'.*'none'"):
        hessian_diag(model, nn.CrossEntropyLoss(reduction="none"), (x, _target_case("indices")), method="fisher",
                     progress=False)
    with pytest.raises(NotImplementedError, match="ggn-mc.*label smoothing"):
        hessian_diag(model, nn.CrossEntropyLoss(label_smoothing=0.1), (x, _target_case("indices")), method="ggn-mc",
                     progress=False)
