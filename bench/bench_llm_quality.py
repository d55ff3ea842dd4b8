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
  must equal layer-wise OBD per row: the mismatch is printed;
- the Optimal Brain Surgeon, layer-wise (``obs``: ``method="layerwise-obs"``,
  SparseGPT's algorithm in obd_ext; scope "layer" for unstructured, as
  SparseGPT's adaptive mask; ``obs-row``: one fraction per row), skipped with a
  note where this obd_ext has no such method;
- llm-compressor's SparseGPT and Wanda (``llmc-sparsegpt``, ``llmc-wanda``:
  ``llmcompressor.oneshot`` with ``SparseGPTModifier`` / ``WandaPruningModifier``,
  sparsity 0.5 or mask structure "2:4", targets the same block layers by name,
  ``lm_head`` ignored), calibrated on the SAME windows in the same batches (a
  DataLoader of them), on the CPU; skipped with a note where llmcompressor is
  not importable (run with /work/benchenv/bin/python, or any environment with
  llmcompressor). Its masks are compared with layer-wise OBD per row too.

Each pruning call alone is timed (wall clock; ``seconds``), and the table gives
its ratio to llm-compressor's Wanda on the same pattern (``x_llmc_wanda``; < 1
is faster), the damage ``perplexity - dense``, and the block layers' sparsity
actually reached (a method that pruned less than asked is flagged, not scored
as if it had). The machine's load average is recorded: timings on a loaded
machine are inflated.


Usage:
    python bench/train_tiny_gpt.py                       # once: bench/out/tiny-gpt2
    python bench/bench_llm_quality.py [--model DIR] [--json bench/out/llm_quality.json]

    # the Llama-family model of bench/RESULTS.md's first quality table
    python bench/train_tiny_gpt.py --arch llama --bf16 --steps 1500 --out bench/out/tiny-llama-1500
    python bench/bench_llm_quality.py --model bench/out/tiny-llama-1500

    # beside llm-compressor (its environment), a quick check with few windows and test tokens
    /work/benchenv/bin/python bench/bench_llm_quality.py --model DIR --nsamples 8 --eval-tokens 4096 \
        --methods magnitude,obd-row,obs,llmc-sparsegpt,llmc-wanda
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
from obd_ext.vocabulary import LAYERWISE_METHODS  # noqa: E402


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


LLMC_METHODS = ("llmc-sparsegpt", "llmc-wanda")
DEFAULT_METHODS = "magnitude,obd-row,obd-layer,obd-block,global-obd,global-lm,wanda,obs,obs-row," + ",".join(LLMC_METHODS)


class Skip(Exception):
    """A method that cannot run here (not in this obd_ext, llmcompressor missing): a note, not a failure."""


def block_layer_names(model: nn.Module):
    prefix, blocks = find_blocks(model)
    return [f"{prefix}.{i}.{n}" for i, b in enumerate(blocks) for n in prunable_layers(b)]


