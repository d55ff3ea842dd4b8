"""How well each curvature estimate ranks OBD saliency on trained small networks.

For each model, trained briefly here from a fixed seed, the saliency
``s = h * w^2 / 2`` of ``obd``, ``lm``, ``fisher`` and ``ggn-mc`` (and of
magnitude, ``w^2``, as the baseline that needs no curvature) is ranked against
the saliency of the exact Hessian diagonal (``method="exact"``, autograd) by
Spearman's rank correlation, on the same batch, in float64:

- ``digits-convnet``: the demo's network (obd_ext.models.constrained_net: two
  shared-weight convolutions, scaled tanh, MSE on +-1 targets) on sklearn's 8x8
  digits;
- ``digits-resnet``: obd_ext.models.SmallResNet (BatchNorm, residual blocks,
  cross-entropy) on the same digits, curvature in eval mode;
- ``tiny-gpt2``: transformers' GPT-2 with its default ``gelu_new`` (tied
  embeddings), character-level, trained on the Python standard library's
  source; cross-entropy per token.

Also reported: the fraction of exact diagonal entries that are negative, the
Spearman correlation over the entries whose exact curvature is positive (where
a rank can be right for the right reason), and each method's seconds.

Usage:
    python bench/bench_saliency_quality.py --json bench/out/saliency_quality.json
    python bench/bench_saliency_quality.py --quick      # fewer steps, a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, print_table, write_json  # noqa: E402

from obd_ext import hessian_diag  # noqa: E402
from obd_ext.models import SmallResNet, constrained_net  # noqa: E402

METHODS = ("obd", "lm", "fisher", "ggn-mc")
Batch = Tuple[Tensor, Tensor]


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation (ties broken by position: continuous values have none to speak of)."""
    ra = torch.argsort(torch.argsort(a)).double()
    rb = torch.argsort(torch.argsort(b)).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


# ---------------------------------------------------------------------------
# Models and data
# ---------------------------------------------------------------------------


def digits(seed: int) -> Tuple[Tensor, Tensor, Tensor]:
    """sklearn's 8x8 digits (bundled, no download): images N x 1 x 8 x 8, +-1 targets, labels."""
    from obd_ext.demo.data import load_data

    (x, t, y), _ = load_data(seed)
    return x, t, y


def train_digits_convnet(steps: int, seed: int) -> Tuple[nn.Module, nn.Module, Batch]:
    x, t, _ = digits(seed)
    torch.manual_seed(seed)
    model = constrained_net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (64,), generator=g)
        opt.zero_grad()
        F.mse_loss(model(x[idx]), t[idx]).backward()
        opt.step()
    return model, nn.MSELoss(), (x, t)


def train_digits_resnet(steps: int, seed: int) -> Tuple[nn.Module, nn.Module, Batch]:
    x, _, y = digits(seed)
    torch.manual_seed(seed)
    model = SmallResNet(widths=(8, 16), blocks=(1, 1), classes=10, in_ch=1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval(), nn.CrossEntropyLoss(), (x, y)


class CharGPT(nn.Module):
    """GPT2LMHeadModel as ids -> (batch * tokens) x vocabulary logits."""

    def __init__(self, vocab: int, seq: int):
        super().__init__()
        import transformers

        cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=32, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                      eos_token_id=0)
        assert cfg.activation_function == "gelu_new"
        self.m = transformers.GPT2LMHeadModel(cfg)

    def forward(self, ids: Tensor) -> Tensor:
        out = self.m(input_ids=ids).logits
        return out.reshape(-1, out.shape[-1])


def stdlib_text(chars: int) -> str:
    """The first ``chars`` characters of a few standard-library modules' source (every machine has them)."""
    import inspect
    import json as json_mod
    import textwrap
    import argparse as argparse_mod
    import dataclasses

    text = "".join(inspect.getsource(m) for m in (argparse_mod, dataclasses, textwrap, json_mod.decoder))
    return text[:chars]


def train_tiny_gpt2(steps: int, seed: int, seq: int = 32) -> Tuple[nn.Module, nn.Module, Batch]:
    text = stdlib_text(200_000)
    vocab_chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(vocab_chars)}
    ids = torch.tensor([lookup[c] for c in text])
    split = int(0.9 * len(ids))
    train, held = ids[:split], ids[split:]
    torch.manual_seed(seed)
    model = CharGPT(len(vocab_chars), seq)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)

    def blocks(src: Tensor, n: int, gen: torch.Generator) -> Tuple[Tensor, Tensor]:
        start = torch.randint(0, len(src) - seq - 1, (n,), generator=gen)
        rows = torch.stack([src[s:s + seq + 1] for s in start.tolist()])
        return rows[:, :-1], rows[:, 1:].reshape(-1)

    model.train()
    for _ in range(steps):
        xb, yb = blocks(train, 16, g)
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    model.eval()
    # the curvature batch: held-out text (the model has not fitted it)
    return model, nn.CrossEntropyLoss(), blocks(held, 8, torch.Generator().manual_seed(seed + 1))


