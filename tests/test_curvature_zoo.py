"""The curvature engine on real architectures (transformers built from tiny configs,
random weights, never downloaded), float64:

- every method runs, or raises the clear error this file states;
- ``obd`` / ``lm`` are exact on the last layer (against autograd's diagonal);
- ``fisher`` equals a loop over samples with autograd to 1e-10;
- ``hutchinson`` runs (attention through the math path, as ``obd``).

Heavier models are ``slow``.
"""

import pytest
import torch
import torch.nn as nn

from testing import float64_by_default  # noqa: F401  (autouse fixture: every test in float64)
from obd_ext.curvature import UnsupportedOpError, hessian_diag

transformers = pytest.importorskip("transformers")

VOCAB = 32


def close(a, b, tol=1e-10):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


class TokenLogits(nn.Module):
    """A language model's logits as (batch * tokens, vocabulary) rows."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, ids):
        out = self.m(input_ids=ids).logits
        return out.reshape(-1, out.shape[-1])


class ImageLogits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, x):
        return self.m(pixel_values=x).logits


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                  tie_word_embeddings=False)  # an untied head: the last layer, exact
    return TokenLogits(transformers.GPT2LMHeadModel(cfg)), 1e-10, ("m.lm_head.weight",)


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    # Llama computes its rotary angles in float32 whatever the model's dtype, so one
    # sample alone and in a batch differ at float32's rounding: fisher's loop tolerance.
    return TokenLogits(transformers.LlamaForCausalLM(cfg)), 1e-6, ("m.lm_head.weight",)


def _bert():
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, pad_token_id=0)
    return TokenLogits(transformers.BertForMaskedLM(cfg)), 1e-10, ("m.cls.predictions.bias",)


def _vit():
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)
    return ImageLogits(transformers.ViTForImageClassification(cfg)), 1e-10, ("m.classifier.weight",
                                                                           "m.classifier.bias")


def _resnet():
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    layer_type="basic", num_labels=3)
    return ImageLogits(transformers.ResNetForImageClassification(cfg)), 1e-10, ("m.classifier.1.weight",
                                                                              "m.classifier.1.bias")


# name -> (factory returning (model, fisher's loop tolerance, parameters where obd/lm are exact), input kind, slow)
ZOO = {
    "gpt2-gelu_new": (_gpt2, "tokens", False),
    "llama": (_llama, "tokens", False),
    "vit": (_vit, "image", False),
    "bert": (_bert, "tokens", True),
    "resnet": (_resnet, "image", True),
}


def build(name):
    factory, kind, _ = ZOO[name]
    torch.manual_seed(0)
    model, tol, exact_names = factory()
    model = model.double().eval()
    g = torch.Generator().manual_seed(1)
    if kind == "tokens":
        x, y = torch.randint(0, VOCAB, (3, 5), generator=g), torch.randint(0, VOCAB, (15,), generator=g)
    else:
        x, y = torch.randn(3, 3, 16, 16, generator=g), torch.randint(0, 3, (3,), generator=g)
    return model, x, y, exact_names, tol


def zoo_params():
    return [pytest.param(n, marks=pytest.mark.slow) if slow else n for n, (_, _, slow) in ZOO.items()]


def loop_fisher(model, loss_fn, x, t):
    """c * sum_n (d l_n / d theta)^2 by a loop over samples, c = loss / sum_n l_n."""
    import copy

    summed = copy.copy(loss_fn)
    summed.reduction = "sum"
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    acc = {k: torch.zeros_like(p) for k, p in params.items()}
    rows = t.shape[0] // x.shape[0]
    total = 0.0
    for b in range(x.shape[0]):
        loss = summed(model(x[b:b + 1]), t[b * rows:(b + 1) * rows])
        total += float(loss.detach())
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for k, gr in zip(params, grads):
            if gr is not None:
                acc[k] += gr * gr
    with torch.no_grad():
        c = float(loss_fn(model(x), t)) / total
    return {k: v * c for k, v in acc.items()}


@pytest.mark.parametrize("name", zoo_params())
def test_obd_and_lm_exact_on_the_last_layer(name):
    model, x, y, exact_names, _ = build(name)
    loss = nn.CrossEntropyLoss()
    ex = hessian_diag(model, loss, (x, y), method="exact", params=list(exact_names), progress=False)
    for method in ("obd", "lm"):
        res = hessian_diag(model, loss, (x, y), method=method, progress=False)
        assert set(res) == {k for k, p in model.named_parameters() if p.requires_grad}
        assert all(bool(torch.isfinite(v).all()) for v in res.values()), (name, method)
        for k in exact_names:
            assert close(res[k], ex[k]), (name, method, k)


@pytest.mark.parametrize("name", zoo_params())
def test_fisher_equals_a_loop_over_samples(name):
    model, x, y, _, tol = build(name)
    loss = nn.CrossEntropyLoss()
    res = hessian_diag(model, loss, (x, y), method="fisher", progress=False)
    ref = loop_fisher(model, loss, x, y)
    for k in ref:
        assert close(res[k], ref[k], tol), (name, k)


@pytest.mark.parametrize("name", zoo_params())
def test_fallbacks_run(name):
    model, x, y, _, _ = build(name)
    for method in ("hutchinson", "ggn-mc"):
        res = hessian_diag(model, nn.CrossEntropyLoss(), (x, y), method=method, progress=False)
        assert all(bool(torch.isfinite(v).all()) for v in res.values()), (name, method)


class LSTMLanguageModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.rnn = nn.LSTM(8, 8, batch_first=True)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, ids):
        return self.head(self.rnn(self.emb(ids))[0]).reshape(-1, VOCAB)


def test_lstm_is_a_clear_error_for_obd_naming_the_module_and_runs_with_exact():
    torch.manual_seed(2)
    model = LSTMLanguageModel().double()
    x, y = torch.randint(0, VOCAB, (2, 4)), torch.randint(0, VOCAB, (8,))
    with pytest.raises(UnsupportedOpError, match=r"used in rnn \(LSTM\).*method='hutchinson'"):
        hessian_diag(model, nn.CrossEntropyLoss(), (x, y), method="obd", progress=False)
    ex = hessian_diag(model, nn.CrossEntropyLoss(), (x, y), method="exact", params=["head.bias"], progress=False)
    assert bool((ex["head.bias"] > 0).all())


class TinyUNet(nn.Module):
    """Down, up (nearest upsampling), skip connection by concatenation."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.mid = nn.Conv2d(4, 4, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        d = torch.tanh(self.down(x))
        u = self.up(torch.tanh(self.mid(self.pool(d))))
        return self.out(torch.cat([d, u], 1))


