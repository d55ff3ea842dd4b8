"""Curvature methods against one plain forward + backward, in the same run.

For each model (MLP 784-1024-1024-10 at batch 1024, LeNet-5 at 28x28 batch
256, a ResNet-18-like net at 32x32 batch 128, a GPT-style model d=512, 4
layers, seq 256 at vocabularies 8k and 32k, and two Hugging Face models built
from configs: GPT-2 d=512, 4 layers, with its default activation gelu_new
(written out as elementwise ops, which the sweep treats as one region), and a
Llama with 2 blocks d=512 (RMSNorm, rotary embeddings, SwiGLU), both at
vocabulary 8k, seq 256) it times, per batch, a call over
``--batches`` batches (3 by default: curvature is computed over a data set,
and obd_ext's sweep reuses memory from one batch to the next, see
obd_ext/block_cache.py; ``--batches 1`` times a single batch) of:

- fwd+bwd:    model(x), loss, backward (the baseline every ratio divides by);
- obd, lm:    obd_ext.hessian_diag (the back-propagated diagonal);
- fisher, ggn-mc, hutchinson (1 sample): the other estimators;
- BackPACK DiagGGNExact, DiagGGNMC, DiagHessian where BackPACK supports the
  model (a benchmark-only dependency: `pip install --no-deps
  backpack-for-pytorch einops unfoldNd`, so torch is not replaced).

and reports the median seconds, the ratio to fwd+bwd, and the peak extra
memory (bytes per parameter). `--quick` shrinks every model for a smoke run.

The methods of a model are timed in rounds (each round runs every method
once) and the ratio is the median of the per-round ratios: a ratio then
compares calls made seconds apart, so slow drifts of a shared or virtualised
machine (page reclaim, other tenants) cancel instead of landing on one
method's block of repeats.

`--keep-memory` re-runs the process with glibc keeping the memory it frees, so
that page faults (which depend on what ran before) weigh on no method.

Usage: python bench/bench_curvature.py [--quick] [--models mlp,lenet] [--batches 3] [--keep-memory] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import keep_allocator_memory, machine, peak_extra_bytes, print_table, write_json  # noqa: E402

import obd_ext  # noqa: E402
from obd_ext.models import GPT, LeNet5, SmallResNet, mlp  # noqa: E402

METHODS = ["fwd+bwd", "obd", "lm", "fisher", "ggn-mc", "hutchinson"]
BACKPACK = ["bp:DiagGGNExact", "bp:DiagGGNMC", "bp:DiagHessian"]


def lenet_sequential() -> nn.Sequential:
    m = LeNet5()
    return nn.Sequential(*m.features, *m.classifier)


class CausalLMLogits(nn.Module):
    """A Hugging Face causal LM as a function of token ids to logits [tokens, vocab]."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, use_cache=False).logits.flatten(0, 1)


