"""Layer-wise OBD pruning of a Llama-shaped model: obd_ext against plain PyTorch (Wanda-style).

For every block of a Llama-7B-shaped model (d=4096, ffn=11008, 32 blocks;
random bf16 weights; random calibration activations of 128 x 2048 tokens),
the work after the forward passes is timed, layer by layer:

- statistics ``sum_n x_nj^2`` of each distinct layer input (q/k/v share one,
  gate/up share one, o and down have their own),
- saliency ``w^2 sum x^2`` and the per-output-row selection of the lowest
  half (or 2:4), zeroing the weights.

Paths:
- obd_ext:     ops.column_sq_sum_ (reads bf16, accumulates fp32, no upcast
               copy) + prune_rows_ / prune_nm_ (fused saliency + radix select
               + mask write);
- plain torch: Wanda's reference code: ``x.float().norm(dim=0)`` per input,
               ``|W| * norm``, ``torch.sort`` per row, scatter a mask, zero.

Masks are compared before timing (equal up to ties). On a GPU the default is
the 7B shape; on CPU a scaled-down one (``--scale``). With ``--semi`` on a
GPU, 2:4-pruned Linear layers are exported with
``torch.sparse.to_sparse_semi_structured`` and their matmul timed against
dense across batch sizes.

Usage:
    python bench/bench_llm.py                     # GPU: 7B shapes; CPU: --scale 0.125
    python bench/bench_llm.py --quick             # a smoke run
    python bench/bench_llm.py --device cuda --semi --json bench/out/llm.json
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import exact_rss_accounting, machine, peak_extra_bytes, print_table, sync, time_call, write_json  # noqa: E402

import obd_ext  # noqa: E402
from obd_ext.ops import column_sq_sum_  # noqa: E402

# (name, output features, input features, which input it reads) of one Llama block
LLAMA_LAYERS = [("q", "d", "d", "attn_in"), ("k", "d", "d", "attn_in"), ("v", "d", "d", "attn_in"),
                ("o", "d", "d", "o_in"), ("gate", "ffn", "d", "mlp_in"), ("up", "ffn", "d", "mlp_in"),
                ("down", "d", "ffn", "down_in")]


def block_shapes(d: int, ffn: int):
    size = {"d": d, "ffn": ffn}
    return [(n, size[o], size[i], src) for n, o, i, src in LLAMA_LAYERS]


def obd_block(weights: Dict[str, torch.Tensor], inputs: Dict[str, torch.Tensor], shapes, sparsity: float,
              pattern: str) -> None:
    stats = {}
    for src, x in inputs.items():
        stats[src] = column_sq_sum_(torch.zeros(x.shape[-1], dtype=torch.float32, device=x.device), x)
    for name, out_f, _, src in shapes:
        w = weights[name]
        h = (2 * stats[src]).expand(out_f, -1)
        if pattern == "2:4":
            obd_ext.prune_nm_(w, h, "2:4")
        else:
            obd_ext.prune_rows_(w, h, sparsity=sparsity)


def torch_block(weights: Dict[str, torch.Tensor], inputs: Dict[str, torch.Tensor], shapes, sparsity: float,
                pattern: str) -> None:
    norms = {src: x.float().norm(dim=0) for src, x in inputs.items()}  # Wanda's scaler_row, upcast as it does
    for name, out_f, in_f, src in shapes:
        w = weights[name]
        score = w.abs().float() * norms[src].reshape(1, -1)
        if pattern == "2:4":
            groups = score.reshape(out_f, -1, 4)
            idx = torch.topk(groups, 2, dim=-1, largest=False).indices
            mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True).reshape(out_f, in_f)
        else:
            k = obd_ext.count_for_sparsity(sparsity, in_f)
            idx = torch.sort(score, dim=-1, stable=True).indices[:, :k]
            mask = torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)
        w.masked_fill_(mask, 0)


def make_block(shapes, tokens: int, dtype, device, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    weights = {n: (torch.randn(o, i, generator=g) * 0.02).to(dtype).to(device) for n, o, i, _ in shapes}
    widths = {src: i for _, _, i, src in shapes}
    inputs = {src: torch.randn(tokens, i, generator=g).to(dtype).to(device) for src, i in widths.items()}
    return weights, inputs


def check_same_masks(shapes, tokens, dtype, device, sparsity, pattern) -> float:
    """Fraction of entries whose mask differs (ties may split differently; must be ~0)."""
    weights, inputs = make_block(shapes, tokens, dtype, device, seed=1)
    other = {k: v.clone() for k, v in weights.items()}
    obd_block(weights, inputs, shapes, sparsity, pattern)
    torch_block(other, inputs, shapes, sparsity, pattern)
    diff = sum(int(((weights[n] == 0) != (other[n] == 0)).sum()) for n in weights)
    return diff / sum(w.numel() for w in weights.values())


def semi_structured_rows(d: int, ffn: int, batches: List[int], device: str, dtype) -> List[Dict[str, object]]:
    """Linear layers after 2:4 pruning: dense matmul against torch's 2:4 semi-structured kernels."""
    from torch.sparse import to_sparse_semi_structured

    rows = []
    for out_f, in_f in [(d, d), (ffn, d), (d, ffn)]:
        w = torch.randn(out_f, in_f, device=device, dtype=dtype) * 0.02
        obd_ext.prune_nm_(w, torch.ones_like(w), "2:4")
        ws = to_sparse_semi_structured(w)
        for b in batches:
            x = torch.randn(b, in_f, device=device, dtype=dtype)
            torch.testing.assert_close(torch.nn.functional.linear(x, ws), torch.nn.functional.linear(x, w),
                                       rtol=2e-2, atol=2e-2)
            dense = time_call(lambda: torch.nn.functional.linear(x, w), device, 20)
            sparse = time_call(lambda: torch.nn.functional.linear(x, ws), device, 20)
            rows.append({"shape": f"{out_f}x{in_f}", "batch": b, "dense_ms": dense * 1e3, "semi_ms": sparse * 1e3,
                         "speedup": dense / sparse})
    return rows


