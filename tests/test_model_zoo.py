"""Model zoo: every curvature method on real architectures (issue 13, item 6).

Each model is built from a config or from code with random weights (nothing is
downloaded), at a tiny size, in float64. For every model x method the table
EXPECTED below states what happens: the method runs, raises a clear error, or
fails in a way that is itself a defect (strict xfail, with what is wrong). A
change in coverage is a test failure: update the table deliberately.

Where a method runs, its numbers are checked against plain autograd:

- ``fisher`` equals a loop over samples (``c * sum_n (d l_n / d theta)^2``) and
  ``ggn-mc`` the same loop with the targets the seeded generator draws, to 1e-10;
- ``exact`` equals autograd's Hessian diagonal, one double backward per entry, on
  spread entries of the probe tensors (a small tensor near the input, a weight in
  the middle, the last layer: ``exact``'s cost grows with the tensors' size);
- ``obd`` and ``lm`` equal it on the last layer, where the diagonal is exact (a
  linear head under a per-output loss: the Hessian's diagonal there has no term
  the recursion drops, and the Gauss-Newton matrix equals the Hessian); ``lm`` is
  never negative;
- ``hutchinson`` gives finite numbers of the right shapes.

The Spearman correlation of obd / lm / fisher saliency with the exact diagonal's
on the probe tensors is printed (``pytest -s``); the last layer's ranks are
asserted identical for obd / lm (they follow from exactness), nothing more: on
random weights the rest is a record, not a property.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from obd_ext.curvature import UnsupportedOpError, hessian_diag, recordable
from obd_ext.curvature.losses import sampled_targets
from obd_ext.vocabulary import CURVATURE_METHODS
from testing import float64_by_default  # noqa: F401  (autouse fixture: every test in float64)

transformers = pytest.importorskip("transformers")

METHODS = tuple(CURVATURE_METHODS)
OK = "ok"


def clear(exc: type, match: str) -> Tuple[str, type, str]:
    """An expected clear error: its type and a regex its message matches."""
    return ("error", exc, match)


def defect(reason: str) -> Tuple[str, str]:
    """An expected failure that is a defect (an unclear error or a wrong number): strict xfail."""
    return ("xfail", reason)


def unsupported(op: str, where: str) -> Tuple[str, type, str]:
    """obd / lm stop at an op without a rule: the error names the op, the user's module, a fallback."""
    return clear(UnsupportedOpError, rf"no second-order rule for {op} .*used in .*{where}.*method='hutchinson'")


def row(**changes: object) -> Dict[str, object]:
    """Every method runs, except those named (ggn_mc for ggn-mc)."""
    out: Dict[str, object] = {m: OK for m in METHODS}
    for k, v in changes.items():
        out[k.replace("_", "-")] = v
    return out


# ---------------------------------------------------------------------------
# What each method does on each model: the table to update when coverage changes.
# ---------------------------------------------------------------------------

EXPECTED: Dict[str, Dict[str, object]] = {
    "resnet": row(),
    "mobilenet_v2": row(),
    "efficientnet": row(),
    "convnext": row(),
    "vit": row(),
    "swin": row(),
    "bert": row(),
    "gpt2": row(),
    "llama": row(),
    "t5": row(),
    "lstm": row(),
    "unet_groupnorm": row(),
    "unet_batchnorm": row(),
}

# Models whose cases together take more than a few seconds on 2 cores.
SLOW: Tuple[str, ...] = ()


# ---------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------


@dataclass
class Case:
    """A model with one batch, its loss and the tensors the checks look at."""

    model: nn.Module
    x: Tensor
    y: Tensor
    loss_fn: nn.Module
    head: List[str]  # the last layer: obd / lm exact there
    probe: List[str] = field(default_factory=list)  # tensors exact and Spearman look at (head included)
    tol: float = 1e-10  # relative, for fisher / ggn-mc against the loop over samples


