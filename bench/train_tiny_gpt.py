"""Train a tiny GPT-2 from scratch on the Python standard library's source.

The model the pruning-quality benchmark prunes: no pretrained weights can be
downloaded, so one is trained here, on CPU, in about a quarter of an hour, on
text every machine has (bench/llm_data.py says which files and how they are
split). Everything is a pure function of the arguments (seed, threads, --bf16)
and the Python version's standard library.

Steps: train a byte-level BPE tokenizer on the train split; cut every split into
blocks of ``--seq-len`` tokens; train ``GPT2LMHeadModel`` or, with ``--arch llama``,
``LlamaForCausalLM`` (tied embeddings, no
dropout) with AdamW and a linear-warmup cosine schedule on shuffled train
blocks; score val perplexity on a fixed subset every ``--eval-every`` steps and
on the whole val and test splits at the end, next to the unigram baseline;
save with ``save_pretrained`` and check that the saved directory loads back with
``AutoModelForCausalLM`` / ``AutoTokenizer`` and gives the same test perplexity.

Output directory: the model (``config.json``, ``model.safetensors``), the
tokenizer (``tokenizer.json`` and transformers' files), ``splits.json`` (the
files of each split, their digests, the Python version) and ``train_log.json``.

Usage:
    python bench/train_tiny_gpt.py --bf16                   # the benchmark's model
    python bench/train_tiny_gpt.py --steps 20 --out /tmp/t  # measure steps/s
    nohup python bench/train_tiny_gpt.py --bf16 > train.log 2>&1 &

Load it:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("bench/out/tiny-gpt2")
    tokenizer = AutoTokenizer.from_pretrained("bench/out/tiny-gpt2")
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llm_data  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "tiny-gpt2")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=DEFAULT_OUT, help="output directory (default bench/out/tiny-gpt2)")
    # 500 steps x 16 x 256 = 2.0 M tokens (0.75 epoch of the train split): about 13
    # minutes on 2 EPYC cores with --bf16 (~1.55 s/step; fp32 ~2.3 s/step).
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate as a fraction of --lr")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5%% of --steps)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    # llama: RMSNorm, rotary positions, SwiGLU MLP (intermediate 8/3 x width,
    # rounded up to 16), no biases; the family of the LLMs layer-wise pruning
    # is used on. gpt2: LayerNorm, learned positions, GELU MLP, biases.
    p.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2", help="model family")
    # sdpa's fused CPU attention: fastest of the two in fp32 on the 2-core machine
    # (best-of-run step times, batch 16: sdpa 2.3 s, eager 4.2 s; noisy, shared cores).
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="attention implementation")
    # Off by default: fast only where the CPU has bf16 instructions (AVX512-BF16, AMX),
    # much slower elsewhere. Weights and optimizer state stay fp32 either way.
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the training forward/backward")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-blocks", type=int, default=64, help="val blocks scored at each periodic evaluation")
    p.add_argument("--max-train-tokens", type=int, default=None, help="cap on train tokens (smoke runs)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p.parse_args(argv)


def lr_lambda(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine down to ``min_ratio`` at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_model(args: argparse.Namespace, eos_id: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if args.arch == "llama":
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=args.vocab_size,
            hidden_size=args.n_embd,
            intermediate_size=-(-8 * args.n_embd // 3 // 16) * 16,
            num_hidden_layers=args.n_layer,
            num_attention_heads=args.n_head,
            num_key_value_heads=args.n_head,
            max_position_embeddings=args.seq_len,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            tie_word_embeddings=True,
            attn_implementation=args.attn,
        ))
    config = GPT2Config(
        vocab_size=args.vocab_size,
        n_positions=args.seq_len,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        # A few million parameters and a few epochs: dropout only slows learning.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        # No pad id, as in GPT-2: with pad = EOS, transformers warns about padding on
        # every batch that holds a document boundary.
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=True,
        attn_implementation=args.attn,
    )
    return GPT2LMHeadModel(config)


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict[str, object]]:
    """Decay matrices (embeddings included), not biases and LayerNorm gains."""
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields the tied embedding once
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(args: argparse.Namespace) -> Dict[str, object]:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    root = llm_data.stdlib_root()
    files = llm_data.split_files(llm_data.stdlib_files(root), root)
    tokenizer = llm_data.train_tokenizer(files["train"], vocab_size=args.vocab_size)
    eos_id = tokenizer.token_to_id(llm_data.EOS)
    blocks = {name: llm_data.token_blocks(tokenizer, files[name], args.seq_len,
                                          args.max_train_tokens if name == "train" else None)
              for name in llm_data.SPLITS}
    n_train = blocks["train"].shape[0]
    if n_train == 0:
        raise SystemExit("train_tiny_gpt: no train blocks")
    # A fixed subset spread over the whole val split, for the periodic evaluations.
    n_val = blocks["val"].shape[0]
    val_subset = blocks["val"][torch.linspace(0, n_val - 1, min(args.eval_blocks, n_val)).long()]
    unigram = {name: llm_data.unigram_perplexity(blocks["train"], blocks[name], args.vocab_size)
               for name in ("val", "test")}
    print(f"python {llm_data.python_version()}  files " +
          "  ".join(f"{k}={len(v)}" for k, v in files.items()) + "  blocks " +
          "  ".join(f"{k}={tuple(v.shape)}" for k, v in blocks.items()) +
          f"  unigram ppl val={unigram['val']:.1f} test={unigram['test']:.1f}", flush=True)

    model = make_model(args, eos_id)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{type(model).__name__}: {n_params:,} parameters (tied embeddings), attn={args.attn}, "
          f"threads={args.threads}", flush=True)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, args.steps, warmup, args.min_lr_ratio))
    gen = torch.Generator().manual_seed(args.seed)

    losses: List[float] = []
    evals: List[Dict[str, float]] = []
    order = torch.empty(0, dtype=torch.long)
    cursor = 0
    t_train = time.perf_counter()
    eval_seconds = 0.0
    bar = tqdm(range(args.steps), disable=args.no_progress, mininterval=5.0, file=sys.stdout)
    model.train()
    for step in bar:
        if cursor + args.batch > order.numel():  # a new epoch: a fresh permutation
            order = torch.randperm(n_train, generator=gen)
            cursor = 0
        x = blocks["train"][order[cursor:cursor + args.batch]]
        cursor += args.batch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{sched.get_last_lr()[0]:.2e}", refresh=False)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            t0 = time.perf_counter()
            ppl = llm_data.perplexity(model, val_subset)
            eval_seconds += time.perf_counter() - t0
            evals.append({"step": step + 1, "val_subset_ppl": ppl,
                          "train_loss_avg": sum(losses[-args.eval_every:]) / len(losses[-args.eval_every:])})
            tqdm.write(f"step {step + 1}: train loss {evals[-1]['train_loss_avg']:.3f}  "
                       f"val ppl ({len(val_subset)} blocks) {ppl:.2f}", file=sys.stdout)
    bar.close()
    train_wall = time.perf_counter() - t_train - eval_seconds

    val_ppl = llm_data.perplexity(model, blocks["val"])
    test_ppl = llm_data.perplexity(model, blocks["test"])
    print(f"final: val ppl {val_ppl:.2f}  test ppl {test_ppl:.2f}  (unigram {unigram['val']:.1f} / "
          f"{unigram['test']:.1f})  train {train_wall:.0f} s, {args.steps / train_wall:.2f} steps/s", flush=True)

    model.save_pretrained(str(out))
    llm_data.save_tokenizer(tokenizer, out)
    (out / llm_data.SPLITS_FILE).write_text(json.dumps(llm_data.split_manifest(files, root), indent=1))

    # The saved directory is what the benchmark uses: load it the way it will and re-score.
    reloaded = AutoModelForCausalLM.from_pretrained(str(out))
    auto_tok = AutoTokenizer.from_pretrained(str(out))
    reload_blocks = llm_data.token_blocks(auto_tok, files["test"], args.seq_len)
    if not torch.equal(reload_blocks, blocks["test"]):
        raise SystemExit("train_tiny_gpt: AutoTokenizer from the saved directory tokenizes differently")
    reload_test_ppl = llm_data.perplexity(reloaded, reload_blocks)
    if not math.isclose(reload_test_ppl, test_ppl, rel_tol=1e-4):
        raise SystemExit(f"train_tiny_gpt: reloaded test ppl {reload_test_ppl} != {test_ppl}")
    print(f"reloaded from {out}: test ppl {reload_test_ppl:.4f}", flush=True)

    log = {
        "config": {k: v for k, v in vars(args).items() if k != "out"} | {"warmup": warmup},
        "model": {"class": type(model).__name__, "n_params": n_params, "tied_embeddings": True,
                  "attn_implementation": args.attn},
        "data": {
            "python_version": llm_data.python_version(),
            "stdlib": str(root),
            "n_files": {k: len(v) for k, v in files.items()},
            "n_blocks": {k: int(v.shape[0]) for k, v in blocks.items()},
            "n_tokens": {k: int(v.numel()) for k, v in blocks.items()},
            "epochs": args.steps * args.batch / n_train,
        },
        "steps": args.steps,
        "losses": losses,
        "evals": evals,
        "val_ppl": val_ppl,
        "test_ppl": test_ppl,
        "reload_test_ppl": reload_test_ppl,
        "unigram_ppl": unigram,
        "train_wall_s": train_wall,
        "steps_per_s": args.steps / train_wall,
        "total_wall_s": time.perf_counter() - t_start,
        "python_version": llm_data.python_version(),
        "torch_version": torch.__version__,
        "transformers_version": __import__("transformers").__version__,
        "tokenizers_version": __import__("tokenizers").__version__,
        "platform": platform.platform(),
        "processor": platform.processor(),
    }
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    return log


def main(argv: Optional[List[str]] = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
