"""The paper's recipe (section 2.2) as a scheduler: rounds of
curvature -> saliency -> delete -> retrain, with checkpoints that survive a kill.

Each round: compute curvature (any method of obd_ext.hessian_diag), delete to
the round's target sparsity with a :class:`~obd_ext.pruning.Pruner`, measure
the actual loss increase, retrain with the user's callable, log, and save a
checkpoint (:mod:`obd_ext.checkpoints`: atomic, checksummed, the previous one
kept as ``<checkpoint>.prev``). A run restarted with the same arguments
resumes after the last completed round and ends with the same masks and
weights as an uninterrupted run (bitwise on the CPU with deterministic
training): the checkpoint holds the model, the masks, the optimizer, the RNG
states (torch CPU and CUDA, Python's ``random``) and the log.

A checkpoint also records what made it (schedule, method, scope, pattern,
loss budget, seed, optimizer class and hyperparameters, the model's parameter
names, shapes and dtypes, the pruned parameters, the obd_ext version). A run
whose setup differs refuses to resume from it, naming the fields that
differ, unless ``resume="restart"`` asks to start over.

Schedules: ``one_shot(s)``, ``fixed(fraction, rounds)`` (delete a fraction of
what remains each round), ``cubic(s_final, rounds, s_initial=0)`` (Zhu & Gupta,
2017), and a loss budget (stop when the predicted or measured loss increase
of a round exceeds it).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import numbers
import os
import random
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .checkpoints import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    previous_path,
    read_checkpoint,
    remove_stale_temporaries,
    write_checkpoint,
)
from .curvature import as_batches, hessian_diag
from .pruning import Pruner, default_prunable, inputs_first, warn_uncovered
from .selection import check_nm_shapes
from .vocabulary import (METHODS, PRUNER_METHODS, SCOPES, check_method, check_pattern_sparsity, check_scope,
                         parse_pattern)

__all__ = ["one_shot", "fixed", "cubic", "OBDScheduler", "RESUME_MODES", "BUDGET_ON"]

RESUME_MODES: Tuple[str, ...] = ("auto", "restart", "require")
BUDGET_ON: Tuple[str, ...] = ("predicted", "measured")

# The checkpoint fields that must match for a run to resume (the rest of the meta is informational).
_SETUP_FIELDS = ("schedule", "method", "scope", "pattern", "loss_budget", "budget_on", "seed", "optimizer",
                 "optimizer_groups", "parameters", "pruned")


def one_shot(sparsity: float) -> List[float]:
    """Everything in one round."""
    return [float(sparsity)]


def fixed(fraction: float, rounds: int) -> List[float]:
    """Delete ``fraction`` of the remaining weights in each of ``rounds`` rounds."""
    if not 0 < fraction < 1 or rounds < 1:
        raise ValueError(f"fixed: need 0 < fraction < 1 and rounds >= 1, got {fraction}, {rounds}")
    return [1 - (1 - fraction) ** (r + 1) for r in range(rounds)]


def cubic(final: float, rounds: int, initial: float = 0.0) -> List[float]:
    """Zhu & Gupta's gradual schedule: s_t = s_f + (s_i - s_f) (1 - t / n)^3, t = 1..n."""
    if rounds < 1 or not 0 <= initial <= final <= 1:
        raise ValueError(f"cubic: need rounds >= 1 and 0 <= initial <= final <= 1, got {rounds}, {initial}, {final}")
    return [final + (initial - final) * (1 - t / rounds) ** 3 for t in range(1, rounds + 1)]


