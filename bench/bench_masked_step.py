"""The cost of keeping deleted weights frozen: one training step, masked vs dense.

For each model it times one AdamW training step (forward, loss, backward,
``optimizer.step()``, ``optimizer.zero_grad()``) four ways, on copies of the
same initial weights and the same batch:

- dense:        no masks (the baseline every ratio divides by);
- obd_ext:      ``Pruner(model, params); pruner.prune(0.9, method="magnitude");
                pruner.attach(optimizer)``;
- torch.prune:  ``torch.nn.utils.prune.l1_unstructured(module, name, 0.9)`` on
                every pruned weight (its forward pre-hooks recompute
                ``weight = weight_orig * weight_mask``). It cannot prune
                ``nn.MultiheadAttention``: the attention module reads
                ``out_proj.weight`` without calling ``out_proj``, so the hook
                never runs; that model's row says "n/a" with the error;
- mask multiply: a bool keep-mask per weight (90% deleted by magnitude, per
                tensor) and ``p.mul_(mask)`` for each after ``optimizer.step()``
                (the weights stay zero; the optimizer's moments do not).

Models (all weights of two or more dimensions are pruned, the same set for
every method: Linear and Embedding weights and the attention's packed
``in_proj_weight``):

- mlp:          784-2048-2048-2048-10, ReLU, batch 512, cross-entropy;
- transformer:  ``nn.TransformerEncoder`` of 4 ``nn.TransformerEncoderLayer``
                (d=512, 8 heads, feed-forward 2048, dropout 0, batch_first,
                post-norm), between an ``nn.Embedding(1024, 512)`` and a
                ``Linear(512, 1024)`` head; batch 16 x 128 tokens,
                token-level cross-entropy.

Correctness before timing: every method takes ``--warmup`` steps, after which
each deleted weight (as the forward sees it) must be exactly zero, the masks
must delete round(0.9 n) entries (per tensor) or 90% of the pool (obd_ext,
global), and the kept weights must have moved. A method that fails here is
reported with its error and not timed.

Timing: interleaved rounds. Each round runs ``--steps`` steps of every
method, in an order rotated by one each round, and records the mean step time
of each; a method's ratio to dense is the median of its per-round ratios
(steps seconds apart, so the drifts of a shared machine cancel) and its time
is the median over rounds (x_dense_cpu: the same ratio of the process's CPU
time, steadier on a shared machine). x_q1 and x_q3 are the quartiles of the
per-round ratios, and the noise column the spread of the dense method's own
per-round times (interquartile range / median). ``--methods`` may add
"dense-aa", a second dense copy: its ratio to dense (ideally 1) is the noise
floor and order bias of the same statistic, measured in the same run.

Memory of freezing, per pruned parameter (entry of a pruned weight):

- held: bytes of every tensor that exists after setup and two steps and did
  not exist before, other than the parameters, their gradients and the
  optimizer state (found by walking every live tensor known to Python's
  garbage collector, keyed by storage): masks, cached float masks, torch
  prune's recomputed ``weight`` tensors;
- step peak: the peak extra memory of one step minus that of a dense step.
  On CUDA the caching allocator's peak; on the CPU the peak resident set of
  one step (bench/common.py) measured in a child process that runs with
  glibc's mmap threshold at 64 KiB, so every sizeable allocation is a fresh
  mapping and counted (the timed process keeps glibc's defaults).

Usage:
    python bench/bench_masked_step.py                      # both models, CPU
    python bench/bench_masked_step.py --models mlp --rounds 20 --threads 2
    python bench/bench_masked_step.py --quick              # tiny sizes (smoke test)
    python bench/bench_masked_step.py --device cuda --json bench/out/masked_step_cuda.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.utils import prune as torch_prune

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, peak_extra_bytes, print_table, sync, write_json  # noqa: E402

import obd_ext  # noqa: E402
from obd_ext.models import mlp as make_mlp  # noqa: E402

__all__ = ["METHODS", "CONTROLS", "MODELS", "main"]

METHODS = ["dense", "obd_ext", "torch.prune", "mask multiply"]
CONTROLS = ["dense-aa"]  # on request: a second dense copy (A/A), the noise floor of the ratio
MODELS = ["mlp", "transformer"]
SPARSITY = 0.9


# ---------------------------------------------------------------------------
# Models and batches
# ---------------------------------------------------------------------------


class TokenTransformer(nn.Module):
    """Embedding -> nn.TransformerEncoder -> Linear head, logits as (B*T, V) rows."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, ff: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        logits = self.head(self.encoder(self.tok(idx)))
        return logits.reshape(-1, logits.shape[-1])


