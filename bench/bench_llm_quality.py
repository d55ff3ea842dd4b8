"""Pruning quality on a real language model trained here: held-out perplexity, dense and pruned.

The model is the GPT-2-style LM that ``bench/train_tiny_gpt.py`` trains on the
Python standard library's source (no download). Each method starts from the
same dense model and the same calibration windows (random windows of the
train split), prunes the layers inside the transformer blocks to 50%
unstructured or 2:4, and is scored by perplexity on the test split:

- magnitude (per layer);
- layer-wise OBD per output row (Wanda's rule), per layer, and per block;
- global OBD and LM (Gauss-Newton) through the whole-network curvature engine
  (``obd_ext.hessian_diag`` on the next-token loss), one pool over all layers;
- a plain Wanda implementation (``|W| * ||X_j||``, per-row sort), whose masks
  must equal layer-wise OBD per row: the mismatch is printed.

Usage:
    python bench/train_tiny_gpt.py                       # once: bench/out/tiny-gpt2
    python bench/bench_llm_quality.py [--model DIR] [--json bench/out/llm_quality.json]

    # the Llama-family model of bench/RESULTS.md's first quality table
    python bench/train_tiny_gpt.py --arch llama --bf16 --steps 1500 --out bench/out/tiny-llama-1500
    python bench/bench_llm_quality.py --model bench/out/tiny-llama-1500
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, print_table, write_json  # noqa: E402
from llm_data import load_model_and_splits, perplexity  # noqa: E402

import obd_ext  # noqa: E402
from obd_ext.layerwise import (capture_block_inputs, find_blocks, next_block_inputs, prunable_layers,  # noqa: E402
                               prune_layerwise, weight_rows)
from obd_ext.layerwise.hf import prune_global_curvature, run_causal_lm  # noqa: E402


@torch.no_grad()
def plain_wanda(model: nn.Module, calibration, sparsity: float) -> None:
    """Wanda as its authors write it: per block, ||X_j||_2 by hooks, |W| * norm, sort each row, zero the lowest."""
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], calibration, run_causal_lm)
    for block in blocks:
        layers = prunable_layers(block)
        sq = {n: 0 for n in layers}
        hooks = [m.register_forward_pre_hook(
            lambda mod, a, n=n: sq.__setitem__(n, sq[n] + a[0].reshape(-1, a[0].shape[-1]).double().square()
                                               .sum(0))) for n, m in layers.items()]
        for args, kwargs in inputs:
            block(*args, **kwargs)
        for h in hooks:
            h.remove()
        for n, m in layers.items():
            w = weight_rows(m)
            score = w.abs() * sq[n].sqrt().to(w.dtype)
            k = obd_ext.count_for_sparsity(sparsity, w.shape[1])
            idx = torch.sort(score, dim=1, stable=True).indices[:, :k]
            w.scatter_(1, idx, 0.0)
        inputs = next_block_inputs(block, inputs)


def masks_of(model: nn.Module):
    _, blocks = find_blocks(model)
    return {f"{i}.{n}": weight_rows(m) == 0 for i, b in enumerate(blocks) for n, m in prunable_layers(b).items()}


def block_sparsity(model: nn.Module) -> float:
    ms = masks_of(model)
    return sum(int(m.sum()) for m in ms.values()) / sum(m.numel() for m in ms.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(os.path.dirname(__file__), "out", "tiny-gpt2"))
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=400_000, help="test tokens scored")
    p.add_argument("--methods", default="magnitude,obd-row,obd-layer,obd-block,global-obd,global-lm,wanda")
    p.add_argument("--patterns", default="unstructured,2:4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    dense, tokenizer, splits = load_model_and_splits(args.model, splits=("train", "test"), seq_len=args.seq_len,
                                                     max_tokens=max(args.eval_tokens, 16 * args.nsamples * args.seq_len))
    test = splits["test"][: max(1, args.eval_tokens // args.seq_len)]
    train = splits["train"]
    g = torch.Generator().manual_seed(args.seed)
    calib = train[torch.randperm(train.shape[0], generator=g)[: args.nsamples]]
    batches = list(calib.split(8))
    params = sum(p.numel() for p in dense.parameters())
    print(f"model {args.model}: {params / 1e6:.2f} M parameters; calibration {calib.shape[0]} x {calib.shape[1]} "
          f"tokens; test {test.numel()} tokens")
    t0 = time.time()
    rows = [{"pattern": "dense", "method": "dense", "sparsity": 0.0, "perplexity": perplexity(dense, test),
             "seconds": 0.0}]
    methods = args.methods.split(",")
    for pattern in args.patterns.split(","):
        reference_masks = None
        for method in methods:
            if pattern != "unstructured" and method in ("obd-layer", "obd-block"):
                continue  # N:M is one pool per group of M inputs: the scope does not apply
            if pattern != "unstructured" and method == "wanda":
                continue  # the plain Wanda here is the unstructured per-row rule
            model = copy.deepcopy(dense)
            start = time.time()
            # an N:M pattern fixes the sparsity and selects within rows: no sparsity or other scope with it
            unstructured = pattern == "unstructured"
            sparsity = 0.5 if unstructured else None
            if method == "magnitude":
                prune_layerwise(model, batches, sparsity=sparsity, pattern=pattern,
                                scope="layer" if unstructured else None, method="magnitude", run=run_causal_lm,
                                progress=False)
            elif method.startswith("obd-"):
                scope = {"obd-row": "row", "obd-layer": "layer", "obd-block": "global"}[method]
                prune_layerwise(model, batches, sparsity=sparsity, pattern=pattern,
                                scope=scope if unstructured else None, method="layerwise-obd", run=run_causal_lm,
                                progress=False)
            elif method.startswith("global-"):
                prune_global_curvature(model, calib, sparsity=sparsity, pattern=pattern,
                                       scope="global" if unstructured else None, method=method.split("-")[1],
                                       batch_size=8, progress=False)
            elif method == "wanda":
                plain_wanda(model, batches, 0.5)
            else:
                raise ValueError(f"unknown method {method!r}")
            seconds = time.time() - start
            row = {"pattern": pattern, "method": method, "sparsity": block_sparsity(model),
                   "perplexity": perplexity(model, test), "seconds": seconds}
            if method == "obd-row":
                reference_masks = masks_of(model)
            if method == "wanda" and reference_masks is not None:
                ours = masks_of(model)
                diff = sum(int((ours[k] != reference_masks[k]).sum()) for k in ours)
                row["mask_mismatch_vs_obd_row"] = diff / sum(m.numel() for m in ours.values())
            rows.append(row)
            print_table([row], list(row))
    print()
    print_table(rows, ["pattern", "method", "sparsity", "perplexity", "seconds", "mask_mismatch_vs_obd_row"])
    print(f"total {time.time() - t0:.0f} s")
    write_json(args.json, {"machine": machine(), "model": args.model, "parameters": params,
                           "calibration": list(calib.shape), "test_tokens": int(test.numel()), "results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
