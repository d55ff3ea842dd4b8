"""The linear rule's squared-operand product: BLAS on a squared copy against a
loop that squares on load, on the layer shapes of the curvature benchmark.

For each shape (rows x in) x (in x out), times on the chosen device:
- plain:        a @ b (the matching GEMM of an ordinary backward pass);
- blas-squared: obd_ext.ops.squared_mm (squares b into a temporary, then
                MKL's GEMM on the CPU, cuBLAS on CUDA);
- direct:       torch.ops.obd_ext._squared_mm_direct (squares on load: a
                blocked loop on the CPU, a shared-memory tiled kernel on CUDA).

Usage: python bench/bench_squared_mm.py [--device cuda] [--dtype bfloat16] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, print_table, time_call, write_json  # noqa: E402

import obd_ext  # noqa: E402

SHAPES = [  # (rows, in, out): MLP layers at batch 1024, GPT layers at 1024 tokens
    (1024, 784, 1024), (1024, 1024, 1024), (1024, 512, 1536), (1024, 512, 2048), (1024, 2048, 512),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows = []
    dtype = getattr(torch, args.dtype)
    for m, k, n in SHAPES:
        a = torch.randn(m, k, device=args.device).to(dtype)
        b = torch.randn(k, n, device=args.device).to(dtype)
        ref = (a.double() @ (b.double() * b.double())).to(dtype)
        tol = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
        for name, fn in [("plain", lambda: a @ b), ("blas-squared", lambda: obd_ext.ops.squared_mm(a, b, False, True)),
                         ("direct", lambda: torch.ops.obd_ext._squared_mm_direct(a, b, False, True))]:
            if name != "plain":
                torch.testing.assert_close(fn(), ref, rtol=tol, atol=tol * k)
            secs = time_call(fn, args.device, args.repeats)
            rows.append({"shape": f"{m}x{k} @ {k}x{n}", "device": args.device, "dtype": args.dtype, "method": name,
                         "seconds": secs, "gflops": 2 * m * k * n / secs / 1e9})
        base = [r for r in rows if r["shape"] == rows[-1]["shape"]]
        for r in base:
            r["x_plain"] = r["seconds"] / base[0]["seconds"]
    print("machine:", machine())
    print_table(rows, ["shape", "method", "seconds", "gflops", "x_plain"])
    write_json(args.json, {"machine": machine(), "results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
