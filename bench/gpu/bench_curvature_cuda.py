"""Curvature on a GPU: obd_ext.hessian_diag against one plain backward pass.

For each model (an MLP and a small GPT-like transformer) and method (obd, lm,
fisher, ggn-mc), times one hessian_diag call over one batch with CUDA events
after a warm-up, and one forward + backward of the same loss as the
baseline, measured in the same run; reports medians and the ratio. Before
timing, obd's curvature is checked to be finite and non-negative where it
must be (lm is a Gauss-Newton diagonal: >= 0).

``--device cpu --tiny`` runs the same code on tiny models (the suite's dry run).

Usage: python bench/gpu/bench_curvature_cuda.py [--device cuda] [--tiny] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, Tuple

import torch
from torch import nn

import obd_ext

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import time_call  # noqa: E402  (bench/common.py: CUDA events on a GPU, perf_counter on the CPU)

METHODS = ["obd", "lm", "fisher", "ggn-mc"]


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.blocks(self.emb(idx)))).flatten(0, 1)


def cases(tiny: bool, device: str) -> Dict[str, Tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    if tiny:
        mlp = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 10))
        x, y = torch.randn(8, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
        gpt, vocab, batch, seq = TinyGPT(50, 16, 1, 2), 50, 2, 8
    else:
        mlp = nn.Sequential(nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))
        x, y = torch.randn(4096, 784, generator=g), torch.randint(0, 10, (4096,), generator=g)
        gpt, vocab, batch, seq = TinyGPT(32000, 512, 4, 8), 32000, 16, 256
    idx = torch.randint(0, vocab, (batch, seq), generator=g)
    tgt = torch.randint(0, vocab, (batch * seq,), generator=g)
    return {"mlp": (mlp.to(device), x.to(device), y.to(device)),
            "gpt": (gpt.to(device), idx.to(device), tgt.to(device))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--json")
    args = p.parse_args(argv)
    loss_fn = nn.CrossEntropyLoss()
    rows = []
    for name, (model, x, y) in cases(args.tiny, args.device).items():
        def backward(model=model, x=x, y=y):
            model.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()

        base = time_call(backward, args.device, args.repeats)
        rows.append({"model": name, "method": "forward+backward", "seconds": base, "x_backward": 1.0})
        for method in args.methods.split(","):
            def curv(model=model, x=x, y=y, method=method):
                return obd_ext.hessian_diag(model, loss_fn, (x, y), method=method, progress=False)

            c = curv()
            for pname, h in c.items():
                assert torch.isfinite(h).all(), f"{name} {method}: non-finite curvature for {pname}"
                if method in ("lm", "fisher", "ggn-mc"):
                    assert (h >= 0).all(), f"{name} {method}: negative Gauss-Newton/Fisher curvature for {pname}"
            secs = time_call(curv, args.device, args.repeats)
            rows.append({"model": name, "method": method, "seconds": secs, "x_backward": secs / base})
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"curvature on {dev} (median of {args.repeats}; x_backward = time / one forward+backward)")
    for r in rows:
        print(f"  {r['model']:4s} {r['method']:17s} {r['seconds'] * 1e3:10.2f} ms  {r['x_backward']:6.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "device_name": dev, "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