# ---------------------------------------------------------------------------
# Validation at the door: every check runs before the scheduler changes anything.
# ---------------------------------------------------------------------------


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_schedule(schedule: Any) -> List[float]:
    if hasattr(schedule, "tolist") and not isinstance(schedule, (str, bytes)):  # a numpy array or a tensor
        schedule = schedule.tolist()
        schedule = schedule if isinstance(schedule, list) else [schedule]
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence):
        raise TypeError(f"schedule must be a list of target sparsities (one_shot / fixed / cubic), got {schedule!r}")
    if len(schedule) == 0:
        raise ValueError("schedule is empty: give at least one target sparsity (e.g. obd_ext.one_shot(0.5))")
    for i, s in enumerate(schedule):
        if not _is_real(s):
            raise TypeError(f"schedule[{i}] must be a number, got {s!r}")
        if not math.isfinite(s) or not 0 <= s <= 1:
            raise ValueError(f"schedule[{i}] = {s!r}: sparsities must be finite and in [0, 1]")
    out = [float(s) for s in schedule]
    for i in range(1, len(out)):
        if out[i] < out[i - 1]:
            raise ValueError(f"schedule must be non-decreasing sparsities in [0, 1], got {out} "
                             f"(schedule[{i}] = {out[i]} < schedule[{i - 1}] = {out[i - 1]})")
    return out


def _check_path(name: str, path: Any) -> Optional[str]:
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {path!r}")
    path = os.fspath(path)
    if not path:
        raise ValueError(f"{name} is an empty path")
    if os.path.isdir(path):
        raise ValueError(f"{name} = {path!r} is a directory; give a file path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{name} = {path!r}: the folder {folder!r} does not exist")
    return path


def _check_data(data: Any) -> None:
    """Reject data the rounds cannot use: none, empty, or a one-shot iterator (read several times per round)."""
    if data is None:
        raise ValueError("data is required: batches (inputs, targets) for the curvature and the loss, got None")
    if isinstance(data, Tensor):
        raise TypeError("data must be one (inputs, targets) pair or an iterable of such batches, got a single tensor")
    batches = as_batches(data)
    if batches is not data:  # one (inputs, targets) pair
        x = data[0]
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"data: the (inputs, targets) pair holds no samples (inputs of shape {tuple(x.shape)}); "
                             "empty data would give zero curvature and delete the first entries in index order")
        return
    if iter(data) is data:
        raise TypeError(f"data is a one-shot iterator ({type(data).__name__}): the scheduler reads the data "
                        "several times per round; pass a list of batches, a DataLoader, or one (inputs, targets) pair")
    try:
        n = len(data)
    except TypeError:  # an iterable without a length (e.g. an IterableDataset's loader): look at its first batch
        n = 1 if next(iter(data), None) is not None else 0
    if n == 0:
        raise ValueError("data holds no batches: empty data would give zero curvature and delete the first "
                         "entries in index order")
    if isinstance(data, (list, tuple)):
        for i, b in enumerate(data):
            if not (isinstance(b, (list, tuple)) and len(b) == 2 and isinstance(b[0], Tensor)):
                raise TypeError(f"data[{i}] must be an (inputs, targets) pair of tensors, got {type(b).__name__}")
            if b[0].dim() == 0 or b[0].shape[0] == 0:
                raise ValueError(f"data[{i}] holds no samples (inputs of shape {tuple(b[0].shape)})")


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """``model.eval()`` inside, every module's own training flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _check_params(model: nn.Module, params: Any, method: str) -> List[str]:
    names = default_prunable(model) if params is None else params
    if params is None:
        warn_uncovered(model, names, stacklevel=4)
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"params must be a list of parameter names, got {params!r}")
    names = list(names)
    if not names:
        raise ValueError("params: no parameters to prune " + (
            "(got an empty list)" if params is not None
            else "(the model has no layer weights obd_ext.default_prunable knows: pass params=)"))
    # Every name of every parameter: a weight tied to another is listed under both names.
    named = dict(model.named_parameters(remove_duplicate=False))
    seen = set()
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"params: names must be strings, got {n!r}")
        if n in seen:
            raise ValueError(f"params: {n!r} appears more than once")
        seen.add(n)
        # A layer pruned with torch.nn.utils.prune holds "<name>_orig" (and a mask); the Pruner adopts it.
        p = named.get(n, named.get(n + "_orig"))
        if p is None:
            raise ValueError(f"params: the model has no parameter named {n!r}")
        if METHODS[method].needs_curvature and not p.requires_grad:
            raise ValueError(f"params: {n!r} does not require grad, so method={method!r} has no curvature for it; "
                             "leave it out of params or use method='magnitude'")
    return names


def _plain(value: Any, where: str) -> Any:
    """A JSON-able copy of a log value (numbers, strings, lists, dicts); one-element tensors become numbers."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Tensor):
        if value.numel() == 1:
            return value.item()
        raise TypeError(f"{where} must hold numbers, not a tensor of shape {tuple(value.shape)}")
    if hasattr(value, "item") and callable(value.item) and getattr(value, "size", None) == 1:  # numpy scalars
        return _plain(value.item(), where)
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, where) for k, v in value.items()}
    raise TypeError(f"{where} must hold numbers, strings, lists or dicts (they go into the JSON log), "
                    f"got {type(value).__name__}")


