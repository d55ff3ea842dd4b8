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

The layer-wise Optimal Brain Surgeon (``method="layerwise-obs"``, issue 18) on
the same block: the statistics ``X^T X`` of each distinct input (accumulated in
float32 over chunks of tokens, as calibration batches would), then
``obs_prune_`` per weight (q/k/v stacked, gate/up stacked: one Gram matrix,
one factorisation, one sweep each), split into statistics, factorisation
(damping + Cholesky, timed alone) and sweep (the rest of ``obs_prune_``). Its
result is checked first against the float64 reference on a small layer.

Then the whole pipeline on a transformers Llama with ``--timed-blocks`` blocks
of the same shapes, the calibration tokens as ``--seq``-long sequences,
calibration forwards included: obd_ext's ``prune_layerwise`` (layerwise-obs,
layerwise-obd) and, where ``llmcompressor`` imports (``/work/benchenv``),
llm-compressor's ``oneshot`` with SparseGPT and Wanda; per-block time is the
call's time over the timed blocks. Without transformers or llmcompressor those
rows are skipped with a note.

Masks are compared before timing (equal up to ties). On a GPU the default is
the 7B shape; on CPU a scaled-down one (``--scale``). With ``--semi`` on a
GPU, 2:4-pruned Linear layers are exported with
``torch.sparse.to_sparse_semi_structured`` and their matmul timed against
dense across batch sizes.

Usage:
    python bench/bench_llm.py                     # GPU: 7B shapes; CPU: --scale 0.125
    python bench/bench_llm.py --quick             # a smoke run
    python bench/bench_llm.py --device cuda --semi --json bench/out/llm.json
    /work/benchenv/bin/python bench/bench_llm.py --methods obs,hf   # with llm-compressor's rows
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import exact_rss_accounting, machine, peak_extra_bytes, print_table, sync, time_call, write_json  # noqa: E402

import obd_ext  # noqa: E402
from obd_ext import reference  # noqa: E402
from obd_ext.layerwise import obs_prune_, prune_layerwise  # noqa: E402
from obd_ext.layerwise.surgeon import damped_hessian, reverse_cholesky  # noqa: E402
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


def gram_stats(inputs: Dict[str, torch.Tensor], chunk: int = 8192) -> Dict[str, torch.Tensor]:
    """``X^T X`` of each distinct input in float32, accumulated over chunks of tokens (as over calibration batches:
    the float32 copy of one chunk at a time, never of all the activations)."""
    grams = {}
    for src, x in inputs.items():
        xs = x.reshape(-1, x.shape[-1])
        g = torch.zeros((xs.shape[1], xs.shape[1]), dtype=torch.float32, device=x.device)
        for c in range(0, xs.shape[0], chunk):
            part = xs[c:c + chunk].float()
            g.addmm_(part.t(), part)
        grams[src] = g
    return grams


def input_groups(shapes) -> Dict[str, List[str]]:
    """Distinct input -> the layers reading it (q/k/v, gate/up): swept together, as prune_layerwise does."""
    groups: Dict[str, List[str]] = {}
    for name, _, _, src in shapes:
        groups.setdefault(src, []).append(name)
    return groups


def obs_block(weights: Dict[str, torch.Tensor], inputs: Dict[str, torch.Tensor], shapes, sparsity: float,
              pattern: str, parts: Optional[Dict[str, float]] = None) -> None:
    """The surgeon on one block: statistics, then one obs_prune_ per distinct input (rows stacked)."""
    device = next(iter(inputs.values())).device.type
    t0 = time.perf_counter()
    grams = gram_stats(inputs)
    sync(device)
    t1 = time.perf_counter()
    for src, names in input_groups(shapes).items():
        stacked = torch.cat([weights[n] for n in names]) if len(names) > 1 else weights[names[0]]
        obs_prune_(stacked, grams[src], sparsity=sparsity if pattern == "unstructured" else None, pattern=pattern,
                   scope="row", name=src)
        start = 0
        for n in names if len(names) > 1 else ():
            weights[n].copy_(stacked[start:start + weights[n].shape[0]])
            start += weights[n].shape[0]
    sync(device)
    if parts is not None:
        parts["stats_s"] = t1 - t0
        parts["prune_s"] = time.perf_counter() - t1