def conv1d_to_linear_(model: nn.Module) -> int:
    """Replace transformers' Conv1D layers (GPT-2; weight ``[in, out]``) by the equal ``nn.Linear``; returns how many.

    llm-compressor 0.14 prunes only the classes named "Linear", "Conv1d", "Conv2d", "Conv3d": it silently
    leaves GPT-2's Conv1D layers dense. The same function as an ``nn.Linear`` (weight transposed) it prunes.
    """
    from obd_ext.layerwise.stats import is_hf_conv1d

    swaps = [(n, m) for n, m in model.named_modules() if is_hf_conv1d(m)]
    for name, conv in swaps:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        w = conv.weight.detach()
        lin = nn.Linear(w.shape[0], w.shape[1], bias=conv.bias is not None, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            lin.weight.copy_(w.t())
            if conv.bias is not None:
                lin.bias.copy_(conv.bias)
        setattr(owner, attr, lin)
    return len(swaps)


def llmc_prune(model: nn.Module, tokenizer, batches, method: str, pattern: str) -> float:
    """llm-compressor's oneshot on ``model`` with the given calibration batches; returns the call's seconds."""
    # Its log stays on: with LLM_COMPRESSOR_LOG_DISABLED=true, llm-compressor 0.14 does not register its
    # METRIC level and then fails logging a metric ("Level 'METRIC' does not exist").
    try:
        import llmcompressor  # noqa: F401
    except ImportError as e:
        raise Skip(f"llmcompressor is not importable here ({e}); run with an environment that has it") from None
    from torch.utils.data import DataLoader

    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    try:
        from llmcompressor.core import reset_session
        reset_session()  # a fresh session per call: recipes of earlier calls must not be applied again
    except ImportError:
        pass
    if conv1d_to_linear_(model):
        print(f"{method}: the model's transformers Conv1D layers were converted to the equal nn.Linear first "
              "(llm-compressor leaves Conv1D dense)")
    modifier = {"llmc-sparsegpt": SparseGPTModifier, "llmc-wanda": WandaPruningModifier}[method]
    # Targets by exact name: the same layers obd_ext prunes. (A class-name target such as "Linear" makes every
    # Linear its own "layer", whose name inside itself is "", so ignore=["lm_head"] does not match "lm_head.";
    # with a tied lm_head that would prune the embeddings too.)
    recipe = modifier(sparsity=0.5, mask_structure="0:0" if pattern == "unstructured" else pattern,
                      targets=block_layer_names(model), ignore=["re:.*lm_head"])
    rows = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for b in batches for w in b]
    loader = DataLoader(rows, batch_size=batches[0].shape[0], shuffle=False)  # the same windows, batches, order
    start = time.perf_counter()
    oneshot(model=model, dataset=loader, recipe=[recipe], tokenizer=tokenizer, num_calibration_samples=len(rows))
    return time.perf_counter() - start


def run_ours(model: nn.Module, method: str, pattern: str, batches, calib) -> float:
    """One of obd_ext's methods on ``model``; returns the pruning call's seconds."""
    unstructured = pattern == "unstructured"
    # an N:M pattern fixes the sparsity and selects within rows: no sparsity or other scope with it
    sparsity = 0.5 if unstructured else None
    start = time.perf_counter()
    if method == "magnitude":
        prune_layerwise(model, batches, sparsity=sparsity, pattern=pattern, scope="layer" if unstructured else None,
                        method="magnitude", run=run_causal_lm, progress=False)
    elif method.startswith("obd-"):
        scope = {"obd-row": "row", "obd-layer": "layer", "obd-block": "global"}[method]
        prune_layerwise(model, batches, sparsity=sparsity, pattern=pattern, scope=scope if unstructured else None,
                        method="layerwise-obd", run=run_causal_lm, progress=False)
    elif method in ("obs", "obs-row"):
        if "layerwise-obs" not in LAYERWISE_METHODS:
            raise Skip("this obd_ext has no method 'layerwise-obs' (the surgeon step)")
        scope = ("layer" if method == "obs" else "row") if unstructured else None
        prune_layerwise(model, batches, sparsity=sparsity, pattern=pattern, scope=scope, method="layerwise-obs",
                        run=run_causal_lm, progress=False)
    elif method.startswith("global-"):
        prune_global_curvature(model, calib, sparsity=sparsity, pattern=pattern,
                               scope="global" if unstructured else None, method=method.split("-")[1],
                               batch_size=batches[0].shape[0], progress=False)
    elif method == "wanda":
        plain_wanda(model, batches, 0.5)
    else:
        raise ValueError(f"unknown method {method!r}")
    return time.perf_counter() - start


