"""Check that every obd_ext op has the kernel its backend needs registered.

Run with the obd_ext to check importable (no GPU is needed: loading the
library registers the kernels). With ``--cuda`` every op that has a CUDA
kernel in csrc/cuda/ must have one registered for the CUDA dispatch key; the
device-generic ops (csrc/generic/) must have a CompositeExplicitAutograd or
catch-all kernel. Prints one line per op and exits 1 if any is missing.

Usage: python bench/gpu/check_ops.py [--cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List

import torch

# Ops with no per-device kernels (csrc/generic/): CompositeExplicitAutograd
# (squared_conv) or CompositeImplicitAutograd with no tensor arguments (the
# block cache). Every other op has a CPU and a CUDA kernel.
DEVICE_GENERIC = {"squared_conv", "_block_cache_enter", "_block_cache_exit", "_block_cache_stats"}


def obd_ops() -> List[str]:
    """Every op of the obd_ext namespace, as registered by the loaded library."""
    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("obd_ext::"))


def check(cuda: bool) -> Dict[str, Dict[str, bool]]:
    """Per op: which of the dispatch keys it needs has a kernel."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    table = {}
    for op in obd_ops():
        name = f"obd_ext::{op}"
        if op in DEVICE_GENERIC:
            table[op] = {"generic": has(name, "CompositeExplicitAutograd") or has(name, "CompositeImplicitAutograd")}
            continue
        row = {"CPU": has(name, "CPU")}
        if cuda:
            row["CUDA"] = has(name, "CUDA")
        table[op] = row
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cuda", action="store_true", help="require the CUDA kernels too")
    p.add_argument("--json", help="write the table here")
    args = p.parse_args(argv)
    import obd_ext

    table = check(args.cuda)
    missing = [f"{op} ({key})" for op, row in table.items() for key, ok in row.items() if not ok]
    for op, row in table.items():
        print(f"  {op:28s} " + "  ".join(f"{k}={'yes' if v else 'MISSING'}" for k, v in row.items()))
    summary = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "obd_ext_file": obd_ext.__file__,
               "has_cuda_kernels": obd_ext.has_cuda_kernels(), "ops": table, "missing": missing}
    print(f"{len(table)} ops; has_cuda_kernels() = {summary['has_cuda_kernels']}; missing: {missing or 'none'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    if not table:
        print("no obd_ext ops are registered", file=sys.stderr)
        return 1
    if args.cuda and not summary["has_cuda_kernels"]:
        missing.append("has_cuda_kernels() is False")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