Case = Tuple[Callable[[], nn.Module], Callable[[torch.Generator], Tuple[Tensor, Tensor]], str]


def cases(quick: bool) -> Dict[str, Case]:
    """name -> (model factory, batch factory, description)."""
    if quick:
        sizes, batch = (32, 64, 64, 10), 16
        vocab, d, layers, heads, ff, b, t = 64, 32, 2, 4, 64, 2, 8
    else:
        sizes, batch = (784, 2048, 2048, 2048, 10), 512
        vocab, d, layers, heads, ff, b, t = 1024, 512, 4, 8, 2048, 16, 128

    def mlp() -> nn.Module:
        return make_mlp(sizes)

    def mlp_batch(g: torch.Generator) -> Tuple[Tensor, Tensor]:
        return torch.randn(batch, sizes[0], generator=g), torch.randint(0, sizes[-1], (batch,), generator=g)

    def transformer() -> nn.Module:
        return TokenTransformer(vocab, d, layers, heads, ff)

    def transformer_batch(g: torch.Generator) -> Tuple[Tensor, Tensor]:
        idx = torch.randint(0, vocab, (b, t + 1), generator=g)
        return idx[:, :-1].contiguous(), idx[:, 1:].reshape(-1)

    return {
        "mlp": (mlp, mlp_batch, f"MLP {'-'.join(map(str, sizes))}, batch {batch}"),
        "transformer": (transformer, transformer_batch,
                        f"nn.TransformerEncoder {layers} layers d={d} heads={heads} ff={ff}, "
                        f"Embedding/head vocab {vocab}, batch {b}x{t}"),
    }


def pruned_names(model: nn.Module) -> List[str]:
    """Every weight of two or more dimensions (biases and norms are not pruned)."""
    return [n for n, p in model.named_parameters() if p.dim() >= 2]


def owner(model: nn.Module, name: str) -> Tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def magnitude_keep(w: Tensor, sparsity: float) -> Tensor:
    """Bool keep-mask deleting the round(sparsity * n) smallest |w| of one tensor (ties by index)."""
    k = round(sparsity * w.numel())
    keep = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
    if k:
        keep[torch.topk(w.detach().abs().flatten(), k, largest=False).indices] = False
    return keep.view_as(w)


# ---------------------------------------------------------------------------
# Methods: each builds its model, optimizer and one-step function
# ---------------------------------------------------------------------------