class Logits(nn.Module):
    """A Hugging Face model as ``x -> logits`` with classes in dim 1 (tokens as rows)."""

    def __init__(self, hf: nn.Module, kind: str):
        super().__init__()
        self.hf, self.kind = hf, kind

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "image":
            return self.hf(pixel_values=x).logits
        if self.kind == "text-class":
            return self.hf(input_ids=x).logits
        if self.kind == "seq2seq":  # x: N x 2 x T, encoder ids then decoder ids
            out = self.hf(input_ids=x[:, 0], decoder_input_ids=x[:, 1]).logits
        else:
            out = self.hf(input_ids=x).logits
        return out.reshape(-1, out.shape[-1])


class LSTMLanguageModel(nn.Module):
    """Embedding -> two-layer LSTM -> linear head over the vocabulary."""

    def __init__(self, vocab: int = 17, d: int = 6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.rnn = nn.LSTM(d, d, num_layers=2, batch_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        h, _ = self.rnn(self.emb(ids))
        return self.head(h).reshape(-1, self.head.out_features)


class UNet(nn.Module):
    """Two-level U-Net: conv blocks with GroupNorm (diffusion models) or BatchNorm
    (the original), max-pool down, nearest and bilinear upsampling, skip connections
    by concatenation, 1x1 output conv."""

    def __init__(self, norm: str, c_in: int = 2, c: int = 4, c_out: int = 2):
        super().__init__()

        def block(i: int, o: int) -> nn.Sequential:
            n = nn.GroupNorm(2, o) if norm == "group" else nn.BatchNorm2d(o)
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), n, nn.ReLU(), nn.Conv2d(o, o, 3, padding=1), nn.SiLU())

        self.down1, self.down2 = block(c_in, c), block(c, 2 * c)
        self.mid = block(2 * c, 2 * c)
        self.up2 = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec2 = block(4 * c, c)
        self.dec1 = block(2 * c, c)
        self.out = nn.Conv2d(c, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        d1 = self.down1(x)  # H
        d2 = self.down2(F.max_pool2d(d1, 2))  # H/2
        m = self.mid(F.max_pool2d(d2, 2))  # H/4
        u2 = self.dec2(torch.cat([self.up2(m), d2], dim=1))
        u1 = self.dec1(torch.cat([F.interpolate(u2, scale_factor=2, mode="bilinear", align_corners=False), d1], 1))
        return self.out(u1)


def _ids(g: torch.Generator, vocab: int, *shape: int) -> Tensor:
    return torch.randint(0, vocab, shape, generator=g)


def _image_case(hf: nn.Module, head: List[str], size: int, classes: int = 5, batch: int = 3) -> Case:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g, dtype=torch.float64)
    return Case(Logits(hf, "image"), x, _ids(g, classes, batch), nn.CrossEntropyLoss(), head)


def _lm_case(model: nn.Module, head: List[str], vocab: int, batch: int = 2, seq: int = 5) -> Case:
    g = torch.Generator().manual_seed(1)
    return Case(model, _ids(g, vocab, batch, seq), _ids(g, vocab, batch * seq), nn.CrossEntropyLoss(), head)


_CLASSIFIER = ["hf.classifier.weight", "hf.classifier.bias"]


def _resnet() -> Case:
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    layer_type="bottleneck", num_labels=5)
    return _image_case(transformers.ResNetForImageClassification(cfg),
                       ["hf.classifier.1.weight", "hf.classifier.1.bias"], 16)


def _mobilenet_v2() -> Case:
    cfg = transformers.MobileNetV2Config(depth_multiplier=0.1, depth_divisible_by=4, min_depth=4, expand_ratio=2,
                                         image_size=32, num_labels=5, classifier_dropout_prob=0.0,
                                         finegrained_output=False)
    return _image_case(transformers.MobileNetV2ForImageClassification(cfg), _CLASSIFIER, 32)


def _efficientnet() -> Case:
    # hidden_dim is the width of the last 1x1 convolution (round_filters(1280) = 128 here);
    # transformers does not derive it
    cfg = transformers.EfficientNetConfig(image_size=32, width_coefficient=0.1, depth_coefficient=0.1,
                                          depth_divisor=4, hidden_dim=128, num_labels=5, dropout_rate=0.0,
                                          drop_connect_rate=0.0)
    return _image_case(transformers.EfficientNetForImageClassification(cfg), _CLASSIFIER, 32)


