"""The paper's recipe (section 2.2) as a scheduler: rounds of
curvature -> saliency -> delete -> retrain, with checkpoints that survive a kill.

Each round: compute curvature (any method of obd_ext.hessian_diag), delete to
the round's target sparsity with a :class:`~obd_ext.pruning.Pruner`, measure
the actual loss increase if data is given, retrain with the user's callable,
log, and save a checkpoint atomically (temporary file, then rename). A run
restarted with the same arguments resumes after the last completed round and
ends with the same masks and weights as an uninterrupted run (bitwise on the
CPU with deterministic training): the checkpoint holds the model, the masks,
the optimizer, the RNG states and the log.

Schedules: ``one_shot(s)``, ``fixed(fraction, rounds)`` (delete a fraction of
what remains each round), ``cubic(s_final, rounds, s_initial=0)`` (Zhu & Gupta,
2017), and a loss budget (stop when the predicted or measured loss increase
of a round exceeds it).
"""

from __future__ import annotations

import copy
import json
import os
import random
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .curvature import as_batches, hessian_diag
from .pruning import Pruner

__all__ = ["one_shot", "fixed", "cubic", "OBDScheduler"]


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


class OBDScheduler:
    """Rounds of curvature, deletion and retraining, checkpointed after each.

    Args:
        model: the model; the pruner is built on it (default prunable weights).
        loss_fn: the loss for curvature and for the measured loss increase.
        data: batches (x, y) for the curvature and the loss measurement.
        train_fn: ``train_fn(round)`` retrains in place after each deletion
            (the user's own loop; deleted weights stay zero if it uses
            ``optimizer``, which the scheduler attaches to the pruner).
        schedule: target sparsity after each round (one_shot / fixed / cubic).
        optimizer: the optimizer train_fn uses (saved in checkpoints).
        method: curvature method for the saliency ("obd", "lm", "fisher", ...),
            or criterion "magnitude" / "random".
        scope: selection scope (obd_ext.SCOPES).
        loss_budget: stop before a round whose predicted increase (or, with
            ``budget_on="measured"``, measured increase) exceeds it.
        checkpoint: path of the checkpoint file (resume from it if it exists).
        log_path: JSON log of the rounds, rewritten after each.
        eval_fn: optional ``eval_fn() -> dict`` of metrics logged per round.
        params: names of the parameters to prune.
    """

    def __init__(self, model: nn.Module, loss_fn, data, train_fn: Optional[Callable[[int], None]],
                 schedule: Sequence[float], optimizer: Optional[torch.optim.Optimizer] = None,
                 method: str = "obd", scope: str = "global", loss_budget: Optional[float] = None,
                 budget_on: str = "predicted", checkpoint: Optional[str] = None, log_path: Optional[str] = None,
                 eval_fn: Optional[Callable[[], Dict[str, float]]] = None, params: Optional[Sequence[str]] = None,
                 progress: bool = True, seed: int = 0):
        if budget_on not in ("predicted", "measured"):
            raise ValueError(f"budget_on must be 'predicted' or 'measured', got {budget_on!r}")
        if list(schedule) != sorted(schedule) or any(not 0 <= s <= 1 for s in schedule):
            raise ValueError(f"schedule must be non-decreasing sparsities in [0, 1], got {list(schedule)}")
        self.model, self.loss_fn, self.data, self.train_fn = model, loss_fn, data, train_fn
        self.schedule = [float(s) for s in schedule]
        self.optimizer, self.method, self.scope = optimizer, method, scope
        self.loss_budget, self.budget_on = loss_budget, budget_on
        self.checkpoint, self.log_path, self.eval_fn = checkpoint, log_path, eval_fn
        self.progress, self.seed = progress, seed
        self.pruner = Pruner(model, params)
        if optimizer is not None:
            self.pruner.attach(optimizer)
        self.log: List[Dict[str, object]] = []
        self.next_round = 0
        self.stopped = False

    # ------------------------------------------------------------------

    @torch.no_grad()
    def _loss(self) -> float:
        total, n = 0.0, 0
        for x, y in as_batches(self.data):
            total += float(self.loss_fn(self.model(x), y))
            n += 1
        return total / max(n, 1)

    def _state(self) -> Dict[str, object]:
        return {
            "round": self.next_round, "stopped": self.stopped, "log": self.log,
            "model": self.model.state_dict(), "masks": self.pruner.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }

    def save(self) -> None:
        """Atomic checkpoint: write a temporary file, then rename it over the old one."""
        if not self.checkpoint:
            return
        tmp = f"{self.checkpoint}.tmp.{os.getpid()}"
        torch.save(self._state(), tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.checkpoint)

    def load(self) -> bool:
        """Resume from the checkpoint if there is one; returns whether it did."""
        if not self.checkpoint or not os.path.exists(self.checkpoint):
            return False
        state = torch.load(self.checkpoint, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.pruner.load_state_dict(state["masks"])
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.log, self.next_round, self.stopped = state["log"], state["round"], state["stopped"]
        return True

    def _write_log(self) -> None:
        if self.log_path:
            tmp = f"{self.log_path}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.log, f, indent=2)
            os.replace(tmp, self.log_path)

    # ------------------------------------------------------------------

    def run(self) -> List[Dict[str, object]]:
        """Run (or resume) every round; returns the per-round log."""
        if not self.load():
            torch.manual_seed(self.seed)
            random.seed(self.seed)
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
            target = self.schedule[r]
            before = self._loss()
            criterion = self.method if self.method in ("magnitude", "random") else "obd"
            curvature = None
            if criterion == "obd":
                curvature = hessian_diag(self.model, self.loss_fn, self.data, method=self.method, progress=False)
            # Snapshots to undo the round, only when a budget can ask for it.
            undo = self.loss_budget is not None
            masks_before = self.pruner.state_dict() if undo else None
            weights_before = {k: p.detach().clone() for k, p in self.pruner.params.items()} if undo else None
            opt_before = copy.deepcopy(self.optimizer.state_dict()) if undo and self.optimizer is not None else None
            sel = self.pruner.prune(target, criterion=criterion, curvature=curvature, scope=self.scope,
                                    generator=torch.Generator().manual_seed(self.seed + r))
            after = self._loss()
            entry: Dict[str, object] = {
                "round": r, "target_sparsity": target, "sparsity": self.pruner.sparsity,
                "deleted": sel.deleted_now, "predicted_increase": sel.predicted_increase,
                "loss_before": before, "loss_after_delete": after, "actual_increase": after - before,
            }
            over = self.loss_budget is not None and (
                (sel.predicted_increase if self.budget_on == "predicted" else after - before) > self.loss_budget)
            if over:  # undo this round and stop: the budget is the last word
                with torch.no_grad():
                    for k, p in self.pruner.params.items():
                        p.copy_(weights_before[k])
                    for k, m in self.pruner.masks.items():
                        m.copy_(masks_before[k])
                if opt_before is not None:
                    self.optimizer.load_state_dict(opt_before)
                entry["stopped_by_budget"] = True
                self.stopped = True
            elif self.train_fn is not None:
                self.train_fn(r)
                entry["loss_after_retrain"] = self._loss()
            if self.eval_fn is not None and not over:
                entry.update(self.eval_fn())
            self.log.append(entry)
            self.next_round = r + 1
            self._write_log()
            self.save()
        return self.log
