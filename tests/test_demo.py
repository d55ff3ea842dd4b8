"""`obd-ext demo` (the paper's experiment) runs end to end and reproduces the paper's qualitative results."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_cli(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "obd_ext", "demo", "--out", str(out), "--epochs", "1500",
                           "--retrain-steps", "50", "--levels", "20", "--random-draws", "2", "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "remaining" in proc.stdout  # the printed table
    for name in ("fig1a.png", "fig1b.png", "fig2.png", "results.json", "saliency_report.json", "saliency_layers.png",
                 "saliency_units.png", "rounds.png"):
        assert (out / name).stat().st_size > 0, name
    r = json.loads((out / "results.json").read_text())
    f1 = r["figure1a"]
    assert f1["remaining"][0] == r["parameters"] and len(f1["remaining"]) == 20
    obd, mag, rnd = (f1["train_mse_db"][k] for k in ("obd", "magnitude", "random"))
    # Figure 1a: random deletion is far worse than both; OBD is no worse than magnitude on the whole
    assert sum(rnd[1:4]) > sum(obd[1:4]) + 10 and sum(obd) <= sum(mag) + 1e-9
    # Figure 1b: prediction and actual agree at the first deletion step
    b = r["figure1b"]
    assert abs(b["predicted_mse"][1] - b["actual_mse"][1]) < 0.5 * b["actual_mse"][1] + 1e-3
    # Figure 2: with retraining, test accuracy holds better than without
    with_r = [e["test_accuracy"] for e in r["figure2"]["with_retraining"]]
    without = [e["test_accuracy"] for e in r["figure2"]["without_retraining"]]
    assert len(with_r) == len(without) == 20 and with_r[-2] >= without[-2]


def test_demo_help_documents_every_option():
    proc = subprocess.run([sys.executable, "-m", "obd_ext", "demo", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    for opt in ("--out", "--seed", "--epochs", "--retrain-steps", "--random-draws", "--levels", "--no-progress"):
        assert opt in proc.stdout
