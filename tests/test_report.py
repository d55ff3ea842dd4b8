"""Saliency report: per-layer and per-unit numbers match the ops, and the charts are written."""

import json

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