def main(argv=None) -> int:
    if argv is None:
        exact_rss_accounting()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--scale", type=float, help="shrink d, ffn and tokens by this (default 1 on GPU, 0.125 on CPU)")
    p.add_argument("--blocks", type=int, default=32, help="blocks of the model (the 7B has 32)")
    p.add_argument("--timed-blocks", type=int, default=2,
                   help="blocks actually timed; the whole-model time is per-block time x --blocks")
    p.add_argument("--tokens", type=int, default=128 * 2048, help="calibration tokens (128 x 2048)")
    p.add_argument("--patterns", default="unstructured,2:4")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--semi", action="store_true", help="time 2:4 semi-structured Linear layers (CUDA)")
    p.add_argument("--quick", action="store_true", help="a smoke run (tiny shapes)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    device = args.device
    scale = args.scale or (1.0 if device.startswith("cuda") else 0.125)
    d, ffn, tokens = int(4096 * scale), int(11008 * scale), int(args.tokens * scale)
    if args.quick:
        d, ffn, tokens, args.blocks, args.timed_blocks, args.repeats = 64, 176, 512, 2, 1, 1
    d, ffn = d - d % 8, ffn - ffn % 8
    shapes = block_shapes(d, ffn)
    dtype = torch.bfloat16
    rows = []
    for pattern in args.patterns.split(","):
        mismatch = check_same_masks(shapes, min(tokens, 4096), dtype, device, 0.5, pattern)
        assert mismatch < 1e-3, f"{pattern}: obd_ext and the plain-torch path disagree on {mismatch:.2%} of entries"
        for label, fn in (("obd_ext", obd_block), ("plain torch (Wanda)", torch_block)):
            times, mems = [], []
            for b in range(args.timed_blocks):
                weights, inputs = make_block(shapes, tokens, dtype, device, seed=10 + b)
                fresh = {k: v.clone() for k, v in weights.items()}

                def setup(fresh=fresh, weights=weights):
                    for k in weights:
                        weights[k].copy_(fresh[k])

                times.append(time_call(lambda: fn(weights, inputs, shapes, 0.5, pattern), device, args.repeats,
                                       setup=setup))
                setup()
                mems.append(peak_extra_bytes(lambda: fn(weights, inputs, shapes, 0.5, pattern), device))
                del weights, inputs, fresh
            per_block = sum(times) / len(times)
            params = sum(o * i for _, o, i, _ in shapes)
            mem = max(m for m in mems) if all(m is not None for m in mems) else None
            rows.append({"pattern": pattern, "method": label, "block_s": per_block,
                         "model_s": per_block * args.blocks, "mask_mismatch": mismatch,
                         "extra_B_per_param": None if mem is None else mem / params})
        base = rows[-1]["model_s"]
        rows[-2]["x_vs_torch"] = base / rows[-2]["model_s"]
        rows[-1]["x_vs_torch"] = 1.0
    print(f"Llama-shaped model: d={d}, ffn={ffn}, {args.blocks} blocks, {tokens} calibration tokens, bf16, {device}")
    print_table(rows, ["pattern", "method", "block_s", "model_s", "x_vs_torch", "extra_B_per_param", "mask_mismatch"])
    payload = {"machine": machine(), "device": device, "d": d, "ffn": ffn, "blocks": args.blocks, "tokens": tokens,
               "results": rows}
    if args.semi:
        if not device.startswith("cuda"):
            print("--semi: 2:4 semi-structured tensors are CUDA-only in torch; skipped on", device)
        else:
            semi = semi_structured_rows(d, ffn, [1, 16, 128, 1024, 4096], device, torch.float16)
            print_table(semi, ["shape", "batch", "dense_ms", "semi_ms", "speedup"])
            payload["semi_structured"] = semi
    sync(device)
    write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
