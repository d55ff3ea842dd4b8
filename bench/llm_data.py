"""Data for the tiny language model: the Python standard library's own source.

No pretrained weights can be downloaded, so the pruning-quality benchmark uses a
small GPT-2 trained here (bench/train_tiny_gpt.py) on text every machine has.

- ``stdlib_files()``: the ``.py`` files of the running interpreter's standard
  library, without tests, IDLE, site-packages, build-specific files and files
  over 200 kB; sorted by relative path.
- ``split_files()``: train / val / test by the SHA-1 of each relative path
  (90 / 5 / 5), so the split does not depend on the machine, the file system's
  order or which files exist. The text itself depends on the Python version
  (recorded as ``python_version()`` in every output, with a content digest per
  split, so a changed standard library is noticed instead of silently scored).
- ``train_tokenizer()``: byte-level BPE (``tokenizers``), trained locally.
- ``token_blocks()``: documents joined by the EOS token, cut into
  non-overlapping ``[n, seq_len]`` blocks.
- ``perplexity()``: exp of the mean next-token NLL over every predicted token.
- ``load_model_and_splits()``: what the quality benchmark needs from a trained
  model directory.

Example::

    from llm_data import load_model_and_splits, perplexity
    model, tokenizer, blocks = load_model_and_splits("bench/out/tiny-gpt2")
    print(perplexity(model, blocks["test"]))
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sysconfig
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from obd_ext.layerwise.hf import perplexity  # noqa: F401  (the one implementation; re-exported)

__all__ = [
    "EOS",
    "SPLITS",
    "SPLIT_FRACTIONS",
    "MAX_FILE_BYTES",
    "stdlib_root",
    "stdlib_files",
    "split_of",
    "split_files",
    "split_digest",
    "python_version",
    "read_text",
    "train_tokenizer",
    "save_tokenizer",
    "load_tokenizer",
    "token_blocks",
    "perplexity",
    "unigram_perplexity",
    "split_manifest",
    "load_model_and_splits",
]

EOS = "<|endoftext|>"
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.90, 0.05, 0.05)
MAX_FILE_BYTES = 200_000
SPLITS_FILE = "splits.json"

# Directories never read: tests (and their data), IDLE, third-party packages,
# lib2to3's grammar fixtures, and build-specific config. Matched against every
# component of the path relative to the standard library.
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})
# Files whose content is written by the build, not the CPython sources (absolute
# paths, compiler flags): they would make the same Python version differ by machine.
_EXCLUDED_PREFIXES = ("_sysconfigdata", "config-")


def python_version() -> str:
    """The interpreter whose standard library is the corpus, e.g. ``"3.11.7"``."""
    return platform.python_version()


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def _excluded(rel: Path) -> bool:
    if any(part in _EXCLUDED_DIRS for part in rel.parts[:-1]):
        return True
    if any(part.startswith(_EXCLUDED_PREFIXES) for part in rel.parts):
        return True
    # lib2to3's test data lives under lib2to3/tests (caught above); its
    # fixers/ are real code and stay.
    return False


def stdlib_files(root: Optional[os.PathLike] = None, max_bytes: int = MAX_FILE_BYTES) -> List[Path]:
    """The standard library's ``.py`` files, sorted by path relative to ``root``.

    Args:
        root: The directory to scan; the running interpreter's standard library
            when None.
        max_bytes: Files larger than this are left out (generated tables such as
            ``pydoc_data/topics.py``).

    Returns:
        Absolute paths, sorted by their POSIX relative path (deterministic across
        file systems).
    """
    root = Path(root) if root is not None else stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so excluded trees (site-packages can be huge) are never walked.
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith(_EXCLUDED_PREFIXES)]
        for name in filenames:
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root)
            if _excluded(rel) or path.is_symlink() or path.stat().st_size > max_bytes:
                continue
            found.append((rel.as_posix(), path))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


def _relative(path: Path, root: Optional[os.PathLike]) -> str:
    root = Path(root) if root is not None else stdlib_root()
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).as_posix()


def split_of(rel_path: str) -> str:
    """The split (``"train"``, ``"val"`` or ``"test"``) of one relative POSIX path.

    The first 8 bytes of the path's SHA-1, as a fraction of 2^64, against the
    cumulative ``SPLIT_FRACTIONS``: stable across machines and runs, and adding or
    removing a file moves no other file.
    """
    u = int.from_bytes(hashlib.sha1(rel_path.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    edge = 0.0
    for name, frac in zip(SPLITS, SPLIT_FRACTIONS):
        edge += frac
        if u < edge:
            return name
    return SPLITS[-1]


def split_files(files: Sequence[os.PathLike], root: Optional[os.PathLike] = None) -> Dict[str, List[Path]]:
    """Group ``files`` into train / val / test by ``split_of`` their path relative to ``root``.

    Args:
        files: Paths, e.g. from ``stdlib_files()``; their order is kept in each split.
        root: What paths are relative to; the standard library when None.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``.
    """
    out: Dict[str, List[Path]] = {name: [] for name in SPLITS}
    for path in files:
        out[split_of(_relative(Path(path), root))].append(Path(path))
    return out


def read_text(path: os.PathLike) -> str:
    """A source file's text as UTF-8 (undecodable bytes replaced, deterministically)."""
    return Path(path).read_bytes().decode("utf-8", errors="replace")


