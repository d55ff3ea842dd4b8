"""Command line: ``obd-ext demo`` (also ``python -m obd_ext demo``)."""

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
    args = p.parse_args(argv)
    if args.command == "demo":
        demo.run_demo(args.out, seed=args.seed, epochs=args.epochs, retrain_steps=args.retrain_steps,
                      random_draws=args.random_draws, levels=args.levels, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
