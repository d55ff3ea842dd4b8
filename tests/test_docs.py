"""Every code block of README.md and docs/*.md runs as written.

Python blocks are executed, each in a fresh namespace and a scratch working
directory. Shell blocks hold one command per line, and each kind is handled
here explicitly, so a new kind of command in the docs fails this test until
someone decides how to run it:

- ``obd-ext prune-llm ...`` runs against a tiny Llama built from a config and a
  calibration text, saved under the names the docs use, with
  ``--nsamples 4 --seq-len 16`` added so it takes seconds (a ``--device cuda``
  line on a machine without CUDA must fail cleanly: one line, exit 2);
- ``torchrun ... examples/distributed_prune.py ...`` runs as written;
- the install / test / demo chains are CI's own commands: the test command must
  be in ``.ci/run`` verbatim (CI runs it), the demo command's options are parsed
  by the CLI (its full run, the main job, takes minutes; tests/test_demo.py runs
  its quick form), and the plain install is the test command's install with the
  ``llm`` extra (``.ci/check_wheel.sh`` installs the same way, without ``-e``).
"""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"```(\w+)\n(.*?)```", flags=re.S)


def _blocks(lang):
    out = []
    for path in DOCS:
        for i, (tag, body) in enumerate(FENCE.findall(path.read_text())):
            if tag == lang:
                out.append(pytest.param(path, body, id=f"{path.relative_to(ROOT)}#{i}"))
    return out


def _commands():
    out = []
    for path in DOCS:
        for tag, body in FENCE.findall(path.read_text()):
            if tag in ("bash", "sh", "shell", "console"):
                for line in body.splitlines():
                    if line.strip() and not line.strip().startswith("#"):
                        out.append(pytest.param(path, line.strip(), id=f"{path.name}:{line.strip()[:60]}"))
    return out


def test_every_fenced_block_has_a_known_language():
    """Unknown tags would be skipped silently by the tests below."""
    known = {"python", "bash", "text", ""}
    for path in DOCS:
        for tag, _ in FENCE.findall(path.read_text()):
            assert tag in known, f"{path.name}: code block tagged {tag!r}: tag it python, bash or text"


@pytest.mark.parametrize("path, code", _blocks("python"))
def test_python_block_runs(path, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(code, str(path), "exec"), {"__name__": "__docs__"})


def _ci_text():
    return (ROOT / ".ci" / "run").read_text()


def _test_command():
    lines = [c for p in _commands() for c in [p.values[1]] if "pytest" in c]
    assert len(set(lines)) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def llm_workspace(tmp_path_factory):
    """The names the docs use: ``my-llama`` (a tiny random Llama) and ``calib.txt``."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_layerwise import TEXT, save_tiny_lm

    d = tmp_path_factory.mktemp("docs_llm")
    save_tiny_lm("llama", d / "my-llama")
    (d / "calib.txt").write_text(TEXT * 3)
    return d


@pytest.mark.parametrize("path, line", _commands())
def test_shell_command_runs(path, line, tmp_path, request):
    ci = _ci_text()
    argv = shlex.split(line)
    if line == _test_command():
        assert line in ci, "CI must run the docs' test command verbatim"
        assert "torch==2.13.0" in line
        return
    if "obd-ext demo" in line and "&&" in line:
        install, _, demo = line.rpartition("&&")
        assert install.strip() == _test_command().rpartition("&&")[0].strip().replace('".[test]"', '".[demo]"')
        from obd_ext.cli import build_parser

        args = build_parser().parse_args(shlex.split(demo)[1:])
        assert args.command == "demo"
        return
    if argv[:2] == ["pip", "install"] and "&&" in line:
        expected = _test_command().rpartition("&&")[0].strip().replace('-e ".[test]"', '".[llm]"')
        assert line == expected
        return
    if argv[0] == "obd-ext" and argv[1] == "prune-llm":
        pytest.importorskip("transformers")
        work = request.getfixturevalue("llm_workspace")
        out_dir = work / argv[argv.index("--out") + 1]
        shutil.rmtree(out_dir, ignore_errors=True)
        env_argv = [sys.executable, "-m", "obd_ext"] + argv[1:] + ["--nsamples", "4", "--seq-len", "16",
                                                                   "--no-progress"]
        r = subprocess.run(env_argv, cwd=work, capture_output=True, text=True, timeout=600)
        if "--device" in argv and argv[argv.index("--device") + 1].startswith("cuda") \
                and not torch.cuda.is_available():
            assert r.returncode == 2 and "cuda" in r.stderr.lower() and "Traceback" not in r.stderr, r.stderr
            return
        assert r.returncode == 0, r.stderr
        assert (out_dir / "prune_report.json").exists() and (out_dir / "config.json").exists()
        return
    if argv[0] == "torchrun":
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run"] + argv[1:], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return
    raise AssertionError(f"{path.name}: no rule to run {line!r}: add one to tests/test_docs.py")