def factor_block(grams: Dict[str, torch.Tensor]) -> None:
    """What obs_prune_ does before its sweep: the damped Hessian and its reverse Cholesky factor, per input."""
    for g in grams.values():
        h, _, _ = damped_hessian(g, 0.01, torch.float32)
        assert reverse_cholesky(h) is not None


def check_surgeon(pattern: str, device: str) -> float:
    """Fraction of mask entries where float32 obs_prune_ on ``device`` and the float64 reference differ (small
    layer; near-ties may split differently in float32: must be ~0). Also checks the pattern is met exactly."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 128, generator=g) + torch.randn(2048, 1, generator=g)
    w = torch.randn(32, 128, generator=g) * 0.02
    gram = x.T @ x
    sparsity = 0.5 if pattern == "unstructured" else None
    ours = w.to(device)
    res = obs_prune_(ours, gram.to(device), sparsity=sparsity, pattern=pattern, blocksize=64)
    _, keep, _ = reference.obs_prune(w.double(), gram.double(), sparsity=sparsity, pattern=pattern, blocksize=64)
    if pattern == "unstructured":
        assert bool((res.mask.sum(1) == 64).all()), "the surgeon missed the per-row count"
    else:
        obd_ext.check_nm_pattern(ours, pattern, "surgeon")
    return float((res.mask.cpu() != keep).double().mean())


def hf_rows(d: int, ffn: int, timed_blocks: int, blocks: int, tokens: int, seq: int, pattern: str, device: str,
            methods: List[str]) -> List[Dict[str, object]]:
    """Whole pipelines on a transformers Llama of the same shapes: obd_ext's prune_layerwise and llm-compressor."""
    try:
        import transformers
    except ImportError as e:
        print(f"hf rows skipped: transformers is not importable ({e})")
        return []
    seq = min(seq, tokens)
    heads = max(1, d // 128)
    cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=d, intermediate_size=ffn,
                                   num_hidden_layers=timed_blocks, num_attention_heads=heads,
                                   num_key_value_heads=heads, max_position_embeddings=seq)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (tokens // seq, seq), generator=torch.Generator().manual_seed(1))
    batches = [ids[i:i + 1] for i in range(ids.shape[0])]
    sparsity = 0.5 if pattern == "unstructured" else None
    rows = []
    label = f"{len(batches)} x {seq} tokens, {timed_blocks} blocks timed"
    def wanted(row: str) -> bool:
        return "hf" in methods or row in methods

    # warm-up: the first call of each pipeline in a process pays imports and first-use costs
    tiny = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1, max_position_embeddings=16)).to(torch.bfloat16).eval().to(device)
    for method in ("layerwise-obs", "layerwise-obd"):
        prune_layerwise(tiny, [torch.randint(0, 64, (1, 16))], sparsity=sparsity, pattern=pattern, method=method,
                        progress=False, run=lambda m, b: m(b.to(device)))

    for method in ("layerwise-obs", "layerwise-obd"):
        if not wanted("hf-" + method.split("-")[1]):
            continue
        model = copy.deepcopy(base).to(device)
        sync(device)
        t0 = time.perf_counter()
        prune_layerwise(model, batches, sparsity=sparsity, pattern=pattern, method=method, progress=False,
                        run=lambda m, b: m(b.to(device)))
        sync(device)
        dt = (time.perf_counter() - t0) / timed_blocks
        rows.append({"pattern": pattern, "method": f"obd_ext prune_layerwise {method} (HF, {label})", "block_s": dt,
                     "model_s": dt * blocks, "mask_mismatch": 0.0})
        del model
    if not (wanted("llmc-sparsegpt") or wanted("llmc-wanda")):
        return rows
    try:
        import llmcompressor  # noqa: F401
    except ImportError as e:
        print(f"llm-compressor rows skipped: llmcompressor is not importable here ({e}); run with "
              "/work/benchenv/bin/python")
        return rows
    os.environ.setdefault("LLM_COMPRESSOR_LOG_DISABLED", "true")  # the value it reads
    from torch.utils.data import DataLoader

    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    # oneshot wants a processor with a dataset; the data are token ids already, so any word-level one serves
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    import tempfile

    config_dir = tempfile.mkdtemp(prefix="bench_llm_cfg_")
    cfg.save_pretrained(config_dir)  # oneshot reads the model's config back from its name_or_path
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({f"t{i}": i for i in range(cfg.vocab_size)}, unk_token="t0")),
        unk_token="t0", pad_token="t0")
    for name, modifier in (("sparsegpt", SparseGPTModifier), ("wanda", WandaPruningModifier)):
        if not wanted(f"llmc-{name}"):
            continue
        try:
            from llmcompressor.core import reset_session
            reset_session()
        except ImportError:
            pass
        model = copy.deepcopy(base).to(device)
        model.config.name_or_path = config_dir
        targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
        recipe = modifier(sparsity=0.5, mask_structure="0:0" if pattern == "unstructured" else pattern,
                          targets=targets, ignore=["re:.*lm_head"])
        loader = DataLoader([{"input_ids": b[0], "attention_mask": torch.ones_like(b[0])} for b in batches],
                            batch_size=1, shuffle=False)
        sync(device)
        t0 = time.perf_counter()
        oneshot(model=model, dataset=loader, recipe=[recipe], tokenizer=tokenizer, num_calibration_samples=len(batches))
        sync(device)
        dt = (time.perf_counter() - t0) / timed_blocks
        w = model.model.layers[0].mlp.up_proj.weight
        zeros = float((w == 0).double().mean())
        assert abs(zeros - 0.5) < 0.01, f"llm-compressor {name}: {zeros:.3f} of up_proj is zero, not 0.5"
        rows.append({"pattern": pattern, "method": f"llm-compressor {name} oneshot (HF, {label})", "block_s": dt,
                     "model_s": dt * blocks, "mask_mismatch": 0.0})
        del model
    return rows


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