def _hyperparameter(value: Any) -> Any:
    try:
        return _plain(value, "a hyperparameter")
    except TypeError:  # a custom optimizer's object: compared by its type only
        return f"<{type(value).__name__}>"


def _optimizer_groups(optimizer: torch.optim.Optimizer) -> List[Dict[str, Any]]:
    """Each param group's hyperparameters and size, as plain values (what the checkpoint compares)."""
    groups = []
    for g in optimizer.param_groups:
        entry = {k: _hyperparameter(v) for k, v in g.items() if k != "params"}
        entry["params"] = len(g["params"])
        groups.append(entry)
    return groups


def _show(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _differences(recorded: Dict[str, Any], now: Dict[str, Any]) -> List[str]:
    """The setup fields in which ``recorded`` (a checkpoint's meta) and ``now`` differ, each described."""
    out = []
    for field in _SETUP_FIELDS:
        a, b = recorded.get(field), now.get(field)
        if json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True):
            continue
        if field == "optimizer_groups" and recorded.get("optimizer") != now.get("optimizer"):
            continue  # another optimizer class has other hyperparameters; the class is reported
        if field == "parameters" and isinstance(a, list) and isinstance(b, list):
            ra, rb = {p[0]: p[1:] for p in a}, {p[0]: p[1:] for p in b}
            parts = [f"{k}: {ra[k]} -> {rb[k]}" for k in ra if k in rb and ra[k] != rb[k]]
            parts += [f"{k} only in the checkpoint" for k in ra if k not in rb]
            parts += [f"{k} only in the model" for k in rb if k not in ra]
            out.append(f"parameters ({'; '.join(parts[:4])}{'; ...' if len(parts) > 4 else ''})")
        elif field == "optimizer_groups" and isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            parts = [f"group {i} {k}: {_show(ga.get(k))} -> {_show(gb.get(k))}"
                     for i, (ga, gb) in enumerate(zip(a, b)) for k in sorted(set(ga) | set(gb))
                     if json.dumps(ga.get(k)) != json.dumps(gb.get(k))]
            out.append(f"optimizer_groups ({'; '.join(parts[:4])}{'; ...' if len(parts) > 4 else ''})")
        else:
            out.append(f"{field} (checkpoint {_show(a)}, now {_show(b)})")
    return out


