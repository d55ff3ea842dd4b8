"""The scheduler refuses the wrong checkpoint and nonsense arguments (issue 14, item 6).

Each case measured in the issue has a test here: a different schedule or
optimizer with the same checkpoint, flipped bytes inside a weight, a truncated
file, temporary files of killed writes, a NaN budget and empty data. The
table-driven tests check that after every error nothing changed: not the
weights, not the optimizer state, not a byte of any file.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from obd_ext.checkpoints import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    previous_path,
    read_checkpoint,
    read_header,
    remove_stale_temporaries,
    write_checkpoint,
)
from obd_ext.scheduler import OBDScheduler, fixed

SCHEDULE = fixed(0.3, 3)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)


def _make(ckpt=None, optimizer="adam", build=True, **kw):
    """A fresh model, optimizer and scheduler, identical on every call with the same arguments."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))
    x, y = _data()
    opt = (torch.optim.Adam(model.parameters(), lr=0.01) if optimizer == "adam"
           else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    loss_fn = nn.CrossEntropyLoss()

    def train(r):
        for _ in range(5):
            idx = torch.randperm(40)[:20]  # the global RNG, restored by the checkpoint
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()

    args = dict(schedule=SCHEDULE, optimizer=opt, checkpoint=None if ckpt is None else str(ckpt), progress=False)
    args.update(kw)
    if not build:
        return model, opt, loss_fn, (x, y), train, args
    return OBDScheduler(model, loss_fn, (x, y), train, **args), model, opt


def _snapshot(folder, model, opt):
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for p, s in opt.state.items()}
    return files, weights, state


def _assert_unchanged(before, folder, model, opt):
    files, weights, state = _snapshot(folder, model, opt)
    assert files.keys() == before[0].keys(), "files were added or removed"
    for name in files:
        assert files[name] == before[0][name], f"{name} changed"
    for k, v in weights.items():
        assert torch.equal(v, before[1][k]), f"weight {k} changed"
    assert state.keys() == before[2].keys(), "optimizer state changed"
    for pid, s in state.items():
        for k, v in s.items():
            assert (torch.equal(v, before[2][pid][k]) if isinstance(v, torch.Tensor) else v == before[2][pid][k])


def _final(model, sched):
    return {k: v.clone() for k, v in model.state_dict().items()}, sched.pruner.state_dict(), sched.log


