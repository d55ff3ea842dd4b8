"""2:4-pruned Hugging Face models in the compressed-tensors ``sparse-24-bitmask`` format.

The format (compressed-tensors' "Sparse24BitMask" layout, as llm-compressor
saved 2:4 models and vLLM loaded them for its 2:4 sparse kernels) keeps the
Hugging Face directory layout and changes two things:

- each targeted ``nn.Linear`` weight ``[out, in]`` is replaced in the
  safetensors by three tensors named after the module (``<module>.weight``
  gives way to ``<module>.compressed``, ``<module>.bitmask``,
  ``<module>.shape``):

  - ``compressed``: ``[out, in / 2]``, the weight's dtype: the two kept
    entries of every group of four inputs, in input order;
  - ``bitmask``: ``[out, ceil(in / 8)]`` uint8: one bit per entry, set where an
    entry is kept, packed eight to a byte, least significant bit first;
  - ``shape``: ``[2, 1]`` int64: the dense shape.

  Every group of four holds exactly two set bits: where a group has more than
  two zeros, zeros fill the remaining places (the earliest positions first).

- ``config.json`` gains a ``quantization_config`` block whose
  ``sparsity_config`` names the format (``"sparse-24-bitmask"``), the
  structure (``"2:4"``), the targets (``["Linear"]``) and, in ``ignore``,
  every ``nn.Linear`` left dense (e.g. ``lm_head``), plus the model's
  fraction of zero parameters (``global_sparsity``).

Everything else (embeddings, norms, biases, ignored layers) is stored dense
under its usual name.

Where the format stands (checked against the released packages): the
compressed-tensors releases after 0.14 no longer compress or decompress it
(their ``ModelCompressor`` writes an empty ``sparsity_config``; the config
class ``Sparse24BitMaskConfig`` and the bit packing remain), llm-compressor
0.14 saves 2:4 models dense, and vLLM dropped its 2:4 kernels and refuses
these checkpoints from v0.19.1 on. A directory written here loads with
:func:`load_compressed_2of4` (or compressed-tensors <= 0.14's
``ModelCompressor.decompress``). Plain ``transformers.from_pretrained``
cannot rebuild the weights, and is not always loud about it: without
compressed-tensors, or with 0.19, it raises; transformers 5.24 with
compressed-tensors 0.20 loads the model with the targeted weights left at
their random initialisation and only a warning (its load report lists
``.compressed``/``.bitmask``/``.shape`` as unexpected). For serving on
current engines save dense (``save_pretrained``: the zeros in place).

Example::

    from obd_ext.layerwise import prune_layerwise
    from obd_ext.layerwise.export import save_compressed_2of4, load_compressed_2of4
    prune_layerwise(model, batches, pattern="2:4", method="layerwise-obd")
    save_compressed_2of4(model, "out/llama-2of4", tokenizer=tokenizer)
    dense = load_compressed_2of4("out/llama-2of4")   # the same weights, bit for bit
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..sparse_export import check_nm_pattern
from .blockwise import find_blocks
from .stats import is_hf_conv1d, prunable_layers

__all__ = ["COMPRESSED_24_FORMAT", "FORMAT_VERSION", "Compressed24Export", "compress_2of4", "decompress_2of4",
           "default_2of4_layers", "sparsity_config_2of4", "save_compressed_2of4", "decompress_2of4_state_dict",
           "load_compressed_2of4"]

COMPRESSED_24_FORMAT = "sparse-24-bitmask"
"""The ``sparsity_config.format`` value of the format."""

FORMAT_VERSION = "0.14.0.1"
"""Written as ``quantization_config.version``: the last compressed-tensors release that reads the format."""

_PARAMS = ("compressed", "bitmask", "shape")
_SAFETENSORS = "model.safetensors"
_INDEX = "model.safetensors.index.json"


@dataclass
class Compressed24Export:
    """What :func:`save_compressed_2of4` wrote."""

    out_dir: str
    compressed: List[str] = field(default_factory=list)  # module names stored as compressed/bitmask/shape
    ignored: List[str] = field(default_factory=list)  # nn.Linear modules left dense (listed in ``ignore``)
    global_sparsity: float = 0.0
    bytes_dense: int = 0  # the targeted weights, dense
    bytes_compressed: int = 0  # the same weights as compressed + bitmask + shape
    files: List[str] = field(default_factory=list)


# ---------------------------------------------------------------------------
# One weight
# ---------------------------------------------------------------------------

def _pack_bits(mask: Tensor) -> Tensor:
    """``[rows, cols]`` bool -> ``[rows, ceil(cols / 8)]`` uint8, entry ``8j + i`` in bit ``i`` of byte ``j``."""
    rows, cols = mask.shape
    pad = (-cols) % 8
    m = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad)).reshape(rows, -1, 8)
    weights = (1 << torch.arange(8, dtype=torch.int32, device=mask.device))
    return (m.to(torch.int32) * weights).sum(-1).to(torch.uint8)


def _unpack_bits(packed: Tensor, cols: int) -> Tensor:
    """Inverse of :func:`_pack_bits`: ``[rows, ceil(cols / 8)]`` uint8 -> ``[rows, cols]`` bool."""
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    bits = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :cols].bool()


def _raw(t: Tensor) -> Tensor:
    """An integer view of the same bytes, so that selection copies bit patterns (fp8 has no indexing)."""
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(view)


def compress_2of4(weight: Tensor, name: str = "weight") -> Dict[str, Tensor]:
    """The ``compressed``, ``bitmask`` and ``shape`` tensors of a 2:4 weight ``[out, in]`` (checked first).

    Raises:
        ValueError: ``weight`` is not 2-D, its input size is not a multiple of
            4, or a group of four inputs holds more than two nonzeros (the
            message names ``name``, the row and the inputs).
    """
    check_nm_pattern(weight, "2:4", name)
    w = weight.detach()
    rows, cols = w.shape
    nonzero = (w != 0).reshape(rows, cols // 4, 4)
    # exactly two places per group: the nonzeros, then the earliest zeros (keys are distinct)
    key = nonzero.to(torch.int8) * 4 + torch.arange(3, -1, -1, dtype=torch.int8, device=w.device)
    keep = torch.zeros_like(nonzero)
    keep.scatter_(2, key.topk(2, dim=2).indices, True)
    keep = keep.reshape(rows, cols)
    values = _raw(w)[keep].view(w.dtype).reshape(rows, cols // 2)
    return {"compressed": values.contiguous(), "bitmask": _pack_bits(keep),
            "shape": torch.tensor([rows, cols], dtype=torch.int64).reshape(-1, 1)}


def decompress_2of4(compressed: Tensor, bitmask: Tensor, shape: Tensor | Tuple[int, int],
                    name: str = "weight") -> Tensor:
    """The dense weight from its ``compressed``, ``bitmask`` and ``shape`` tensors (checked for consistency).

    Entries not kept are +0.0 (a deleted -0.0 reads back as +0.0).
    """
    rows, cols = (int(v) for v in (shape.flatten().tolist() if isinstance(shape, Tensor) else shape))
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, (cols + 7) // 8):
        raise ValueError(f"{name}: bitmask must be uint8 of shape {(rows, (cols + 7) // 8)} for a "
                         f"{rows} x {cols} weight, got {bitmask.dtype} {tuple(bitmask.shape)}")
    keep = _unpack_bits(bitmask, cols)
    kept = int(keep.sum())
    if compressed.numel() != kept or (cols % 4 == 0 and compressed.shape[-1] != cols // 2):
        raise ValueError(f"{name}: {kept} kept entries in the bitmask but compressed has shape "
                         f"{tuple(compressed.shape)} (expected [{rows}, {cols // 2}])")
    out = torch.zeros(rows, cols, dtype=compressed.dtype, device=compressed.device)
    _raw(out)[keep] = _raw(compressed.contiguous()).reshape(-1)
    return out


# ---------------------------------------------------------------------------
# A model
# ---------------------------------------------------------------------------

def default_2of4_layers(model: nn.Module) -> List[str]:
    """The layers that layer-wise pruning prunes: every prunable layer inside the transformer blocks."""
    prefix, blocks = find_blocks(model)
    return [f"{prefix}.{i}.{n}" for i, b in enumerate(blocks) for n in prunable_layers(b)]


def sparsity_config_2of4(ignore: Iterable[str], global_sparsity: float) -> Dict[str, Any]:
    """The ``sparsity_config`` block, with the fields and order of compressed-tensors' ``Sparse24BitMaskConfig``."""
    return {"registry_requires_subclass": False, "format": COMPRESSED_24_FORMAT, "targets": ["Linear"],
            "ignore": sorted(ignore), "global_sparsity": float(global_sparsity), "sparsity_structure": "2:4"}


