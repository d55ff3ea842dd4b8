"""Hugging Face transformers causal LMs: load from a local directory, prune, evaluate, save.

This is ``obd-ext prune-llm`` and its Python form :func:`prune_llm`. Models are
loaded with ``local_files_only=True`` (never from a hub). The pruned model is
saved with ``save_pretrained``: plain dense tensors with the zeros in place,
so it loads back in plain transformers without obd_ext.

Two ways to compute saliency:

- ``method="layerwise"`` (default): layer-wise OBD, block by block
  (:func:`~obd_ext.layerwise.blockwise.prune_layerwise`); scales to models
  larger than the GPU.
- ``method="obd" | "lm" | "fisher"``: the whole-network curvature engine
  (``obd_ext.hessian_diag`` on the next-token cross-entropy), for models that
  fit; it prunes the same layers as the layer-wise path.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from torch import Tensor

from ..selection import check_sparsity
from .blockwise import find_blocks, parse_pattern, prune_by_saliency_, prune_layerwise
from .stats import prunable_layers, weight_rows_of

__all__ = ["METHODS", "load_causal_lm", "text_blocks", "calibration_windows", "perplexity", "run_causal_lm",
           "prune_llm", "prune_global_curvature"]

METHODS = ("layerwise", "magnitude", "obd", "lm", "fisher")


def load_causal_lm(model_dir: str, dtype: Optional[torch.dtype] = None):
    """(model, tokenizer) from a local directory, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model_dir: no such directory {model_dir!r} (models load from local files only)")
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return model.eval(), tokenizer


def text_blocks(tokenizer, text: str, seq_len: int) -> Tensor:
    """The text's tokens cut into non-overlapping ``[n, seq_len]`` blocks (the tail is dropped)."""
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one block of seq_len={seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)


def calibration_windows(tokenizer, text: str, nsamples: int, seq_len: int, seed: int = 0) -> Tensor:
    """``nsamples`` random ``seq_len``-token windows of the text (SparseGPT/Wanda's calibration draw)."""
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    if ids.numel() < seq_len + 1:
        raise ValueError(f"the calibration text has {ids.numel()} tokens, fewer than seq_len={seq_len} + 1")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (nsamples,), generator=g)
    return torch.stack([ids[s: s + seq_len] for s in starts.tolist()])


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def run_causal_lm(model: nn.Module, batch: Tensor):
    """One forward of a transformers causal LM on a batch of token ids."""
    return model(input_ids=batch.to(_device_of(model)), use_cache=False)


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """exp of the mean next-token NLL over every predicted token of ``blocks``.

    Each block of ``T`` tokens predicts its last ``T - 1`` tokens from the ones
    before (no context is carried between blocks). The model runs in eval mode
    without gradients and its previous train/eval mode is restored.

    Args:
        model: A causal LM: ``model(input_ids)`` returns logits ``[B, T, V]`` or an
            object with ``.logits`` (transformers).
        blocks: ``LongTensor[n, T]``.
        batch_size: Blocks per forward pass.

    Returns:
        The perplexity; ``nan`` when there is nothing to predict.
    """
    if blocks.dim() != 2:
        raise ValueError(f"perplexity: blocks must be [n, seq_len], got shape {tuple(blocks.shape)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll = 0.0
    count = 0
    try:
        for start in range(0, blocks.shape[0], batch_size):
            x = blocks[start:start + batch_size].to(device)
            if x.shape[1] < 2:
                continue
            out = model(x)
            logits = getattr(out, "logits", out)
            nll = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1),
                                  reduction="sum")
            total_nll += float(nll)
            count += x[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total_nll / count) if count else float("nan")


