"""Saliency report: per-layer and per-unit numbers match the ops, and the charts are written."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import obd_ext
from obd_ext.report import format_report, plot_rounds, saliency_report
from obd_ext.scheduler import OBDScheduler, fixed


def test_report_numbers_and_files(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(30, 6), torch.randint(0, 3, (30,))
    h = obd_ext.hessian_diag(model, nn.CrossEntropyLoss(), (x, y), method="lm", progress=False)
    rep = saliency_report(model, h, out_dir=str(tmp_path))
    layer = {e["name"]: e for e in rep["layers"]}
    w = model[0].weight.detach()
    s = obd_ext.saliency(w, h["0.weight"])
    assert abs(layer["0.weight"]["sum"] - float(s.sum())) < 1e-6
    assert torch.allclose(torch.tensor(layer["0.weight"]["unit_saliency"]), s.sum(1), atol=1e-6)
    assert layer["0.weight"]["least_salient_units"][0] == int(torch.argmin(s.sum(1)))
    assert abs(sum(e["share"] for e in rep["layers"]) - 1) < 1e-6
    for f in ("saliency_report.json", "saliency_layers.png", "saliency_units.png"):
        assert (tmp_path / f).stat().st_size > 0
    assert json.loads((tmp_path / "saliency_report.json").read_text())["layers"][0]["name"] == "0.weight"
    assert "0.weight" in format_report(rep)
    log = OBDScheduler(model, nn.CrossEntropyLoss(), (x, y), None, fixed(0.3, 3), progress=False).run()
    plot_rounds(log, str(tmp_path / "rounds.png"))
    assert (tmp_path / "rounds.png").stat().st_size > 0


_BACKEND_CHECK = """
import sys
import matplotlib
matplotlib.use("svg")  # the user's choice, which obd_ext must leave alone
before = matplotlib.get_backend()
import torch
import torch.nn as nn
import obd_ext
from obd_ext.report import plot_rounds, saliency_report
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
h = {n: torch.rand_like(p) for n, p in model.named_parameters()}
saliency_report(model, h, out_dir=sys.argv[1])
plot_rounds([{"sparsity": 0.1 * i, "predicted_increase": 0.01 * i, "actual_increase": 0.02 * i} for i in (1, 2, 3)],
            sys.argv[1] + "/rounds.png")
print("BACKEND", before, matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
"""


def test_plots_leave_the_backend_alone_and_write_png(tmp_path):
    """saliency_report and plot_rounds draw on their own figures: the backend stays the user's, pyplot unused."""
    proc = subprocess.run([sys.executable, "-c", _BACKEND_CHECK, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "BACKEND svg svg False" in proc.stdout
    for name in ("saliency_layers.png", "saliency_units.png", "rounds.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, name


def test_report_rejects_bad_input_before_writing(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    h = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=r"curvature\['0.weight'\] has shape \(4, 3\), the parameter \(3, 4\)"):
        saliency_report(model, {**h, "0.weight": torch.ones(4, 3)}, out_dir=str(out))
    with pytest.raises(ValueError, match="'1.weight', which is not a parameter"):
        saliency_report(model, h, names=["0.weight", "1.weight"], out_dir=str(out))
    with pytest.raises(ValueError, match="curvature has no entry for parameter '2.bias'"):
        saliency_report(model, {k: v for k, v in h.items() if k != "2.bias"}, names=list(h), out_dir=str(out))
    with pytest.raises(ValueError, match="no parameter of the model has an entry"):
        saliency_report(model, {"x.weight": torch.ones(1)}, out_dir=str(out))
    assert not out.exists()
    png = tmp_path / "rounds.png"
    with pytest.raises(ValueError, match=r"rounds \[1\] of log have non-finite"):
        plot_rounds([{"sparsity": 0.1, "predicted_increase": 0.1, "actual_increase": 0.1},
                     {"sparsity": 0.2, "predicted_increase": 0.1, "actual_increase": float("inf")}], str(png))
    with pytest.raises(ValueError, match="log is empty"):
        plot_rounds([], str(png))
    assert not png.exists()