def split_digest(files: Iterable[os.PathLike], root: Optional[os.PathLike] = None) -> str:
    """SHA-256 over the relative paths and bytes of ``files``: equal digests mean equal text."""
    h = hashlib.sha256()
    for path in files:
        h.update(_relative(Path(path), root).encode("utf-8") + b"\0")
        h.update(Path(path).read_bytes() + b"\0")
    return h.hexdigest()


def train_tokenizer(files: Sequence[os.PathLike], vocab_size: int = 4096, min_frequency: int = 2):
    """Train a byte-level BPE tokenizer (GPT-2's scheme) on ``files``.

    Args:
        files: Text files to learn merges from (the train split only, so val and
            test are unseen by the tokenizer too).
        vocab_size: Final vocabulary size, including the 256 byte symbols and EOS.
        min_frequency: A pair must occur this often to be merged.

    Returns:
        A ``tokenizers.Tokenizer`` whose id ``token_to_id(EOS)`` separates documents.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: a file's first token is not a word in a sentence.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((read_text(p) for p in files), trainer=trainer, length=len(files))
    return tok


def save_tokenizer(tokenizer, model_dir: os.PathLike) -> None:
    """Save ``tokenizer`` into ``model_dir`` so that ``AutoTokenizer.from_pretrained(model_dir)`` loads it.

    Writes ``tokenizer.json`` plus the transformers configuration files, through
    ``PreTrainedTokenizerFast(tokenizer_object=...)`` with EOS as bos/eos/unk/pad.
    """
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                   pad_token=EOS)
    fast.save_pretrained(str(model_dir))


def load_tokenizer(model_dir: os.PathLike):
    """The raw ``tokenizers.Tokenizer`` saved in ``model_dir`` (``tokenizer.json``)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))


def _raw(tokenizer):
    # Accept both a tokenizers.Tokenizer and a transformers fast tokenizer.
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


