"""`obd-ext demo` (the paper's experiment) runs end to end, reproduces the paper's orderings, and checks its claims.

A quick run checks only the claims it can establish and says which it skipped and why; it never prints FAIL
for a claim that needs the full run.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from obd_ext.demo import CLAIMS, DEFAULTS, FIGURES, QUICK, check_claims, format_claims, resolve_config, run_demo

ROOT = Path(__file__).resolve().parents[1]
CHECKED_QUICK = ["random_worst", "prediction", "retraining"]


def test_demo_quick_cli(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "obd_ext", "demo", "--quick", "--out", str(out), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "remaining" in proc.stdout and "claims check" in proc.stdout  # the printed tables and the check
    # Three claims checked (each with its measured value and threshold), the full-run claim skipped, no FAIL.
    lines = proc.stdout.splitlines()
    checked = [ln for ln in lines if ln.startswith("  PASS  ")]
    assert len(checked) == 3 and all("(needs " in ln for ln in checked), proc.stdout[-3000:]
    skipped = [ln for ln in lines if ln.startswith("  SKIP  ")]
    assert len(skipped) == 1 and "1500 epochs" in skipped[0] and "OBD's training MSE" in skipped[0]
    assert "FAIL" not in proc.stdout
    assert "3 of the 3 claims checked hold; skipped 1 this run cannot establish: obd_below_magnitude" in proc.stdout
    for name in ("fig1a.png", "fig1b.png", "fig2.png", "results.json", "saliency_report.json", "saliency_layers.png",
                 "saliency_units.png", "rounds.png"):
        assert (out / name).stat().st_size > 0, name
    r = json.loads((out / "results.json").read_text())
    total = r["parameters"]
    assert r["seeds"] == [0, 1] and [s["seed"] for s in r["per_seed"]] == [0, 1] and r["config"]["quick"]
    assert r["config"]["method"] == "obd" and "criterion" not in r["config"]
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
    assert set(CLAIMS) <= set(c) and "dB" in c["averaging"]
    assert c["checked"] == CHECKED_QUICK and c["skipped"] == ["obd_below_magnitude"] and c["all_pass"]
    for k in CLAIMS:
        assert isinstance(c[k]["claim"], str) and c[k]["remaining"] and c[k]["threshold"], k
    for k in CHECKED_QUICK:
        assert c[k]["pass"] is True and c[k]["status"] == "pass", k
    c1 = c["obd_below_magnitude"]
    assert c1["pass"] is None and c1["status"] == "skipped" and "1500" in c1["skipped_because"]
    assert c1["remaining"] == [rem[i] for i in paper_range] and len(c1["margin_db"]) == 4  # measured all the same


def _fake(obd, mag, rnd, pred, acc, total=100, epochs=1500):
    """A results dict on a 10% grid from 100% to 20% remaining."""
    rem = [total - 10 * i for i in range(9)]
    db = {"obd": obd, "magnitude": mag, "random": rnd, "obd_static": mag}
    return {"parameters": total, "seeds": [0], "config": {"epochs": epochs},
            "figure1a": {"remaining": rem, "train_mse_db": db},
            "figure1b": {"remaining": rem, "predicted_db": pred, "actual_db": obd},
            "figure2": {"with_retraining": [{"remaining": n, "test_accuracy": a} for n, a in zip(rem, acc)]}}


OBD = [-30, -30, -29, -28, -26, -24, -20, -15, -10]
MAG = [-30, -29, -27.5, -26, -24, -22, -15, -10, -5]
RND = [-30, -5, 0, 1, 1, 1, 1, 1, 1]
ACC = [0.97, 0.97, 0.97, 0.968, 0.965, 0.963, 0.962, 0.95, 0.9]


def test_check_claims_levels():
    obd, mag, rnd, acc = OBD, MAG, RND, ACC
    c = check_claims(_fake(obd, mag, rnd, obd, acc))
    assert c["all_pass"] and c["checked"] == list(CLAIMS) and c["skipped"] == []
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
    assert not bad["retraining"]["pass"] and bad["retraining"]["status"] == "fail" and not bad["all_pass"]
    text = format_claims(bad)
    assert "  FAIL  with retraining" in text and "3 of 4 claims hold (failed: retraining)" in text
    assert "all 4 claims hold" in format_claims(c)


def test_check_claims_skips_what_a_short_training_cannot_show():
    # OBD only 0.5 dB below magnitude at 80% remaining: a FAIL after the full training, a SKIP after 800 epochs.
    mag = [m if i != 2 else OBD[2] + 0.5 for i, m in enumerate(MAG)]
    full = check_claims(_fake(OBD, mag, RND, OBD, ACC, epochs=DEFAULTS["epochs"]))
    assert full["obd_below_magnitude"]["status"] == "fail" and not full["all_pass"]
    quick = check_claims(_fake(OBD, mag, RND, OBD, ACC, epochs=QUICK["epochs"]))
    c1 = quick["obd_below_magnitude"]
    assert c1["status"] == "skipped" and c1["pass"] is None and "1500 epochs" in c1["skipped_because"]
    assert c1["min_margin_db"] == 0.5  # still measured, for information
    assert quick["checked"] == CHECKED_QUICK and quick["skipped"] == ["obd_below_magnitude"] and quick["all_pass"]
    text = format_claims(quick)
    assert "FAIL" not in text and text.count("  PASS  ") == 3 and text.count("  SKIP  ") == 1
    assert "this run measured: smallest margin 0.50 dB" in text
    assert "skipped 1 this run cannot establish: obd_below_magnitude" in text
    # a checked claim that misses is still a FAIL in a quick run
    bad = check_claims(_fake(OBD, mag, RND[:-1] + [-20], OBD, ACC, epochs=QUICK["epochs"]))
    assert bad["random_worst"]["status"] == "fail" and not bad["all_pass"]
    assert "0 of the 3 claims checked hold" not in format_claims(bad) and "2 of the 3 claims checked hold" in \
        format_claims(bad)


def test_check_claims_skips_a_claim_without_grid_levels():
    r = _fake(OBD, MAG, RND, OBD, ACC)
    r["figure1a"]["remaining"] = [100, 90, 40, 30, 20, 15, 12, 11, 10]  # nothing between 80% and 50% remaining
    c = check_claims(r)
    assert c["obd_below_magnitude"]["status"] == "skipped" and "no level" in c["obd_below_magnitude"]["skipped_because"]
    assert "obd_below_magnitude" in c["skipped"]


def test_demo_settings_are_checked_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="method='exact' is not accepted by obd-ext demo"):
        resolve_config(False, {"method": "exact"})
    with pytest.raises(ValueError, match="method must be one of .* got 'criterion'"):
        resolve_config(False, {"method": "criterion"})
    with pytest.raises(ValueError, match="random_draws must be at least 1, got 0"):
        resolve_config(True, {"random_draws": 0})
    with pytest.raises(ValueError, match="unknown demo setting 'criterion'"):
        resolve_config(True, {"criterion": "obd"})
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="schedule must be one of"):
        run_demo(str(out), schedule="linear", progress=False)
    with pytest.raises(ValueError, match="jobs must be at least 0"):
        run_demo(str(out), jobs=-1, progress=False)
    assert not out.exists()
    assert resolve_config(True, {"method": "lm", "seeds": None}) == {**QUICK, "method": "lm"}


_FIGURES = """
import json, sys
import matplotlib
matplotlib.use("svg")  # the user's choice, which the demo's figures must leave alone
before = matplotlib.get_backend()
from obd_ext.demo import aggregate, plot_figures
runs = json.loads(sys.argv[2])
r = {**aggregate(runs), "per_seed": runs, "config": {"method": "lm", "schedule": "cubic"}}
plot_figures(r, sys.argv[1])
print("BACKEND", before, matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
"""


def _seed_run(seed, scale):
    """A synthetic run_seed result on a 3-level grid (the figures need nothing else)."""
    rem = [100, 60, 20]
    mse = [0.01 * scale, 0.02 * scale, 0.2 * scale]
    rows = [{"remaining": n, "train_mse": m, "test_mse": 2 * m, "test_accuracy": 0.9 - m} for n, m in zip(rem, mse)]
    return {"seed": seed, "parameters": 100, "negative_curvature_entries": 0,
            "trained": {"train": {"mse": mse[0], "accuracy": 0.99}, "test": {"mse": 2 * mse[0], "accuracy": 0.95}},
            "figure1a": {"remaining": rem, "train_mse": {"obd": mse, "obd_static": mse, "magnitude": mse,
                                                          "random": [10 * m for m in mse]}},
            "figure1b": {"remaining": rem, "predicted_mse": mse, "actual_mse": mse, "static_predicted_mse": mse,
                         "static_actual_mse": mse},
            "figure2": {"with_retraining": rows, "without_retraining": rows}}


def test_demo_figures_keep_the_backend_and_write_png(tmp_path):
    """The demo's figures: written as PNG, the user's matplotlib backend untouched, pyplot never imported."""
    runs = [_seed_run(0, 1.0), _seed_run(1, 1.5)]
    proc = subprocess.run([sys.executable, "-c", _FIGURES, str(tmp_path), json.dumps(runs)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "BACKEND svg svg False" in proc.stdout
    for name in FIGURES:
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name


def test_demo_help_documents_every_option():
    proc = subprocess.run([sys.executable, "-m", "obd_ext", "demo", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    for opt in ("--out", "--seed", "--seeds", "--jobs", "--epochs", "--lr", "--retrain-steps", "--random-draws",
                "--levels", "--min-remaining", "--obd-step", "--method", "--schedule", "--quick",
                "--no-progress", "obd,lm,fisher,magnitude", "levels,cubic"):
        assert opt in proc.stdout, opt
    assert "--criterion" not in proc.stdout


def test_every_option_is_a_run_demo_keyword(monkeypatch):
    """The CLI passes each parsed option to run_demo under its own name (out and no_progress aside)."""
    import argparse
    import inspect

    import obd_ext.demo.run as run_module
    from obd_ext.demo import add_arguments, run_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    dests = set(vars(p.parse_args([])))
    keywords = set(inspect.signature(run_demo).parameters)
    assert dests - {"out", "no_progress"} <= keywords and {"out_dir", "progress"} <= keywords
    seen = {}
    monkeypatch.setattr(run_module, "run_demo", lambda out_dir, **kw: seen.update(out_dir=out_dir, **kw))
    run_from_args(p.parse_args(["--quick", "--method", "fisher", "--out", "d", "--no-progress", "--seeds", "3"]))
    assert seen["out_dir"] == "d" and seen["method"] == "fisher" and seen["quick"] and seen["seeds"] == 3
    assert seen["progress"] is False and seen["epochs"] is None
