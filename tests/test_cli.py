"""The obd-ext command line: errors early, on one line, with exit status 2; --version; --no-eval; the report.

Most cases run ``main([...])`` in-process with a model loader that fails the
test if called, so they prove that the error came before any model loaded.
One case runs ``python -m obd_ext`` as a subprocess to check the real exit
status and stderr.
"""

import json
import subprocess
import sys

import pytest
import torch

import obd_ext
from obd_ext import cli
from obd_ext.layerwise import hf

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A tiny random GPT-2 with its tokenizer, saved with save_pretrained (built, never downloaded)."""
    from test_layerwise import save_tiny_lm

    return save_tiny_lm("gpt2", tmp_path_factory.mktemp("gpt2") / "model")


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    import inspect

    from test_layerwise import TEXT

    d = tmp_path_factory.mktemp("texts")
    (d / "calib.txt").write_text(TEXT)
    (d / "eval.txt").write_text(inspect.getsource(pytest.approx)[:1500])
    return d / "calib.txt", d / "eval.txt"


@pytest.fixture()
def config_only(tmp_path):
    """A model directory with a config and nothing to load: every check passes, loading would fail."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 64}))
    return d


@pytest.fixture()
def no_loading(monkeypatch):
    """Fail the test if a model or tokenizer is loaded."""

    def never(*a, **kw):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(hf, "_load_model", never)
    monkeypatch.setattr(hf, "_load_tokenizer", never)


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("obd-ext: error: ") and "Traceback" not in err, err
    return lines[0]


def test_version(capsys):
    code, out, err = _run(capsys, "--version")
    assert code == 0 and not err
    assert f"obd-ext {obd_ext.__version__}" in out and f"torch {torch.__version__}" in out
    import transformers

    assert f"transformers {transformers.__version__}" in out


def test_help_is_plain_with_defaults_and_the_methods(capsys):
    from obd_ext.vocabulary import LLM_METHODS, METHODS

    code, out, err = _run(capsys, "prune-llm", "--help")
    assert code == 0
    for markup in ("``", ":func:", ":mod:", ":class:", ".. "):
        assert markup not in out, markup
    for default in ("(default: layerwise-obs)", "(default: unstructured)", "(default: 128)", "(default: 0)",
                    "default: 0.5 for", "default: layer for layerwise-obs, row for layerwise-obd"):
        assert default in " ".join(out.split()), default
    flat = " ".join(out.split())
    for name in LLM_METHODS:
        assert f"{name} {METHODS[name].summary}; cost: {METHODS[name].cost}" in flat, name
    code, out, err = _run(capsys, "--help")
    assert code == 0 and "prune-llm" in out and "exit status" in out


