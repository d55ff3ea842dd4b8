"""Hugging Face transformers causal LMs: load from a local directory, prune, save, evaluate.

This is ``obd-ext prune-llm`` and its Python form :func:`prune_llm`. Models are
loaded with ``local_files_only=True`` (never from a hub). The pruned model is
saved with ``save_pretrained``: plain dense tensors with the zeros in place,
so it loads back in plain transformers without obd_ext.

Methods (``obd_ext.vocabulary.LLM_METHODS``):

- ``"layerwise-obs"`` (the default: it measured best, bench/RESULTS.md):
  the Optimal Brain Surgeon layer by layer, block by block
  (:func:`~obd_ext.layerwise.blockwise.prune_layerwise`; the full ``X^T X``
  per layer and updates of the kept weights, SparseGPT's algorithm); scales
  to models larger than the GPU. ``"layerwise-obd"`` takes the same path with
  the diagonal of ``X^T X`` only (Wanda's score, no update: cheaper);
  ``"magnitude"`` with ``|w|`` (no calibration pass).
- ``"obd"``, ``"lm"``, ``"fisher"``: the whole-network curvature engine
  (``obd_ext.hessian_diag`` on the next-token cross-entropy), for models that
  fit on the device; it prunes the same layers as the layer-wise path.

With a ``device``, perplexity is measured block by block on it as well
(:func:`blockwise_perplexity`), so the whole model is never on the device.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..vocabulary import DEFAULT_LAYERWISE_METHOD, LAYERWISE_METHODS, LLM_METHODS, check_method
from .blockwise import (_check_surgeon_options, _prune_by_saliency, find_blocks, forward_blockwise, prune_layerwise,
                        resolve_scope, resolve_sparsity)
from .stats import prunable_layers, weight_rows_of

__all__ = ["DTYPES", "check_model_dir", "check_text_file", "check_out_dir", "check_device", "check_count",
           "read_text", "versions", "load_causal_lm", "text_blocks", "calibration_windows", "perplexity",
           "blockwise_perplexity", "run_causal_lm", "prune_llm", "prune_global_curvature"]

DTYPES: Dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtypes a model may be loaded in, by the name the command line uses."""

# Calibration windows per forward while pruning.
_CALIB_BATCH = 4


# ---------------------------------------------------------------------------
# Checks of arguments and files: each names the argument as the caller calls it
# (``name``: "calib" from Python, "--calib" from the command line).
# ---------------------------------------------------------------------------

def check_model_dir(path: str, name: str = "model_dir") -> str:
    """``path`` as an absolute path if it is a directory holding a transformers ``config.json``.

    Raises:
        FileNotFoundError: no such directory, or no config.json in it.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path, got {type(path).__name__}")
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{name}: no such directory {path!r} (models load from local files only)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{name}: {path!r} holds no config.json (is it a save_pretrained directory?)")
    return path


def check_text_file(path: str, name: str) -> str:
    """``path`` as an absolute path if it is a readable file.

    Raises:
        FileNotFoundError: no such file.
        PermissionError: not readable.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path, got {type(path).__name__}")
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        what = "is a directory, not a text file" if os.path.isdir(path) else "no such file"
        raise FileNotFoundError(f"{name}: {what}: {path!r}")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{name}: {path!r} is not readable")
    return path


