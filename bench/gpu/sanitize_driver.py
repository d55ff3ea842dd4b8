"""Calls every obd_ext kernel on small and odd sizes: the program compute-sanitizer runs.

Sizes: empty, one element, sizes that are not a multiple of the block (255,
257, 1025, 4097), rows of one and of many entries; dtypes float32, float64,
float16, bfloat16; the adversarial selection distributions of tests/testing.py
(all equal, half zeros, a few ulps apart, a huge range, negative curvature),
the overflow extremes of the saliency rule, masks with entries already
deleted, non-finite entries with skip_nonfinite, score mode and factors.

Each result on the device is compared with the CPU kernel on the same inputs
(bitwise for saliency and selection, closely for the curvature rules), so a
run is also a functional check of every CUDA kernel; any mismatch or error
exits 1. On a machine without a GPU, ``--device cpu`` runs the same calls on
the CPU kernels (the comparisons are then trivially equal): that is what the
suite's dry run does.

Usage: python bench/gpu/sanitize_driver.py [--device cuda] [--tiny] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch

import obd_ext
from obd_ext import ops
from obd_ext.constants import ACT_KINDS

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


class Driver:
    """Runs cases, counts them and collects failures (a failure never stops the run)."""

    def __init__(self, device: str, tiny: bool) -> None:
        self.device = device
        self.tiny = tiny
        self.sizes = [0, 1, 257] if tiny else [0, 1, 7, 31, 255, 256, 257, 1025, 4097, 65537]
        self.floats = [torch.float32, torch.bfloat16] if tiny else FLOATS
        self.dists = ["normal", "all_equal", "overflow"] if tiny else DISTS
        self.factors = (0.0, None) if tiny else (0.0, None, 0.5)
        self.cases = 0
        self.failures: List[str] = []
        self.gen = torch.Generator().manual_seed(0)

    def case(self, name: str, fn: Callable[[], None]) -> None:
        self.cases += 1
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - every failure is reported, the run goes on
            self.failures.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")

    def dev(self, t: torch.Tensor) -> torch.Tensor:
        # always a copy: the in-place ops must not share tensors with the CPU run (device "cpu" too)
        return t.to(self.device, copy=True)

    def randn(self, *shape, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64).to(dtype)

    def rand(self, *shape, dtype=torch.float32) -> torch.Tensor:
        return torch.rand(*shape, generator=self.gen, dtype=torch.float64).to(dtype)


def same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    a, b = a.cpu(), b.cpu()
    if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b) and not (
            torch.isnan(a).equal(torch.isnan(b)) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))):
        raise AssertionError(f"{what}: device result differs from the CPU kernel's")


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    a, b = a.cpu().double(), b.cpu().double()
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}")
    if not torch.allclose(a, b, rtol=2e-2, atol=1e-3, equal_nan=True):
        err = (a - b).abs().max().item() if a.numel() else 0.0
        raise AssertionError(f"{what}: max abs difference {err:.3g} from the CPU kernel")


def distribution(d: Driver, n: int, dist: str, wdt, hdt) -> Tuple[torch.Tensor, torch.Tensor]:
    w = d.randn(n, dtype=torch.float64)
    h = d.rand(n, dtype=torch.float64) + 0.1
    if dist == "all_equal":
        w, h = torch.full((n,), 0.5, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    elif dist == "half_zeros":
        w[d.rand(n, dtype=torch.float64) < 0.5] = 0.0
    elif dist == "few_ulps":
        w = torch.ones(n, dtype=torch.float64)
        h = 1.0 + 2.0 ** -7 * torch.randint(0, 4, (n,), generator=d.gen).double()
    elif dist == "huge_range":
        w = w * torch.pow(10.0, torch.randint(-6, 6, (n,), generator=d.gen).double())
        h = h * torch.pow(10.0, torch.randint(-6, 6, (n,), generator=d.gen).double())
    elif dist == "negative_curvature":
        h = d.randn(n, dtype=torch.float64)
    elif dist == "overflow":
        # the extremes of the saliency rule: huge w with zero curvature, tiny with huge
        big = min(1e30, torch.finfo(wdt).max)
        w = torch.where(torch.arange(n) % 2 == 0, torch.tensor(big, dtype=torch.float64), w)
        h = torch.where(torch.arange(n) % 3 == 0, torch.tensor(0.0, dtype=torch.float64), h)
    w = torch.nan_to_num(w.to(wdt), posinf=1.0, neginf=-1.0)
    h = torch.nan_to_num(h.to(hdt), posinf=1.0, neginf=-1.0)
    return w, h


DISTS = ["normal", "all_equal", "half_zeros", "few_ulps", "huge_range", "negative_curvature", "overflow"]


def saliency_cases(d: Driver) -> None:
    for n in d.sizes:
        for wdt in d.floats:
            for hdt in sorted({torch.float32, torch.float64, wdt}, key=str):
                w, h = distribution(d, n, "overflow" if n % 2 else "normal", wdt, hdt)

                def run(w=w, h=h, n=n, wdt=wdt, hdt=hdt):
                    same(ops.saliency(d.dev(w), d.dev(h)), ops.saliency(w, h), f"saliency n={n} {wdt}/{hdt}")
                    if n:
                        w2, h2 = w.reshape(1, n).expand(3, n).contiguous(), h.reshape(1, n).expand(3, n).contiguous()
                        for dim in (0, 1):
                            close(ops.group_saliency(d.dev(w2), d.dev(h2), dim), ops.group_saliency(w2, h2, dim),
                                  f"group_saliency n={n} dim={dim}")

                d.case(f"saliency n={n} {wdt}/{hdt}", run)


def selection_cases(d: Driver) -> None:
    sizes = [n for n in d.sizes if n]
    combos = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float64),
              (torch.float64, torch.float64)]
    for dist in d.dists:
        for wdt, hdt in combos[:2] if d.tiny else combos:
            pool = [distribution(d, n, dist, wdt, hdt) for n in sizes] + [distribution(d, 0, dist, wdt, hdt)]
            total = sum(w.numel() for w, _ in pool)
            for k in sorted({0, total // 3, total} if d.tiny else {0, 1, total // 3, total - 1, total}):
                for factor in d.factors:
                    def run(pool=pool, k=k, factor=factor, dist=dist, wdt=wdt, hdt=hdt):
                        masks = [d.rand(w.numel()) >= 0.2 for w, _ in pool]  # some already deleted
                        k_eff = max(k, sum(int((~m).sum()) for m in masks))
                        ws_c = [w.clone() for w, _ in pool]
                        ms_c = [m.clone() for m in masks]
                        st_c = ops.global_select_(ws_c, [h for _, h in pool], ms_c, k_eff, factor, False)
                        ws_d = [d.dev(w) for w, _ in pool]
                        ms_d = [d.dev(m) for m in masks]
                        st_d = ops.global_select_(ws_d, [d.dev(h) for _, h in pool], ms_d, k_eff, factor, False)
                        for i in range(len(pool)):
                            same(ms_d[i], ms_c[i], f"global_select_ mask {i}")
                            same(ws_d[i], ws_c[i], f"global_select_ weight {i}")
                        same(st_d[:3], st_c[:3], "global_select_ counts")

                    d.case(f"global_select_ {dist} {wdt}/{hdt} k={k} factor={factor}", run)
            # score mode and skip_nonfinite with NaN/Inf entries
            def run_scores(pool=pool, dist=dist):
                scores = [ops.saliency(w, h) for w, h in pool]
                bad = [s.clone() for s in scores]
                for s in bad:
                    if s.numel() > 2:
                        s[0], s[-1] = math.nan, math.inf
                # a saliency beyond the dtype's range is +-inf: a non-finite score, kept with skip
                finite = all(bool(torch.isfinite(s).all()) for s in scores)
                for skip, ss in ((not finite, scores), (True, bad)):
                    n_ok = sum(int(torch.isfinite(s).sum()) for s in ss)
                    k = n_ok // 2
                    mc = [torch.ones(s.numel(), dtype=torch.bool) for s in ss]
                    md = [d.dev(m) for m in mc]
                    ops.global_select_([], ss, mc, k, None, skip)
                    ops.global_select_([], [d.dev(s) for s in ss], md, k, None, skip)
                    for a, b in zip(md, mc):
                        same(a, b, f"global_select_ score mode skip={skip}")

            d.case(f"global_select_ scores {dist} {wdt}/{hdt}", run_scores)
            for rows, cols in [(1, 1), (5, 257)] + ([] if d.tiny else [(3, 7), (2, 1025), (64, 4096), (1, 65537)]):
                w, h = distribution(d, rows * cols, dist, wdt, hdt)
                w, h = w.reshape(rows, cols), h.reshape(rows, cols)

                def run_rows(w=w, h=h, cols=cols):
                    for k in sorted({0, 1, cols // 2, cols}):
                        wc, mc = w.clone(), torch.ones(w.shape, dtype=torch.bool)
                        wd, md = d.dev(w), d.dev(mc)
                        ops.row_select_(wc, h, mc, k, 0.0, False)
                        ops.row_select_(wd, d.dev(h), md, k, 0.0, False)
                        same(md, mc, f"row_select_ k={k}")
                        same(wd, wc, f"row_select_ weight k={k}")

                d.case(f"row_select_ {dist} {wdt}/{hdt} {rows}x{cols}", run_rows)
            nm_shapes = [((1, 4), 2, 4), ((4, 8, 3, 3), 2, 4)]
            if not d.tiny:
                nm_shapes += [((3, 8), 2, 4), ((5, 32), 1, 8), ((2, 1024), 3, 1024)]
            for shape, n, m in nm_shapes:
                numel = math.prod(shape)
                w, h = distribution(d, numel, dist, wdt, hdt)
                w, h = w.reshape(shape), h.reshape(shape)

                def run_nm(w=w, h=h, n=n, m=m):
                    wc, mc = w.clone(), torch.ones(w.shape, dtype=torch.bool)
                    wd, md = d.dev(w), d.dev(mc)
                    ops.nm_select_(wc, h, mc, n, m, 0.0, False)
                    ops.nm_select_(wd, d.dev(h), md, n, m, 0.0, False)
                    same(md, mc, f"nm_select_ {n}:{m}")
                    same(wd, wc, f"nm_select_ weight {n}:{m}")

                d.case(f"nm_select_ {dist} {wdt}/{hdt} {shape} {n}:{m}", run_nm)


def curvature_cases(d: Driver) -> None:
    for n in d.sizes:
        for dt in d.floats:
            for kind in ACT_KINDS.values():
                v, h, g = d.randn(n, dtype=dt), d.rand(n, dtype=dt), d.randn(n, dtype=dt)
                if kind in (ACT_KINDS["tanh"],):
                    v = v.tanh()
                elif kind in (ACT_KINDS["sigmoid"],):
                    v = v.sigmoid()
                elif kind in (ACT_KINDS["relu"],):
                    v = v.relu()
                params = {ACT_KINDS["leaky_relu"]: (0.01, 0.0, 0.0), ACT_KINDS["elu"]: (1.0, 1.0, 1.0),
                          ACT_KINDS["softplus"]: (1.0, 20.0, 0.0), ACT_KINDS["hardtanh"]: (-1.0, 1.0, 0.0)}
                p = params.get(kind, (0.0, 0.0, 0.0))

                def run_act(v=v, h=h, g=g, kind=kind, p=p):
                    for lm, want_g in ((False, True), (True, False), (False, False), (True, True)):
                        gg = None if (lm and not want_g) else g
                        a = ops.activation_hessian(v, h, gg, kind, *p, lm=lm, want_g=want_g)
                        b = ops.activation_hessian(d.dev(v), d.dev(h), None if gg is None else d.dev(gg), kind, *p,
                                                   lm=lm, want_g=want_g)
                        close(b[0], a[0], "activation_hessian h")
                        close(b[1], a[1], "activation_hessian g")

                d.case(f"activation_hessian kind={kind} n={n} {dt}", run_act)
    for rows, cols in [(0, 5), (1, 1), (4, 257)] + ([] if d.tiny else [(3, 7), (2, 1025), (8, 4097)]):
        for dt in d.floats:
            x = d.randn(rows, cols, dtype=dt)
            y = torch.softmax(x.float(), -1).to(dt)
            h, g = d.rand(rows, cols, dtype=dt), d.randn(rows, cols, dtype=dt)

            def run_sm(y=y, h=h, g=g):
                for lm, want_g in ((False, True), (True, False)):
                    gg = None if (lm and not want_g) else g
                    a = ops.softmax_hessian(y, h, gg, lm, want_g)
                    b = ops.softmax_hessian(d.dev(y), d.dev(h), None if gg is None else d.dev(gg), lm, want_g)
                    close(b[0], a[0], "softmax_hessian h")
                    close(b[1], a[1], "softmax_hessian g")

            d.case(f"softmax_hessian {rows}x{cols} {dt}", run_sm)

            def run_ln(x=x, h=h, g=g, cols=cols):
                if cols == 0:
                    return
                wt = d.randn(cols, dtype=dt)
                _, mean, rstd = torch.native_layer_norm(x.float(), [cols], None, None, 1e-5)
                for weight in (None, wt):
                    for lm, want_g in ((False, True), (True, False)):
                        gg = None if (lm and not want_g) else g
                        a = ops.layer_norm_hessian(x, mean, rstd, weight, h, gg, lm, want_g)
                        b = ops.layer_norm_hessian(d.dev(x), d.dev(mean), d.dev(rstd),
                                                   None if weight is None else d.dev(weight), d.dev(h),
                                                   None if gg is None else d.dev(gg), lm, want_g)
                        close(b[0], a[0], "layer_norm_hessian h")
                        close(b[1], a[1], "layer_norm_hessian g")

            d.case(f"layer_norm_hessian {rows}x{cols} {dt}", run_ln)

            def run_ce(x=x, rows=rows, cols=cols):
                if cols == 0:
                    return
                t = torch.randint(0, cols, (rows,), generator=d.gen)
                if rows > 1:
                    t[0] = -100
                for want_g in (True, False):
                    a = ops.cross_entropy_boundary(x, t, -100, 1.0 / max(rows, 1), want_g)
                    b = ops.cross_entropy_boundary(d.dev(x), d.dev(t), -100, 1.0 / max(rows, 1), want_g)
                    for i in range(3):
                        close(b[i], a[i], f"cross_entropy_boundary out {i}")

            d.case(f"cross_entropy_boundary {rows}x{cols} {dt}", run_ce)
    for (m, k, n) in [(0, 3, 4), (1, 1, 1), (33, 65, 17)] + ([] if d.tiny else [(7, 13, 5), (257, 129, 255)]):
        for dt in d.floats:
            a, b = d.randn(m, k, dtype=dt), d.randn(k, n, dtype=dt)

            def run_mm(a=a, b=b):
                for sa, sb in ((True, False), (False, True), (True, True)):
                    for fn in (ops.squared_mm, torch.ops.obd_ext._squared_mm_direct.default):
                        close(fn(d.dev(a), d.dev(b), sa, sb), fn(a, b, sa, sb), f"{fn} {sa}/{sb}")
                close(ops.squared_mm(d.dev(a[None]), d.dev(b[None]), True, False),
                      ops.squared_mm(a[None], b[None], True, False), "squared_mm batched")

            d.case(f"squared_mm {m}x{k}x{n} {dt}", run_mm)

            def run_cols(a=a):
                for acc_dt in (torch.float32, torch.float64):
                    ac = torch.zeros(a.shape[-1], dtype=acc_dt)
                    ad = d.dev(ac.clone())
                    ops.column_sq_sum_(ac, a)
                    ops.column_sq_sum_(ad, d.dev(a))
                    close(ad, ac, "column_sq_sum_")

            d.case(f"column_sq_sum_ {tuple(a.shape)} {dt}", run_cols)
    for dt in (torch.float32, torch.float64):
        x, w = d.randn(2, 3, 9, 7, dtype=dt), d.randn(4, 3, 3, 3, dtype=dt)
        out = torch.nn.functional.conv2d(x, w, padding=1)
        h = d.rand(*out.shape, dtype=dt)

        def run_conv(x=x, w=w, h=h):
            args = ([4], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, True])
            a = ops.squared_conv(h, x, w, *args)
            b = ops.squared_conv(d.dev(h), d.dev(x), d.dev(w), *args)
            for i in range(3):
                close(b[i], a[i], f"squared_conv out {i}")

        d.case(f"squared_conv {dt}", run_conv)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="fewer and smaller cases (the dry run, a quick sanitizer tool)")
    p.add_argument("--only", choices=["saliency", "selection", "curvature"], action="append",
                   help="run only these groups (default all)")
    p.add_argument("--json", help="write the counts and failures here")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not obd_ext.has_cuda_kernels():
        print("obd_ext was built without CUDA kernels", file=sys.stderr)
        return 1
    d = Driver(args.device, args.tiny)
    groups: Dict[str, Callable[[Driver], None]] = {"saliency": saliency_cases, "selection": selection_cases,
                                                   "curvature": curvature_cases}
    t0 = time.perf_counter()
    for name in args.only or list(groups):
        start = time.perf_counter()
        before = d.cases
        groups[name](d)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        print(f"  {name:10s} {d.cases - before:5d} cases  {time.perf_counter() - start:6.1f} s", flush=True)
    secs = time.perf_counter() - t0
    for f in d.failures[:50]:
        print("FAIL", f)
    print(f"sanitize_driver: {d.cases} cases on {args.device}, {len(d.failures)} failed, {secs:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "tiny": args.tiny, "cases": d.cases, "failures": d.failures,
                       "seconds": secs}, f, indent=1)
    return 1 if d.failures else 0


if __name__ == "__main__":
    sys.exit(main())
