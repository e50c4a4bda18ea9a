"""The `glm` command line: a thin argparse layer over typed functions that notebooks call directly."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .checkpoint import CheckpointError
from .config import ConfigError
from .convert import FormatError, KeyMismatchError
from .model import InputError


def cmd_parity(args: argparse.Namespace) -> int:
    from .parity import run_parity, summary

    results = run_parity(args.dir, cases=args.cases, atol=args.atol, backend=args.backend, device=args.device)
    for r in results:
        print(r.line())
    print(f"{args.dir}: {summary(results)}")
    return 0 if all(r.passed for r in results) else 1


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoint

    summary = convert_checkpoint(args.src, args.dst, to=args.to, family=args.family, dtype=args.dtype,
                                 allow_lossy=args.allow_lossy, shard_size=args.shard_size,
                                 overwrite=args.overwrite, progress=not args.quiet)
    print(summary.line())
    return 0


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

    from .config import FAMILIES

    s = sub.add_parser("convert", help="convert a checkpoint between a release format and glm's, shard by shard",
                       description="Stream SRC (a release's Hugging Face format, or glm's) into DST, one shard at a "
                                   "time. DST is written under DST.tmp-* and renamed into place at the end.")
    s.add_argument("src", help="source checkpoint folder")
    s.add_argument("dst", help="destination folder (must not exist unless --overwrite)")
    s.add_argument("--to", choices=("glm", "hf"), default="glm", help="output format (default glm)")
    s.add_argument("--family", choices=list(FAMILIES), default=None,
                   help="release format for --to hf (default: the source's; e.g. glm-hf turns a chatglm-format "
                        "GLM-4 into transformers' Glm)")
    s.add_argument("--dtype", choices=("fp32", "bf16", "fp16", "float32", "bfloat16", "float16"), default=None,
                   help="cast every tensor (default: keep each tensor's dtype)")
    s.add_argument("--allow-lossy", action="store_true", help="permit casts that lose precision (e.g. fp32 -> bf16)")
    s.add_argument("--shard-size", default="2GB", help="max bytes per output shard, e.g. 2GB, 500MB (default 2GB)")
    s.add_argument("--overwrite", action="store_true", help="replace DST if it exists (atomically)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_convert)
    return p


USER_ERRORS = (ConfigError, CheckpointError, KeyMismatchError, FormatError, InputError, FileNotFoundError,
               FileExistsError, ValueError, OSError)


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