def read_text(path: str, name: str) -> str:
    """The UTF-8 text of ``path``; ValueError naming ``name`` if it is not UTF-8 or is empty."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{name}: {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise ValueError(f"{name}: {path!r} is empty")
    return text


def check_out_dir(out_dir: str, model_dir: Optional[str], overwrite: bool, name: str = "out_dir") -> str:
    """``out_dir`` as an absolute path if the pruned model may be written there.

    Refused unless ``overwrite``: ``out_dir`` equal to or inside
    ``model_dir`` (the input model would be overwritten or mixed with the
    output), and an existing non-empty directory. Always refused: an existing
    file, and a directory that cannot be created or written.

    Raises:
        FileExistsError: one of the above.
        PermissionError: the directory (or its nearest existing parent) is not writable.
    """
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path, got {type(out_dir).__name__}")
    out = os.path.realpath(out_dir)
    if model_dir is not None and not overwrite:
        src = os.path.realpath(model_dir)
        if out == src or out.startswith(src.rstrip(os.sep) + os.sep):
            where = "is" if out == src else "is inside"
            raise FileExistsError(f"{name}: {out_dir!r} {where} the model directory {model_dir!r}: the input "
                                  "model would be overwritten; choose another directory (or pass overwrite=True, --overwrite)")
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise FileExistsError(f"{name}: {out_dir!r} exists and is not a directory")
        if os.listdir(out) and not overwrite:
            raise FileExistsError(f"{name}: {out_dir!r} exists and is not empty (pass overwrite=True, or --overwrite, to write into it)")
    parent = out
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{name}: cannot write to {parent!r}")
    return out


def check_device(device: Optional[torch.device | str], name: str = "device") -> Optional[torch.device]:
    """``device`` as a ``torch.device`` (None stays None) if it parses and exists on this machine.

    Raises:
        ValueError: not a device string, or a device this machine lacks.
    """
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{name}: {device!r} is not a device ({str(e).splitlines()[0]})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}: {device!r} asked for, but this machine (or this torch build) has no CUDA "
                             "device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name}: {device!r} asked for, but there are {torch.cuda.device_count()} CUDA "
                             "devices")
    elif dev.type != "cpu":
        backend = getattr(torch, dev.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise ValueError(f"{name}: {device!r} is not available on this machine")
    return dev


def check_count(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` if it is an int >= ``minimum``, else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def versions() -> Dict[str, Optional[str]]:
    """Versions of obd_ext, torch, transformers and Python (None for one that is not installed)."""
    from importlib import metadata

    import obd_ext  # the package: imported here because it imports this module while it initialises

    try:
        tf = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        tf = None
    return {"obd_ext": obd_ext.__version__, "torch": torch.__version__, "transformers": tf,
            "python": sys.version.split()[0]}


def _require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ImportError("prune-llm needs transformers: pip install 'transformers>=4.40' tokenizers") from None


# ---------------------------------------------------------------------------
# Loading and data
# ---------------------------------------------------------------------------

def _load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def _load_model(model_dir: str, dtype: Optional[torch.dtype]) -> nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs: Dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()


def load_causal_lm(model_dir: str, dtype: Optional[torch.dtype] = None):
    """(model, tokenizer) from a local directory, the model in eval mode."""
    model_dir = check_model_dir(model_dir)
    _require_transformers()
    return _load_model(model_dir, dtype), _load_tokenizer(model_dir)


def _context_length(config) -> Optional[int]:
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def text_blocks(tokenizer, text: str, seq_len: int) -> Tensor:
    """The text's tokens cut into non-overlapping ``[n, seq_len]`` blocks (the tail is dropped)."""
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one block of seq_len={seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)


def calibration_windows(tokenizer, text: str, nsamples: int, seq_len: int, seed: int = 0) -> Tensor:
    """``nsamples`` random ``seq_len``-token windows of the text (SparseGPT/Wanda's calibration draw)."""
    check_count(nsamples, "nsamples")
    check_count(seq_len, "seq_len")
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    if ids.numel() < seq_len + 1:
        raise ValueError(f"the calibration text has {ids.numel()} tokens, fewer than seq_len={seq_len} + 1")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (nsamples,), generator=g)
    return torch.stack([ids[s: s + seq_len] for s in starts.tolist()])


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def run_causal_lm(model: nn.Module, batch: Tensor):
    """One forward of a transformers causal LM on a batch of token ids (moved to the model's first parameter)."""
    return model(input_ids=batch.to(_device_of(model)), use_cache=False)


# ---------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------

def _next_token_nll(out: Any, ids: Tensor) -> Tuple[float, int]:
    """(sum of next-token NLL, tokens predicted) of one batch's model output."""
    logits = getattr(out, "logits", out)
    ids = ids.to(logits.device)
    nll = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                                      reduction="sum")
    return float(nll), ids[:, 1:].numel()


