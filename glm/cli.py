"""The `glm` command line: a thin argparse layer over typed functions that notebooks call directly."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .checkpoint import CheckpointError
from .config import ConfigError
from .convert import KeyMismatchError
from .model import InputError


def cmd_parity(args: argparse.Namespace) -> int:
    from .parity import run_parity, summary

    results = run_parity(args.dir, cases=args.cases, atol=args.atol, backend=args.backend, device=args.device)
    for r in results:
        print(r.line())
    print(f"{args.dir}: {summary(results)}")
    return 0 if all(r.passed for r in results) else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glm", description="GLM family models in plain PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("parity", help="check glm's logits against a reference cases file",
                       description="Load the checkpoint in DIR, run every case of the cases file and compare "
                                   "logits, greedy tokens and decode positions with the reference.")
    s.add_argument("dir", help="checkpoint folder (config.json + weights in the release's format)")
    s.add_argument("--cases", default=None, help="cases .json (its .safetensors beside it); default DIR/cases.json")
    s.add_argument("--atol", type=float, default=None, help="max |logit difference| (default: the file's, 1e-4)")
    s.add_argument("--backend", default=None, help="attention backend: auto, sdpa, reference (default auto)")
    s.add_argument("--device", default="cpu", help="torch device (default cpu)")
    s.set_defaults(func=cmd_parity)
    return p


USER_ERRORS = (ConfigError, CheckpointError, KeyMismatchError, InputError, FileNotFoundError, ValueError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        # A user mistake gets one clear line, not a stack trace.
        print(f"glm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
