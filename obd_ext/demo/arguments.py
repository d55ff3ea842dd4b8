"""The demo's command-line options (``obd-ext demo``)."""

from __future__ import annotations

import argparse

from .claims import FULL_TRAINING_EPOCHS
from .config import DEFAULTS, METHODS, QUICK, SCHEDULES

__all__ = ["add_arguments"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``p``; :func:`obd_ext.demo.run_from_args` runs the demo with them."""
    d, q = DEFAULTS, QUICK
    p.add_argument("--out", default="obd_demo_out", metavar="DIR",
                   help="directory for the figures and results.json (default obd_demo_out)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="first seed; each seed sets its run's split, initialisation and random draws (default 0)")
    p.add_argument("--seeds", type=int, metavar="N",
                   help=f"number of seeds, S .. S + N - 1 are run and averaged (default {d['seeds']}, "
                        f"--quick {q['seeds']})")
    p.add_argument("--jobs", type=int, metavar="J",
                   help="seeds run at once, one process each (default: the number of CPU cores, at most --seeds)")
    p.add_argument("--epochs", type=int, help=f"full-batch Adam steps before pruning (default {d['epochs']}, "
                                              f"--quick {q['epochs']})")
    p.add_argument("--lr", type=float,
                   help=f"Adam learning rate of the training (default {d['lr']}; retraining uses half)")
    p.add_argument("--retrain-steps", type=int,
                   help=f"retraining steps after each deletion round of Fig. 2 (default {d['retrain_steps']}, "
                        f"--quick {q['retrain_steps']})")
    p.add_argument("--random-draws", type=int,
                   help=f"random deletion orders averaged in Fig. 1a (default {d['random_draws']}, "
                        f"--quick {q['random_draws']})")
    p.add_argument("--levels", type=int,
                   help=f"parameter counts on the figures' grid, evenly from all down to --min-remaining; also "
                        f"the rounds of Fig. 2 (default {d['levels']}: steps of 5%%, --quick {q['levels']})")
    p.add_argument("--min-remaining", type=float,
                   help=f"fraction of the parameters remaining where the grid stops (default {d['min_remaining']})")
    p.add_argument("--obd-step", type=float,
                   help=f"fraction of the parameters OBD deletes per step in Fig. 1, the curvature recomputed "
                        f"before each (default {d['obd_step']}, --quick {q['obd_step']})")
    p.add_argument("--method", choices=METHODS,
                   help="saliency of the Fig. 2 rounds with retraining (OBDScheduler's method): obd (eq. 7), "
                        f"lm (Levenberg-Marquardt), fisher (empirical Fisher), magnitude (default {d['method']})")
    p.add_argument("--schedule", choices=SCHEDULES,
                   help="Fig. 2 rounds: levels (one round per grid level) or cubic (obd_ext.scheduler.cubic to "
                        "the same final sparsity in the same number of rounds) (default levels)")
    p.add_argument("--quick", action="store_true",
                   help="reduced run for CI (fewer seeds, epochs, levels and steps; about a quarter of the time); "
                        "options given explicitly still apply. It checks the three claims such a run can show and "
                        f"skips the first (OBD 1 dB below magnitude), which needs {FULL_TRAINING_EPOCHS} epochs")
    p.add_argument("--no-progress", action="store_true", help="hide the per-seed progress lines")
