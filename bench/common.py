"""Shared benchmark plumbing: timing, peak-memory measurement, tables, JSON.

Timing: wall clock around a synchronised call on the CPU, CUDA events on the
GPU; a warm-up first; the median of the repeats. Memory: the peak number of
bytes a call allocates beyond what existed before it (CUDA: the caching
allocator's peak; CPU: the process's peak resident set, reset through
/proc/self/clear_refs, so it counts every allocation, torch's or not).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: str, repeats: int, setup: Optional[Callable[[], None]] = None,
              warmup: int = 1) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs; ``setup`` runs untimed before each."""
    times = []
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        sync(device)
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    return statistics.median(times)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(fn: Callable[[], object], device: str) -> Optional[int]:
    """Peak bytes allocated by one call of ``fn`` beyond what was live before it."""
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    base = _rss_kb("VmRSS")
    fn()
    return max(0, (_rss_kb("VmHWM") - base) * 1024)


def machine() -> Dict[str, object]:
    info: Dict[str, object] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_table(rows: List[Dict[str, object]], columns: List[str]) -> None:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def write_json(path: Optional[str], payload: Dict[str, object]) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")


def keep_allocator_memory() -> None:
    """Re-exec with glibc's trimming and mmap thresholds at 4 GiB.

    By default glibc gives large freed blocks back to the kernel, and the next
    tensor of that size is faulted in again page by page: on this project's VM
    that is 10-15% of a plain forward+backward at vocabulary 32k, and how much
    depends on what ran before (the heap's state). With the thresholds fixed,
    no method pays for the allocator, so a ratio compares the work itself.
    """
    _rerun_with_glibc(MALLOC_TRIM_THRESHOLD_="4294967296", MALLOC_MMAP_THRESHOLD_="4294967296")


def exact_rss_accounting() -> None:
    """Re-exec with glibc's mmap threshold fixed at 64 KiB.

    glibc serves allocations below a dynamic threshold (up to 32 MiB) from a
    heap whose pages may already be resident, so the peak-RSS measurement
    would miss them; with a fixed threshold every sizeable allocation is a
    fresh mapping and shows up in the peak.
    """
    _rerun_with_glibc(MALLOC_MMAP_THRESHOLD_="65536")


def _rerun_with_glibc(**settings: str) -> None:
    """Re-exec this script with glibc malloc settings (environment variables read at
    process start), unless the first one is already set (a setting chosen by the
    caller wins, and the re-executed process does not loop)."""
    first = next(iter(settings))
    if os.environ.get(first) is None and sys.platform.startswith("linux"):
        os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, **settings))