def _check_ids(blocks: Tensor) -> None:
    if not isinstance(blocks, Tensor) or blocks.dim() != 2:
        shape = tuple(blocks.shape) if isinstance(blocks, Tensor) else type(blocks).__name__
        raise ValueError(f"perplexity: blocks must be a [n, seq_len] tensor of token ids, got {shape}")


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """exp of the mean next-token NLL over every predicted token of ``blocks``, the whole model where it is.

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
    _check_ids(blocks)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll, count = 0.0, 0
    try:
        for start in range(0, blocks.shape[0], batch_size):
            x = blocks[start:start + batch_size].to(device)
            if x.shape[1] < 2:
                continue
            nll, n = _next_token_nll(model(x), x)
            total_nll += nll
            count += n
    finally:
        model.train(was_training)
    return math.exp(total_nll / count) if count else float("nan")


@torch.no_grad()
def blockwise_perplexity(model: nn.Module, blocks: Tensor, *, device: Optional[torch.device | str] = None,
                         batch_size: int = 8, progress: bool = False) -> float:
    """:func:`perplexity` of a transformers causal LM computed block by block on ``device``.

    The layers outside the blocks (embedding, final norm, head) move to
    ``device``; then each block visits it in turn over all windows, as in
    pruning (:func:`~obd_ext.layerwise.blockwise.forward_blockwise`), so a
    model larger than the device can be evaluated. The device holds one block
    plus the hidden states of all windows. Equal to :func:`perplexity` up to
    rounding (the same operations in the same order per window).

    Args:
        model: a transformers causal LM (left where it is; it is not moved as a whole).
        blocks: ``LongTensor[n, T]`` of token ids.
        device: where to compute (default: where each part of the model is).
        batch_size: windows per forward of a block.
        progress: a tqdm bar over blocks.
    """
    _check_ids(blocks)
    check_count(batch_size, "batch_size")
    if blocks.shape[1] < 2 or blocks.shape[0] == 0:
        return float("nan")
    dev = torch.device(device) if device is not None else None
    totals = [0.0, 0]

    def consume(ids: Tensor, out: Any) -> None:
        nll, n = _next_token_nll(out, ids)
        totals[0] += nll
        totals[1] += n

    def run(m: nn.Module, ids: Tensor):
        return m(input_ids=ids.to(dev if dev is not None else _device_of(m)), use_cache=False)

    forward_blockwise(model, blocks.split(batch_size), consume, run=run, device=dev, progress=progress,
                      desc="perplexity")
    return math.exp(totals[0] / totals[1])


# ---------------------------------------------------------------------------
# Whole-network curvature
# ---------------------------------------------------------------------------

class _NextTokenLogits(nn.Module):
    """``ids -> logits of positions 0..T-2`` as rows: the curvature engine's model for next-token CE."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids: Tensor) -> Tensor:
        logits = self.lm(input_ids=ids, use_cache=False).logits[:, :-1]
        return logits.reshape(-1, logits.shape[-1])


def prune_global_curvature(model: nn.Module, calibration: Tensor, *, sparsity: Optional[float] = None,
                           pattern: str = "unstructured", scope: Optional[str] = None, method: str = "lm",
                           batch_size: int = 4, progress: bool = True) -> Dict[str, Any]:
    """Whole-network OBD: ``hessian_diag`` on next-token cross-entropy, then one selection.

    Args:
        model: a transformers causal LM, on the device it is to run on.
        calibration: ``LongTensor[n, T]`` of token ids.
        sparsity: as in :func:`~obd_ext.layerwise.blockwise.prune_layerwise`.
        pattern: "unstructured" or "N:M".
        scope: "global" (the default for None: one pool over the block
            layers, the paper's rule, since whole-network saliencies are
            comparable across layers), "layer" or "row"; None or "row" for N:M.
        method: a curvature method of ``obd_ext.hessian_diag`` ("obd", "lm", "fisher", ...).
        batch_size: windows per curvature batch.
        progress: a progress bar.

    Returns:
        A JSON-ready dict: method, pattern, scope, sparsity_target, sparsity,
        predicted_increase, negative_curvature_entries and per-layer reports
        under the model's own layer names.
    """
    sparsity = resolve_sparsity(pattern, sparsity)
    scope = resolve_scope(pattern, scope, layerwise=False)
    from ..curvature import hessian_diag, recordable

    wrapped = _NextTokenLogits(model)
    prefix, blocks = find_blocks(model)
    layers = {f"{prefix}.{i}.{n}": m for i, b in enumerate(blocks) for n, m in prunable_layers(b).items()}
    names = [f"lm.{n}.weight" for n in layers]
    data = [(ids, ids[:, 1:].reshape(-1)) for ids in calibration.split(batch_size)]
    t0 = time.time()
    with recordable():
        h = hessian_diag(wrapped, nn.CrossEntropyLoss(), data, method=method, params=names, progress=progress)
    # the curvature laid out like each weight's [outputs, inputs] rows (HF Conv1D stores [in, out])
    curvatures = {n: weight_rows_of(m, h[f"lm.{n}.weight"]).contiguous() for n, m in layers.items()}
    reports = _prune_by_saliency(layers, curvatures, sparsity, pattern, scope)
    total = sum(r.total for r in reports)
    return {"method": method, "pattern": pattern, "scope": scope, "sparsity_target": sparsity,
            "negative_curvature_entries": h.total_negative,
            "predicted_increase": sum(r.predicted_increase for r in reports),
            "sparsity": sum(r.deleted for r in reports) / total if total else 0.0,
            "seconds": time.time() - t0, "layers": [asdict(r) for r in reports]}


# ---------------------------------------------------------------------------
# The command's Python form
# ---------------------------------------------------------------------------

