"""Command line: ``obd-ext demo`` and ``obd-ext prune-llm`` (also ``python -m obd_ext ...``).

Every argument and file is checked before any model loads. An error is one
line on stderr, ``obd-ext: error: ...``, and the exit status says whose it is:

- 0: done;
- 2: the arguments or the input are wrong (a bad option, a missing file, a
  value the library refuses with ValueError, a file it cannot read or write
  (OSError), a missing optional dependency (ImportError)): fix the command and run it again;
- 1: an unexpected failure inside (e.g. out of memory, a bug): the line names
  the exception; ``--debug`` shows the traceback;
- 130: interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import traceback
from typing import Any, Callable, Dict, Iterator, List, Optional

__all__ = ["main", "build_parser", "EXIT_USAGE", "EXIT_INTERNAL"]

PROG = "obd-ext"
EXIT_USAGE = 2
"""Exit status of an error in the arguments or the input."""
EXIT_INTERNAL = 1
"""Exit status of an unexpected failure."""

# Errors that mean "the command or its input is wrong", reported as usage errors.
_USER_ERRORS = (ValueError, OSError, ImportError)

_EXIT_HELP = """\
exit status: 0 done; 2 bad arguments or input (one line on stderr);
1 unexpected failure (one line; --debug shows the traceback); 130 interrupted"""


class _UsageError(Exception):
    """An argument error found while parsing: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors become one line ``obd-ext: error: ...`` (not usage + message, exit by SystemExit)."""

    def error(self, message: str):  # noqa: D102  (argparse's hook)
        raise _UsageError(f"{message} (see: {self.prog} --help)")


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _fail(message: str, status: int) -> int:
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)
    return status


# ---------------------------------------------------------------------------
# Argument types: each checks one value and names the option in its error
# ---------------------------------------------------------------------------

def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _pattern(text: str) -> str:
    from .vocabulary import parse_pattern

    try:
        parse_pattern(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _device(text: str) -> str:
    from .layerwise.hf import check_device

    try:
        check_device(text, "device")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("device: ")) from None
    return text


def _methods_help(names) -> str:
    from .vocabulary import METHODS

    import textwrap

    width = max(len(n) for n in names)
    lines = [textwrap.fill(f"{n:<{width}}  {METHODS[n].summary}; cost: {METHODS[n].cost}", width=79,
                           initial_indent="  ", subsequent_indent=" " * (width + 4)) for n in names]
    return "methods (--method):\n" + "\n".join(lines)


# ---------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------

_DEMO_DESCRIPTION = """\
The paper's experiment (LeCun, Denker and Solla, NIPS 1989) on the scikit-learn
digits: train a small network, delete parameters by OBD saliency, by
magnitude and at random, and compare (Figures 1a, 1b and 2 and the claims
they support). Writes the figures and results.json to --out."""

_PRUNE_LLM_DESCRIPTION = """\
Prune a Hugging Face transformers causal LM (Llama, GPT-2, ...) from a local
directory, one transformer block at a time, and save it with save_pretrained
(dense tensors with the zeros in place: it loads in plain transformers).