def _convnext() -> Case:
    cfg = transformers.ConvNextConfig(num_channels=3, patch_size=2, hidden_sizes=[8, 16], depths=[1, 1],
                                      num_stages=2, num_labels=5)
    return _image_case(transformers.ConvNextForImageClassification(cfg), _CLASSIFIER, 8)


def _vit() -> Case:
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, hidden_size=8, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=16, num_labels=5,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _image_case(transformers.ViTForImageClassification(cfg), _CLASSIFIER, 8)


def _swin() -> Case:
    cfg = transformers.SwinConfig(image_size=8, patch_size=2, embed_dim=8, depths=[1, 1], num_heads=[2, 2],
                                  window_size=2, mlp_ratio=2.0, num_labels=5, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, drop_path_rate=0.0)
    return _image_case(transformers.SwinForImageClassification(cfg), _CLASSIFIER, 8)


def _bert() -> Case:
    cfg = transformers.BertConfig(vocab_size=23, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=16, max_position_embeddings=16, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    g = torch.Generator().manual_seed(1)
    model = Logits(transformers.BertForSequenceClassification(cfg), "text-class")
    return Case(model, _ids(g, 23, 3, 5), _ids(g, 3, 3), nn.CrossEntropyLoss(), _CLASSIFIER)


def _gpt2() -> Case:
    # the default activation, gelu_new, written out of elementwise ops; an untied
    # head so that the last layer is a layer of its own
    cfg = transformers.GPT2Config(vocab_size=19, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
                                  bos_token_id=0, eos_token_id=0)
    assert cfg.activation_function == "gelu_new"
    return _lm_case(Logits(transformers.GPT2LMHeadModel(cfg), "causal"), ["hf.lm_head.weight"], 19)


def _llama() -> Case:
    cfg = transformers.LlamaConfig(vocab_size=19, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                   tie_word_embeddings=False)
    case = _lm_case(Logits(transformers.LlamaForCausalLM(cfg), "causal"), ["hf.lm_head.weight"], 19)
    # LlamaRMSNorm computes in float32 whatever the input's dtype: every gradient below
    # the final norm carries float32 roundoff (2.6e-7 relative between two orders of
    # summation), so per-sample gradients agree only to that
    case.tol = 1e-5
    return case


def _t5() -> Case:
    cfg = transformers.T5Config(vocab_size=19, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=1,
                                num_heads=2, dropout_rate=0.0, relative_attention_num_buckets=4,
                                decoder_start_token_id=0)
    cfg.tie_word_embeddings = False  # the constructor's keyword is not kept for T5
    g = torch.Generator().manual_seed(1)
    model = Logits(transformers.T5ForConditionalGeneration(cfg), "seq2seq")
    # `shared` is outside the graph once untied: the probe starts at the encoder's embedding
    return Case(model, _ids(g, 19, 2, 2, 4), _ids(g, 19, 8), nn.CrossEntropyLoss(), ["hf.lm_head.weight"],
                ["hf.encoder.block.0.layer.0.layer_norm.weight", "hf.decoder.block.0.layer.0.SelfAttention.k.weight",
                 "hf.lm_head.weight"])


def _lstm() -> Case:
    return _lm_case(LSTMLanguageModel(), ["head.weight", "head.bias"], 17)


def _unet(norm: str) -> Case:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 8, 8, generator=g, dtype=torch.float64)
    model = UNet(norm)
    if norm == "batch":  # non-trivial running statistics
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5, generator=g)
                    m.running_var.uniform_(0.5, 2.0, generator=g)
    return Case(model, x, torch.randn(2, 2, 8, 8, generator=g, dtype=torch.float64), nn.MSELoss(),
                ["out.weight", "out.bias"])


