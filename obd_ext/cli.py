"""Command line: ``obd-ext demo`` and ``obd-ext prune-llm`` (also ``python -m obd_ext ...``)."""

from __future__ import annotations

import argparse
from typing import List, Optional

__all__ = ["main"]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="obd-ext", description="Optimal Brain Damage for PyTorch")
    sub = p.add_subparsers(dest="command", required=True)
    from . import demo

    d = sub.add_parser("demo", help="the paper's digits experiment (Figures 1a, 1b, 2)", description=demo.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(d)
    _add_prune_llm(sub)
    args = p.parse_args(argv)
    if args.command == "demo":
        demo.run_demo(args.out, seed=args.seed, epochs=args.epochs, retrain_steps=args.retrain_steps,
                      random_draws=args.random_draws, levels=args.levels, progress=not args.no_progress,
                      lr=args.lr, seeds=args.seeds, quick=args.quick, min_remaining=args.min_remaining,
                      obd_step=args.obd_step, criterion=args.criterion, schedule=args.schedule, jobs=args.jobs)
    elif args.command == "prune-llm":
        _prune_llm(args)
    return 0


def _add_prune_llm(sub) -> None:
    from .layerwise import hf

    q = sub.add_parser("prune-llm", help="prune a Hugging Face causal LM from a local directory",
                       description=hf.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("model_dir", help="local directory of a transformers causal LM (Llama, GPT-2, ...)")
    q.add_argument("--out", required=True, help="directory for the pruned model (save_pretrained) and report")
    q.add_argument("--calib", required=True, help="text file the calibration windows are drawn from")
    q.add_argument("--eval", dest="eval_text", help="held-out text for perplexity (default: last 10%% of --calib)")
    q.add_argument("--sparsity", type=float, default=0.5, help="fraction deleted (unstructured)")
    q.add_argument("--pattern", default="unstructured", help="unstructured, 2:4, 4:8 or any N:M")
    q.add_argument("--scope", default="row", choices=("row", "layer", "global"),
                   help="selection pool for unstructured sparsity")
    q.add_argument("--method", default="layerwise", choices=hf.METHODS,
                   help="layerwise OBD (block by block), magnitude, or whole-network curvature obd/lm/fisher")
    q.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    q.add_argument("--seq-len", type=int, help="tokens per window (default: min(2048, the model's context))")
    q.add_argument("--device", help="where to process blocks, e.g. cuda (default: where the model loads)")
    q.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="load the model in this dtype")
    q.add_argument("--seed", type=int, default=0, help="seed of the calibration draw")
    q.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _prune_llm(args) -> None:
    import torch

    from .layerwise import hf

    r = hf.prune_llm(args.model_dir, args.out, calib=args.calib, sparsity=args.sparsity, pattern=args.pattern,
                     eval_text=args.eval_text, nsamples=args.nsamples, seq_len=args.seq_len, scope=args.scope,
                     method=args.method, device=args.device,
                     dtype=getattr(torch, args.dtype) if args.dtype else None, seed=args.seed,
                     progress=not args.no_progress)
    print(f"{args.method} {args.pattern} (scope {args.scope}): sparsity {r['detail']['sparsity']:.4f} of the "
          f"block layers; perplexity {r['perplexity_before']:.3f} -> {r['perplexity_after']:.3f} "
          f"on {r['eval_tokens']} held-out tokens; {r['seconds']:.1f} s; saved to {args.out}")


if __name__ == "__main__":
    raise SystemExit(main())
