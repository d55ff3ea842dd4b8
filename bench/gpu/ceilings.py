"""The two ceilings every GPU benchmark is read against, measured in the same run.

- copy bandwidth: a device-to-device copy of a buffer far larger than L2
  (bytes read plus bytes written per second);
- bf16 matrix rate: an n x n x n bf16 matmul on random data (2 n^3 / s).

Both are timed with CUDA events after a warm-up; the median of the repeats is
reported. On the CPU (the dry run) the same code runs on tiny sizes with
wall-clock timing, so the script cannot rot.

Usage: python bench/gpu/ceilings.py [--device cuda] [--tiny] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import time_call  # noqa: E402  (bench/common.py: CUDA events on a GPU, perf_counter on the CPU)


def measure(device: str, tiny: bool) -> Dict[str, float]:
    """Copy bandwidth (bytes/s, read + write) and bf16 matmul rate (FLOP/s)."""
    copy_bytes = (1 << 20) if tiny else (4 << 30)  # 4 GiB: about 70x the H200's L2
    src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t_copy = time_call(lambda: dst.copy_(src), device, 5 if tiny else 10, warmup=3)
    del src, dst
    n = 64 if tiny else 8192
    a = torch.randn(n, n, device=device).to(torch.bfloat16)
    b = torch.randn(n, n, device=device).to(torch.bfloat16)
    t_mm = time_call(lambda: torch.mm(a, b), device, 5 if tiny else 10, warmup=3)
    return {"copy_bytes": float(copy_bytes), "copy_seconds": t_copy, "copy_bytes_per_s": 2.0 * copy_bytes / t_copy,
            "matmul_n": float(n), "matmul_seconds": t_mm, "bf16_flop_per_s": 2.0 * n ** 3 / t_mm}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (the dry run)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    r = measure(args.device, args.tiny)
    r["device"] = args.device
    r["device_name"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"ceilings on {r['device_name']}: copy {r['copy_bytes_per_s'] / 1e12:.3f} TB/s (read + write), "
          f"bf16 matmul {r['bf16_flop_per_s'] / 1e12:.1f} TFLOP/s (n={int(r['matmul_n'])})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