class _NextTokenLogits(nn.Module):
    """``ids -> logits of positions 0..T-2`` as rows: the curvature engine's model for next-token CE."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids: Tensor) -> Tensor:
        logits = self.lm(input_ids=ids, use_cache=False).logits[:, :-1]
        return logits.reshape(-1, logits.shape[-1])


def prune_global_curvature(model: nn.Module, calibration: Tensor, *, sparsity: float, pattern: str = "unstructured",
                           scope: str = "global", method: str = "lm", batch_size: int = 4,
                           progress: bool = True) -> Dict[str, Any]:
    """Whole-network OBD: ``hessian_diag`` on next-token cross-entropy, then one selection.

    ``scope`` is "global" (one pool over the block layers; the paper's rule),
    "layer" or "row"; an N:M ``pattern`` overrides it.
    """
    from ..curvature import hessian_diag, recordable

    wrapped = _NextTokenLogits(model)
    prefix, blocks = find_blocks(model)
    layers = {f"{prefix}.{i}.{n}": m for i, b in enumerate(blocks) for n, m in prunable_layers(b).items()}
    names = [f"lm.{n}.weight" for n in layers]
    data = [(ids, ids[:, 1:].reshape(-1)) for ids in calibration.split(batch_size)]
    with recordable():
        h = hessian_diag(wrapped, nn.CrossEntropyLoss(), data, method=method, params=names, progress=progress)
    # the curvature laid out like each weight's [outputs, inputs] rows (HF Conv1D stores [in, out])
    curvatures = {n: weight_rows_of(m, h[f"lm.{n}.weight"]).contiguous() for n, m in layers.items()}
    reports = prune_by_saliency_(layers, curvatures, sparsity, pattern, scope)
    total = sum(r.total for r in reports)
    return {"method": method, "negative_curvature_entries": h.total_negative,
            "predicted_increase": sum(r.predicted_increase for r in reports),
            "sparsity": sum(r.deleted for r in reports) / total if total else 0.0,
            "layers": [asdict(r) for r in reports]}


def prune_llm(model_dir: str, out_dir: Optional[str], *, calib: str, sparsity: float = 0.5,
              pattern: str = "unstructured", eval_text: Optional[str] = None, nsamples: int = 128,
              seq_len: Optional[int] = None, scope: str = "row", method: str = "layerwise", device: Optional[str] = None,
              dtype: Optional[torch.dtype] = None, seed: int = 0, progress: bool = True) -> Dict[str, Any]:
    """Load a causal LM from ``model_dir``, prune it, report perplexity before/after, save it to ``out_dir``.

    Args:
        calib: path of a text file; calibration windows are drawn from it.
        eval_text: path of held-out text for perplexity (default: the last
            10% of ``calib``, which calibration then does not use).
        method: "layerwise" (OBD, block by block), "magnitude" (per layer, for
            comparison), or "obd"/"lm"/"fisher" (whole-network curvature).
        seq_len: tokens per window (default: min(2048, the model's context)).
        device: where blocks are processed (default: where the model is).
    Returns the report written to ``out_dir/prune_report.json``.
    """
    check_sparsity(sparsity)
    parse_pattern(pattern)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    t0 = time.time()
    model, tokenizer = load_causal_lm(model_dir, dtype)
    with open(calib, encoding="utf-8") as f:
        calib_text = f.read()
    if eval_text is None:
        cut = int(len(calib_text) * 0.9)
        calib_text, held_out = calib_text[:cut], calib_text[cut:]
    else:
        with open(eval_text, encoding="utf-8") as f:
            held_out = f.read()
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 2048)
    seq_len = seq_len or min(2048, context)
    windows = calibration_windows(tokenizer, calib_text, nsamples, seq_len, seed)
    eval_blocks = text_blocks(tokenizer, held_out, seq_len)
    if device is not None and method not in ("layerwise", "magnitude"):
        model.to(device)
    ppl_before = perplexity(model, eval_blocks)
    if method in ("layerwise", "magnitude"):
        result = prune_layerwise(model, windows.split(4), sparsity=sparsity, pattern=pattern,
                                 scope=scope if method == "layerwise" else "layer",
                                 criterion="obd" if method == "layerwise" else "magnitude",
                                 run=run_causal_lm, device=device, progress=progress)
        detail = result.to_dict()
    else:
        detail = prune_global_curvature(model, windows, sparsity=sparsity, pattern=pattern,
                                        scope=scope, method=method,
                                        progress=progress)
    if device is not None:
        model.to(device)
    ppl_after = perplexity(model, eval_blocks)
    report = {"model_dir": os.path.abspath(model_dir), "method": method, "pattern": pattern, "scope": scope,
              "sparsity_target": sparsity, "nsamples": nsamples, "seq_len": seq_len, "eval_tokens":
              int(eval_blocks.numel()), "perplexity_before": ppl_before, "perplexity_after": ppl_after,
              "seconds": time.time() - t0, "detail": detail}
    if out_dir is not None:
        model.to("cpu").save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        with open(os.path.join(out_dir, "prune_report.json"), "w") as f:
            json.dump(report, f, indent=2)
    return report