BUILDERS: Dict[str, Callable[[], Case]] = {
    "resnet": _resnet, "mobilenet_v2": _mobilenet_v2, "efficientnet": _efficientnet, "convnext": _convnext,
    "vit": _vit, "swin": _swin, "bert": _bert, "gpt2": _gpt2, "llama": _llama, "t5": _t5, "lstm": _lstm,
    "unet_groupnorm": functools.partial(_unet, "group"), "unet_batchnorm": functools.partial(_unet, "batch"),
}
ZOO = tuple(BUILDERS)
assert set(EXPECTED) == set(ZOO) and all(set(v) == set(METHODS) for v in EXPECTED.values())

PROBE_MAX = 160  # entries of a probe tensor outside the head: exact's batched rows cost time


@functools.lru_cache(maxsize=None)
def build(name: str) -> Case:
    """The model in float64 eval mode (BatchNorm on running statistics, no dropout),
    with its probe tensors: the first small tensor, a small weight in the middle, the head."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        case = BUILDERS[name]()
    finally:
        torch.set_default_dtype(old)
    case.model = case.model.double().eval()
    params = {k: p for k, p in case.model.named_parameters() if p.requires_grad}
    assert set(case.head) <= set(params), (name, case.head)
    if not case.probe:
        small = [k for k in params if k not in case.head and params[k].numel() <= PROBE_MAX]
        weights = [k for k in small if params[k].dim() >= 2] or small
        middle = min(weights, key=lambda k: abs(list(params).index(k) - len(params) // 2))
        case.probe = list(dict.fromkeys([small[0], middle] + case.head))
    assert set(case.probe) <= set(params), (name, case.probe)
    return case


# ---------------------------------------------------------------------------
# References by plain autograd
# ---------------------------------------------------------------------------


def close(a: Tensor, b: Tensor, tol: float = 1e-10, floor: float = 0.0) -> bool:
    """max |a - b| <= tol * the largest |b| (or ``floor``, for a tensor whose true values
    are 0 and whose computed ones are roundoff on the scale of the rest of the model)."""
    return float((a - b).abs().max()) <= tol * max(1e-300, float(b.abs().max()), floor)


def entries(p: Tensor, k: int = 6) -> Tensor:
    """k flat indices spread over a tensor (all of a small one)."""
    return torch.linspace(0, p.numel() - 1, min(k, p.numel())).round().long().unique()


@functools.lru_cache(maxsize=None)
def brute_diag(name: str) -> Dict[str, Tuple[Tensor, Tensor]]:
    """probe tensor -> (flat indices, the Hessian's diagonal there), one double backward per entry."""
    case = build(name)
    params = dict(case.model.named_parameters())
    with recordable():  # the fused attention kernels have no double backward
        loss = case.loss_fn(case.model(case.x), case.y)
    grads = torch.autograd.grad(loss, [params[k] for k in case.probe], create_graph=True)
    out = {}
    for k, g in zip(case.probe, grads):
        idx, g = entries(params[k]), g.reshape(-1)
        h = [torch.autograd.grad(g[i], params[k], retain_graph=True)[0].reshape(-1)[i] for i in idx.tolist()]
        out[k] = (idx, torch.stack(h).detach())
    return out


def loop_squared(case: Case, y: Tensor) -> Dict[str, Tensor]:
    """``c * sum_n (d l_n / d theta)^2``, one sample at a time; c = 1/(target rows or entries) for a mean loss."""
    params = {k: p for k, p in case.model.named_parameters() if p.requires_grad}
    acc = {k: torch.zeros_like(p) for k, p in params.items()}
    batch = case.x.shape[0]
    rows = y.shape[0] // batch
    summed = type(case.loss_fn)(reduction="sum")
    for n in range(batch):
        loss = summed(case.model(case.x[n:n + 1]), y[n * rows:(n + 1) * rows])
        for k, gr in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
            if gr is not None:
                acc[k] += gr * gr
    c = 1.0 if case.loss_fn.reduction == "sum" else 1.0 / y.numel()
    return {k: v * c for k, v in acc.items()}


def spearman(a: Tensor, b: Tensor) -> float:
    ra = torch.argsort(torch.argsort(a)).double()
    rb = torch.argsort(torch.argsort(b)).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


# ---------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------

SEED = 7


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads; on a shared 2-core machine the idle ones spin."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


_RESULTS: Dict[Tuple[str, str], Dict[str, Tensor]] = {}


def run(name: str, method: str) -> Dict[str, Tensor]:
    """hessian_diag on the model's batch (exact on the probe tensors only)."""
    if (name, method) not in _RESULTS:
        case = build(name)
        kw = {"params": case.probe} if method == "exact" else {}
        _RESULTS[name, method] = hessian_diag(case.model, case.loss_fn, (case.x, case.y), method=method,
                                              samples=2 if method == "hutchinson" else 1, seed=SEED,
                                              progress=False, **kw)
    return _RESULTS[name, method]


def _cases():
    for name in ZOO:
        for method in METHODS:
            want = EXPECTED[name][method]
            marks = [pytest.mark.slow] if name in SLOW else []
            if isinstance(want, tuple) and want[0] == "xfail":
                marks.append(pytest.mark.xfail(strict=True, reason=want[1]))
            yield pytest.param(name, method, marks=marks, id=f"{name}-{method}")


@pytest.mark.parametrize("name,method", list(_cases()))
def test_zoo(name: str, method: str):
    want = EXPECTED[name][method]
    case = build(name)
    if isinstance(want, tuple) and want[0] == "error":
        with pytest.raises(want[1], match=want[2]):
            run(name, method)
        return
    res = run(name, method)
    params = dict(case.model.named_parameters())
    for k, v in res.items():
        assert v.shape == params[k].shape and bool(torch.isfinite(v).all()), (name, method, k)
    if method in ("fisher", "ggn-mc"):
        y = case.y
        if method == "ggn-mc":  # the first draw of the seeded generator, as hessian_diag draws
            with torch.no_grad():
                y = sampled_targets(case.model(case.x), case.loss_fn, torch.Generator().manual_seed(SEED), case.y)
        ref = loop_squared(case, y)
        assert set(res) == set(ref)
        # a gradient that is 0 in exact arithmetic (a key bias under softmax) is roundoff
        # on both sides: compare it on the scale of the model's largest entry
        floor = 1e-6 * max(float(v.abs().max()) for v in ref.values())
        for k in ref:
            assert close(res[k], ref[k], case.tol, floor), (name, method, k)
    elif method == "exact":
        assert set(res) == set(case.probe)
        for k, (idx, h) in brute_diag(name).items():
            assert close(res[k].reshape(-1)[idx], h), (name, k)
    elif method in ("obd", "lm"):
        assert set(res) == set(params)
        brute = brute_diag(name)
        for k in case.head:
            idx, h = brute[k]
            assert close(res[k].reshape(-1)[idx], h), (name, method, k)
        if method == "lm":
            assert all(bool((v >= 0).all()) for v in res.values())


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else []) for n in ZOO])
def test_spearman_against_the_exact_diagonal(name: str):
    """Saliency ranks of obd / lm / fisher against the exact diagonal's on the probe tensors
    (printed); on the head, obd and lm rank exactly as exact does."""
    if EXPECTED[name]["exact"] != OK:
        pytest.skip(f"exact does not run on {name}")
    case = build(name)
    params = {k: p.detach() for k, p in case.model.named_parameters()}
    exact = run(name, "exact")

    def saliency(h: Dict[str, Tensor], names: List[str]) -> Tensor:
        return torch.cat([(h[k] * params[k] * params[k] * 0.5).reshape(-1) for k in names])

    ref = saliency(exact, case.probe)
    line = []
    for method in ("obd", "lm", "fisher"):
        if EXPECTED[name][method] != OK:
            line.append(f"{method}=n/a")
            continue
        est = run(name, method)
        line.append(f"{method}={spearman(saliency(est, case.probe), ref):.3f}")
        if method in ("obd", "lm"):
            head = saliency(exact, case.head)
            assert spearman(saliency(est, case.head), head) > 0.999, (name, method)
    print(f"\nspearman vs exact [{name}, {ref.numel()} entries]: " + " ".join(line))