# ---------------------------------------------------------------------------
# The measurement
# ---------------------------------------------------------------------------


def measure(name: str, model: nn.Module, loss_fn: nn.Module, batch: Batch, params: Optional[List[str]],
            seed: int) -> Dict[str, object]:
    """Spearman of each method's saliency against the exact diagonal's, in float64."""
    model = model.double()
    x, y = batch
    if x.is_floating_point():
        x = x.double()
    if y.is_floating_point():
        y = y.double()
    names = params or [k for k, p in model.named_parameters() if p.requires_grad]
    w = {k: p.detach() for k, p in model.named_parameters()}
    with torch.no_grad():
        loss = float(loss_fn(model(x), y))

    def saliency(h: Dict[str, Tensor]) -> Tensor:
        return torch.cat([(h[k] * w[k] * w[k] * 0.5).reshape(-1) for k in names])

    t0 = time.perf_counter()
    exact = hessian_diag(model, loss_fn, (x, y), method="exact", params=names, progress=False)
    seconds = {"exact": time.perf_counter() - t0}
    h_exact = torch.cat([exact[k].reshape(-1) for k in names])
    ref = saliency(exact)
    positive = h_exact > 0
    row: Dict[str, object] = {"model": name, "entries": int(ref.numel()), "loss": loss,
                              "negative": float((h_exact < 0).double().mean())}
    for method in METHODS:
        t0 = time.perf_counter()
        # every method over the whole model (as a user runs it), compared on ``names``
        est = hessian_diag(model, loss_fn, (x, y), method=method, seed=seed, progress=False)
        seconds[method] = time.perf_counter() - t0
        s = saliency(est)
        row[method] = spearman(s, ref)
        row[f"{method}+"] = spearman(s[positive], ref[positive])
    mag = torch.cat([(w[k] * w[k]).reshape(-1) for k in names])
    row["magnitude"], row["magnitude+"] = spearman(mag, ref), spearman(mag[positive], ref[positive])
    row["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    return row


def markdown(rows: List[Dict[str, object]]) -> str:
    """The table for bench/RESULTS.md: Spearman over all entries (over those with positive exact curvature)."""
    cols = ["obd", "lm", "fisher", "ggn-mc", "magnitude"]
    lines = ["| model | entries | neg. exact | " + " | ".join(cols) + " |",
             "| --- | ---: | ---: | " + " | ".join("---:" for _ in cols) + " |"]
    for r in rows:
        cells = [f"{r[c]:.3f} ({r[c + '+']:.3f})" for c in cols]
        lines.append(f"| {r['model']} | {r['entries']} | {100 * r['negative']:.2f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# GPT-2's exact diagonal on a subset of tensors (one of each kind, from the first and
# the last block): exact costs one batched double backward per 256 entries.
GPT_PROBE = ["m.transformer.h.0.ln_1.weight", "m.transformer.h.0.attn.c_proj.weight", "m.transformer.h.0.mlp.c_fc.bias",
             "m.transformer.h.1.attn.c_attn.bias", "m.transformer.h.1.mlp.c_proj.weight", "m.transformer.ln_f.weight"]

MODELS: Dict[str, Tuple[Callable[[int, int], Tuple[nn.Module, nn.Module, Batch]], int, int, Optional[List[str]]]] = {
    # name: (trainer, steps, quick steps, tensors compared (None: all))
    "digits-convnet": (train_digits_convnet, 600, 30, None),
    "digits-resnet": (train_digits_resnet, 300, 20, None),
    "tiny-gpt2": (train_tiny_gpt2, 1500, 20, GPT_PROBE),
}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    p.add_argument("--quick", action="store_true", help="a few training steps only (smoke run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--curvature-samples", type=int, default=100,
                   help="digits samples in the curvature batch (exact's cost grows with it)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in MODELS]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    if args.curvature_samples < 1:
        p.error(f"--curvature-samples must be positive, got {args.curvature_samples}")
    info = machine()
    rows = []
    for name in chosen:
        trainer, steps, quick, probe = MODELS[name]
        t0 = time.perf_counter()
        model, loss_fn, (x, y) = trainer(quick if args.quick else steps, args.seed)
        trained = time.perf_counter() - t0
        if name.startswith("digits"):
            x, y = x[:args.curvature_samples], y[:args.curvature_samples]
        row = measure(name, model, loss_fn, (x, y), probe, args.seed)
        row["steps"], row["train_seconds"] = quick if args.quick else steps, round(trained, 1)
        rows.append(row)
        print(f"{name}: trained {row['steps']} steps in {trained:.0f}s, loss {row['loss']:.4f}, "
              f"seconds {row['seconds']}", flush=True)
    cols = ["model", "entries", "loss", "negative", *METHODS, "magnitude"]
    print()
    print_table(rows, cols)
    print()
    print(markdown(rows))
    write_json(args.json, {"machine": info, "date": datetime.date.today().isoformat(), "quick": args.quick,
                           "seed": args.seed, "curvature_samples": args.curvature_samples, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