def hf_gpt2(vocab: int, d: int, layers: int, heads: int, seq: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_embd=d, n_layer=layers, n_head=heads, n_positions=seq,
                     activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return CausalLMLogits(GPT2LMHeadModel(cfg).eval())


def hf_llama(vocab: int, d: int, layers: int, heads: int, seq: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=int(d * 8 / 3) // 32 * 32,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=seq)
    return CausalLMLogits(LlamaForCausalLM(cfg).eval())


def cases(quick: bool) -> Dict[str, Tuple[Callable[[], nn.Module], Callable[[], Tuple[torch.Tensor, torch.Tensor]], bool]]:
    """name -> (model factory, batch factory, BackPACK-compatible)."""
    g = torch.Generator().manual_seed(0)
    if quick:
        return {
            "mlp": (lambda: mlp((64, 32, 32, 10)), lambda: (torch.randn(32, 64, generator=g),
                                                           torch.randint(0, 10, (32,), generator=g)), True),
            "lenet": (lenet_sequential, lambda: (torch.randn(8, 1, 28, 28, generator=g),
                                                 torch.randint(0, 10, (8,), generator=g)), True),
            "resnet": (lambda: SmallResNet(widths=(8, 16), blocks=(1, 1)).eval(),
                       lambda: (torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)),
                       False),
            "gpt-v512": (lambda: GPT(vocab=512, d=32, layers=2, heads=4, seq=16),
                         lambda: (torch.randint(0, 512, (2, 16), generator=g),
                                  torch.randint(0, 512, (32,), generator=g)), False),
            "hf-gpt2-gelu_new": (lambda: hf_gpt2(512, 32, 2, 4, 16),
                                 lambda: (torch.randint(0, 512, (2, 16), generator=g),
                                          torch.randint(0, 512, (32,), generator=g)), False),
            "hf-llama": (lambda: hf_llama(512, 32, 2, 4, 16),
                         lambda: (torch.randint(0, 512, (2, 16), generator=g),
                                  torch.randint(0, 512, (32,), generator=g)), False),
        }
    return {
        "mlp": (lambda: mlp((784, 1024, 1024, 10)), lambda: (torch.randn(1024, 784, generator=g),
                                                              torch.randint(0, 10, (1024,), generator=g)), True),
        "lenet": (lenet_sequential, lambda: (torch.randn(256, 1, 28, 28, generator=g),
                                             torch.randint(0, 10, (256,), generator=g)), True),
        "resnet18": (lambda: SmallResNet().eval(), lambda: (torch.randn(128, 3, 32, 32, generator=g),
                                                            torch.randint(0, 10, (128,), generator=g)), False),
        "gpt-v8k": (lambda: GPT(vocab=8192, d=512, layers=4, heads=8, seq=256),
                    lambda: (torch.randint(0, 8192, (4, 256), generator=g),
                             torch.randint(0, 8192, (1024,), generator=g)), False),
        "gpt-v32k": (lambda: GPT(vocab=32768, d=512, layers=4, heads=8, seq=256),
                     lambda: (torch.randint(0, 32768, (4, 256), generator=g),
                              torch.randint(0, 32768, (1024,), generator=g)), False),
        "hf-gpt2-gelu_new": (lambda: hf_gpt2(8192, 512, 4, 8, 256),
                             lambda: (torch.randint(0, 8192, (4, 256), generator=g),
                                      torch.randint(0, 8192, (1024,), generator=g)), False),
        "hf-llama": (lambda: hf_llama(8192, 512, 2, 8, 256),
                     lambda: (torch.randint(0, 8192, (4, 256), generator=g),
                              torch.randint(0, 8192, (1024,), generator=g)), False),
    }


def run_method(name: str, model: nn.Module, loss_fn, x, y, batches: int) -> Callable[[], object]:
    """One call of a method over ``batches`` batches (the same batch again)."""
    if name == "fwd+bwd":
        def f():
            for _ in range(batches):
                model.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()
        return f
    if name.startswith("bp:"):
        import backpack
        from backpack import extensions

        ext = getattr(extensions, name[3:])()
        bmodel = backpack.extend(model)
        bloss = backpack.extend(type(loss_fn)())  # its own copy: extend() adds hooks to the module

        def f():
            for _ in range(batches):
                bmodel.zero_grad(set_to_none=True)
                with backpack.backpack(ext):
                    bloss(bmodel(x), y).backward()
        return f
    return lambda: obd_ext.hessian_diag(model, loss_fn, [(x, y)] * batches, method=name, progress=False)


def timed_rounds(fns: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, List[float]]:
    """Seconds of every call: ``repeats`` rounds, each calling every method once, in order."""
    times: Dict[str, List[float]] = {m: [] for m in fns}
    for _ in range(repeats):
        for method, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[method].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    # No exact_rss_accounting() here: a fixed mmap threshold makes every tensor
    # allocation a fresh mapping, and the page faults would slow the sweeps
    # (which allocate per node) more than fwd+bwd. Memory is indicative.
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", default=None, help="comma-separated subset of the cases")
    p.add_argument("--methods", default=",".join(METHODS + BACKPACK))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", type=int, default=3,
                   help="batches per call (curvature is computed over a data set); times are per batch")
    p.add_argument("--slow-s", type=float, default=30.0, help="time a method once if one call takes longer")
    p.add_argument("--keep-memory", action="store_true",
                   help="run with glibc keeping freed memory (no page faults for any method; bench/common.py)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.keep_memory:
        keep_allocator_memory()
    try:
        import backpack  # noqa: F401

        have_backpack = True
    except ImportError:
        have_backpack = False
        print("BackPACK not installed: its rows are skipped (pip install --no-deps backpack-for-pytorch einops unfoldNd)")
    print("machine:", machine())
    all_cases = cases(args.quick)
    names = args.models.split(",") if args.models else list(all_cases)
    rows: List[Dict] = []
    loss_fn = nn.CrossEntropyLoss()
    for case in names:
        make_model, make_batch, bp_ok = all_cases[case]
        torch.manual_seed(0)
        model = make_model()
        x, y = make_batch()
        n_params = sum(p.numel() for p in model.parameters())
        fns: Dict[str, Callable[[], object]] = {}
        once: Dict[str, float] = {}  # methods timed by their single first call
        mems: Dict[str, object] = {}
        for method in args.methods.split(","):
            if method.startswith("bp:") and not (bp_ok and have_backpack):
                continue
            m = make_model() if method.startswith("bp:") else model
            if method.startswith("bp:"):
                m.load_state_dict(model.state_dict())
            try:
                fn = run_method(method, m, loss_fn, x, y, args.batches)
                t0 = time.perf_counter()
                fn()  # warm-up, and any error surfaces here
                first = time.perf_counter() - t0
                # A method that takes minutes (BackPACK's DiagHessian on convolutions) is timed once.
                if first > args.slow_s:
                    once[method] = first
                    mems[method] = None
                else:
                    fns[method] = fn
                    mems[method] = peak_extra_bytes(fn, "cpu")
            except Exception as e:  # a method that cannot handle the model is reported, not fatal
                print(f"  {case} {method}: {type(e).__name__}: {str(e)[:120]}")
        times = timed_rounds(fns, args.repeats)
        for method in mems:
            secs = (once[method] if method in once else statistics.median(times[method])) / args.batches
            ratio = None
            if "fwd+bwd" in times and method in times:
                ratio = statistics.median(t / b for t, b in zip(times[method], times["fwd+bwd"]))
            elif "fwd+bwd" in times:
                ratio = secs * args.batches / statistics.median(times["fwd+bwd"])
            mem = mems[method]
            rows.append({"model": case, "params": n_params, "method": method, "seconds": secs,
                         "x_fwd_bwd": ratio, "extra_bytes_per_param": None if mem is None else mem / n_params})
            print(f"  {case:>9} {method:>16} {secs:8.4f} s  x{ratio if ratio else float('nan'):.2f}", flush=True)
    print()
    print_table(rows, ["model", "params", "method", "seconds", "x_fwd_bwd", "extra_bytes_per_param"])
    write_json(args.json, {"machine": machine(), "batches": args.batches,
                           "glibc_keeps_memory": os.environ.get("MALLOC_TRIM_THRESHOLD_") is not None, "results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