class Setup:
    """One method's model, optimizer, step and the keep-masks it froze (name -> bool)."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, names: List[str]):
        self.model, self.opt, self.names = model, opt, names
        self.keep: Dict[str, Tensor] = {}
        self.keep_is_copy = False  # True: ``keep`` is this benchmark's copy, not memory the method holds
        self.after_step: Optional[Callable[[], None]] = None
        self.holder: object = None  # keeps a method's objects (e.g. the Pruner) alive

    def step(self, x: Tensor, y: Tensor) -> None:
        loss = nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()
        if self.after_step is not None:
            self.after_step()
        self.opt.zero_grad()

    def effective(self, name: str) -> Tensor:
        """The weight as the forward sees it (torch.prune's recomputed attribute, else the parameter)."""
        mod, attr = owner(self.model, name)
        return getattr(mod, attr)


def setup_method(method: str, model: nn.Module, lr: float) -> Setup:
    names = pruned_names(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    s = Setup(model, opt, names)
    if method in ("dense", "dense-aa"):
        return s
    if method == "obd_ext":
        pruner = obd_ext.Pruner(model, params=names)
        pruner.prune(SPARSITY, method="magnitude")
        pruner.attach(opt)
        s.keep, s.keep_is_copy = {n: m.clone() for n, m in pruner.masks.items()}, True
        s.holder = pruner
        return s
    if method == "torch.prune":
        for n in names:
            mod, attr = owner(model, n)
            torch_prune.l1_unstructured(mod, attr, amount=SPARSITY)
            s.keep[n] = getattr(mod, attr + "_mask").bool()
        s.keep_is_copy = True
        return s
    if method == "mask multiply":
        params = dict(model.named_parameters())
        with torch.no_grad():
            pairs = []
            for n in names:
                keep = magnitude_keep(params[n], SPARSITY)
                params[n].mul_(keep)
                s.keep[n] = keep
                pairs.append((params[n], keep))

        @torch.no_grad()
        def remask() -> None:
            for p, keep in pairs:
                p.mul_(keep)

        s.after_step = remask
        s.holder = pairs
        return s
    raise ValueError(f"--methods: unknown method {method!r}; choose from {METHODS + CONTROLS}")


# ---------------------------------------------------------------------------
# Correctness and memory
# ---------------------------------------------------------------------------


def check_frozen(method: str, s: Setup, start: Dict[str, Tensor], x: Tensor, y: Tensor) -> None:
    """Deleted weights exactly zero as the forward sees them; kept weights moved; 90% deleted."""
    if method in ("dense", "dense-aa"):
        return
    with torch.no_grad():
        s.model(x)  # torch.prune recomputes its weights in forward pre-hooks
    total = sum(k.numel() for k in s.keep.values())
    deleted = sum(int((~k).sum()) for k in s.keep.values())
    if method == "obd_ext":
        want = round(SPARSITY * total)  # one global pool
        if deleted != want:
            raise AssertionError(f"{method}: {deleted} deleted of {total}, wanted {want}")
    else:
        for n, k in s.keep.items():
            if int((~k).sum()) != round(SPARSITY * k.numel()):
                raise AssertionError(f"{method}: {n} has {int((~k).sum())} deleted of {k.numel()}")
    for n, keep in s.keep.items():
        w = s.effective(n).detach()
        bad = int((w[~keep] != 0).sum())
        if bad:
            raise AssertionError(f"{method}: {bad} deleted entries of {n} are not zero after training steps")
        # A tensor may have no kept entry (a global pool can delete a whole layer).
        if keep.any() and not (w[keep] != start[n][keep]).any():
            raise AssertionError(f"{method}: the kept entries of {n} did not move: is it training?")


def storages(tensors) -> Dict[Tuple[int, int], int]:
    """(storage pointer, device index) -> bytes, for every tensor with a real storage."""
    out = {}
    for t in tensors:
        if t.device.type == "meta" or t.is_sparse or t.layout != torch.strided:
            continue
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without one
            continue
        if st.nbytes():
            out[(st.data_ptr(), t.device.index or 0)] = st.nbytes()
    return out


def live_storages() -> Dict[Tuple[int, int], int]:
    gc.collect()
    # type() rather than isinstance(): isinstance reads __class__, which some lazy
    # module proxies (torch.distributed.reduce_op) answer with a deprecation warning.
    return storages(o for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def training_storages(s: Setup) -> Dict[Tuple[int, int], int]:
    """Parameters, gradients and optimizer state: what a dense step holds too."""
    ts = []
    for p in s.model.parameters():
        ts.append(p)
        if p.grad is not None:
            ts.append(p.grad)
    for st in s.opt.state.values():
        ts += [v for v in st.values() if isinstance(v, Tensor)]
    return storages(ts)


# ---------------------------------------------------------------------------
# Running one model
# ---------------------------------------------------------------------------


def build(case: Case, methods: List[str], device: str, warmup: int, lr: float, measure_held: bool
          ) -> Tuple[Dict[str, Setup], Dict[str, str], Dict[str, Optional[int]], Tuple[Tensor, Tensor], int]:
    """Set up every method from the same weights, check it, and measure what it holds."""
    make_model, make_batch, _ = case
    torch.manual_seed(0)
    base = make_model().to(device)
    x, y = (t.to(device) for t in make_batch(torch.Generator().manual_seed(1)))
    n_pruned = sum(p.numel() for n, p in base.named_parameters() if n in set(pruned_names(base)))
    setups: Dict[str, Setup] = {}
    errors: Dict[str, str] = {}
    held: Dict[str, Optional[int]] = {}
    for method in methods:
        model = make_model().to(device)
        model.load_state_dict(base.state_dict())
        before = live_storages() if measure_held else {}
        try:
            s = setup_method(method, model, lr)
            start = {n: s.effective(n).detach().clone() for n in s.keep}
            for _ in range(warmup):
                s.step(x, y)
            check_frozen(method, s, start, x, y)
            del start
        except Exception as e:  # a method that cannot handle the model is reported, not fatal
            errors[method] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print(f"  {method}: n/a ({errors[method]})", flush=True)
            continue
        setups[method] = s
        if measure_held:
            after, own = live_storages(), training_storages(s)
            if s.keep_is_copy:
                own.update(storages(s.keep.values()))
            held[method] = sum(b for k, b in after.items() if k not in before and k not in own)
    return setups, errors, held, (x, y), n_pruned


def timed_rounds(setups: Dict[str, Setup], x: Tensor, y: Tensor, rounds: int, steps: int, device: str
                 ) -> Tuple[Dict[str, List[float]], Dict[str, List[float]]]:
    """Mean step seconds per round per method, wall clock and this process's CPU time.

    Each round's order is rotated by one. CPU time (all of the process's
    threads) does not advance while the process waits for cores other
    tenants hold, so on a shared CPU machine its ratio is less exposed to
    them; wall clock is what a user waits for.
    """
    order = list(setups)
    wall: Dict[str, List[float]] = {m: [] for m in order}
    cpu: Dict[str, List[float]] = {m: [] for m in order}
    for r in range(rounds):
        for method in order[r % len(order):] + order[:r % len(order)]:
            s = setups[method]
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                s.step(x, y)
            sync(device)
            wall[method].append((time.perf_counter() - t0) / steps)
            cpu[method].append((time.process_time() - c0) / steps)
    return wall, cpu


def step_peaks(case: Case, methods: List[str], device: str, warmup: int, lr: float) -> Dict[str, int]:
    """Peak extra bytes of one step per method that runs (call it where memory is counted exactly)."""
    setups, _, _, (x, y), _ = build(case, methods, device, warmup, lr, measure_held=False)
    peaks = {}
    for m, s in setups.items():
        gc.collect()
        peak = peak_extra_bytes(lambda s=s: s.step(x, y), device)
        if peak is not None:
            peaks[m] = peak
    return peaks


def step_peaks_child(args: argparse.Namespace, models: List[str], methods: List[str]) -> Dict[str, Dict[str, int]]:
    """step_peaks of every model in one child process with glibc's mmap threshold at 64 KiB (module docstring)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--peak-probe", "--models", ",".join(models),
           "--methods", ",".join(methods), "--warmup", str(args.warmup), "--device", args.device]
    if args.quick:
        cmd.append("--quick")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
    if proc.returncode != 0:  # memory is reported as unknown, the timings still stand
        print(f"step-peak probe failed: {(proc.stderr.strip().splitlines() or [proc.returncode])[-1]}")
        return {}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_model(args: argparse.Namespace, name: str, case: Case, methods: List[str],
              peaks: Dict[str, int]) -> List[Dict[str, object]]:
    print(f"{name}: {case[2]}", flush=True)
    setups, errors, held, (x, y), n_pruned = build(case, methods, args.device, args.warmup, args.lr, True)
    if "dense" not in setups:
        raise SystemExit(f"{name}: the dense step failed: {errors.get('dense')}")
    times, cpu = timed_rounds(setups, x, y, args.rounds, args.steps, args.device)
    del setups
    gc.collect()
    if args.device.startswith("cuda"):  # the caching allocator counts exactly in this process
        peaks = step_peaks(case, [m for m in methods if m not in errors], args.device, args.warmup, args.lr)
    dense = times["dense"]
    q = statistics.quantiles(dense, n=4) if len(dense) >= 2 else [dense[0]] * 3
    noise = (q[2] - q[0]) / statistics.median(dense)
    rows = []
    for method in methods:
        row: Dict[str, object] = {"model": name, "method": method, "pruned_params": n_pruned,
                                  "seconds": None, "x_dense": None, "x_q1": None, "x_q3": None,
                                  "cpu_seconds": None, "x_dense_cpu": None,
                                  "held_bytes_per_pruned": None,
                                  "step_peak_extra_bytes_per_pruned": None, "dense_noise_iqr": noise,
                                  "error": errors.get(method)}
        if method in times:
            row["seconds"] = statistics.median(times[method])
            ratios = [t / d for t, d in zip(times[method], dense)]
            row["x_dense"] = statistics.median(ratios)
            row["x_q1"], _, row["x_q3"] = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
            row["round_seconds"] = times[method]
            row["cpu_seconds"] = statistics.median(cpu[method])
            row["x_dense_cpu"] = statistics.median(c / d for c, d in zip(cpu[method], cpu["dense"]))
            row["round_cpu_seconds"] = cpu[method]
            if held.get(method) is not None:
                row["held_bytes_per_pruned"] = held[method] / n_pruned
            if method in peaks and "dense" in peaks:
                row["step_peak_extra_bytes_per_pruned"] = (peaks[method] - peaks["dense"]) / n_pruned
        rows.append(row)
        shown = "n/a" if row["x_dense"] is None else (f"{row['seconds'] * 1e3:8.1f} ms  x{row['x_dense']:.3f}  "
                                                      f"(CPU time x{row['x_dense_cpu']:.3f})")
        print(f"  {name:>11} {method:>13} {shown}", flush=True)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS + CONTROLS} (dense is always run)")
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds (default 10)")
    p.add_argument("--steps", type=int, default=2, help="steps of each method per round (default 2)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per method, checked (default 3)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny models, 3 rounds of 1 step (a smoke run)")
    p.add_argument("--json", default="bench/out/masked_step.json", help="write the results here ('' for none)")
    p.add_argument("--peak-probe", action="store_true", help=argparse.SUPPRESS)  # internal: step_peaks_child's child
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.steps, args.warmup = min(args.rounds, 3), 1, min(args.warmup, 3)
    for flag in ("rounds", "steps", "warmup"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    all_cases = cases(args.quick)
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in all_cases:
            p.error(f"--models: unknown model {m!r}; choose from {list(all_cases)}")
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS + CONTROLS:
            p.error(f"--methods: unknown method {m!r}; choose from {METHODS + CONTROLS}")
    methods = ["dense"] + [m for m in methods if m != "dense"]

    if args.peak_probe:
        print(json.dumps({m: step_peaks(all_cases[m], methods, args.device, args.warmup, args.lr) for m in models}))
        return 0

    print("machine:", machine())
    # CPU memory first, in a child process (before this one holds the models).
    peaks = {} if args.device.startswith("cuda") else step_peaks_child(args, models, methods)
    rows: List[Dict[str, object]] = []
    for name in models:
        rows += run_model(args, name, all_cases[name], methods, peaks.get(name, {}))
    print()
    shown = [{**r, "error": r["error"] and r["error"][:60]} for r in rows]  # the full text is in the JSON
    print_table(shown, ["model", "method", "seconds", "x_dense", "x_q1", "x_q3", "x_dense_cpu", "held_bytes_per_pruned",
                        "step_peak_extra_bytes_per_pruned", "dense_noise_iqr", "error"])
    write_json(args.json, {"machine": machine(), "device": args.device, "sparsity": SPARSITY,
                           "rounds": args.rounds, "steps_per_round": args.steps, "warmup": args.warmup,
                           "models": {m: all_cases[m][2] for m in models},
                           "results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
