"""The benchmarks run (tiny sizes): they check correctness before timing and write JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def _quality_bench():
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_llm_quality

    return bench_llm_quality


def test_bench_llm_quality_conv1d_to_linear():
    """llm-compressor gets GPT-2 with its Conv1D layers as the equal nn.Linear: the same function."""
    import torch

    tf = pytest.importorskip("transformers")
    bench = _quality_bench()
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16)).eval()
    ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        before = model(ids).logits
        assert bench.conv1d_to_linear_(model) == 8  # c_attn, c_proj, c_fc, mlp.c_proj per block
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-6, rtol=0)
    assert all(type(m).__name__ != "Conv1D" for m in model.modules())
    names = bench.block_layer_names(model)
    assert names[0] == "transformer.h.0.attn.c_attn" and len(names) == 8


def test_bench_llm_quality_skips_llm_compressor_when_missing():
    import importlib.util

    if importlib.util.find_spec("llmcompressor") is not None:
        pytest.skip("llmcompressor is installed here")
    bench = _quality_bench()
    with pytest.raises(bench.Skip, match="llmcompressor is not importable"):
        bench.llmc_prune(None, None, [], "llmc-wanda", "2:4")


@pytest.mark.slow
def test_bench_llm_quality_quick(tmp_path):
    """End to end on a model trained for one step (about a minute on two cores)."""
    model_dir = tmp_path / "m"
    proc = subprocess.run([sys.executable, "bench/train_tiny_gpt.py", "--arch", "llama", "--steps", "1", "--n-embd",
                           "32", "--n-layer", "1", "--n-head", "2", "--vocab-size", "300", "--seq-len", "32",
                           "--batch", "2", "--threads", "1", "--eval-every", "1000", "--eval-blocks", "2",
                           "--max-train-tokens", "20000", "--no-progress", "--out", str(model_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = run(["bench/bench_llm_quality.py", "--model", str(model_dir), "--nsamples", "4", "--batch", "2",
               "--seq-len", "32", "--eval-tokens", "256", "--methods", "magnitude,obd-row,wanda,obs,llmc-wanda"],
              tmp_path)
    rows = {(r["pattern"], r["method"]): r for r in res["results"]}
    assert rows[("unstructured", "wanda")]["mask_mismatch_vs_obd_row"] == 0
    for pattern in ("unstructured", "2:4"):
        for method in ("magnitude", "obd-row", "obs"):
            r = rows[(pattern, method)]
            assert "problem" not in r and abs(r["sparsity"] - 0.5) < 0.01 and r["seconds"] > 0
    if ("2:4", "llmc-wanda") in rows:
        assert rows[("2:4", "llmc-wanda")]["mask_mismatch_vs_obd_row"] == 0
    else:
        assert any("llmc-wanda" in n and "skipped" in n for n in res["notes"])
