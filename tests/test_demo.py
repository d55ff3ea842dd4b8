"""`obd-ext demo` (the paper's experiment) runs end to end, reproduces the paper's orderings, and checks its claims."""

import json
import subprocess
import sys
from pathlib import Path

from obd_ext.demo import check_claims

ROOT = Path(__file__).resolve().parents[1]
CLAIMS = ("obd_below_magnitude", "random_worst", "prediction", "retraining")


def test_demo_quick_cli(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "obd_ext", "demo", "--quick", "--out", str(out), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "remaining" in proc.stdout and "claims check" in proc.stdout  # the printed tables and the check
    assert sum(proc.stdout.count(v) for v in ("PASS ", "FAIL ")) == 4
    for name in ("fig1a.png", "fig1b.png", "fig2.png", "results.json", "saliency_report.json", "saliency_layers.png",
                 "saliency_units.png", "rounds.png"):
        assert (out / name).stat().st_size > 0, name
    r = json.loads((out / "results.json").read_text())
    total = r["parameters"]
    assert r["seeds"] == [0, 1] and [s["seed"] for s in r["per_seed"]] == [0, 1] and r["config"]["quick"]
    f1 = r["figure1a"]
    rem = f1["remaining"]
    assert rem[0] == total and len(rem) == 9 and abs(rem[-1] / total - 0.2) < 1e-3
    for s in r["per_seed"]:
        assert s["figure1a"]["remaining"] == rem and set(s["figure1a"]["train_mse"]) == set(f1["train_mse_db"])
    obd, mag, rnd = (f1["train_mse_db"][k] for k in ("obd", "magnitude", "random"))
    # Figure 1a, seed means: OBD below magnitude from 80% to 50% remaining, random worst at every level deleted
    paper_range = [i for i, n in enumerate(rem) if 0.5 - 1e-9 <= n / total <= 0.8 + 1e-9]
    assert len(paper_range) == 4
    assert all(obd[i] < mag[i] for i in paper_range), (obd, mag)
    assert all(rnd[i] > max(obd[i], mag[i]) for i in range(1, len(rem))), (rnd, obd, mag)
    # Figure 1b: the prediction follows the actual objective at the first deletion level
    b = r["figure1b"]
    assert abs(b["predicted_db"][1] - b["actual_db"][1]) < 1.0
    # Figure 2: with retraining, test accuracy holds better than without at the last level
    with_r = [e["test_accuracy"] for e in r["figure2"]["with_retraining"]]
    without = [e["test_accuracy"] for e in r["figure2"]["without_retraining"]]
    assert len(with_r) == len(without) == 9 and with_r[-1] > without[-1]
    # The claims check: each claim with its statement, numbers and verdict, stored as printed
    c = r["claims"]
    assert set(CLAIMS) <= set(c) and isinstance(c["all_pass"], bool) and "dB" in c["averaging"]
    for k in CLAIMS:
        assert isinstance(c[k]["claim"], str) and isinstance(c[k]["pass"], bool) and c[k]["remaining"], k
    assert c["obd_below_magnitude"]["remaining"] == [rem[i] for i in paper_range]
    assert c["random_worst"]["pass"] and c["prediction"]["pass"]
    assert c["all_pass"] == all(c[k]["pass"] for k in CLAIMS)


def _fake(obd, mag, rnd, pred, acc, total=100):
    """A results dict on a 10% grid from 100% to 20% remaining."""
    rem = [total - 10 * i for i in range(9)]
    db = {"obd": obd, "magnitude": mag, "random": rnd, "obd_static": mag}
    return {"parameters": total, "seeds": [0],
            "figure1a": {"remaining": rem, "train_mse_db": db},
            "figure1b": {"remaining": rem, "predicted_db": pred, "actual_db": obd},
            "figure2": {"with_retraining": [{"remaining": n, "test_accuracy": a} for n, a in zip(rem, acc)]}}


def test_check_claims_levels():
    obd = [-30, -30, -29, -28, -26, -24, -20, -15, -10]
    mag = [-30, -29, -27.5, -26, -24, -22, -15, -10, -5]
    rnd = [-30, -5, 0, 1, 1, 1, 1, 1, 1]
    acc = [0.97, 0.97, 0.97, 0.968, 0.965, 0.963, 0.962, 0.95, 0.9]
    c = check_claims(_fake(obd, mag, rnd, obd, acc))
    assert c["all_pass"]
    assert c["obd_below_magnitude"]["remaining"] == [80, 70, 60, 50]  # 80% .. 50% remaining, both ends included
    assert c["obd_below_magnitude"]["min_margin_db"] == 1.5
    assert c["random_worst"]["remaining"] == [90, 80, 70, 60, 50, 40, 30, 20]  # every level with deletions
    assert c["prediction"]["remaining"] == [100, 90, 80, 70]  # up to 30% deleted
    assert c["retraining"]["remaining"] == [90, 80, 70, 60, 50, 40]  # up to 60% deleted
    assert abs(c["retraining"]["max_drop_points"] - 0.8) < 1e-9
    # each claim fails on its own when its numbers miss
    assert not check_claims(_fake(obd, [m if i != 5 else obd[5] - 0.5 for i, m in enumerate(mag)], rnd, obd,
                                  acc))["obd_below_magnitude"]["pass"]
    assert not check_claims(_fake(obd, mag, rnd[:-1] + [-20], obd, acc))["random_worst"]["pass"]
    assert not check_claims(_fake(obd, mag, rnd, [o - (1.5 if i == 3 else 0) for i, o in enumerate(obd)],
                                  acc))["prediction"]["pass"]
    assert check_claims(_fake(obd, mag, rnd, [o - (1.5 if i == 4 else 0) for i, o in enumerate(obd)],
                              acc))["prediction"]["pass"]  # 40% deleted is beyond the claim
    bad = check_claims(_fake(obd, mag, rnd, obd, acc[:6] + [0.955] + acc[7:]))
    assert not bad["retraining"]["pass"] and not bad["all_pass"]


def test_demo_help_documents_every_option():
    proc = subprocess.run([sys.executable, "-m", "obd_ext", "demo", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    for opt in ("--out", "--seed", "--seeds", "--jobs", "--epochs", "--lr", "--retrain-steps", "--random-draws",
                "--levels", "--min-remaining", "--obd-step", "--criterion", "--schedule", "--quick",
                "--no-progress", "obd,lm,fisher,magnitude", "levels,cubic"):
        assert opt in proc.stdout, opt
