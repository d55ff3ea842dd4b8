"""The demo's printed tables: the trained networks, Figure 1 and Figure 2 level by level."""

from __future__ import annotations

from typing import Dict

from .experiment import db

__all__ = ["format_summary"]


def format_summary(r: Dict[str, object]) -> str:
    """The tables as printed, from ``r`` (as :func:`obd_ext.demo.run_demo` returns it)."""
    total = r["parameters"]
    f1 = r["figure1a"]
    mean_db = f1["train_mse_db"]
    cfg = r["config"]
    accs = ", ".join(f"{s['trained']['test']['accuracy']:.3f}" for s in r["per_seed"])
    lines = [
        f"constrained network: {total} parameters; seeds {r['seeds']} (means below: MSE in dB averaged over "
        f"seeds); trained: train MSE {db(r['trained']['train']['mse']):.2f} dB, test accuracy "
        f"{r['trained']['test']['accuracy']:.3f} ({accs})",
        "Figure 1 (no retraining; OBD recomputes the curvature every "
        f"{cfg['obd_step']:.2%} of the parameters; pred = OBD's predicted objective):",
        f"{'remaining':>9} {'frac':>5} {'OBD dB':>7} {'static':>7} {'mag dB':>7} {'rand dB':>7} {'pred dB':>7} "
        f"{'test acc':>8}",
    ]
    nore = r["figure2"]["without_retraining"]
    for i, rem in enumerate(f1["remaining"]):
        lines.append(f"{rem:>9} {rem / total:>5.2f} {mean_db['obd'][i]:>7.2f} {mean_db['obd_static'][i]:>7.2f} "
                     f"{mean_db['magnitude'][i]:>7.2f} {mean_db['random'][i]:>7.2f} "
                     f"{r['figure1b']['predicted_db'][i]:>7.2f} {nore[i]['test_accuracy']:>8.3f}")
    lines.append(f"Figure 2 (with retraining: {cfg['method']}, {cfg['schedule']} schedule, {cfg['retrain_steps']} "
                 "steps per round):")
    lines.append(f"{'remaining':>9} {'frac':>5} {'train dB':>8} {'test dB':>8} {'test acc':>8}")
    for e in r["figure2"]["with_retraining"]:
        lines.append(f"{e['remaining']:>9} {e['remaining'] / total:>5.2f} {db(e['train_mse']):>8.2f} "
                     f"{db(e['test_mse']):>8.2f} {e['test_accuracy']:>8.3f}")
    return "\n".join(lines)