class OBDScheduler:
    """Rounds of curvature, deletion and retraining, checkpointed after each.

    Every argument is checked when the scheduler is built, before anything
    changes; a checkpoint is checked (checksum, then setup) before anything
    is loaded from it.

    Args:
        model: the model; the pruner is built on it.
        loss_fn: the loss for curvature and for the measured loss increase.
        data: batches (x, y) for the curvature and the loss measurement: one
            (inputs, targets) pair, a list of pairs, or a re-iterable loader
            (it is read several times per round). Empty data is an error.
        train_fn: ``train_fn(round)`` retrains in place after each deletion
            (the user's own loop; deleted weights stay zero if it uses
            ``optimizer``, which the scheduler attaches to the pruner), or None.
        schedule: target sparsity after each round (one_shot / fixed / cubic):
            non-empty, finite, in [0, 1], non-decreasing.
        optimizer: the optimizer train_fn uses (saved in checkpoints).
        method: one of :data:`obd_ext.vocabulary.PRUNER_METHODS`: a curvature
            method of ``obd_ext.hessian_diag`` ("obd", "lm", "fisher",
            "ggn-mc", "hutchinson", "exact"), "magnitude" or "random".
        scope: selection scope (:data:`obd_ext.vocabulary.SCOPES`); None for
            the default ("global").
        pattern: "unstructured" or "N:M" such as "2:4"; an N:M pattern fixes
            the sparsity at 1 - N/M, so every schedule entry must equal it.
        loss_budget: stop before a round whose predicted increase (or, with
            ``budget_on="measured"``, measured increase) exceeds it: a finite
            number >= 0, or None for no budget.
        budget_on: "predicted" or "measured".
        checkpoint: path of the checkpoint file, written after every round;
            ``<checkpoint>.prev`` keeps the one before.
        resume: what to do with an existing ``checkpoint``: "auto" (default)
            resumes from it if it was made by the same setup and raises
            :class:`~obd_ext.checkpoints.CheckpointMismatchError` naming the
            differing fields if not; "restart" ignores it and starts over
            (the next save overwrites it); "require" raises if there is none.
            A corrupted or truncated checkpoint is always an error
            (:class:`~obd_ext.checkpoints.CheckpointCorruptError`) naming the
            file, and says whether ``<checkpoint>.prev`` is intact: move it
            into place to resume from the round before. The scheduler does
            not fall back to it by itself, so damage never goes unnoticed.
        log_path: JSON log of the rounds, rewritten after each.
        eval_fn: optional ``eval_fn() -> dict`` of metrics (numbers) logged per round.
        params: names of the parameters to prune (default: Linear, conv and
            Embedding weights).
        progress: show a tqdm bar over rounds.
        seed: seeds torch and Python's ``random`` at the start of a fresh run,
            the random method's draws and the Monte-Carlo curvature methods.
    """

    def __init__(self, model: nn.Module, loss_fn, data, train_fn: Optional[Callable[[int], None]],
                 schedule: Sequence[float], optimizer: Optional[torch.optim.Optimizer] = None, *,
                 method: str = "obd", scope: Optional[str] = None, pattern: str = "unstructured",
                 loss_budget: Optional[float] = None, budget_on: str = "predicted",
                 checkpoint: Optional[str] = None, resume: str = "auto", log_path: Optional[str] = None,
                 eval_fn: Optional[Callable[[], Dict[str, float]]] = None, params: Optional[Sequence[str]] = None,
                 progress: bool = True, seed: int = 0):
        # --- validate everything; nothing below changes state until the Pruner is built at the end ---
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
        for name, fn in (("train_fn", train_fn), ("eval_fn", eval_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable or None, got {fn!r}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        schedule = _check_schedule(schedule)
        check_method(method, PRUNER_METHODS, "OBDScheduler")
        resolved_scope = check_scope(scope, SCOPES)
        implied = check_pattern_sparsity(pattern, None)  # raises for a malformed pattern
        for i, s in enumerate(schedule):
            try:
                check_pattern_sparsity(pattern, s)
            except ValueError:
                raise ValueError(f"schedule[{i}] = {s:g}: pattern={pattern!r} fixes the sparsity at {implied:g}, so "
                                 f"every schedule entry must be {implied:g} (e.g. one_shot({implied:g}))") from None
        if loss_budget is not None:
            if not _is_real(loss_budget):
                raise TypeError(f"loss_budget must be a number or None, got {loss_budget!r}")
            if not math.isfinite(loss_budget) or loss_budget < 0:
                raise ValueError(f"loss_budget must be a finite number >= 0 (or None for no budget), "
                                 f"got {loss_budget!r}")
        if budget_on not in BUDGET_ON:
            raise ValueError(f"budget_on must be one of {BUDGET_ON}, got {budget_on!r}")
        if loss_budget is not None and budget_on == "predicted" and not METHODS[method].needs_curvature:
            raise ValueError(f"loss_budget with budget_on='predicted' needs a curvature method: method={method!r} "
                             "predicts no loss increase (its scores are not saliencies); pass budget_on='measured'")
        if resume not in RESUME_MODES:
            raise ValueError(f"resume must be one of {RESUME_MODES}, got {resume!r}")
        checkpoint = _check_path("checkpoint", checkpoint)
        log_path = _check_path("log_path", log_path)
        if resume == "require" and checkpoint is None:
            raise ValueError("resume='require' needs a checkpoint path")
        if checkpoint is not None and log_path is not None and os.path.abspath(checkpoint) == os.path.abspath(log_path):
            raise ValueError(f"checkpoint and log_path are the same file {checkpoint!r}")
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be a bool, got {progress!r}")
        _check_data(data)
        names = _check_params(model, params, method)
        nm = parse_pattern(pattern)
        if nm is not None:  # a layer the pattern cannot split fails here, not after a round's curvature pass
            named = dict(model.named_parameters(remove_duplicate=False))
            flipped = {n for n in names if inputs_first(model, n)}
            check_nm_shapes("OBDScheduler", pattern, nm, (
                (f"parameter {n!r} (stored inputs first, shown with dims 0 and 1 swapped)", named[n].transpose(0, 1))
                if n in flipped else (f"parameter {n!r}", named[n]) for n in names if n in named))

        self.model, self.loss_fn, self.data, self.train_fn = model, loss_fn, data, train_fn
        self.schedule = schedule
        self.optimizer, self.method, self.scope, self.pattern = optimizer, method, scope, pattern
        self.loss_budget = None if loss_budget is None else float(loss_budget)
        self.budget_on, self.resume = budget_on, resume
        self.checkpoint, self.log_path, self.eval_fn = checkpoint, log_path, eval_fn
        self.progress, self.seed = progress, int(seed)
        # What made this run, recorded at construction (an LR scheduler may change the groups later).
        self._setup: Dict[str, Any] = {
            "schedule": self.schedule, "method": method, "scope": resolved_scope, "pattern": pattern,
            "loss_budget": self.loss_budget, "budget_on": budget_on, "seed": self.seed,
            "optimizer": None if optimizer is None else f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
            "optimizer_groups": None if optimizer is None else _optimizer_groups(optimizer),
            "parameters": [[n, list(p.shape), str(p.dtype).replace("torch.", "")]
                           for n, p in model.named_parameters(remove_duplicate=False)],
            "pruned": names,
        }
        self.pruner = Pruner(model, names)
        if optimizer is not None:
            self.pruner.attach(optimizer)
        self.log: List[Dict[str, object]] = []
        self.next_round = 0
        self.stopped = False
        self._saved = False  # whether this run wrote (or resumed from) the current checkpoint: then rotate it

    def __repr__(self) -> str:
        done, total = self.next_round, len(self.schedule)
        target = self.schedule[min(done, total - 1)]
        state = (", stopped by the loss budget" if self.stopped
                 else "" if done == total else f", next target {target:g}")
        return (f"OBDScheduler(rounds {done}/{total} done{state}, final target {self.schedule[-1]:g}, "
                f"sparsity {self.pruner.sparsity:.4f}, method={self.method!r}, scope={self._setup['scope']!r}, "
                f"pattern={self.pattern!r}, loss_budget={self.loss_budget!r}, checkpoint={self.checkpoint!r})")

    # ------------------------------------------------------------------

    @torch.no_grad()
    def _loss(self) -> float:
        # In eval mode: dropout would make a round that deletes nothing show an
        # increase, and BatchNorm would move its running statistics.
        total, n = 0.0, 0
        with _eval_mode(self.model):
            for x, y in as_batches(self.data):
                total += float(self.loss_fn(self.model(x), y))
                n += 1
        if n == 0:  # a loader that was non-empty when checked may run dry
            raise ValueError("data yielded no batches; the loss (and the curvature) need at least one")
        return total / n

    def _check_still_deleted(self, r: int) -> None:
        # An optimizer train_fn uses but the scheduler was not given is not
        # frozen: its momentum revives deleted weights, and the log would
        # report a sparsity the model no longer has.
        for name, m in self.pruner.masks.items():
            moved = int(self.pruner.params[name].detach()[~m].ne(0).sum())
            if moved:
                raise RuntimeError(
                    f"round {r}: after train_fn, {moved} deleted weights of {name!r} are no longer zero: the "
                    "optimizer train_fn steps is not frozen by this scheduler; pass it as optimizer= (or "
                    "scheduler.pruner.attach(it)). The last checkpoint is from before this round")

    def _meta(self) -> Dict[str, Any]:
        from . import __version__

        return dict(self._setup, obd_ext_version=__version__, torch_version=torch.__version__,
                    rounds_done=self.next_round, rounds=len(self.schedule), stopped=self.stopped)

    def _state(self) -> Dict[str, object]:
        return {
            "round": self.next_round, "stopped": self.stopped, "log_json": json.dumps(self.log),
            "model": self.model.state_dict(), "masks": self.pruner.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def save(self) -> None:
        """Write the checkpoint atomically; the one it replaces is kept as ``<checkpoint>.prev``."""
        if not self.checkpoint:
            return
        # Rotate only a checkpoint of this run: after "restart", the old file is another run's.
        write_checkpoint(self.checkpoint, self._meta(), self._state(), keep_previous=self._saved)
        self._saved = True

    def _advice(self) -> str:
        """Whether ``<checkpoint>.prev`` could be resumed from, for an error about the current file."""
        prev = previous_path(self.checkpoint)
        if not os.path.exists(prev):
            return f"there is no previous checkpoint {prev!r}; pass resume='restart' to start over"
        try:
            meta, _ = read_checkpoint(prev)
        except CheckpointError as e:
            return f"the previous checkpoint is damaged too ({e}); pass resume='restart' to start over"
        if _differences(meta, self._setup):
            return (f"the previous checkpoint {prev!r} is intact but was made by a different setup; "
                    "pass resume='restart' to start over")
        return (f"the previous checkpoint {prev!r} (after round {meta.get('rounds_done')}) is intact: move it to "
                f"{self.checkpoint!r} to resume from it, or pass resume='restart' to start over")

    def _check_state(self, state: Any) -> None:
        """The payload fits this model, pruner and optimizer (checked before anything is loaded)."""
        path = self.checkpoint

        def bad(what: str) -> CheckpointError:
            return CheckpointCorruptError(f"checkpoint {path!r}: {what}", path)

        keys = {"round", "stopped", "log_json", "model", "masks", "optimizer", "rng"}
        if not isinstance(state, dict) or not keys <= set(state):
            raise bad(f"the payload lacks {sorted(keys - set(state)) if isinstance(state, dict) else keys}")
        if not isinstance(state["round"], int) or not 0 <= state["round"] <= len(self.schedule):
            raise bad(f"round {state['round']!r} is outside 0..{len(self.schedule)}")
        if not isinstance(state["stopped"], bool):
            raise bad(f"its 'stopped' flag is {state['stopped']!r}, not a bool")
        own = self.model.state_dict()
        saved = state["model"]
        if not isinstance(saved, dict) or set(saved) != set(own):
            raise bad("its model state has different entries from the model's "
                      f"({sorted(set(saved) ^ set(own))[:4] if isinstance(saved, dict) else type(saved).__name__})")
        for k, v in own.items():
            if not isinstance(saved[k], Tensor) or saved[k].shape != v.shape or saved[k].dtype != v.dtype:
                raise bad(f"model entry {k!r} is not a {v.dtype} tensor of shape {tuple(v.shape)}")
        masks = state["masks"]
        if not isinstance(masks, dict) or set(masks) != set(self.pruner.masks):
            raise bad("its masks are for other parameters than this pruner's")
        for k, m in self.pruner.masks.items():
            if not isinstance(masks[k], Tensor) or masks[k].dtype != torch.bool or masks[k].shape != m.shape:
                raise bad(f"mask {k!r} is not a bool tensor of shape {tuple(m.shape)}")
        if (state["optimizer"] is None) != (self.optimizer is None):
            raise bad("it was saved " + ("without" if state["optimizer"] is None else "with") + " an optimizer")
        if self.optimizer is not None:
            groups = state["optimizer"].get("param_groups") if isinstance(state["optimizer"], dict) else None
            if not isinstance(groups, list) or [len(g.get("params", ())) for g in groups] != \
                    [len(g["params"]) for g in self.optimizer.param_groups]:
                raise bad("its optimizer state has other parameter groups than the optimizer's")
        rng = state["rng"]
        if not isinstance(rng, dict) or not isinstance(rng.get("torch"), Tensor) or "python" not in rng:
            raise bad("its RNG states are missing")
        try:
            json.loads(state["log_json"])
        except (TypeError, ValueError):
            raise bad("its log is not valid JSON") from None

    def load(self) -> bool:
        """Resume from the checkpoint if there is one (per ``resume``); returns whether it did.

        Raises:
            CheckpointCorruptError: the checkpoint is damaged (nothing is loaded).
            CheckpointMismatchError: it was made by a different setup (nothing is loaded).
            FileNotFoundError: ``resume="require"`` and there is no checkpoint.
        """
        if not self.checkpoint or self.resume == "restart":
            return False
        path = self.checkpoint
        if not os.path.exists(path):
            if self.resume == "require":
                raise FileNotFoundError(f"resume='require' but there is no checkpoint {path!r}")
            return False
        try:
            meta, state = read_checkpoint(path)
        except CheckpointCorruptError as e:
            raise CheckpointCorruptError(f"{e}. Nothing was loaded; {self._advice()}", path) from e
        diff = _differences(meta, self._setup)
        if diff:
            raise CheckpointMismatchError(
                f"checkpoint {path!r} was made by a different setup, so this run cannot resume from it: "
                f"{'; '.join(diff)}. Run with the same arguments to resume, or pass resume='restart' to start over "
                "(the next save overwrites the checkpoint)", path)
        self._check_state(state)
        from . import __version__

        if meta.get("obd_ext_version") != __version__:
            warnings.warn(f"checkpoint {path!r} was written by obd_ext {meta.get('obd_ext_version')}, this is "
                          f"{__version__}: the resumed rounds may differ from an uninterrupted run", stacklevel=3)
        # Everything checked: load. Nothing below is expected to fail.
        self.model.load_state_dict(state["model"])
        self.pruner.load_state_dict(state["masks"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        cuda = state["rng"].get("cuda")
        if cuda is not None and torch.cuda.is_available():
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
            else:
                warnings.warn(f"checkpoint {path!r} holds CUDA RNG states of {len(cuda)} devices, this machine has "
                              f"{torch.cuda.device_count()}: CUDA random draws will differ", stacklevel=3)
        self.log, self.next_round, self.stopped = json.loads(state["log_json"]), state["round"], state["stopped"]
        self._saved = True
        return True

    def _write_log(self) -> None:
        if self.log_path:
            tmp = f"{self.log_path}.tmp.{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(self.log, f, indent=2)
            os.replace(tmp, self.log_path)

    # ------------------------------------------------------------------

    def run(self) -> List[Dict[str, object]]:
        """Run (or resume) every round; returns the per-round log."""
        if not self.load():
            torch.manual_seed(self.seed)
            random.seed(self.seed)
        if self.checkpoint:
            remove_stale_temporaries(self.checkpoint)  # left by writes that were killed
        if self.log_path:
            remove_stale_temporaries(self.log_path)
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover
            tqdm = None
        rounds = range(self.next_round, len(self.schedule))
        bar = tqdm(rounds, desc="OBD rounds", initial=self.next_round, total=len(self.schedule),
                   disable=not self.progress) if tqdm else rounds
        for r in bar:
            if self.stopped:
                break
            self._round(r)
        return self.log

    def _round(self, r: int) -> None:
        target = self.schedule[r]
        before = self._loss()
        curvature = None
        if METHODS[self.method].needs_curvature:
            buffers = {k: b.clone() for k, b in self.model.named_buffers()}  # the curvature pass must not move them
            curvature = hessian_diag(self.model, self.loss_fn, self.data, method=self.method,
                                     params=list(self.pruner.params.values()), seed=self.seed + r, progress=False)
            with torch.no_grad():
                for k, b in self.model.named_buffers():
                    b.copy_(buffers[k])
            if curvature.batches == 0:
                raise ValueError("data yielded no batches for the curvature; zero curvature would delete the "
                                 "first entries in index order")
        # Snapshots to undo the round, only when a budget can ask for it.
        undo = self.loss_budget is not None
        masks_before = self.pruner.state_dict() if undo else None
        weights_before = {k: p.detach().clone() for k, p in self.pruner.params.items()} if undo else None
        opt_before = copy.deepcopy(self.optimizer.state_dict()) if undo and self.optimizer is not None else None

        def undo_round() -> None:
            with torch.no_grad():
                for k, p in self.pruner.params.items():
                    p.copy_(weights_before[k])
            self.pruner.load_state_dict(masks_before)
            if opt_before is not None:
                self.optimizer.load_state_dict(opt_before)

        sel = self.pruner.prune(target, method=self.method, curvature=curvature, scope=self.scope,
                                pattern=self.pattern, generator=torch.Generator().manual_seed(self.seed + r))
        after = self._loss()
        entry: Dict[str, object] = {
            "round": r, "target_sparsity": target, "sparsity": self.pruner.sparsity,
            "deleted": sel.deleted_now, "predicted_increase": sel.predicted_increase,
            "loss_before": before, "loss_after_delete": after, "actual_increase": after - before,
        }
        over = False
        if self.loss_budget is not None:
            spent = sel.predicted_increase if self.budget_on == "predicted" else after - before
            if math.isnan(spent):
                undo_round()
                raise ValueError(f"round {r}: the {self.budget_on} loss increase is NaN (loss {before!r} before the "
                                 f"deletion, {after!r} after), so loss_budget cannot be checked; the round was undone")
            over = spent > self.loss_budget
        if over:  # undo this round and stop: the budget is the last word
            undo_round()
            entry.update({"stopped_by_budget": True, "undone_sparsity": entry["sparsity"],
                          "undone_deleted": entry["deleted"], "sparsity": self.pruner.sparsity, "deleted": 0})
            self.stopped = True
        elif self.train_fn is not None:
            self.train_fn(r)
            self._check_still_deleted(r)
            entry["loss_after_retrain"] = self._loss()
        if self.eval_fn is not None and not over:
            metrics = self.eval_fn()
            if not isinstance(metrics, dict):
                raise TypeError(f"eval_fn must return a dict of metrics, got {type(metrics).__name__}")
            entry.update(_plain(metrics, "eval_fn's result"))
        self.log.append(entry)
        self.next_round = r + 1
        self._write_log()
        self.save()
