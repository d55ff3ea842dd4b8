"""Markdown table of a bench_select.py JSON file (for bench/RESULTS.md).

Usage: python bench/select_table.py bench/out/select_cpu.json
"""

import json
import sys


def main(path: str) -> None:
    rows = json.load(open(path))["results"]
    base = {}
    for r in rows:
        if r["method"] != "obd_ext":
            base[(r["n"], r["dtype"], r["distribution"], r["sparsity"], r["method"])] = r
    print("| N | dtype | distribution | sparsity | obd_ext ms | extra B/param | x cat+kthvalue | x cat+topk "
          "| x global_unstructured |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if r["method"] != "obd_ext":
            continue

        def ratio(name):
            v = r.get(f"x_vs_{name}")
            return f"{v:.1f}" if v else "-"

        mem = r["extra_bytes_per_param"]
        print(f"| {r['n']:.0e} | {r['dtype']} | {r['distribution']} | {r['sparsity']} | {r['seconds'] * 1e3:.1f} "
              f"| {mem:.3f} | {ratio('cat+kthvalue')} | {ratio('cat+topk')} | {ratio('prune.global')} |")
    print()
    print("Baselines (ms, extra bytes per parameter), where measured:")
    print()
    print("| N | dtype | distribution | sparsity | method | ms | extra B/param | exactly k |")
    print("| ---: | --- | --- | ---: | --- | ---: | ---: | --- |")
    for (n, dt, dist, sp, m), r in base.items():
        if dist == "normal" and sp == 0.9:
            print(f"| {n:.0e} | {dt} | {dist} | {sp} | {m} | {r['seconds'] * 1e3:.1f} "
                  f"| {r['extra_bytes_per_param']:.1f} | {r['exact']} |")


if __name__ == "__main__":
    main(sys.argv[1])