def token_blocks(tokenizer, files: Sequence[os.PathLike], seq_len: int,
                 max_tokens: Optional[int] = None) -> torch.Tensor:
    """Tokenize ``files`` into non-overlapping blocks of ``seq_len`` tokens.

    Each document is followed by the EOS token; the documents are concatenated in
    the given order and cut into blocks; the last partial block is dropped.

    Args:
        tokenizer: A ``tokenizers.Tokenizer`` or a transformers fast tokenizer.
        files: The documents, in order.
        seq_len: Tokens per block.
        max_tokens: Use at most this many tokens (the first ones), if given.

    Returns:
        ``LongTensor[n, seq_len]``; ``n`` may be 0.
    """
    if seq_len <= 0:
        raise ValueError(f"token_blocks: seq_len must be positive, got {seq_len}")
    tok = _raw(tokenizer)
    eos = tok.token_to_id(EOS)
    if eos is None:
        raise ValueError(f"token_blocks: the tokenizer has no {EOS!r} token")
    ids: List[int] = []
    limit = max_tokens if max_tokens is not None else math.inf
    # Encode in chunks: encode_batch runs in parallel and a chunk keeps memory bounded.
    chunk = 64
    for start in range(0, len(files), chunk):
        texts = [read_text(p) for p in files[start:start + chunk]]
        for enc in tok.encode_batch(texts, add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(eos)
        if len(ids) >= limit:
            break
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = len(ids) // seq_len
    return torch.tensor(ids[:n * seq_len], dtype=torch.long).view(n, seq_len)


def unigram_perplexity(train_blocks: torch.Tensor, eval_blocks: torch.Tensor, vocab_size: int) -> float:
    """Perplexity on ``eval_blocks`` of the add-one unigram model of ``train_blocks``.

    The baseline a language model must beat by far: it knows token frequencies
    and nothing about context. Counts the same tokens as ``perplexity``.
    """
    counts = torch.bincount(train_blocks.reshape(-1), minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    targets = eval_blocks[:, 1:].reshape(-1)
    if targets.numel() == 0:
        return float("nan")
    return math.exp(-float(logp[targets].mean()))


def split_manifest(files_by_split: Dict[str, List[Path]], root: Optional[os.PathLike] = None) -> Dict[str, object]:
    """What ``splits.json`` records: Python version, root, and per split the files and a digest."""
    return {
        "python_version": python_version(),
        "stdlib": str(Path(root) if root is not None else stdlib_root()),
        "fractions": dict(zip(SPLITS, SPLIT_FRACTIONS)),
        "max_file_bytes": MAX_FILE_BYTES,
        "splits": {
            name: {
                "n_files": len(files),
                "sha256": split_digest(files, root),
                "files": [_relative(p, root) for p in files],
            }
            for name, files in files_by_split.items()
        },
    }


def load_model_and_splits(model_dir: os.PathLike, splits: Sequence[str] = SPLITS, seq_len: Optional[int] = None,
                          max_tokens: Optional[int] = None) -> Tuple[torch.nn.Module, object, Dict[str, torch.Tensor]]:
    """Load a model trained by bench/train_tiny_gpt.py and tokenize its data splits.

    The files of each split come from ``splits.json`` in ``model_dir`` (the ones
    the model was trained and scored on), read from this interpreter's standard
    library. If this Python's version or a split's content digest differs from the
    recorded one, a warning says so: perplexities are then not comparable with
    ``train_log.json``.

    Args:
        model_dir: Directory written by ``train_tiny_gpt.py``.
        splits: Which splits to tokenize (train is the largest; leave it out when
            only scoring).
        seq_len: Block length; the one the model was trained with when None.
        max_tokens: Cap per split, if given.

    Returns:
        ``(model, tokenizer, {split: LongTensor[n, seq_len]})``: the
        ``GPT2LMHeadModel`` in eval mode on the CPU, the transformers tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    manifest_path = model_dir / SPLITS_FILE
    root = stdlib_root()
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest["python_version"] != python_version():
            warnings.warn(f"load_model_and_splits: {model_dir} was built from Python {manifest['python_version']}'s "
                          f"standard library; this is Python {python_version()}", stacklevel=2)
        files_by_split = {}
        for name in splits:
            entry = manifest["splits"][name]
            files = [root / rel for rel in entry["files"]]
            missing = [p for p in files if not p.exists()]
            if missing:
                warnings.warn(f"load_model_and_splits: {len(missing)} {name} files missing from {root}, "
                              f"e.g. {missing[0]}", stacklevel=2)
                files = [p for p in files if p.exists()]
            elif split_digest(files, root) != entry["sha256"]:
                warnings.warn(f"load_model_and_splits: the {name} split's text differs from the one recorded in "
                              f"{manifest_path}", stacklevel=2)
            files_by_split[name] = files
    else:
        by_split = split_files(stdlib_files(root), root)
        files_by_split = {name: by_split[name] for name in splits}
    if seq_len is None:
        log_path = model_dir / "train_log.json"
        seq_len = (json.loads(log_path.read_text())["config"]["seq_len"] if log_path.exists()
                   else model.config.n_positions)
    blocks = {name: token_blocks(tokenizer, files, seq_len, max_tokens) for name, files in files_by_split.items()}
    return model, tokenizer, blocks
