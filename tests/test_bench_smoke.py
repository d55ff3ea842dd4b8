"""The benchmarks run (tiny sizes): they check correctness before timing and write JSON."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args, tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, *args, "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_bench_select_quick(tmp_path):
    res = run(["bench/bench_select.py", "--quick", "--dists", "normal,all_equal"], tmp_path)
    rows = res["results"]
    obd = [r for r in rows if r["method"] == "obd_ext"]
    assert obd and all(r["exact"] for r in obd)
    assert all(r["x_vs_cat+kthvalue"] > 0 for r in obd)


def test_bench_curvature_quick(tmp_path):
    res = run(["bench/bench_curvature.py", "--quick", "--repeats", "1", "--methods", "fwd+bwd,obd,lm"], tmp_path)
    rows = res["results"]
    assert {r["model"] for r in rows} == {"mlp", "lenet", "resnet", "gpt-v512", "hf-gpt2-gelu_new", "hf-llama"}
    assert len(rows) == 6 * 3  # every method ran on every model (a failure is printed, not a row)
    assert all(r["x_fwd_bwd"] > 0 for r in rows)


def test_bench_llm_quick(tmp_path):
    res = run(["bench/bench_llm.py", "--quick"], tmp_path)
    rows = res["results"]
    assert {r["pattern"] for r in rows} == {"unstructured", "2:4"}
    assert all(r["mask_mismatch"] < 1e-3 and r["model_s"] > 0 for r in rows)
