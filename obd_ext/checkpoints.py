"""Checkpoint files that are verified before they are trusted.

The scheduler's checkpoints are written and read here. A file is::

    obd_ext-checkpoint 1\\n                 format and its version
    sha256 <64 hex digits> <n bytes>\\n      digest and length of everything below
    {"meta": {...}, "payload_bytes": N}\\n  JSON: what made the checkpoint
    <payload>                              torch.save of the state (tensors, numbers, strings)

so a flipped byte anywhere below the second line, or a file cut short, is
found before ``torch.load`` sees a byte of it, and the error names the file.
The payload holds only tensors and plain Python values, so it is read with
``torch.load(weights_only=True)``: loading a checkpoint runs no pickled code.

Writing is atomic and keeps the previous checkpoint (:func:`write_checkpoint`):
the new file is written to ``<path>.tmp.<pid>`` and fsynced; the current file
is hard-linked to ``<path>.prev`` (copied where the file system has no hard
links); then the temporary file is renamed over ``<path>``. At every moment
``<path>`` is a complete file, and after the second save ``<path>.prev`` holds
the one before it. A write killed half-way leaves only ``<path>.tmp.<pid>``,
which :func:`remove_stale_temporaries` deletes once that process is gone.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import shutil
from typing import Any, Dict, List, Optional, Tuple

import torch

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointCorruptError",
    "CheckpointMismatchError",
    "previous_path",
    "write_checkpoint",
    "read_header",
    "read_checkpoint",
    "remove_stale_temporaries",
]

FORMAT = "obd_ext-checkpoint"
FORMAT_VERSION = 1
_MAGIC = f"{FORMAT} {FORMAT_VERSION}\n".encode()
# The digest line is short; a longer "line" means this is not our format (or it is damaged).
_MAX_DIGEST_LINE = 200


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; ``path`` is the file."""

    def __init__(self, message: str, path: Optional[str] = None):
        super().__init__(message)
        self.path = path


class CheckpointCorruptError(CheckpointError):
    """The file is not a complete, intact checkpoint (bad digest, cut short, wrong format)."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint is intact but was made by a different setup."""


def previous_path(path: str) -> str:
    """Where the checkpoint before ``path``'s current one is kept."""
    return f"{path}.prev"


def _tmp_path(path: str, pid: int) -> str:
    return f"{path}.tmp.{pid}"


def _fsync_dir(path: str) -> None:
    # The renames are durable only once the directory entry is on disk.
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_checkpoint(path: str, meta: Dict[str, Any], state: Dict[str, Any], keep_previous: bool) -> None:
    """Write ``state`` with ``meta`` to ``path`` atomically.

    Args:
        path: the checkpoint file.
        meta: JSON-serialisable description of what made the checkpoint.
        state: tensors and plain Python values (what ``torch.load(weights_only=True)`` reads).
        keep_previous: link the current ``path`` to ``<path>.prev`` before
            replacing it (it belongs to the same run). When False, an old
            ``<path>.prev`` (another run's) is removed instead.
    """
    payload = io.BytesIO()
    torch.save(state, payload)
    header = json.dumps({"meta": meta, "payload_bytes": payload.tell()}, sort_keys=True, allow_nan=True)
    body = [header.encode() + b"\n", payload.getbuffer()]
    digest = hashlib.sha256()
    for part in body:
        digest.update(part)
    size = sum(len(part) for part in body)
    pid = os.getpid()
    tmp, link = _tmp_path(path, pid), _tmp_path(path, pid) + ".prev"
    prev = previous_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(_MAGIC)
            f.write(f"sha256 {digest.hexdigest()} {size}\n".encode())
            for part in body:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and os.path.exists(path):
            try:
                os.link(path, link)  # no copy: prev and current share the bytes until current is replaced
            except OSError:  # file systems without hard links
                shutil.copyfile(path, link)
                with open(link, "rb") as f:
                    os.fsync(f.fileno())
            os.replace(link, prev)
        elif not keep_previous and os.path.exists(prev):
            os.remove(prev)
        os.replace(tmp, path)
        _fsync_dir(path)
    finally:
        for leftover in (tmp, link):
            if os.path.exists(leftover):
                os.remove(leftover)


