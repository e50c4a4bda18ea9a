"""The `glm` command line: a thin argparse layer over typed functions that notebooks call directly."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .checkpoint import CheckpointError
from .config import ConfigError
from .convert import FormatError, KeyMismatchError
from .model import InputError
from .tokenizer import TokenizerError


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


def _load(args: argparse.Namespace):
    from .checkpoint import from_pretrained
    from .tokenizer import load

    model = from_pretrained(args.dir, dtype=args.dtype, device=args.device)
    return model, load(args.tokenizer or args.dir)


def _sampling(args: argparse.Namespace) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed)


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import stream_text

    model, tok = _load(args)
    ids = tok.encode_with_specials(args.prompt)
    if not args.raw:
        ids = tok.build_inputs(ids)
    for piece in stream_text(model, tok, ids, max_new_tokens=args.max_new_tokens, **_sampling(args)):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_infill(args: argparse.Namespace) -> int:
    from .generate import infill

    model, tok = _load(args)
    print(infill(model, tok, args.text, max_span_tokens=args.max_new_tokens, **_sampling(args)))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive chat that keeps the history; `/reset` clears it; Ctrl-D (end of input) exits.
    Reads plain lines, so it also works with a pipe: `printf 'hi\nmore\n' | glm chat DIR`."""
    from .generate import stream_text

    model, tok = _load(args)
    history: list[tuple[str, str]] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            if interactive:
                print()
            return 0
        query = line.strip()
        if not query:
            continue
        if query == "/reset":
            history.clear()
            print("(history cleared)")
            continue
        ids = tok.chat_ids(query, history=history, system=args.system)
        print("glm> ", end="", flush=True)
        reply = ""
        for piece in stream_text(model, tok, ids, max_new_tokens=args.max_new_tokens, **_sampling(args)):
            reply += piece
            print(piece, end="", flush=True)
        print()
        history.append((query, reply.strip()))


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    import glob as _glob

    from .tokenizer import train

    files = sorted({f for pattern in args.corpus for f in (_glob.glob(pattern) or [pattern])})
    tok = train(files, args.out, args.vocab_size, args.family)
    print(f"wrote {args.out}: {tok!r}")
    return 0


def _add_model_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("dir", help="checkpoint folder (release format or glm's), with its tokenizer files")
    s.add_argument("--tokenizer", default=None, help="tokenizer folder or file (default: DIR)")
    s.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
    s.add_argument("--device", default="cpu", help="torch device (default cpu)")
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=None)


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

    s = sub.add_parser("generate", help="generate a continuation of a prompt, streamed")
    _add_model_args(s)
    s.add_argument("--prompt", required=True, help="prompt text (special tokens such as [gMASK] allowed)")
    s.add_argument("--raw", action="store_true", help="do not wrap the prompt the release's way ([gMASK] sop ...)")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("infill", help="fill the [MASK]/[sMASK]/[gMASK] blanks of a text (GLM, ChatGLM-6B)")
    _add_model_args(s)
    s.add_argument("--text", required=True, help='text with blanks, e.g. "Paris is the [MASK] of France."')
    s.set_defaults(func=cmd_infill)

    s = sub.add_parser("chat", help="chat in the release's format; /reset clears the history, Ctrl-D exits")
    _add_model_args(s)
    s.add_argument("--system", default=None, help="system prompt (families with a system role)")
    s.set_defaults(func=cmd_chat)

    from .tokenizer import FAMILIES as TOKENIZER_FAMILIES

    s = sub.add_parser("train-tokenizer", help="train a SentencePiece (or GLM-4 BPE) tokenizer with a family's specials")
    s.add_argument("corpus", nargs="+", help="text files or globs")
    s.add_argument("out", help="output folder")
    s.add_argument("--vocab-size", type=int, required=True, help="total vocabulary, special tokens included")
    s.add_argument("--family", choices=list(TOKENIZER_FAMILIES), required=True)
    s.set_defaults(func=cmd_train_tokenizer)
    return p


USER_ERRORS = (ConfigError, CheckpointError, KeyMismatchError, FormatError, InputError, TokenizerError, FileNotFoundError,
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