Order: every argument and file is checked; the model loads; perplexity before
(unless --no-eval); pruning; the pruned model, tokenizer and
prune_report.json are saved; perplexity after, and the report is rewritten.
With --device, pruning and perplexity process one block at a time on that
device, so a model larger than the device fits."""


def _add_debug(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="on an error, show the Python traceback too")


def _add_prune_llm(sub) -> None:
    from .layerwise.blockwise import DEFAULT_SPARSITY
    from .layerwise.hf import DTYPES
    from .vocabulary import DEFAULT_LAYERWISE_METHOD, LAYERWISE_SCOPES, LLM_METHODS

    q = sub.add_parser("prune-llm", help="prune a Hugging Face causal LM from a local directory",
                       description=_PRUNE_LLM_DESCRIPTION, epilog=_methods_help(LLM_METHODS) + "\n\n" + _EXIT_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("model_dir", metavar="MODEL_DIR",
                   help="local save_pretrained directory of a causal LM (holds config.json)")
    q.add_argument("--out", required=True, metavar="DIR",
                   help="directory for the pruned model and prune_report.json; must not be MODEL_DIR or inside "
                        "it, nor a non-empty directory, unless --overwrite (required)")
    q.add_argument("--calib", required=True, metavar="FILE",
                   help="UTF-8 text file the calibration windows are drawn from (required)")
    q.add_argument("--eval", dest="eval_text", metavar="FILE",
                   help="held-out UTF-8 text for perplexity (default: the last 10%% of --calib, which calibration "
                        "then does not use)")
    q.add_argument("--no-eval", action="store_true",
                   help="skip both perplexities (default: measure them; calibration then uses all of --calib)")
    q.add_argument("--method", default=DEFAULT_LAYERWISE_METHOD, choices=LLM_METHODS,
                   help="how weights are scored, see the list below; obd, lm and fisher need the whole model on "
                        "the device (default: %(default)s)")
    q.add_argument("--pattern", default="unstructured", type=_pattern,
                   help="unstructured, or N:M (keep N of every M consecutive inputs) such as 2:4 or 4:8 "
                        "(default: %(default)s)")
    q.add_argument("--sparsity", type=_fraction, metavar="S",
                   help=f"fraction of the weights deleted, in [0, 1] (default: {DEFAULT_SPARSITY:g} for "
                        "unstructured; an N:M pattern implies 1 - N/M and allows no other value)")
    q.add_argument("--scope", choices=LAYERWISE_SCOPES,
                   help="the pool the lowest saliencies are taken from, for unstructured sparsity: row (each "
                        "output row), layer, or global (default: layer for layerwise-obs, row for layerwise-obd and "
                        "magnitude, global for obd, lm and fisher; layerwise-obs takes row or layer; an N:M pattern "
                        "selects within rows: row or nothing)")
    q.add_argument("--blocksize", type=_positive_int, metavar="B",
                   help="layerwise-obs only: columns per block of the surgeon's sweep, over which its deletions are "
                        "chosen (default: 128; a multiple of M for N:M)")
    q.add_argument("--damp", type=_fraction, metavar="D",
                   help="layerwise-obs only: damping added to the Hessian's diagonal, as a fraction of its mean "
                        "(default: 0.01)")
    q.add_argument("--sequential", action="store_true",
                   help="layer-wise methods: prune the layers of each block stage by stage in the order the block "
                        "calls them, each from inputs that went through the stages already pruned (one "
                        "calibration pass per stage; default: one pass per block)")
    q.add_argument("--nsamples", type=_positive_int, default=128, metavar="N",
                   help="calibration windows (default: %(default)s)")
    q.add_argument("--seq-len", type=_positive_int, metavar="T",
                   help="tokens per window (default: min(2048, the model's context))")
    q.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (default: %(default)s)")
    q.add_argument("--device", type=_device,
                   help="where blocks are processed and perplexity is computed, one block at a time, e.g. cuda or "
                        "cuda:1 (default: where the model loads, CPU)")
    q.add_argument("--dtype", choices=tuple(DTYPES),
                   help="load the model in this dtype (default: the dtype saved in MODEL_DIR's config)")
    q.add_argument("--overwrite", action="store_true",
                   help="allow --out inside MODEL_DIR or non-empty (default: refuse)")
    q.add_argument("--no-progress", action="store_true", help="hide the progress bars and stage lines")
    _add_debug(q)
    q.set_defaults(handler=_prune_llm)


def _add_demo(sub) -> None:
    from . import demo

    d = sub.add_parser("demo", help="the paper's digits experiment (Figures 1a, 1b, 2)",
                       description=_DEMO_DESCRIPTION, epilog=_EXIT_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(d)  # the demo's own options; their help states their defaults
    _add_debug(d)
    d.set_defaults(handler=_demo)


def build_parser() -> argparse.ArgumentParser:
    """The ``obd-ext`` argument parser (its errors raise instead of exiting; :func:`main` reports them)."""
    p = _Parser(prog=PROG, description="Optimal Brain Damage for PyTorch: second-order pruning.",
                epilog=_EXIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=_version_line(),
                   help="print the versions of obd_ext, torch, transformers and Python, and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    _add_demo(sub)
    _add_prune_llm(sub)
    return p


def _version_line() -> str:
    from .layerwise.hf import versions

    v = versions()
    return (f"{PROG} {v['obd_ext']} (torch {v['torch']}, transformers {v['transformers'] or 'not installed'}, "
            f"python {v['python']})")


# ---------------------------------------------------------------------------
# The commands
# ---------------------------------------------------------------------------

def _check_prune_llm_files(args: argparse.Namespace) -> None:
    """The files and directories, and options that only some methods take, named by their options."""
    from .layerwise import hf
    from .vocabulary import LAYERWISE_METHODS

    hf.check_model_dir(args.model_dir, "MODEL_DIR")
    hf.check_text_file(args.calib, "--calib")
    if args.eval_text is not None:
        if args.no_eval:
            raise ValueError("--eval and --no-eval contradict each other: give one")
        hf.check_text_file(args.eval_text, "--eval")
    hf.check_out_dir(args.out, args.model_dir, args.overwrite, "--out")
    for flag, value in (("--blocksize", args.blocksize), ("--damp", args.damp)):
        if value is not None and args.method != "layerwise-obs":
            raise ValueError(f"{flag} applies to --method layerwise-obs only, not --method {args.method}")
    if args.sequential and args.method not in LAYERWISE_METHODS:
        raise ValueError(f"--sequential applies to the layer-wise methods {', '.join(LAYERWISE_METHODS)}, "
                         f"not --method {args.method}")
    if args.seq_len is not None and args.seq_len < 2 and not args.no_eval:
        raise ValueError(f"--seq-len must be >= 2 to measure perplexity (a 1-token window predicts nothing), "
                         f"got {args.seq_len}; or pass --no-eval")


@contextlib.contextmanager
def _transformers_bars(show: bool) -> Iterator[None]:
    """transformers' own progress bars (loading weights) follow --no-progress while the command runs."""
    try:
        from transformers.utils import logging as tf_logging
    except ImportError:  # prune_llm reports it, with what to install
        yield
        return
    was = tf_logging.is_progress_bar_enabled()
    if not show:
        tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not show:
            tf_logging.enable_progress_bar()