def restorer(weights: Dict[str, torch.Tensor]):
    """A ``setup`` for ``time_call`` that puts ``weights`` back as they are now (each timed call prunes them)."""
    fresh = {k: v.clone() for k, v in weights.items()}

    def setup() -> None:
        for k in weights:
            weights[k].copy_(fresh[k])
    return setup


def time_blocks(prune_block, shapes, tokens: int, dtype, device: str, args, after=None):
    """Seconds and peak extra bytes of ``prune_block(weights, inputs)`` on each of ``--timed-blocks`` fresh blocks.

    The weights are put back before every timed run (each run prunes them in
    place); ``after(weights, inputs)``, if given, then runs on the fresh block.
    """
    times, mems = [], []
    for b in range(args.timed_blocks):
        weights, inputs = make_block(shapes, tokens, dtype, device, seed=10 + b)
        setup = restorer(weights)
        times.append(time_call(lambda: prune_block(weights, inputs), device, args.repeats, setup=setup))
        setup()
        mems.append(peak_extra_bytes(lambda: prune_block(weights, inputs), device))
        setup()
        if after is not None:
            after(weights, inputs)
        del weights, inputs, setup
    return times, mems


def surgeon_row(shapes, tokens: int, dtype, device: str, pattern: str, args) -> Dict[str, object]:
    """The surgeon on ``--timed-blocks`` blocks: total, and statistics / factorisation / sweep, and peak memory."""
    mismatch = check_surgeon(pattern, device)
    assert mismatch < 1e-3, f"{pattern}: the surgeon and its float64 reference disagree on {mismatch:.2%} of entries"
    parts, factors = [], []

    def split(weights, inputs) -> None:  # statistics / factorisation / sweep of one untimed run
        part: Dict[str, float] = {}
        obs_block(weights, inputs, shapes, 0.5, pattern, part)
        parts.append(part)
        grams = gram_stats(inputs)
        factors.append(time_call(lambda: factor_block(grams), device, args.repeats))

    times, mems = time_blocks(lambda w, x: obs_block(w, x, shapes, 0.5, pattern), shapes, tokens, dtype, device,
                              args, after=split)
    n = len(times)
    per_block = sum(times) / n
    stats = sum(p["stats_s"] for p in parts) / n
    factor = sum(factors) / n
    prune = sum(p["prune_s"] for p in parts) / n
    mem = max(mems) if all(m is not None for m in mems) else None
    params = sum(o * i for _, o, i, _ in shapes)
    return {"pattern": pattern, "method": "obd_ext layerwise-obs (surgeon)", "block_s": per_block,
            "model_s": per_block * args.blocks, "stats_s": stats, "factor_s": factor, "sweep_s": prune - factor,
            "mask_mismatch": mismatch, "extra_B_per_param": None if mem is None else mem / params,
            "extra_MiB_per_block": None if mem is None else mem / 2 ** 20}


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
    p.add_argument("--methods", default="obs,hf",
                   help="besides obd_ext's layer-wise OBD and plain Wanda (always run): obs (the surgeon on the "
                        "block), hf (all of: hf-obs, hf-obd, llmc-sparsegpt, llmc-wanda: whole pipelines on a "
                        "transformers Llama; llmc rows where llmcompressor imports), or any of those")
    p.add_argument("--seq", type=int, default=2048, help="sequence length of the hf rows' calibration")
    p.add_argument("--semi", action="store_true", help="time 2:4 semi-structured Linear layers (CUDA)")
    p.add_argument("--quick", action="store_true", help="a smoke run (tiny shapes)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    device = args.device
    scale = args.scale or (1.0 if device.startswith("cuda") else 0.125)
    d, ffn, tokens = int(4096 * scale), int(11008 * scale), int(args.tokens * scale)
    if args.quick:
        d, ffn, tokens, args.blocks, args.timed_blocks, args.repeats, args.seq = 64, 176, 512, 2, 1, 1, 128
    d, ffn = d - d % 8, ffn - ffn % 8
    shapes = block_shapes(d, ffn)
    dtype = torch.bfloat16
    rows = []
    methods = args.methods.split(",")
    for pattern in args.patterns.split(","):
        mismatch = check_same_masks(shapes, min(tokens, 4096), dtype, device, 0.5, pattern)
        assert mismatch < 1e-3, f"{pattern}: obd_ext and the plain-torch path disagree on {mismatch:.2%} of entries"
        for label, fn in (("obd_ext", obd_block), ("plain torch (Wanda)", torch_block)):
            times, mems = time_blocks(lambda w, x: fn(w, x, shapes, 0.5, pattern), shapes, tokens, dtype, device,
                                      args)
            per_block = sum(times) / len(times)
            params = sum(o * i for _, o, i, _ in shapes)
            mem = max(m for m in mems) if all(m is not None for m in mems) else None
            rows.append({"pattern": pattern, "method": label, "block_s": per_block,
                         "model_s": per_block * args.blocks, "mask_mismatch": mismatch,
                         "extra_B_per_param": None if mem is None else mem / params})
        base = rows[-1]["model_s"]
        rows[-2]["x_vs_torch"] = base / rows[-2]["model_s"]
        rows[-1]["x_vs_torch"] = 1.0
        if "obs" in methods:
            rows.append(surgeon_row(shapes, tokens, dtype, device, pattern, args))
        if any(m == "hf" or m.startswith(("hf-", "llmc-")) for m in methods):
            rows += hf_rows(d, ffn, args.timed_blocks, args.blocks, tokens, args.seq, pattern, device, methods)
    print(f"Llama-shaped model: d={d}, ffn={ffn}, {args.blocks} blocks, {tokens} calibration tokens, bf16, {device}, "
          f"{torch.get_num_threads()} threads")
    print_table(rows, ["pattern", "method", "block_s", "model_s", "x_vs_torch", "stats_s", "factor_s", "sweep_s",
                       "extra_B_per_param", "mask_mismatch"])
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