def _unique_state(model: nn.Module) -> Dict[str, Tensor]:
    """``state_dict`` without the second name of a tensor tied to another (as ``save_pretrained`` drops it)."""
    seen: Dict[Tuple[int, Tuple[int, ...], Tuple[int, ...]], str] = {}
    out = {}
    tied = set(_tied_keys(model))
    items = sorted(model.state_dict().items(), key=lambda kv: kv[0] in tied)  # keep the source of a tie
    for k, t in items:
        ident = (t.data_ptr(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and ident in seen:
            continue
        seen[ident] = k
        out[k] = t
    return out


def _tied_keys(model: nn.Module) -> List[str]:
    keys = getattr(model, "_tied_weights_keys", None) or []
    return list(keys.keys()) if isinstance(keys, dict) else list(keys)


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _shards(tensors: Dict[str, Tensor], max_shard_bytes: int) -> List[Dict[str, Tensor]]:
    shards: List[Dict[str, Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        if shards[-1] and size + _nbytes(t) > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += _nbytes(t)
    return shards


def save_compressed_2of4(model: nn.Module, out_dir: str, *, tokenizer: Any = None,
                         layers: Optional[Iterable[str]] = None, overwrite: bool = False,
                         max_shard_bytes: int = 5 * 2**30) -> Compressed24Export:
    """Write a 2:4-pruned transformers model as a compressed-tensors ``sparse-24-bitmask`` directory.

    Every targeted layer is checked (an ``nn.Linear`` whose weight is 2:4)
    and compressed in memory before anything is written, so a model that is
    not 2:4 raises with ``out_dir`` untouched.

    Args:
        model: a transformers ``PreTrainedModel`` (it must have ``config``).
        out_dir: the directory to write (created; must be empty unless ``overwrite``).
        tokenizer: saved alongside with its ``save_pretrained`` when given.
        layers: module names to compress (default: :func:`default_2of4_layers`,
            the layers inside the transformer blocks). Other ``nn.Linear``
            modules (``lm_head``) stay dense and are listed in ``ignore``.
        overwrite: write into an existing non-empty directory.
        max_shard_bytes: the largest safetensors file; more shards get an index.

    Returns:
        What was written (:class:`Compressed24Export`).

    Raises:
        ValueError: a targeted layer is not an ``nn.Linear`` (transformers'
            Conv1D of GPT-2 stores ``[in, out]``, which the format cannot hold)
            or its weight is not 2:4 (named, with the offending row and inputs);
            a name in ``layers`` is no module of ``model``.
        FileExistsError: ``out_dir`` is a file, or a non-empty directory without ``overwrite``.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError(f"model must be a transformers PreTrainedModel with a config, got {type(model).__name__}")
    if not isinstance(max_shard_bytes, int) or isinstance(max_shard_bytes, bool) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    from .hf import check_out_dir

    out = check_out_dir(out_dir, None, overwrite)
    modules = dict(model.named_modules())
    names = list(default_2of4_layers(model) if layers is None else layers)
    if not names:
        raise ValueError("no layers to compress (layers is empty)")
    for n in names:
        m = modules.get(n) if isinstance(n, str) else None
        if m is None:
            raise ValueError(f"layers: {n!r} is not a module of the model")
        if is_hf_conv1d(m) or type(m) is not nn.Linear:
            kind = "a transformers Conv1D (weight stored [in, out])" if is_hf_conv1d(m) else type(m).__name__
            raise ValueError(f"{n} is {kind}: the sparse-24-bitmask format holds torch.nn.Linear weights "
                             "[out, in] only; save this model dense with save_pretrained")
    targets = set(names)
    # all checks and compression first: nothing is written for a model that is not 2:4
    packed = {n: compress_2of4(modules[n].weight, f"{n}.weight") for n in names}

    state = _unique_state(model)
    zeros = sum(int((t == 0).sum()) for t in state.values() if t.is_floating_point())
    total = sum(t.numel() for t in state.values() if t.is_floating_point())
    result = Compressed24Export(out, compressed=list(names), global_sparsity=zeros / total if total else 0.0,
                                ignored=sorted(n for n, m in modules.items()
                                               if isinstance(m, nn.Linear) and n not in targets))
    tensors: Dict[str, Tensor] = {}
    for k, t in state.items():
        owner = k.rpartition(".")[0]
        if owner in targets and k == f"{owner}.weight":
            for p in _PARAMS:
                tensors[f"{owner}.{p}"] = packed[owner][p]
            result.bytes_dense += _nbytes(t)
            result.bytes_compressed += sum(_nbytes(packed[owner][p]) for p in _PARAMS)
        else:
            tensors[k] = t.detach().contiguous()
    missing = [n for n in names if f"{n}.compressed" not in tensors]
    if missing:  # a targeted weight not in the state dict (tied to another layer): refuse rather than drop it
        raise ValueError(f"{missing[0]}.weight is not stored under its own name (tied?); it cannot be compressed")

    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    config = copy.deepcopy(config)
    floating = [t.dtype for t in state.values() if t.is_floating_point()]
    if floating:  # as save_pretrained does: the config names the dtype the weights are stored in
        config.dtype = max(set(floating), key=floating.count)
    config.save_pretrained(out)
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(model, "can_generate", lambda: False)():
        gen.save_pretrained(out)
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out, _SAFETENSORS), metadata={"format": "pt"})
        result.files.append(_SAFETENSORS)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(out, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
            result.files.append(fname)
        with open(os.path.join(out, _INDEX), "w") as f:
            json.dump({"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
                       "weight_map": weight_map}, f, indent=2, sort_keys=True)
        result.files.append(_INDEX)
    path = os.path.join(out, "config.json")
    with open(path) as f:
        data = json.load(f)
    data["quantization_config"] = {"version": FORMAT_VERSION, "quant_method": "compressed-tensors",
                                   "sparsity_config": sparsity_config_2of4(result.ignored, result.global_sparsity),
                                   "transform_config": {}}
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return result


# ---------------------------------------------------------------------------
# Reading it back
# ---------------------------------------------------------------------------

def decompress_2of4_state_dict(tensors: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """A compressed state dict with every ``<m>.compressed/bitmask/shape`` triple turned back into ``<m>.weight``."""
    owners = {k.rpartition(".")[0] for k in tensors if k.rpartition(".")[2] in _PARAMS}
    out = {k: v for k, v in tensors.items() if k.rpartition(".")[0] not in owners or
           k.rpartition(".")[2] not in _PARAMS}
    for o in sorted(owners):
        parts = {p: tensors.get(f"{o}.{p}") for p in _PARAMS}
        lacking = [p for p, v in parts.items() if v is None]
        if lacking:
            raise ValueError(f"{o}: {', '.join(lacking)} missing from the compressed tensors")
        if f"{o}.weight" in out:
            raise ValueError(f"{o}: both a dense weight and compressed tensors are stored")
        out[f"{o}.weight"] = decompress_2of4(parts["compressed"], parts["bitmask"], parts["shape"], f"{o}.weight")
    return out


def _read_tensors(model_dir: str) -> Dict[str, Tensor]:
    from safetensors.torch import load_file

    index = os.path.join(model_dir, _INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(model_dir, _SAFETENSORS)):
        files = [_SAFETENSORS]
    else:
        raise FileNotFoundError(f"{model_dir!r} holds neither {_SAFETENSORS} nor {_INDEX}")
    tensors: Dict[str, Tensor] = {}
    for fname in files:
        tensors.update(load_file(os.path.join(model_dir, fname)))
    return tensors


def load_compressed_2of4(model_dir: str, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The dense transformers model of a ``sparse-24-bitmask`` directory (no compressed-tensors needed).

    Raises:
        ValueError: the directory's ``quantization_config`` is not this format,
            or the stored tensors do not fill the model exactly (anything
            missing but the tied output embedding, or anything left over).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from .hf import check_model_dir

    model_dir = check_model_dir(model_dir)
    with open(os.path.join(model_dir, "config.json")) as f:
        qc = json.load(f).get("quantization_config") or {}
    fmt = (qc.get("sparsity_config") or {}).get("format")
    if qc.get("quant_method") != "compressed-tensors" or fmt != COMPRESSED_24_FORMAT:
        raise ValueError(f"{model_dir!r}: config.json's quantization_config is not compressed-tensors "
                         f"{COMPRESSED_24_FORMAT!r} (quant_method {qc.get('quant_method')!r}, sparsity format {fmt!r})")
    if any(k not in ("version", "quant_method", "sparsity_config", "transform_config") and v for k, v in qc.items()) \
            or qc.get("transform_config"):
        raise ValueError(f"{model_dir!r}: quantization or transforms besides 2:4 sparsity are not supported here")
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    if dtype is None:  # the dtype the weights were saved in, as from_pretrained's dtype="auto"
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype is not None else {}))
    state = decompress_2of4_state_dict(_read_tensors(model_dir))
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    model.tie_weights()
    tied = set(_tied_keys(model))
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ValueError(f"{model_dir!r}: the stored tensors do not match the model: missing {missing[:5]}, "
                         f"unexpected {list(result.unexpected_keys)[:5]}")
    return model.eval()