def _assert_same_result(a, b):
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]), k
    assert a[2] == b[2]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An uninterrupted 3-round run with a checkpoint: its folder, final result and checkpoint bytes."""
    folder = tmp_path_factory.mktemp("finished")
    sched, model, _ = _make(folder / "run.ckpt")
    sched.run()
    ckpt = folder / "run.ckpt"
    return folder, _final(model, sched), ckpt.read_bytes(), previous_path(str(ckpt))


def _copy_checkpoint(finished, tmp_path, with_prev=True):
    ckpt = tmp_path / "run.ckpt"
    ckpt.write_bytes(finished[2])
    if with_prev:
        (tmp_path / "run.ckpt.prev").write_bytes(open(finished[3], "rb").read())
    return ckpt


# ---------------------------------------------------------------------------
# Checkpoint files
# ---------------------------------------------------------------------------


def test_checkpoint_records_what_made_it_and_keeps_the_previous_one(finished):
    folder, _, _, prev = finished
    meta = read_header(str(folder / "run.ckpt"))
    import obd_ext

    assert meta["schedule"] == SCHEDULE and meta["method"] == "obd" and meta["scope"] == "global"
    assert meta["pattern"] == "unstructured" and meta["loss_budget"] is None and meta["budget_on"] == "predicted"
    assert meta["seed"] == 0 and meta["optimizer"] == "torch.optim.adam.Adam"
    assert meta["optimizer_groups"][0]["lr"] == 0.01 and meta["optimizer_groups"][0]["params"] == 4
    assert meta["parameters"] == [["0.weight", [10, 6], "float32"], ["0.bias", [10], "float32"],
                                  ["2.weight", [3, 10], "float32"], ["2.bias", [3], "float32"]]
    assert meta["pruned"] == ["0.weight", "2.weight"]
    assert meta["obd_ext_version"] == obd_ext.__version__
    assert meta["rounds_done"] == 3 and read_header(prev)["rounds_done"] == 2
    assert sorted(p.name for p in folder.iterdir()) == ["run.ckpt", "run.ckpt.prev"]


def test_resume_from_a_finished_checkpoint_changes_nothing(finished, tmp_path):
    ckpt = _copy_checkpoint(finished, tmp_path)
    sched, model, _ = _make(ckpt)
    log = sched.run()
    assert sched.next_round == 3 and log == finished[1][2]
    _assert_same_result(_final(model, sched), finished[1])


def test_different_schedule_is_refused(finished, tmp_path):
    # Measured: the old scheduler resumed the old run silently and overwrote the new model's weights.
    ckpt = _copy_checkpoint(finished, tmp_path)
    sched, model, opt = _make(ckpt, schedule=fixed(0.5, 3))
    before = _snapshot(tmp_path, model, opt)
    with pytest.raises(CheckpointMismatchError, match=r"schedule \(checkpoint \[0\.3") as e:
        sched.run()
    assert str(ckpt) in str(e.value) and "resume='restart'" in str(e.value)
    _assert_unchanged(before, tmp_path, model, opt)
    assert sched.next_round == 0


def test_sgd_optimizer_with_adam_checkpoint_is_refused(finished, tmp_path):
    # Measured: SGD silently received Adam's exp_avg.
    ckpt = _copy_checkpoint(finished, tmp_path)
    sched, model, opt = _make(ckpt, optimizer="sgd")
    before = _snapshot(tmp_path, model, opt)
    with pytest.raises(CheckpointMismatchError, match=r"optimizer \(checkpoint 'torch\.optim\.adam\.Adam', "
                                                      r"now 'torch\.optim\.sgd\.SGD'\)") as e:
        sched.run()
    assert str(ckpt) in str(e.value)
    _assert_unchanged(before, tmp_path, model, opt)
    assert not opt.state  # no exp_avg handed to SGD


def test_restart_ignores_a_different_setup_and_overwrites_it(finished, tmp_path):
    ckpt = _copy_checkpoint(finished, tmp_path)
    sched, model, _ = _make(ckpt, schedule=fixed(0.5, 2), resume="restart")
    sched.run()
    fresh, fresh_model, _ = _make(None, schedule=fixed(0.5, 2))
    fresh.run()
    _assert_same_result(_final(model, sched), _final(fresh_model, fresh))
    assert read_header(str(ckpt))["schedule"] == fixed(0.5, 2)
    # The previous checkpoint is this run's round 1, not the other run's file.
    assert read_header(previous_path(str(ckpt)))["schedule"] == fixed(0.5, 2)


def test_restart_first_save_drops_another_runs_previous_checkpoint(finished, tmp_path):
    ckpt = _copy_checkpoint(finished, tmp_path)
    sched, _, _ = _make(ckpt, schedule=[0.5], resume="restart")
    sched.run()
    assert read_header(str(ckpt))["schedule"] == [0.5]
    assert not os.path.exists(previous_path(str(ckpt)))


def test_require_without_a_checkpoint(tmp_path):
    sched, model, opt = _make(tmp_path / "none.ckpt", resume="require")
    before = _snapshot(tmp_path, model, opt)
    with pytest.raises(FileNotFoundError, match="none.ckpt"):
        sched.run()
    _assert_unchanged(before, tmp_path, model, opt)


def _flip_inside_weight(data: bytes, weight: torch.Tensor) -> bytes:
    raw = weight.detach().contiguous().numpy().tobytes()
    at = data.find(raw)
    assert at > 0, "the weight's bytes are stored as they are in the file"
    middle = at + len(raw) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 8]) + data[middle + 8:]


def test_flipped_bytes_inside_a_weight_are_an_error_naming_the_file_and_prev_resumes(finished, tmp_path):
    # Measured: 8 flipped bytes inside a weight record loaded and resumed with corrupted weights.
    _, state = read_checkpoint(finished[0] / "run.ckpt")
    ckpt = tmp_path / "run.ckpt"
    ckpt.write_bytes(_flip_inside_weight(finished[2], state["model"]["0.weight"]))
    (tmp_path / "run.ckpt.prev").write_bytes(open(finished[3], "rb").read())
    sched, model, opt = _make(ckpt)
    before = _snapshot(tmp_path, model, opt)
    with pytest.raises(CheckpointCorruptError, match="corrupted: sha256") as e:
        sched.run()
    msg = str(e.value)
    assert str(ckpt) in msg and e.value.path == str(ckpt)
    assert "run.ckpt.prev' (after round 2) is intact" in msg
    _assert_unchanged(before, tmp_path, model, opt)
    # Resume from the previous checkpoint, as the message says: the same result as the uninterrupted run.
    os.replace(tmp_path / "run.ckpt.prev", ckpt)
    sched, model, _ = _make(ckpt)
    sched.run()
    _assert_same_result(_final(model, sched), finished[1])


@pytest.mark.parametrize("keep", [0, 10, 30, 100, 0.5, 0.99])
def test_truncated_checkpoint_is_an_error_naming_the_file(finished, tmp_path, keep):
    # Measured: OSError / EOFError / UnpicklingError without the file's name.
    n = keep if isinstance(keep, int) else int(len(finished[2]) * keep)
    ckpt = tmp_path / "run.ckpt"
    ckpt.write_bytes(finished[2][:n])
    sched, model, opt = _make(ckpt)
    before = _snapshot(tmp_path, model, opt)
    with pytest.raises(CheckpointCorruptError) as e:
        sched.run()
    assert str(ckpt) in str(e.value)
    assert "no previous checkpoint" in str(e.value)
    _assert_unchanged(before, tmp_path, model, opt)


def test_every_single_flipped_byte_is_found(finished, tmp_path):
    data = finished[2]
    path = tmp_path / "x.ckpt"
    for at in range(0, len(data), max(1, len(data) // 97)):
        path.write_bytes(data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:])
        with pytest.raises(CheckpointCorruptError, match="x.ckpt"):
            read_checkpoint(str(path))


def test_corrupt_current_and_prev_both_reported(finished, tmp_path):
    ckpt = _copy_checkpoint(finished, tmp_path)
    ckpt.write_bytes(finished[2][:-5])
    prev = tmp_path / "run.ckpt.prev"
    prev.write_bytes(prev.read_bytes()[:-5])
    sched, _, _ = _make(ckpt)
    with pytest.raises(CheckpointCorruptError, match="previous checkpoint is damaged too"):
        sched.run()


def test_old_plain_torch_save_file_is_refused(tmp_path):
    ckpt = tmp_path / "old.ckpt"
    torch.save({"round": 1}, ckpt)
    sched, model, opt = _make(ckpt)
    before = _snapshot(tmp_path, model, opt)
    with pytest.raises(CheckpointCorruptError, match="not an obd_ext checkpoint: it is a plain torch.save file"):
        sched.run()
    _assert_unchanged(before, tmp_path, model, opt)


class _NotATensor:
    pass


def test_payload_is_loaded_with_weights_only(tmp_path):
    # A payload with an arbitrary object (a pickle that could run code) is not unpickled.
    path = str(tmp_path / "evil.ckpt")
    write_checkpoint(path, {"x": 1}, {"obj": _NotATensor()}, keep_previous=False)
    with pytest.raises(CheckpointCorruptError, match="weights_only=True"):
        read_checkpoint(path)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_killed_writes_are_removed_on_start(finished, tmp_path):
    # Measured: each killed write left its temporary file (11 files, 106 MB after 22 trials).
    ckpt = _copy_checkpoint(finished, tmp_path)
    dead = [_dead_pid() for _ in range(3)]
    stale = [f"run.ckpt.tmp.{dead[0]}", f"run.ckpt.tmp.{dead[1]}", f"run.ckpt.tmp.{dead[2]}.prev",
             f"run.ckpt.tmp.{os.getpid()}"]
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        keep = [f"run.ckpt.tmp.{live.pid}", "run.ckpt.tmp.notapid", "other.ckpt.tmp.1"]
        for name in stale + keep:
            (tmp_path / name).write_bytes(finished[2][:1000])
        sched, _, _ = _make(ckpt)
        sched.run()
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names == sorted(["run.ckpt", "run.ckpt.prev"] + keep)
    finally:
        live.kill()
        live.wait()
    assert remove_stale_temporaries(str(ckpt)) == [str(tmp_path / f"run.ckpt.tmp.{live.pid}")]


def test_failed_write_leaves_no_temporary_and_keeps_the_checkpoint(finished, tmp_path):
    ckpt = _copy_checkpoint(finished, tmp_path)
    good = ckpt.read_bytes()

    class Unsavable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        write_checkpoint(str(ckpt), {}, {"x": Unsavable()}, keep_previous=True)
    assert ckpt.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt", "run.ckpt.prev"]


# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------


def test_repr_summarises_without_tensors(tmp_path):
    sched, _, _ = _make(tmp_path / "r.ckpt")
    text = repr(sched)
    assert "rounds 0/3 done" in text and "method='obd'" in text and "scope='global'" in text
    assert f"final target {SCHEDULE[-1]:g}" in text and "r.ckpt" in text and "tensor" not in text
    sched.run()
    assert "rounds 3/3 done" in repr(sched)


def _empty_loader():
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, 6), torch.zeros(0).long()))


def _gen(x, y):
    yield x, y


BAD_ARGS = [
    # (overrides, exception, message)
    ({"schedule": []}, ValueError, "schedule is empty"),
    ({"schedule": [0.5, 0.2]}, ValueError, "non-decreasing"),
    ({"schedule": [0.2, math.nan]}, ValueError, r"schedule\[1\] = nan"),
    ({"schedule": [math.inf]}, ValueError, "finite"),
    ({"schedule": [1.5]}, ValueError, r"schedule\[0\] = 1.5"),
    ({"schedule": [-0.1]}, ValueError, "in \\[0, 1\\]"),
    ({"schedule": "0.5"}, TypeError, "schedule must be a list"),
    ({"schedule": [True]}, TypeError, r"schedule\[0\] must be a number"),
    ({"method": "obdx"}, ValueError, "method must be one of"),
    ({"method": "layerwise-obd"}, ValueError, "not accepted by OBDScheduler"),
    ({"scope": "nm"}, ValueError, "scope must be one of"),
    ({"pattern": "2:4"}, ValueError, r"schedule\[0\] = 0.3: pattern='2:4' fixes the sparsity at 0.5"),
    ({"pattern": None, "schedule": [0.5]}, ValueError, "pattern must be"),
    ({"pattern": "4:2", "schedule": [0.5]}, ValueError, "need 0 < N < M"),
    ({"pattern": "half", "schedule": [0.5]}, ValueError, "pattern must be"),
    ({"loss_budget": math.nan}, ValueError, "loss_budget must be a finite number >= 0"),
    ({"loss_budget": math.inf}, ValueError, "loss_budget must be a finite"),
    ({"loss_budget": -1.0}, ValueError, "loss_budget"),
    ({"loss_budget": "1"}, TypeError, "loss_budget must be a number"),
    ({"budget_on": "actual"}, ValueError, "budget_on must be one of"),
    ({"loss_budget": 0.1, "method": "random"}, ValueError, "budget_on='predicted' needs a curvature method"),
    ({"loss_budget": 0.1, "method": "magnitude"}, ValueError, "method='magnitude' predicts no loss increase"),
    ({"resume": "yes"}, ValueError, "resume must be one of"),
    ({"resume": "require", "checkpoint": None}, ValueError, "resume='require' needs a checkpoint"),
    ({"params": []}, ValueError, "params: no parameters to prune"),
    ({"params": ["nope.weight"]}, ValueError, "no parameter named 'nope.weight'"),
    ({"params": ["0.weight", "0.weight"]}, ValueError, "'0.weight' appears more than once"),
    ({"params": "0.weight"}, TypeError, "params must be a list"),
    ({"optimizer": "adam"}, TypeError, "optimizer must be a torch.optim.Optimizer"),
    ({"seed": 1.5}, TypeError, "seed must be an int"),
    ({"train_fn": 3}, TypeError, "train_fn must be callable"),
    ({"eval_fn": "acc"}, TypeError, "eval_fn must be callable"),
    ({"checkpoint": "no/such/folder/x.ckpt"}, ValueError, "does not exist"),
    ({"checkpoint": "."}, ValueError, "is a directory"),
    ({"log_path": "same.ckpt", "checkpoint": "same.ckpt"}, ValueError, "the same file"),
    # Empty data: measured to give zero curvature and delete the first entries in index order.
    ({"data": []}, ValueError, "data holds no batches"),
    ({"data": "empty pair"}, ValueError, "data: the .* pair holds no samples"),
    ({"data": "empty loader"}, ValueError, "data holds no batches"),
    ({"data": "iterator"}, TypeError, "data is a one-shot iterator"),
    ({"data": "generator"}, TypeError, "data is a one-shot iterator"),
    ({"data": None}, ValueError, "data is required"),
    ({"data": "tensor"}, TypeError, "single tensor"),
    ({"data": "empty batch"}, ValueError, r"data\[1\] holds no samples"),
]


def _ids(table):
    return [f"{i}-{next(iter(case[0]))}" for i, case in enumerate(table)]


@pytest.mark.parametrize("overrides,exc,match", BAD_ARGS, ids=_ids(BAD_ARGS))
def test_bad_arguments_are_refused_before_anything_changes(tmp_path, monkeypatch, overrides, exc, match):
    overrides = dict(overrides)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("a file that must stay as it is")
    model, opt, loss_fn, (x, y), train, args = _make(tmp_path / "c.ckpt", build=False)
    # An optimizer with state, so that a change to it would show.
    loss_fn(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    data = overrides.pop("data", (x, y))
    data = {"empty pair": (x[:0], y[:0]), "empty loader": _empty_loader(), "iterator": iter([(x, y)]),
            "generator": _gen(x, y), "tensor": x, "empty batch": [(x, y), (x[:0], y[:0])]}.get(data, data) \
        if isinstance(data, str) else data
    train_fn = overrides.pop("train_fn", train)
    args.update(overrides)
    before = _snapshot(tmp_path, model, opt)
    with pytest.raises(exc, match=match):
        OBDScheduler(model, loss_fn, data, train_fn, **args).run()
    _assert_unchanged(before, tmp_path, model, opt)


RUN_MISMATCHES = [
    ({"schedule": fixed(0.3, 4)}, "schedule"),
    ({"method": "lm"}, "method (checkpoint 'obd', now 'lm')"),
    ({"method": "magnitude"}, "method"),
    ({"scope": "layer"}, "scope (checkpoint 'global', now 'layer')"),
    ({"loss_budget": 1.0}, "loss_budget (checkpoint None, now 1.0)"),
    ({"budget_on": "measured"}, "budget_on"),
    ({"seed": 1}, "seed (checkpoint 0, now 1)"),
    ({"params": ["0.weight"]}, "pruned"),
    ({"optimizer": "sgd"}, "optimizer"),
    ({"lr": 0.02}, "optimizer_groups (group 0 lr: 0.01 -> 0.02)"),
    ({"model": "wider"}, "parameters (0.weight: [[10, 6], 'float32'] -> [[11, 6], 'float32']"),
    ({"model": "double"}, "parameters (0.weight: [[10, 6], 'float32'] -> [[10, 6], 'float64']"),
]


@pytest.mark.parametrize("change,field", RUN_MISMATCHES, ids=_ids(RUN_MISMATCHES))
def test_any_setup_difference_is_refused_naming_the_field(finished, tmp_path, change, field):
    change = dict(change)
    ckpt = _copy_checkpoint(finished, tmp_path)
    model, opt, loss_fn, data, train, args = _make(ckpt, optimizer=change.pop("optimizer", "adam"), build=False)
    if "lr" in change:
        opt.param_groups[0]["lr"] = change.pop("lr")
    kind = change.pop("model", None)
    if kind == "wider":
        model[0], model[2] = nn.Linear(6, 11), nn.Linear(11, 3)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        args["optimizer"] = opt
    elif kind == "double":
        model.double()
        data = (data[0].double(), data[1])
    args.update(change)
    sched = OBDScheduler(model, loss_fn, data, train, **args)
    before = _snapshot(tmp_path, model, opt)
    with pytest.raises(CheckpointMismatchError) as e:
        sched.run()
    assert field in str(e.value) and str(ckpt) in str(e.value)
    _assert_unchanged(before, tmp_path, model, opt)


def test_nan_measured_increase_with_a_budget_is_an_error_and_undone(tmp_path):
    model, opt, _, (x, y), _, args = _make(None, build=False)
    calls = []

    def loss_fn(out, target):  # the second loss (after the deletion) is NaN
        calls.append(1)
        return torch.tensor(math.nan) if len(calls) == 2 else nn.functional.cross_entropy(out, target)

    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    args.update(method="magnitude", loss_budget=0.5, budget_on="measured")
    sched = OBDScheduler(model, loss_fn, (x, y), None, **args)
    with pytest.raises(ValueError, match="round 0: the measured loss increase is NaN"):
        sched.run()
    assert sched.pruner.sparsity == 0.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, w0[k]), k


def test_curvature_methods_and_patterns_run(tmp_path):
    for method in ("lm", "fisher", "magnitude", "random"):
        sched, model, _ = _make(None, method=method, schedule=[0.2, 0.4])
        log = sched.run()
        assert [e["round"] for e in log] == [0, 1]
        assert sched.pruner.sparsity == pytest.approx(0.4, abs=0.02), method
    sched, model, _ = _make(None, pattern="1:2", schedule=[0.5], params=["2.weight"])
    sched.run()
    w = model[2].weight.detach().reshape(-1, 2)
    assert ((w != 0).sum(1) <= 1).all()


def test_nan_curvature_names_the_layer_and_changes_nothing(tmp_path, monkeypatch):
    # Measured: the scheduler blamed curvatures[0] for another layer's NaN.
    import obd_ext.scheduler as scheduler_module

    real = scheduler_module.hessian_diag

    def nan_in_second_layer(*args, **kwargs):
        h = real(*args, **kwargs)
        h["2.weight"][1, 3] = math.nan
        return h

    monkeypatch.setattr(scheduler_module, "hessian_diag", nan_in_second_layer)
    sched, model, opt = _make(tmp_path / "n.ckpt")
    before = _snapshot(tmp_path, model, opt)
    with pytest.raises(ValueError, match="2.weight") as e:
        sched.run()
    assert "0.weight" not in str(e.value)
    _assert_unchanged(before, tmp_path, model, opt)
    assert sched.pruner.sparsity == 0.0
