"""bench/bench_masked_step.py runs at tiny sizes: every method checked before timing, ratios and memory in the JSON."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_masked_step_quick(tmp_path):
    out = tmp_path / "masked_step.json"
    args = ["bench/bench_masked_step.py", "--quick", "--threads", "1",
            "--methods", "dense,obd_ext,torch.prune,mask multiply,dense-aa", "--json", str(out)]
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = {(r["model"], r["method"]): r for r in res["results"]}
    assert set(rows) == {(m, k) for m in ("mlp", "transformer")
                         for k in ("dense", "obd_ext", "torch.prune", "mask multiply", "dense-aa")}
    for model in ("mlp", "transformer"):
        dense = rows[model, "dense"]
        assert dense["x_dense"] == 1.0 and dense["held_bytes_per_pruned"] == 0
        # The Pruner and the mask multiply pass their correctness check (deleted weights exactly zero
        # after training steps) and are timed against dense in the same run.
        for method in ("obd_ext", "mask multiply"):
            r = rows[model, method]
            assert r["error"] is None, r["error"]
            assert r["x_dense"] > 0 and r["x_dense_cpu"] > 0 and len(r["round_seconds"]) == res["rounds"]
            assert r["held_bytes_per_pruned"] >= 1  # at least a bool mask per pruned entry
        # The A/A control: a second dense copy, timed by the same statistic, holds nothing.
        aa = rows[model, "dense-aa"]
        assert aa["error"] is None and aa["held_bytes_per_pruned"] == 0
        assert aa["x_q1"] <= aa["x_dense"] <= aa["x_q3"]
        # The plain multiply holds exactly its bool masks.
        assert rows[model, "mask multiply"]["held_bytes_per_pruned"] == 1
    # torch.nn.utils.prune runs on the MLP (a float mask plus the recomputed weight: 8 bytes) ...
    assert rows["mlp", "torch.prune"]["error"] is None
    assert rows["mlp", "torch.prune"]["held_bytes_per_pruned"] == 8
    # ... and not on nn.MultiheadAttention, which is reported with its error instead of a number.
    bad = rows["transformer", "torch.prune"]
    assert bad["x_dense"] is None and bad["error"]
    assert "n/a" in proc.stdout
