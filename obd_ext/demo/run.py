"""Running the demo: seeds in worker processes, then results.json, the figures and the printed check."""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import time
from typing import Dict, Optional

from ..report import format_report, plot_rounds
from .claims import check_claims, format_claims
from .config import resolve_config
from .experiment import aggregate, run_seed
from .figures import plot_figures
from .summary import format_summary

__all__ = ["run_demo", "run_from_args"]


def run_demo(out_dir: str, seed: int = 0, epochs: Optional[int] = None, retrain_steps: Optional[int] = None,
             random_draws: Optional[int] = None, levels: Optional[int] = None, progress: bool = True,
             lr: Optional[float] = None, *, seeds: Optional[int] = None, quick: Optional[bool] = None,
             min_remaining: Optional[float] = None, obd_step: Optional[float] = None,
             method: Optional[str] = None, schedule: Optional[str] = None,
             jobs: Optional[int] = None) -> Dict[str, object]:
    """Run the experiment for seeds ``seed .. seed + seeds - 1`` and write figures and results.json.

    An argument left as None takes the default of :data:`~obd_ext.demo.config.QUICK` (``quick``) or
    :data:`~obd_ext.demo.config.DEFAULTS`; every setting is checked before anything runs or is written.
    ``method`` is the saliency of the Fig. 2 rounds (one of :data:`~obd_ext.demo.config.METHODS`).
    ``jobs`` seeds run at once in worker processes (default: as many as there are CPU cores, at most one
    per seed).

    Returns:
        The seed means (see :func:`obd_ext.demo.experiment.aggregate`) with ``config``, ``claims``
        (:func:`obd_ext.demo.claims.check_claims`), ``per_seed`` and ``seconds``: what results.json holds.
    """
    t0 = time.time()
    cfg = resolve_config(bool(quick), {
        "seeds": seeds, "epochs": epochs, "lr": lr, "retrain_steps": retrain_steps, "random_draws": random_draws,
        "levels": levels, "min_remaining": min_remaining, "obd_step": obd_step, "method": method,
        "schedule": schedule})
    if jobs is not None and int(jobs) < 0:
        raise ValueError(f"jobs must be at least 0 (0: one per CPU core), got {jobs!r}")
    n = int(cfg["seeds"])
    cores = os.cpu_count() or 1
    jobs = max(1, min(n, int(jobs) if jobs else cores))
    os.makedirs(out_dir, exist_ok=True)
    seed_list = [seed + i for i in range(n)]
    runs: Dict[int, Dict[str, object]] = {}

    def done(run: Dict[str, object]) -> None:
        runs[run["seed"]] = run
        if progress:
            print(f"seed {run['seed']}: {run['seconds']:.1f} s", flush=True)

    if jobs == 1:
        for s in seed_list:
            done(run_seed(s, cfg, out_dir if s == seed else None))
    else:
        # One process per seed at a time, one thread each: these small full-batch steps scale far better
        # across processes than across threads (and do not fight a loaded machine's other jobs).
        threads = max(1, cores // jobs)
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = [pool.submit(run_seed, s, cfg, out_dir if s == seed else None, threads) for s in seed_list]
            for f in concurrent.futures.as_completed(futures):
                done(f.result())
    ordered = [runs[s] for s in seed_list]
    first = ordered[0]
    plot_rounds(first.pop("rounds"), os.path.join(out_dir, "rounds.png"))
    report = first.pop("report")
    results = aggregate(ordered)
    results["config"] = {**cfg, "quick": bool(quick), "jobs": jobs}
    results["claims"] = check_claims(results)
    results["per_seed"] = ordered
    results["seconds"] = time.time() - t0
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot_figures(results, out_dir)
    print(format_report(report))
    print(format_summary(results))
    print(f"{format_claims(results['claims'])}; done in {results['seconds']:.1f} s")
    return results


def run_from_args(args: argparse.Namespace) -> Dict[str, object]:
    """:func:`run_demo` with the options of :func:`obd_ext.demo.add_arguments`, as parsed."""
    return run_demo(args.out, seed=args.seed, epochs=args.epochs, retrain_steps=args.retrain_steps,
                    random_draws=args.random_draws, levels=args.levels, progress=not args.no_progress, lr=args.lr,
                    seeds=args.seeds, quick=args.quick, min_remaining=args.min_remaining, obd_step=args.obd_step,
                    method=args.method, schedule=args.schedule, jobs=args.jobs)