@pytest.mark.parametrize("args, message", [
    (["--nsamples", "0"], "argument --nsamples: must be an integer >= 1, got 0"),
    (["--seq-len", "0"], "argument --seq-len: must be an integer >= 1, got 0"),
    (["--sparsity", "1.5"], r"argument --sparsity: must be a number in [0, 1], got 1.5"),
    (["--sparsity", "half"], "argument --sparsity: must be a number in [0, 1], got 'half'"),
    (["--pattern", "2-4"], "argument --pattern: pattern must be 'unstructured' or 'N:M'"),
    (["--pattern", "4:2"], "need 0 < N < M"),
    (["--method", "layerwise"], "argument --method: invalid choice: 'layerwise'"),
    (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    (["--device", "nonsense"], "argument --device: 'nonsense' is not a device"),
    (["--scope", "block"], "argument --scope: invalid choice: 'block'"),
    (["--pattern", "2:4", "--sparsity", "0.7"], "pattern='2:4' deletes 2 of every 4 (sparsity 0.5); sparsity=0.7 "
                                                "conflicts with it"),
    (["--pattern", "2:4", "--scope", "global"], "pattern='2:4' selects within rows; scope must be None or 'row'"),
    (["--seq-len", "65"], "seq_len=65 exceeds the model's context of 64 tokens"),
    (["--seq-len", "1"], "--seq-len must be >= 2 to measure perplexity"),
    (["--no-eval", "--eval", "{eval}"], "--eval and --no-eval contradict each other"),
    (["--eval", "{missing}"], "--eval: no such file"),
    (["--calib", "{missing}"], "--calib: no such file"),
    (["--calib", "{dir}"], "--calib: is a directory, not a text file"),
    (["--method", "layerwise-obd", "--blocksize", "64"], "--blocksize applies to --method layerwise-obs only, not --method layerwise-obd"),
    (["--method", "magnitude", "--damp", "0.1"], "--damp applies to --method layerwise-obs only"),
    (["--method", "lm", "--sequential"], "--sequential applies to the layer-wise methods"),
    (["--method", "layerwise-obs", "--blocksize", "0"], "argument --blocksize: must be an integer >= 1, got 0"),
    (["--method", "layerwise-obs", "--scope", "global"], "method='layerwise-obs' selects per 'row' or per 'layer'"),
    (["--method", "layerwise-obs", "--pattern", "2:4", "--blocksize", "6"], "blocksize to be a multiple of 4"),
])
def test_bad_arguments_are_one_line_and_exit_2_before_loading(capsys, config_only, texts, tmp_path, no_loading,
                                                              args, message):
    calib, eval_text = texts
    fill = {"{missing}": str(tmp_path / "missing.txt"), "{dir}": str(tmp_path), "{eval}": str(eval_text)}
    args = [fill.get(a, a) for a in args]
    base = ["prune-llm", str(config_only), "--out", str(tmp_path / "out"), "--no-progress"]
    if "--calib" not in args:
        base += ["--calib", str(calib)]
    code, out, err = _run(capsys, *base, *args)
    assert code == 2 and not out
    assert message in _one_error_line(err)
    assert not (tmp_path / "out").exists()  # nothing written


def test_missing_model_dir_and_config(capsys, tmp_path, texts, no_loading):
    calib, _ = texts
    code, _, err = _run(capsys, "prune-llm", str(tmp_path / "nope"), "--calib", str(calib), "--out",
                        str(tmp_path / "o"))
    assert code == 2 and "MODEL_DIR: no such directory" in _one_error_line(err)
    code, _, err = _run(capsys, "prune-llm", str(tmp_path), "--calib", str(calib), "--out", str(tmp_path / "o"))
    assert code == 2 and "MODEL_DIR: " in _one_error_line(err) and "holds no config.json" in err


def test_missing_required_arguments(capsys):
    code, _, err = _run(capsys, "prune-llm", "somewhere")
    assert code == 2 and "the following arguments are required: --out, --calib" in _one_error_line(err)
    code, _, err = _run(capsys)
    assert code == 2 and "required: COMMAND" in _one_error_line(err)


def test_out_in_the_model_directory_is_refused(capsys, config_only, texts, tmp_path, no_loading):
    calib, _ = texts
    base = ["prune-llm", str(config_only), "--calib", str(calib)]
    code, _, err = _run(capsys, *base, "--out", str(config_only))
    assert code == 2 and "--out: " in err and "is the model directory" in _one_error_line(err)
    code, _, err = _run(capsys, *base, "--out", str(config_only / "pruned"))
    assert code == 2 and "is inside the model directory" in _one_error_line(err)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    code, _, err = _run(capsys, *base, "--out", str(full))
    assert code == 2 and "exists and is not empty (pass overwrite" in _one_error_line(err)
    assert sorted(p.name for p in config_only.iterdir()) == ["config.json"]
    assert (full / "keep.txt").read_text() == "mine"


def test_library_errors_after_parsing_are_one_line(capsys, tiny_gpt2, tmp_path, monkeypatch):
    short = tmp_path / "short.txt"
    short.write_text("def f(): pass\n")

    def never(*a, **kw):
        raise AssertionError("the model was loaded although the text is too short")

    monkeypatch.setattr(hf, "_load_model", never)
    code, out, err = _run(capsys, "prune-llm", str(tiny_gpt2), "--calib", str(short), "--out", str(tmp_path / "o"),
                          "--no-eval", "--seq-len", "16", "--no-progress")
    assert code == 2
    assert "the calibration text has" in _one_error_line(err)


def test_internal_errors_exit_1_and_debug_shows_the_traceback(capsys, config_only, texts, tmp_path, monkeypatch):
    calib, _ = texts

    def boom(*a, **kw):
        raise RuntimeError("CUDA out of memory\nTried to allocate 2 GiB")

    monkeypatch.setattr(hf, "prune_llm", boom)
    argv = ["prune-llm", str(config_only), "--calib", str(calib), "--out", str(tmp_path / "o")]
    code, _, err = _run(capsys, *argv)
    assert code == 1
    assert _one_error_line(err) == ("obd-ext: error: RuntimeError: CUDA out of memory; Tried to allocate 2 GiB "
                                    "(run with --debug for the traceback)")
    code, _, err = _run(capsys, *argv, "--debug")
    assert code == 1 and "Traceback" in err and "in boom" in err
    assert err.strip().splitlines()[-1] == "obd-ext: error: RuntimeError: CUDA out of memory; Tried to allocate 2 GiB"


def test_demo_errors_are_one_line_and_options_reach_run_demo(capsys, monkeypatch, tmp_path):
    import inspect

    from obd_ext import demo

    accepted = set(inspect.signature(demo.run_demo).parameters)
    code, _, err = _run(capsys, "demo", "--epochs", "many")
    assert code == 2 and "argument --epochs: invalid int value: 'many'" in _one_error_line(err)
    seen = {}

    def fake_run_demo(out_dir, **kwargs):
        seen.update(kwargs, out_dir=out_dir)
        raise ValueError("levels must be >= 2, got 1")

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    code, _, err = _run(capsys, "demo", "--out", str(tmp_path / "d"), "--seed", "3", "--no-progress")
    assert code == 2 and _one_error_line(err) == "obd-ext: error: levels must be >= 2, got 1"
    assert seen["out_dir"] == str(tmp_path / "d") and seen["seed"] == 3 and seen["progress"] is False
    assert set(seen) <= accepted  # every demo option reaches run_demo under its own name


def test_no_eval_runs_and_the_report_holds_what_was_used(capsys, tiny_gpt2, texts, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    calib, _ = texts

    def never(*a, **kw):
        raise AssertionError("perplexity evaluated under --no-eval")

    monkeypatch.setattr(hf, "perplexity", never)
    monkeypatch.setattr(hf, "blockwise_perplexity", never)
    out = tmp_path / "pruned"
    code, stdout, err = _run(capsys, "prune-llm", str(tiny_gpt2), "--calib", str(calib), "--out", str(out),
                             "--no-eval", "--nsamples", "4", "--seq-len", "16", "--seed", "7", "--method", "magnitude",
                             "--no-progress")
    assert code == 0, err
    assert "saved to" in stdout and "perplexity" not in stdout
    report = json.loads((out / "prune_report.json").read_text())
    assert report["calib"] == str(calib) and report["calib_portion"] == "all" and report["eval"] is None
    assert (report["seed"], report["nsamples"], report["seq_len"]) == (7, 4, 16)
    assert (report["method"], report["pattern"], report["scope"]) == ("magnitude", "unstructured", "row")
    assert report["detail"]["scope"] == "row" and report["sparsity_target"] == 0.5
    assert report["perplexity_before"] is None and report["perplexity_after"] is None
    assert report["versions"]["obd_ext"] == obd_ext.__version__ and report["versions"]["torch"] == torch.__version__
    assert report["versions"]["transformers"]
    names = [layer["name"] for layer in report["detail"]["layers"]]
    assert names[:4] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
                         "transformer.h.0.mlp.c_proj"]
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    for layer in report["detail"]["layers"]:
        assert int((model.get_submodule(layer["name"]).weight == 0).sum()) == layer["deleted"]
    capsys.readouterr()  # transformers' own loading bar above
    # a second run into the same directory needs --overwrite
    code, _, err = _run(capsys, "prune-llm", str(tiny_gpt2), "--calib", str(calib), "--out", str(out), "--no-eval")
    assert code == 2 and "exists and is not empty" in _one_error_line(err)


def test_as_a_subprocess_exit_2_one_line_no_traceback(tmp_path, config_only):
    proc = subprocess.run([sys.executable, "-m", "obd_ext", "prune-llm", str(config_only), "--calib",
                           str(tmp_path / "missing.txt"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "--calib: no such file" in _one_error_line(proc.stderr)