def _read(path: str) -> Tuple[Dict[str, Any], bytes]:
    """Read ``path``, check its format, length and digest; return (header, payload bytes).

    The payload is read as one bytes object and handed to ``torch.load``
    through a BytesIO that shares it, so a checkpoint costs its size in memory
    once while it is read.
    """
    with open(path, "rb") as f:
        magic = f.readline(len(_MAGIC))
        digest_line = f.readline(_MAX_DIGEST_LINE) if magic == _MAGIC else b""
        header_line = f.readline() if digest_line.endswith(b"\n") else b""
        payload = f.read()
    if magic != _MAGIC:
        if magic.startswith(FORMAT.encode()):
            raise CheckpointCorruptError(
                f"checkpoint {path!r}: format {magic.strip().decode(errors='replace')!r} is not the one this "
                f"obd_ext reads ({FORMAT} {FORMAT_VERSION})", path)
        size = os.path.getsize(path)
        what = ("is empty" if size == 0 else "is a plain torch.save file (written by an older obd_ext?)"
                if magic[:2] == b"PK" else "does not start with the checkpoint header")
        raise CheckpointCorruptError(f"checkpoint {path!r} is not an obd_ext checkpoint: it {what} ({size} bytes)",
                                     path)
    fields = digest_line.rstrip(b"\n").split(b" ")
    try:
        if not digest_line.endswith(b"\n") or len(fields) != 3 or fields[0] != b"sha256":
            raise ValueError
        expected, size = fields[1].decode(), int(fields[2])
    except ValueError:
        raise CheckpointCorruptError(f"checkpoint {path!r} is damaged: its checksum line is unreadable "
                                     f"(or the file is cut short at {os.path.getsize(path)} bytes)", path) from None
    got = len(header_line) + len(payload)
    if got != size:
        raise CheckpointCorruptError(
            f"checkpoint {path!r} is {'truncated' if got < size else 'longer than written'}: "
            f"{got} bytes after its checksum line, {size} written", path)
    digest = hashlib.sha256(header_line)
    digest.update(payload)
    if digest.hexdigest() != expected:
        raise CheckpointCorruptError(f"checkpoint {path!r} is corrupted: sha256 of its contents is "
                                     f"{digest.hexdigest()}, {expected} when written", path)
    try:
        header = json.loads(header_line)
        if len(payload) != header["payload_bytes"]:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        # The digest matched, so the writer itself wrote this: not ours.
        raise CheckpointCorruptError(f"checkpoint {path!r}: its header is not valid", path) from None
    return header, payload


def read_header(path: str) -> Dict[str, Any]:
    """The ``meta`` of the checkpoint at ``path``, after checking the format, length and digest."""
    return _read(path)[0]["meta"]


def read_checkpoint(path: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Read and verify the checkpoint at ``path``.

    Returns:
        ``(meta, state)``; tensors of ``state`` are on the CPU.

    Raises:
        CheckpointCorruptError: the file is cut short, changed since it was
            written, or not an obd_ext checkpoint; the message names it.
    """
    header, payload = _read(path)
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:  # the digest matched: the writer wrote something weights_only cannot read
        raise CheckpointCorruptError(f"checkpoint {path!r}: its payload cannot be read with "
                                     f"torch.load(weights_only=True): {e}", path) from e
    return header["meta"], state


def _alive(pid: int) -> bool:
    if os.name == "nt":  # pragma: no cover - os.kill(pid, 0) would send CTRL_C_EVENT there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(path: str) -> List[str]:
    """Delete ``<path>.tmp.<pid>*`` files of processes that no longer run (and this one's).

    A write killed half-way leaves its temporary file; the next run calls this
    on start. Files of other live processes are left alone.

    Returns:
        The files removed.
    """
    removed = []
    prefix = _tmp_path(path, "")
    for name in glob.glob(glob.escape(prefix) + "*"):
        pid_text = name[len(prefix):].split(".", 1)[0]
        if not pid_text.isdigit():
            continue
        pid = int(pid_text)
        # This process writes synchronously, so a file with its own pid is left over from a failed write.
        if pid == os.getpid() or not _alive(pid):
            try:
                os.remove(name)
                removed.append(name)
            except FileNotFoundError:  # removed by another process meanwhile
                pass
    return removed