def _write_json(path: str, obj: Dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)  # a reader never sees half a report


def prune_llm(model_dir: str, out_dir: Optional[str], *, calib: str, sparsity: Optional[float] = None,
              pattern: str = "unstructured", eval_text: Optional[str] = None, nsamples: int = 128,
              seq_len: Optional[int] = None, scope: Optional[str] = None, method: str = DEFAULT_LAYERWISE_METHOD,
              device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None, seed: int = 0,
              evaluate: bool = True, overwrite: bool = False, progress: bool = True,
              log: Optional[Callable[[str], None]] = None, blocksize: Optional[int] = None,
              damp: Optional[float] = None, sequential: bool = False) -> Dict[str, Any]:
    """Load a causal LM from ``model_dir``, prune it, save it to ``out_dir``, then report perplexity.

    Every argument and file is checked before the model is loaded (the
    tokenizer and config are read first, so a text too short for the windows
    is reported then too). The pruned model (``save_pretrained``, with the
    tokenizer) and ``prune_report.json`` are written right after pruning, so
    a failure while evaluating loses nothing; the report is rewritten with the
    "after" perplexity when that is done.

    Args:
        model_dir: a local ``save_pretrained`` directory of a causal LM.
        out_dir: where the pruned model and report go (None: not saved). It
            must not be ``model_dir`` or inside it, nor an existing non-empty
            directory, unless ``overwrite``.
        calib: path of a text file; calibration windows are drawn from it.
        sparsity: fraction deleted from each pool; None means 0.5 for an
            unstructured pattern and ``1 - N/M`` for N:M (any other value with
            N:M is an error).
        pattern: "unstructured" or "N:M" such as "2:4".
        eval_text: path of held-out text for perplexity (default: the last
            10% of ``calib``, which calibration then does not use).
        nsamples: calibration windows (>= 1).
        seq_len: tokens per window (default: min(2048, the model's context)).
        scope: "row", "layer" or "global"; None means "layer" for
            layerwise-obs (SparseGPT's adaptive per-layer mask; it refuses
            "global"), "row" for layerwise-obd and magnitude (pass "layer" for
            the classic per-layer magnitude baseline) and "global" for the
            whole-network ones
            (``obd_ext.vocabulary.default_scope``); None or "row" for N:M
            (which selects within rows).
        method: one of ``obd_ext.vocabulary.LLM_METHODS``: "layerwise-obs"
            (the default) or "layerwise-obd" (block by block), "magnitude", or
            "obd"/"lm"/"fisher" (whole-network curvature; the model must fit
            on the device).
        device: where blocks are processed and perplexity is computed, block
            by block (default: where the model loads, the whole model per batch).
        dtype: load the model in this dtype (one of :data:`DTYPES`).
        seed: seed of the calibration draw.
        evaluate: measure perplexity before and after (False skips both).
        overwrite: allow ``out_dir`` inside ``model_dir`` or non-empty.
        progress: progress bars.
        log: called with one line per stage (e.g. ``print``); None: silent.
        blocksize, damp: "layerwise-obs" only (an error with any other
            method): see :func:`~obd_ext.layerwise.blockwise.prune_layerwise`
            (defaults 128 and 0.01).
        sequential: layer-wise methods only: prune the layers of each block
            stage by stage (see ``prune_layerwise``).

    Returns:
        The report written to ``out_dir/prune_report.json``: ``model_dir``,
        ``out_dir``; what was used: ``method``, ``pattern``, ``scope`` ("row"
        for N:M), ``sparsity_target``, ``calib`` (path), ``calib_portion``
        ("all" or "first 90%"), ``eval`` (path, "last 10% of calib", or None
        without evaluation), ``seed``, ``nsamples``, ``seq_len``, ``device``,
        ``dtype``, ``blocksize``, ``damp``, ``sequential`` (the surgeon's
        settings; None for methods that do not use them); results: ``eval_tokens``, ``perplexity_before``,
        ``perplexity_after`` (None when not evaluated, or when evaluation
        failed after saving), ``seconds``; ``versions`` (obd_ext, torch,
        transformers, python); ``detail``: the pruning's own report with one
        entry per layer under the model's qualified layer names
        (``model.layers.0.self_attn.q_proj``).
    """
    t0 = time.time()
    say = log or (lambda _msg: None)
    # --- everything checked before anything is loaded or written ---
    method = check_method(method, LLM_METHODS, "prune_llm")
    layerwise = method in LAYERWISE_METHODS
    sparsity = resolve_sparsity(pattern, sparsity)
    scope = resolve_scope(pattern, scope, layerwise=layerwise, method=method)
    if layerwise:
        blocksize, damp = _check_surgeon_options(method, scope, pattern, blocksize, damp, "prune_llm")
        if method != "layerwise-obs":
            blocksize = damp = None
    elif blocksize is not None or damp is not None:
        raise ValueError(f"prune_llm: blocksize and damp apply to method='layerwise-obs' only, not method={method!r}")
    if not isinstance(sequential, bool) or (sequential and not layerwise):
        raise ValueError(f"prune_llm: sequential must be True or False, and True only with a layer-wise method "
                         f"{LAYERWISE_METHODS}; got sequential={sequential!r} with method={method!r}")
    check_count(nsamples, "nsamples")
    if seq_len is not None:
        check_count(seq_len, "seq_len", 2 if evaluate else 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    dev = check_device(device)
    if dtype is not None and dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {tuple(DTYPES.values())} or None, got {dtype!r}")
    model_dir = check_model_dir(model_dir)
    calib = check_text_file(calib, "calib")
    if eval_text is not None and not evaluate:
        raise ValueError("eval_text was given with evaluate=False: give one or the other")
    eval_path = check_text_file(eval_text, "eval_text") if eval_text is not None else None
    out = check_out_dir(out_dir, model_dir, overwrite) if out_dir is not None else None
    _require_transformers()
    from transformers import AutoConfig

    calib_text = read_text(calib, "calib")
    held_out: Optional[str] = None
    if evaluate and eval_path is None:
        cut = int(len(calib_text) * 0.9)
        calib_text, held_out = calib_text[:cut], calib_text[cut:]
    elif evaluate:
        held_out = read_text(eval_path, "eval_text")
    context = _context_length(AutoConfig.from_pretrained(model_dir, local_files_only=True))
    if seq_len is None:
        seq_len = min(2048, context or 2048)
    elif context is not None and seq_len > context:
        raise ValueError(f"seq_len={seq_len} exceeds the model's context of {context} tokens")
    tokenizer = _load_tokenizer(model_dir)
    windows = calibration_windows(tokenizer, calib_text, nsamples, seq_len, seed)
    eval_ids = text_blocks(tokenizer, held_out, seq_len) if evaluate else None

    report: Dict[str, Any] = {
        "model_dir": model_dir, "out_dir": out, "method": method, "pattern": pattern, "scope": scope,
        "sparsity_target": sparsity, "calib": calib,
        "calib_portion": "first 90%" if evaluate and eval_path is None else "all",
        "eval": None if not evaluate else eval_path or "last 10% of calib", "seed": seed, "nsamples": nsamples,
        "seq_len": seq_len, "device": str(dev) if dev is not None else None, "dtype": None,
        "blocksize": blocksize, "damp": damp, "sequential": sequential if layerwise else None,
        "eval_tokens": int(eval_ids.numel()) if eval_ids is not None else 0,
        "perplexity_before": None, "perplexity_after": None, "seconds": None, "versions": versions(),
        "detail": None}

    def ppl(m: nn.Module) -> float:
        if dev is None:
            return perplexity(m, eval_ids)
        return blockwise_perplexity(m, eval_ids, device=dev, progress=progress)

    say(f"loading {model_dir}")
    model = _load_model(model_dir, dtype)
    report["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    if evaluate:
        say("perplexity before pruning")
        report["perplexity_before"] = ppl(model)
    say(f"pruning: {method}, pattern {pattern}, sparsity {sparsity:g}" + (f", scope {scope}" if scope else ""))
    if layerwise:
        result = prune_layerwise(model, windows.split(_CALIB_BATCH), sparsity=sparsity, pattern=pattern,
                                 scope=scope, method=method, run=run_causal_lm, device=dev, progress=progress,
                                 blocksize=blocksize, damp=damp, sequential=sequential)
        report["detail"] = result.to_dict()
    else:
        home = _device_of(model)
        if dev is not None:
            model.to(dev)
        try:
            report["detail"] = prune_global_curvature(model, windows, sparsity=sparsity, pattern=pattern,
                                                      scope=scope, method=method, progress=progress)
        finally:
            model.to(home)
    report["seconds"] = time.time() - t0
    if out is not None:  # saved before evaluation, so that nothing after pruning can lose the run
        say(f"saving to {out}")
        os.makedirs(out, exist_ok=True)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        _write_json(os.path.join(out, "prune_report.json"), report)
    if evaluate:
        say("perplexity after pruning")
        report["perplexity_after"] = ppl(model)
        report["seconds"] = time.time() - t0
        if out is not None:
            _write_json(os.path.join(out, "prune_report.json"), report)
    return report