def load_average() -> list:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(os.path.dirname(__file__), "out", "tiny-gpt2"))
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--batch", type=int, default=8, help="calibration windows per forward (every method)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=400_000, help="test tokens scored")
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--patterns", default="unstructured,2:4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.nsamples < 1 or args.batch < 1 or args.eval_tokens < args.seq_len:
        p.error("--nsamples and --batch must be >= 1 and --eval-tokens >= --seq-len")
    torch.manual_seed(args.seed)
    dense, tokenizer, splits = load_model_and_splits(args.model, splits=("train", "test"), seq_len=args.seq_len,
                                                     max_tokens=max(args.eval_tokens, 16 * args.nsamples * args.seq_len))
    test = splits["test"][: max(1, args.eval_tokens // args.seq_len)]
    train = splits["train"]
    g = torch.Generator().manual_seed(args.seed)
    calib = train[torch.randperm(train.shape[0], generator=g)[: args.nsamples]]
    batches = list(calib.split(args.batch))
    params = sum(p.numel() for p in dense.parameters())
    print(f"model {args.model}: {params / 1e6:.2f} M parameters; calibration {calib.shape[0]} x {calib.shape[1]} "
          f"tokens in batches of {args.batch}; test {test.numel()} tokens; torch threads {torch.get_num_threads()}; "
          f"load average {load_average()}")
    t0 = time.time()
    dense_ppl = perplexity(dense, test)
    rows = [{"pattern": "dense", "method": "dense", "sparsity": 0.0, "perplexity": dense_ppl, "damage": 0.0,
             "seconds": 0.0}]
    notes = []
    methods = args.methods.split(",")
    for pattern in args.patterns.split(","):
        reference_masks = None
        pattern_rows = []
        for method in methods:
            if pattern != "unstructured" and method in ("obd-layer", "obd-block", "obs-row"):
                continue  # N:M is one pool per group of M inputs: the scope does not apply
            if pattern != "unstructured" and method == "wanda":
                continue  # the plain Wanda here is the unstructured per-row rule
            model = copy.deepcopy(dense)
            load_before = load_average()
            try:
                if method in LLMC_METHODS:
                    seconds = llmc_prune(model, tokenizer, batches, method, pattern)
                else:
                    seconds = run_ours(model, method, pattern, batches, calib)
            except Skip as e:
                note = f"{method} ({pattern}) skipped: {e}"
                print(note)
                notes.append(note)
                continue
            reached = block_sparsity(model)
            row = {"pattern": pattern, "method": method, "sparsity": reached, "perplexity": perplexity(model, test),
                   "seconds": seconds, "load_before": load_before[0] if load_before else None}
            row["damage"] = row["perplexity"] - dense_ppl
            if abs(reached - 0.5) > 0.01:  # the layers were not pruned as asked: do not score it as if they were
                row["problem"] = f"pruned {reached:.1%} of the block layers, not 50%"
                notes.append(f"{method} ({pattern}): {row['problem']}")
            if method == "obd-row":
                reference_masks = masks_of(model)
            if method in ("wanda", "llmc-wanda") and reference_masks is not None:
                ours = masks_of(model)
                diff = sum(int((ours[k] != reference_masks[k]).sum()) for k in ours)
                row["mask_mismatch_vs_obd_row"] = diff / sum(m.numel() for m in ours.values())
            pattern_rows.append(row)
            print_table([row], [c for c in row if c != "problem"] + (["problem"] if "problem" in row else []))
        anchor = next((r["seconds"] for r in pattern_rows if r["method"] == "llmc-wanda" and "problem" not in r),
                      None)
        for r in pattern_rows:
            r["x_llmc_wanda"] = r["seconds"] / anchor if anchor else None
        rows += pattern_rows
    print()
    print_table(rows, ["pattern", "method", "sparsity", "perplexity", "damage", "seconds", "x_llmc_wanda",
                       "mask_mismatch_vs_obd_row", "problem"])
    for note in notes:
        print(f"note: {note}")
    print(f"total {time.time() - t0:.0f} s; load average now {load_average()} "
          f"(timings on a loaded machine are inflated)")
    write_json(args.json, {"machine": machine(), "model": args.model, "parameters": params,
                           "calibration": list(calib.shape), "batch": args.batch, "test_tokens": int(test.numel()),
                           "load_average_end": load_average(), "notes": notes, "results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
