"""bench/gpu_suite.sh --dry-run: the GPU suite's plumbing, checked on every CI run.

The dry run goes through every stage of the GPU call in its order, under its
time caps, with the sanitizer driver and the benchmarks running their CPU
paths on tiny sizes, and bundles the logs; so the script cannot rot between
the rare runs on a lent GPU (bench/gpu/README.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "bench" / "gpu_suite.sh"
STAGES = ["env", "build", "tests", "memcheck", "racecheck", "initcheck", "synccheck", "ceilings", "select", "llm",
          "squared_mm", "curvature"]


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SUITE), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable})


def test_dry_run_runs_every_stage_in_order_and_bundles(tmp_path):
    out = tmp_path / "suite"
    proc = run("--dry-run", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = [line.split("\t") for line in (out / "summary.tsv").read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == STAGES
    assert all(r[1] == "PASS" for r in rows), rows
    assert all(int(r[2]) <= int(r[3]) + 5 for r in rows), rows  # no stage ran past its cap
    # the summary table is what the run prints last
    assert proc.stdout.rstrip().splitlines()[-1] == "result: PASS"
    with tarfile.open(out / "gpu_suite_bundle.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {f"{s}.log" for s in STAGES} <= names
    assert {"summary.txt", "summary.tsv", "ops.json", "ceilings.json", "sanitize_memcheck.json"} <= names


def test_bad_arguments_are_refused_before_anything_runs(tmp_path):
    for args, message in ((["--bogus"], "unknown argument '--bogus'"), (["--budget", "ten"], "--budget must be"),
                          (["--prebuilt", str(tmp_path / "missing.so")], "is not a file")):
        proc = run("--dry-run", "--out", str(tmp_path / "o"), *args, timeout=30)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
        assert not (tmp_path / "o").exists()


def test_stages_past_the_budget_are_skipped_not_run(tmp_path):
    out = tmp_path / "suite"
    proc = run("--dry-run", "--out", str(out), "--budget", "12", timeout=120)
    rows = [line.split("\t") for line in (out / "summary.tsv").read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == STAGES
    assert any(r[1] == "SKIP(no time)" for r in rows), rows
    assert proc.returncode == 0, proc.stdout[-2000:]