def test_unet_with_upsampling_is_a_clear_error_for_obd_and_runs_with_the_others():
    torch.manual_seed(3)
    model = TinyUNet().double()
    x, y = torch.randn(2, 1, 4, 4), torch.randint(0, 2, (2, 4, 4))
    with pytest.raises(UnsupportedOpError, match=r"upsample_nearest2d .*used in up \(Upsample\)"):
        hessian_diag(model, nn.CrossEntropyLoss(), (x, y), method="obd", progress=False)
    res = hessian_diag(model, nn.CrossEntropyLoss(), (x, y), method="fisher", progress=False)
    # fisher against the per-sample loop (targets are per pixel: one target map per sample)
    summed = nn.CrossEntropyLoss(reduction="sum")
    params = dict(model.named_parameters())
    acc = {k: torch.zeros_like(p) for k, p in params.items()}
    total = 0.0
    for b in range(2):
        loss = summed(model(x[b:b + 1]), y[b:b + 1])
        total += float(loss.detach())
        for k, gr in zip(params, torch.autograd.grad(loss, list(params.values()))):
            acc[k] += gr * gr
    c = float(nn.CrossEntropyLoss()(model(x), y).detach()) / total
    assert all(close(res[k], acc[k] * c) for k in params)
    ex = hessian_diag(model, nn.CrossEntropyLoss(), (x, y), method="exact", params=["out.bias"], progress=False)
    assert bool(torch.isfinite(ex["out.bias"]).all())