def _prune_llm(args: argparse.Namespace) -> None:
    from .layerwise import hf

    _check_prune_llm_files(args)
    with _transformers_bars(not args.no_progress):
        r = hf.prune_llm(args.model_dir, args.out, calib=args.calib, sparsity=args.sparsity, pattern=args.pattern,
                         eval_text=args.eval_text, nsamples=args.nsamples, seq_len=args.seq_len, scope=args.scope,
                         method=args.method, device=args.device,
                         dtype=hf.DTYPES[args.dtype] if args.dtype else None, seed=args.seed,
                         evaluate=not args.no_eval, overwrite=args.overwrite, progress=not args.no_progress,
                         log=None if args.no_progress else _stage, blocksize=args.blocksize, damp=args.damp,
                         sequential=args.sequential)
    scope = f", scope {r['scope']}" if r["pattern"] == "unstructured" else ""
    line = (f"{r['method']} {r['pattern']}{scope}: sparsity {r['detail']['sparsity']:.4f} of the block layers")
    if r["perplexity_after"] is not None:
        line += (f"; perplexity {r['perplexity_before']:.3f} -> {r['perplexity_after']:.3f} on "
                 f"{r['eval_tokens']} held-out tokens")
    print(f"{line}; {r['seconds']:.1f} s; saved to {r['out_dir']}")


def _stage(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _demo(args: argparse.Namespace) -> None:
    from . import demo

    # every option of demo.add_arguments is the run_demo keyword of the same name, except these two
    kwargs: Dict[str, Any] = {k: v for k, v in vars(args).items() if k not in ("command", "handler", "debug")}
    out_dir = kwargs.pop("out")
    progress = not kwargs.pop("no_progress")
    demo.run_demo(out_dir, progress=progress, **kwargs)


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``obd-ext`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status (see the module doc)."""
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as e:
        return _fail(str(e), EXIT_USAGE)
    except SystemExit as e:  # --help and --version print and exit 0
        return e.code if isinstance(e.code, int) else 0
    handler: Callable[[argparse.Namespace], None] = args.handler
    debug = args.debug
    try:
        handler(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except _USER_ERRORS as e:
        if debug:
            traceback.print_exc()
        return _fail(str(e) or type(e).__name__, EXIT_USAGE)
    except Exception as e:  # noqa: BLE001  (reported in one line; the traceback with --debug)
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (run with --debug for the traceback)"
        return _fail(f"{type(e).__name__}: {e}{hint}", EXIT_INTERNAL)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
