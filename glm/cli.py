"""The `glm` command line: a thin argparse layer over typed functions that notebooks call directly."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

from .errors import ArgumentError, GLMError, InputError, TokenizerError


def cmd_parity(args: argparse.Namespace) -> int:
    from .parity import run_parity, summary

    _runnable_device(args.device)
    results = run_parity(args.dir, cases=args.cases, atol=args.atol, backend=args.backend, device=args.device)
    for r in results:
        print(r.line())
    print(f"{args.dir}: {summary(results)}")
    return 0 if all(r.passed for r in results) else 1


def cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint import Terminated
    from .hub import convert_checkpoint

    try:
        summary = convert_checkpoint(args.src, args.dst, to=args.to, family=args.family, dtype=args.dtype,
                                     allow_lossy=args.allow_lossy, shard_size=args.shard_size,
                                     overwrite=args.overwrite, progress=not args.quiet, verify=not args.no_verify)
    except Terminated:
        # The writer removed its temp folder; exit as a process killed by SIGTERM would (128 + 15).
        print(f"\nglm convert: terminated (SIGTERM); {args.dst} was left as it was", file=sys.stderr)
        return 143
    print(summary.line())
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .checkpoint import Terminated
    from .hub import quantize_checkpoint
    from .quant import check_scheme, describe

    check_scheme(args.bits, args.group_size)  # before SRC is read
    before, _ = _weights_on_disk(args.src)
    try:
        summary = quantize_checkpoint(args.src, args.dst, args.bits, args.group_size, embeddings=args.embeddings,
                                      lm_head=args.lm_head, format=args.format, shard_size=args.shard_size,
                                      overwrite=args.overwrite, progress=not args.quiet)
    except Terminated:
        # The writer removed its temp folder; exit as a process killed by SIGTERM would (128 + 15).
        print(f"\nglm quantize: terminated (SIGTERM); {args.dst} was left as it was", file=sys.stderr)
        return 143
    # The scheme as written (a tied model has no separate head for --lm-head to quantize).
    after, written = _weights_on_disk(summary.dst)
    print(f"wrote {summary.dst} ({summary.format}, {summary.family}, {describe(written)}): weights "
          f"{_bytes(before)} -> {_bytes(after)} ({before / max(after, 1):.2f}x smaller), {summary.tensors} "
          f"tensors in {len(summary.files)} shard(s), {summary.seconds:.1f} s, peak RSS "
          f"{summary.peak_rss_bytes / 1e9:.2f} GB")
    return 0


def _weights_on_disk(folder: str) -> tuple[int, Optional[dict]]:
    """Bytes on disk of a checkpoint folder's weight files, and its quantization scheme (None: float), read
    from its config and file headers."""
    from .hub import open_source

    source, reader = open_source(folder, verify=False)
    with reader:
        return sum(os.path.getsize(os.path.join(folder, f)) for f in reader.files()), source.quantization


def _bytes(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.3f} MB"


def _runnable_device(device: str) -> str:
    """--device when the model can run there: check_device's messages for unknown names and missing
    CUDA, then the devices torch names but cannot compute on here (meta; xla, lazy, ... without
    their backend)."""
    import torch

    from .devices import check_device

    dev = check_device(device)
    if dev.type == "meta":
        raise InputError(f"--device {device} holds shapes without values and cannot run a model; use --device cpu "
                         f"(or cuda)")
    try:
        torch.zeros(1, device=dev)
    except Exception as e:  # torch raises RuntimeError, NotImplementedError or ImportError by backend
        # torch's first sentence says why; the rest lists every dispatch key.
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:200]
        raise InputError(f"--device {device} cannot run here ({reason}); use --device cpu (or cuda)") from None
    return device


def _check_text(flag: str, text: Optional[str]) -> None:
    """A command-line text that is valid Unicode: bytes that are not UTF-8 reach Python as lone surrogates
    (surrogateescape), which no tokenizer can encode."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{flag} is not valid UTF-8 text (character {e.start + 1} is an undecodable byte or a "
                         f"lone surrogate); pass the text in UTF-8") from None


def _check_generation_args(args: argparse.Namespace) -> None:
    """Every numeric option of generate / infill / chat, before the model is loaded."""
    from .generate import SamplingConfig

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    SamplingConfig(max_new_tokens=args.max_new_tokens or 1, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed).validate()
    _runnable_device(args.device)


def _quantize_args(args: argparse.Namespace) -> dict:
    """from_pretrained's quantize= / group_size= from --quantize / --group-size (none without --quantize),
    checked before the model is read."""
    from .quant import SCHEME_BITS, check_scheme

    if args.quantize is None:
        if args.group_size is not None:
            raise ArgumentError(f"--group-size {args.group_size} needs --quantize int8 or int4 (it sets the "
                                f"quantization's group size)")
        return {}
    check_scheme(SCHEME_BITS[args.quantize], args.group_size)
    return {"quantize": args.quantize, "group_size": args.group_size}


def _load(args: argparse.Namespace):
    from .hub import from_pretrained, tokenizer_folder
    from .tokenizer import load

    _check_generation_args(args)
    model = from_pretrained(args.dir, dtype=args.dtype, device=args.device, **_quantize_args(args))
    tok = load(args.tokenizer or tokenizer_folder(args.dir))
    # Fewer tokenizer ids than embedding rows is normal (padded vocabularies); more is a mismatch
    # that would otherwise fail mid-generation.
    if tok.vocab_size > model.config.vocab_size:
        raise TokenizerError(f"{args.tokenizer or args.dir}: the tokenizer has {tok.vocab_size} ids but the model in "
                             f"{args.dir} only {model.config.vocab_size} embedding rows; pass the tokenizer of this "
                             f"checkpoint (--tokenizer)")
    return model, tok


DEFAULT_MAX_NEW_TOKENS = 128


def _max_new(args: argparse.Namespace, model, prompt_len: int) -> int:
    """--max-new-tokens, or by default 128 cut to what the model's position table leaves room for
    (small trained models have about seq_len positions); a value given explicitly is checked, not cut."""
    from .generate import room_for_new_tokens

    if args.max_new_tokens is not None:
        return args.max_new_tokens
    return max(1, min(DEFAULT_MAX_NEW_TOKENS, room_for_new_tokens(model, prompt_len)))


def _sampling(args: argparse.Namespace) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed, cuda_graphs=args.cuda_graphs)


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import stream_text

    _check_text("--prompt", args.prompt)
    model, tok = _load(args)
    ids = tok.encode_with_specials(args.prompt)
    if not args.raw:
        ids = tok.build_inputs(ids)
    for piece in stream_text(model, tok, ids, max_new_tokens=_max_new(args, model, len(ids)), **_sampling(args)):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_infill(args: argparse.Namespace) -> int:
    from .generate import infill

    _check_text("--text", args.text)
    model, tok = _load(args)
    print(infill(model, tok, args.text, max_span_tokens=_max_new(args, model, 0), **_sampling(args)))
    return 0


def _chat_reply_room(args: argparse.Namespace, model) -> int:
    """Positions kept free for a chat reply: --max-new-tokens, else 128 or a quarter of the model's
    positions if fewer (so the history may fill the rest rather than be dropped every turn)."""
    if args.max_new_tokens is not None:
        return args.max_new_tokens
    return max(1, min(DEFAULT_MAX_NEW_TOKENS, model.config.max_positions // 4))


def _fit_prompt(args: argparse.Namespace, model, entries: int,
                build: Callable[[int], list[int]]) -> tuple[Optional[list[int]], int]:
    """The prompt ``build(dropped)`` that leaves out the fewest oldest history entries (0 to ``entries`` - 1)
    and still leaves room for the reply, and that number; (None, 0) when none fits."""
    limit = model.config.max_positions
    reply = _chat_reply_room(args, model)
    for dropped in range(entries):
        ids = build(dropped)
        # 2D families (ChatGLM-6B) generate inside a blank whose block positions do not depend on the
        # prompt: only the prompt itself must fit. 1D families count the reply on from the prompt.
        need = len(ids) if model.config.position_streams == 2 else len(ids) + reply
        if need <= limit:
            return ids, dropped
    return None, 0


def _chat_prompt(args: argparse.Namespace, model, tok, query: str,
                 history: list[tuple[str, str]]) -> tuple[Optional[list[int]], int]:
    """The prompt for ``query`` after the newest whole turns of ``history`` that leave room for the
    reply, and how many of the oldest turns it leaves out; None when the message alone does not fit."""
    return _fit_prompt(args, model, len(history) + 1,
                       lambda dropped: tok.chat_ids(query, history=history[dropped:], system=args.system))


def _chat_lines():
    """The lines typed (or piped) into `glm chat`, stripped, skipping empty ones; a line of bytes that are not
    valid UTF-8 is refused alone (read as lone surrogates) instead of ending the session."""
    interactive = sys.stdin.isatty()
    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")
    number = 0
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        number += 1
        if not line:
            if interactive:
                print()
            return
        query = line.strip()
        if not query:
            continue
        try:
            query.encode("utf-8")
        except UnicodeEncodeError:
            print(f"(line {number} is not valid UTF-8 text; skipped it: send it again in UTF-8)", file=sys.stderr)
            continue
        yield query


def _tool_chat_prompt(args: argparse.Namespace, model, tok, messages: list[dict],
                      tools: list[dict]) -> tuple[Optional[list[int]], int]:
    """`_chat_prompt` for a conversation with tools: the prompt over the newest messages that leave room for
    the reply (the tools always offered), and how many of the oldest messages it leaves out."""
    from .tokenizer.tools import chat_prompt_ids

    system = [{"role": "system", "content": args.system}] if args.system else []
    return _fit_prompt(args, model, len(messages),
                       lambda dropped: chat_prompt_ids(tok, system + messages[dropped:], tools))


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive chat that keeps the history; `/reset` clears it; Ctrl-D (end of input) exits.
    Reads plain lines, so it also works with a pipe: `printf 'hi\nmore\n' | glm chat DIR`.

    With ``--tools FILE`` the model is offered the tools (the release's chat template, or glm's chat format
    where the folder has none); a reply that is a tool call (GLM-4: ``name`` then a JSON object; ChatGLM3:
    ``name`` then a ``tool_call(...)`` code block) is shown as one, and the next line typed is taken as the
    tool's result (an observation turn)."""
    from .generate import stream_text
    from .tokenizer.tools import ToolCall, load_tools, parse_reply

    _check_text("--system", args.system)
    tools = load_tools(args.tools) if args.tools else None
    model, tok = _load(args)
    if tools is not None and tok.tool_format is None:
        raise ArgumentError(f"--tools: the {tok.family} chat format has no tool calling (GLM-4 and ChatGLM3 have); "
                            f"drop --tools")
    history: list[tuple[str, str]] = []  # (query, reply) turns of a chat without tools
    messages: list[dict] = []  # a chat with tools: user, assistant (a call carries metadata) and observation turns
    awaiting_result = False
    for query in _chat_lines():
        if query == "/reset":
            history.clear()
            messages.clear()
            awaiting_result = False
            print("(history cleared)")
            continue
        if tools is None:
            ids, dropped = _chat_prompt(args, model, tok, query, history)
        else:
            messages.append({"role": "observation" if awaiting_result else "user", "content": query})
            ids, dropped = _tool_chat_prompt(args, model, tok, messages, tools)
        if ids is None:
            if tools is not None:
                messages.pop()
            print(f"(the message does not fit: with room for a {_chat_reply_room(args, model)}-token reply it "
                  f"needs more than the model's {model.config.max_positions} positions; send a shorter one)",
                  file=sys.stderr)
            continue
        if dropped:
            del (history if tools is None else messages)[:dropped]
            unit = "turn" if tools is None else "message"
            print(f"(dropped the {dropped} oldest {unit}{'s' if dropped > 1 else ''}: the history outgrew the "
                  f"model's {model.config.max_positions} positions)", file=sys.stderr)
        print("glm> ", end="", flush=True)
        reply = ""
        for piece in stream_text(model, tok, ids, max_new_tokens=_max_new(args, model, len(ids)), **_sampling(args)):
            reply += piece
            print(piece, end="", flush=True)
        print()
        if tools is None:
            history.append((query, reply.strip()))
            continue
        parsed = parse_reply(reply, tools, tok.tool_format)
        awaiting_result = isinstance(parsed, ToolCall)
        if isinstance(parsed, ToolCall):
            messages.append(parsed.message())
            print(f"(tool call: {parsed.name} {parsed.arguments}; type the tool's result as the next line)")
        else:
            messages.append({"role": "assistant", "content": parsed})
    return 0


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    import glob as _glob

    from .tokenizer import train

    files = sorted({f for pattern in args.corpus for f in (_glob.glob(pattern) or [pattern])})
    tok = train(files, args.out, args.vocab_size, args.family, model_type=args.model_type,
                byte_fallback=args.byte_fallback, overwrite=args.overwrite)
    print(f"wrote {args.out}: {tok!r}")
    return 0


def _train_vocab_size(args: argparse.Namespace) -> Optional[int]:
    """--vocab-size, else the command's default size; a char tokenizer's default is the corpus's."""
    if args.vocab_size is not None:
        return args.vocab_size
    return None if args.tokenizer_type == "char" else args.default_vocab_size


def _train_config(args: argparse.Namespace):
    import json as _json

    from .train import TrainConfig

    try:
        overrides = _json.loads(args.model_overrides) if args.model_overrides else {}
    except ValueError as e:
        raise ArgumentError(f"--model-overrides is not valid JSON ({e}); pass an object such as "
                         f"'{{\"hidden_size\": 256}}'") from None
    return TrainConfig(out_dir=args.out, model=args.model, model_overrides=overrides, data=args.data,
                       doc_split=args.doc_split, val_data=args.val_data,
                       tokenizer=args.tokenizer, tokenizer_type=args.tokenizer_type,
                       vocab_size=_train_vocab_size(args), objective=args.objective,
                       mix=tuple(args.mix) if args.mix is not None else None,
                       seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       steps=args.steps, lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup=args.warmup,
                       weight_decay=args.weight_decay, decay_embeddings=args.decay_embeddings,
                       betas=tuple(args.betas), grad_clip=args.grad_clip, eval_every=args.eval_every,
                       eval_iters=args.eval_iters, eval_examples=args.eval_examples, ckpt_every=args.ckpt_every,
                       keep_last=args.keep_last, seed=args.seed, compile=args.compile, device=args.device,
                       fsdp=args.fsdp, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
                       corpus_size=args.corpus_size, verify=not args.no_verify,
                       allow_optimizer_change=args.allow_optimizer_change)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    summary = train(_train_config(args))
    if summary:  # rank 0
        # predictions / examples are long lists for notebooks; the files in OUT keep them.
        shown = {k: v for k, v in summary.items() if k not in ("predictions", "examples")}
        print("\n".join(f"{k}: {v}" for k, v in shown.items()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import dataclasses as _dc

    from .demo import DEMO, demo

    cfg = _dc.replace(DEMO, out_dir=args.out, **({"steps": args.steps} if args.steps is not None else {}))
    demo(cfg)
    return 0


def _finetune_config(args: argparse.Namespace):
    """The FinetuneConfig of ``glm finetune``'s flags; a flag left out keeps FinetuneConfig's default."""
    from .finetune import FinetuneConfig

    given = {k: v for k, v in vars(args).items() if k in FINETUNE_FLAGS}
    labels = given.get("labels")
    if "verbalizers" in given:
        if len(given["verbalizers"]) != len(labels or ()):
            raise ArgumentError(f"--verbalizers takes one text per label: {len(labels or ())} labels, "
                                f"{len(given['verbalizers'])} verbalizers")
        given["verbalizers"] = dict(zip(labels, given["verbalizers"]))
    for name in ("labels", "lora_targets", "betas"):
        if name in given:
            given[name] = tuple(given[name])
    return FinetuneConfig(base=args.base, data=args.data, out_dir=args.out, eval_data=args.eval,
                          progress=not args.quiet, verify=not args.no_verify, **given)


def cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune import finetune

    summary = finetune(_finetune_config(args))
    print("\n".join(f"{k}: {v}" for k, v in summary.items()))
    return 0


def cmd_merge_lora(args: argparse.Namespace) -> int:
    from .finetune import merge_lora

    print(f"wrote {merge_lora(args.src, args.dst, format=args.format, overwrite=args.overwrite)}")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from .finetune import load_classifier

    _check_text("--text", args.text)
    classify = load_classifier(args.dir, device=args.device)
    for label, p in sorted(classify([args.text])[0].items(), key=lambda kv: -kv[1]):
        print(f"{label}\t{p:.4f}")
    return 0


def cmd_demo_finetune(args: argparse.Namespace) -> int:
    from .demo import FinetuneDemo, finetune_demo

    finetune_demo(FinetuneDemo(out_dir=args.out, base_run=args.base_run))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(args.suite, device=args.device, out=args.out, quick=args.quick, extra=args.extra,
                      publish=args.publish, quantize=args.quantize, group_size=args.group_size)


def _eval_iters(text: str):
    """--eval-iters: a whole number, or 'all'."""
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'all', got {text!r}") from None


def _add_train_args(s: argparse.ArgumentParser, **defaults) -> None:
    d = dict(out="runs/glm", model="tiny-glm", steps=1000, batch_size=16, seq_len=128, lr=3e-3, vocab_size=1000,
             eval_every=250, ckpt_every=250)
    d.update(defaults)
    s.add_argument("--out", default=d["out"], help=f"run folder (default {d['out']})")
    s.add_argument("--model", default=d["model"], help=f"preset name (default {d['model']})")
    s.add_argument("--model-overrides", default=d.get("model_overrides"),
                   help='JSON of GLMConfig fields, e.g. \'{"hidden_size": 256, "num_layers": 4}\'')
    s.add_argument("--data", nargs="*", default=None,
                   help="text files / globs / JSONL; default: the embedded corpus. A text file is read whole, line "
                        "breaks kept, one document per file (see --doc-split); a .jsonl file holds one "
                        '{"text": ...} document per line')
    s.add_argument("--doc-split", choices=("file", "blank-line", "lines"), default="file",
                   help="how a text file of --data / --val-data becomes documents: file = the whole file is one "
                        "(default), blank-line = documents are separated by blank lines, lines = one per line")
    s.add_argument("--val-data", nargs="+", default=None,
                   help="held-out files, read as --data (default: the embedded corpus's own held-out text, else the "
                        "last 5%% of the documents (glm) or of the token stream (causal, prefix))")
    s.add_argument("--corpus-size", choices=("tiny", "small", "base"), default="small",
                   help="size of the embedded corpus (default small)")
    s.add_argument("--tokenizer", default=None, help="tokenizer folder (default: train one into OUT/tokenizer)")
    s.add_argument("--vocab-size", type=int, default=None,
                   help=f"ids of the tokenizer trained into OUT/tokenizer (default {d['vocab_size']}; with "
                        f"--tokenizer-type char: the corpus's characters, or exactly that many)")
    s.set_defaults(default_vocab_size=d["vocab_size"])
    s.add_argument("--tokenizer-type", choices=("bpe", "unigram", "char"), default="bpe",
                   help="model type of the tokenizer trained into OUT/tokenizer (default bpe; char = one id per "
                        "character, as nanoGPT's character-level runs)")
    s.add_argument("--objective", choices=("glm", "causal", "prefix"), default="glm",
                   help="glm = blank infilling (default), causal = left-to-right LM, prefix = prefix LM (both "
                        "on rows packed from one stream of documents)")
    s.add_argument("--mix", nargs=2, type=float, default=None, metavar=("BERT", "GAP"),
                   help="glm objective: the share of batches in token ([MASK]) and sentence ([sMASK]) mode; "
                        "document ([gMASK]) mode gets the rest (default 0.4 0.3, GLM-10B's)")
    s.add_argument("--seq-len", type=int, default=d["seq_len"], help=f"tokens per row (default {d['seq_len']})")
    s.add_argument("--batch-size", type=int, default=d["batch_size"],
                   help=f"global batch in rows (default {d['batch_size']})")
    s.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    s.add_argument("--steps", type=int, default=d["steps"], help=f"optimizer steps (default {d['steps']})")
    s.add_argument("--lr", type=float, default=d["lr"], help=f"peak AdamW learning rate (default {d['lr']})")
    s.add_argument("--warmup", type=int, default=d.get("warmup", 50),
                   help="linear warmup steps before the cosine decay (default %(default)s)")
    s.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="the cosine schedule ends at this share of --lr (default 0.1)")
    s.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default 0.1)")
    s.add_argument("--decay-embeddings", action="store_true",
                   help="weight decay on the embedding tables too, as nanoGPT (default: matrices other than "
                        "embeddings only)")
    s.add_argument("--betas", nargs=2, type=float, default=(0.9, 0.95), metavar=("B1", "B2"),
                   help="AdamW's moment decays (default 0.9 0.95)")
    s.add_argument("--grad-clip", type=float, default=1.0,
                   help="max gradient norm, > 0; inf = no clipping (default 1.0)")
    s.add_argument("--eval-every", type=int, default=d["eval_every"],
                   help=f"held-out loss every N steps (default {d['eval_every']})")
    s.add_argument("--eval-iters", type=_eval_iters, default=20,
                   help="held-out batches per evaluation, or 'all': every held-out row once (default 20)")
    s.add_argument("--eval-examples", type=int, default=200,
                   help="embedded corpus: held-out blanks filled at each evaluation (default 200)")
    s.add_argument("--ckpt-every", type=int, default=d["ckpt_every"],
                   help=f"checkpoint every N steps (default {d['ckpt_every']})")
    s.add_argument("--keep-last", type=int, default=2, help="checkpoints kept (default 2)")
    s.add_argument("--seed", type=int, default=0, help="seed of the data order and the weights (default 0)")
    s.add_argument("--compile", action="store_true", help="torch.compile the model")
    s.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda (default auto)")
    s.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP instead of DDP")
    s.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    s.add_argument("--overwrite", action="store_true",
                   help="delete the run already in OUT (checkpoints, metrics, tokenizer, model) and start over")
    s.add_argument("--allow-optimizer-change", action="store_true",
                   help="with --resume: accept other --lr, --min-lr-ratio, --warmup, --weight-decay, --betas, "
                        "--grad-clip than the run's (recorded in metrics.jsonl)")
    s.add_argument("--no-verify", action="store_true", help="with --resume: skip the checkpoint's sha256 check")
    s.add_argument("--quiet", action="store_true",
                   help="no progress bar (on a terminal) or progress lines (in a log) on stderr")


# The flags of `glm finetune` that are FinetuneConfig fields of the same name. Left out, a flag is absent from
# the namespace (argparse.SUPPRESS), so the dataclass's default applies: one place holds the defaults, and
# `glm --help` does not import the fine-tuning code to show them.
FINETUNE_FLAGS = ("method", "task", "tokenizer", "max_source_len", "max_target_len", "labels", "verbalizers",
                  "template", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "lora_mlp", "pre_seq_len",
                  "prefix_projection", "prefix_hidden_size", "prefix_dropout", "steps", "batch_size", "lr", "warmup",
                  "min_lr_ratio", "weight_decay", "betas", "grad_clip", "eval_every", "ckpt_every", "keep_last",
                  "seed", "device", "dtype", "resume", "overwrite", "quantize", "group_size")


def _add_finetune_args(s: argparse.ArgumentParser) -> None:
    s.argument_default = argparse.SUPPRESS
    s.add_argument("base", help="the model to fine-tune: a checkpoint folder (any format glm reads) or a run folder")
    s.add_argument("--data", required=True, help='training JSONL: chat rows {"messages": [...]} or '
                                                 '{"prompt", "response"} (sft); {"text", "label"} (cloze, head)')
    s.add_argument("--eval", default=None, help="held-out JSONL in the same form (eval loss, or accuracy)")
    s.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl, loss.png, model/")
    s.add_argument("--method", choices=("full", "lora", "ptuning"),
                   help="full: every weight; lora: low-rank adapters (default); ptuning: P-tuning v2 prefixes")
    s.add_argument("--task", choices=("sft", "cloze", "head"),
                   help="sft (default): chat / instruction tuning, loss on the assistant's tokens; cloze: GLM's "
                        "classification by the blank-infilling score of each label's verbalizer; head: a linear "
                        "head on the final hidden state")
    s.add_argument("--tokenizer", help="tokenizer folder (default: BASE's)")
    s.add_argument("--max-source-len", type=int, help="sft: prompt tokens kept (default 1024)")
    s.add_argument("--max-target-len", type=int, help="sft: response tokens kept (default 128)")
    s.add_argument("--labels", nargs="+", help="cloze / head: the class labels")
    s.add_argument("--verbalizers", nargs="+",
                   help="cloze: the text that fills the blank for each label, in --labels order (default: the label)")
    s.add_argument("--template", help="cloze / head: the prompt, with {text} and one [MASK] (default '{text} [MASK]')")
    s.add_argument("--lora-r", type=int, help="LoRA rank (default 8)")
    s.add_argument("--lora-alpha", type=float, help="LoRA alpha; the update is scaled by alpha / r (default 16)")
    s.add_argument("--lora-dropout", type=float, help="dropout on the LoRA input (default 0)")
    s.add_argument("--lora-targets", nargs="+",
                   help="module names as peft writes them for the release (e.g. q_proj v_proj, or query_key_value); "
                        "default: the attention projections")
    s.add_argument("--lora-mlp", action="store_true", help="with the default targets: the MLP projections too")
    s.add_argument("--pre-seq-len", type=int, help="P-tuning prefix length (default 16)")
    s.add_argument("--prefix-projection", action="store_true", help="P-tuning: the two-layer MLP reparametrisation")
    s.add_argument("--prefix-hidden-size", type=int,
                   help="P-tuning: that MLP's hidden size (default: the model's, the only one THUDM's files hold)")
    s.add_argument("--prefix-dropout", type=float, help="P-tuning: dropout on the prefix (default 0)")
    s.add_argument("--steps", type=int, help="optimizer steps (default 200)")
    s.add_argument("--batch-size", type=int, help="rows per step (default 8)")
    s.add_argument("--lr", type=float, help="peak learning rate (default per method: full 5e-5, lora 1e-3, "
                                            "ptuning 2e-2)")
    s.add_argument("--warmup", type=int, help="linear warmup steps (default 0)")
    s.add_argument("--min-lr-ratio", type=float, help="the cosine schedule ends at this share of --lr (default 0.1)")
    s.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices (default 0)")
    s.add_argument("--betas", nargs=2, type=float, metavar=("B1", "B2"), help="AdamW's moment decays (default 0.9 "
                                                                             "0.999)")
    s.add_argument("--grad-clip", type=float, help="max gradient norm (default 1)")
    s.add_argument("--eval-every", type=int, help="evaluate on --eval every N steps (default: after the last step)")
    s.add_argument("--ckpt-every", type=int, help="checkpoint every N steps (default: after the last step)")
    s.add_argument("--keep-last", type=int, help="checkpoints kept (default 2)")
    s.add_argument("--seed", type=int, help="seed of the data order and of new weights (default 0)")
    s.add_argument("--device", help="auto (CUDA when present; default), cpu or cuda")
    s.add_argument("--dtype", help="the base model's dtype (default float32)")
    _add_quantize_args(s, "load the base weight-only quantized and train lora / ptuning over it (QLoRA's "
                          "arrangement)")
    s.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    s.add_argument("--overwrite", action="store_true", help="delete the fine-tuning run in OUT and start over")
    s.add_argument("--no-verify", action="store_true", default=False,
                   help="with --resume: skip the checkpoint's sha256 check")
    s.add_argument("--quiet", action="store_true", default=False, help="no progress bar or progress lines")


def _add_model_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("dir", help="checkpoint folder (release format or glm's), with its tokenizer files")
    s.add_argument("--tokenizer", default=None, help="tokenizer folder or file (default: DIR)")
    s.add_argument("--dtype", default="float32",
                   help="float32, bfloat16, float16, or auto = as stored (default float32)")
    s.add_argument("--device", default="cpu", help="torch device (default cpu)")
    s.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens to generate (infill: per blank) (default 128, or fewer where the model's "
                        "position table ends sooner)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (needs --temperature)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (needs --temperature)")
    s.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1)")
    s.add_argument("--seed", type=int, default=None, help="sampling seed")
    s.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay each decode step from a CUDA graph (default: on with a CUDA --device)")
    _add_quantize_args(s, "quantize the model's linear layers while loading (weight-only, THUDM's layout; "
                          "a folder that is already quantized loads as it is, without this flag)")


def _add_quantize_args(s: argparse.ArgumentParser, what: str) -> None:
    s.add_argument("--quantize", choices=("int8", "int4"), default=None, help=what)
    s.add_argument("--group-size", type=int, default=None,
                   help="with --quantize: one scale per GROUP_SIZE input columns, a divisor of each layer's "
                        "inputs such as 32, 64, 128 (default: one scale per output row)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glm", description="GLM family models in plain PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("parity", help="check glm's logits against a reference cases file",
                       description="Load the checkpoint in DIR, run every case of the cases file and compare "
                                   "logits, greedy tokens and decode positions with the reference.")
    s.add_argument("dir", help="checkpoint folder (config.json + weights in the release's format)")
    s.add_argument("--cases", default=None, help="cases .json (its .safetensors beside it); default DIR/cases.json")
    s.add_argument("--atol", type=float, default=None, help="max |logit difference| (default: the file's, 1e-4)")
    s.add_argument("--backend", default=None, help="attention backend: auto, fused, sdpa, reference (default auto)")
    s.add_argument("--device", default="cpu", help="torch device (default cpu)")
    s.set_defaults(func=cmd_parity)

    from .config import FAMILIES

    s = sub.add_parser("convert", help="convert a checkpoint between a release format and glm's, shard by shard",
                       description="Stream SRC (a release's Hugging Face format, or glm's) into DST, one shard at a "
                                   "time. DST is written under DST.tmp-* and renamed into place at the end.")
    s.add_argument("src", help="source checkpoint folder")
    s.add_argument("dst", help="destination folder: new or empty, or with --overwrite one glm wrote (missing parents "
                               "are created)")
    s.add_argument("--to", choices=("glm", "hf"), default="glm", help="output format (default glm)")
    s.add_argument("--family", choices=list(FAMILIES), default=None,
                   help="release format for --to hf (default: the source's; e.g. glm-hf turns a chatglm-format "
                        "GLM-4 into transformers' Glm)")
    s.add_argument("--dtype", choices=("fp32", "bf16", "fp16", "float32", "bfloat16", "float16"), default=None,
                   help="cast every tensor (default: keep each tensor's dtype)")
    s.add_argument("--allow-lossy", action="store_true", help="permit casts that lose precision (e.g. fp32 -> bf16)")
    s.add_argument("--shard-size", default="2GB", help="max bytes per output shard, e.g. 2GB, 500MB (default 2GB)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace DST (atomically) if glm wrote it and it holds only glm's files")
    s.add_argument("--no-verify", action="store_true",
                   help="skip checking a glm-written SRC's weight files against their sha256 record")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("quantize", help="quantize a checkpoint's linear weights to INT8 / INT4, shard by shard",
                       description="Stream SRC (any format glm reads) into DST with the attention and MLP weights "
                                   "quantized (weight-only, THUDM's INT8/INT4 layout: docs/quantization.md). DST is "
                                   "written under DST.tmp-* and renamed into place at the end.")
    s.add_argument("src", help="full-precision checkpoint folder")
    s.add_argument("dst", help="destination folder: new or empty, or with --overwrite one glm wrote")
    s.add_argument("--bits", type=int, required=True, metavar="{8,4}", help="8 (INT8) or 4 (INT4)")
    s.add_argument("--group-size", type=int, default=None,
                   help="one scale per GROUP_SIZE input columns, a divisor of each layer's inputs such as 32, 64, "
                        "128 (default: one scale per output row, THUDM's layout)")
    s.add_argument("--embeddings", action="store_true", help="quantize the token embedding too, row by row")
    s.add_argument("--lm-head", action="store_true", help="quantize an untied output head too")
    s.add_argument("--format", "--to", dest="format", choices=("glm", "hf"), default="glm",
                   help="glm's format (default) or hf: the release's own format in THUDM's -int8/-int4 layout "
                        "(ChatGLM-6B, ChatGLM2/3, GLM-4 chatglm; per-row scales)")
    s.add_argument("--shard-size", default="2GB", help="max bytes per output shard, e.g. 2GB, 500MB (default 2GB)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace DST (atomically) if glm wrote it and it holds only glm's files")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_quantize)

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
    s.add_argument("--tools", default=None, metavar="TOOLS.json",
                   help="offer the tools of this JSON file (a list of tools, or {\"tools\": [...]}; GLM-4: "
                        "OpenAI-style function tools, python, simple_browser, cogview; ChatGLM3: "
                        "{\"name\", \"description\", \"parameters\"} objects); a reply that calls one is "
                        "shown as a call and the next line is taken as its result")
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("train", help="pretrain a small GLM (blank infilling by default); torchrun-aware",
                       description="Pretrain on the embedded corpus or --data. Multi-GPU/CPU: "
                                   "torchrun --nproc_per_node N -m glm train ...")
    _add_train_args(s)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("demo", help="pretrain a tiny GLM on the embedded corpus and show it filling blanks")
    s.add_argument("--out", default="runs/demo",
                   help="run folder (default runs/demo; an earlier demo there is replaced)")
    s.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's)")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("demo-finetune", help="fine-tune the demo model on embedded toy instructions and a toy "
                                             "classification task; show answers and accuracy before and after")
    s.add_argument("--out", default="runs/demo-finetune", help="run folder (default runs/demo-finetune; replaced)")
    s.add_argument("--base-run", default="runs/demo",
                   help="the pretrained demo run to start from, trained first when missing (default runs/demo)")
    s.set_defaults(func=cmd_demo_finetune)

    s = sub.add_parser("finetune", help="fine-tune a model: chat SFT or classification, full / LoRA / P-tuning v2",
                       description="Fine-tune BASE (a model folder with its tokenizer) on --data (JSONL). The result "
                                   "goes to OUT/model (a glm checkpoint, peft adapter files or THUDM P-tuning files); "
                                   "glm chat / generate OUT load it with its base.")
    _add_finetune_args(s)
    s.set_defaults(func=cmd_finetune)

    s = sub.add_parser("merge-lora", help="fold a LoRA adapter into its base and save a plain checkpoint")
    s.add_argument("src", help="adapter folder (adapter_config.json + adapter_model.safetensors), or its run folder")
    s.add_argument("dst", help="output folder")
    s.add_argument("--format", choices=("glm", "hf"), default="glm",
                   help="glm's format (default) or hf, the release's own that its reference code loads")
    s.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in DST")
    s.set_defaults(func=cmd_merge_lora)

    s = sub.add_parser("classify", help="label probabilities from a classifier glm finetune --task cloze|head made")
    s.add_argument("dir", help="the fine-tuning run folder (or its model/)")
    s.add_argument("--text", required=True, help="the text to classify")
    s.add_argument("--device", default="cpu", help="torch device (default cpu)")
    s.set_defaults(func=cmd_classify)

    from .bench import SUITES

    s = sub.add_parser("bench", help="run a benchmark suite (benchmarks/) and print ours vs the peer and the ceiling",
                       description="Runs benchmarks/SUITE.py in a fresh process (needs the repository checkout); "
                                   "arguments after -- go to the script (see python benchmarks/SUITE.py --help).")
    s.add_argument("suite", choices=(*SUITES, "report"),
                   help="a suite to run, or 'report' to regenerate benchmarks/README.md from the records")
    s.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    s.add_argument("--out", default=None,
                   help="folder for the JSON + PNG (default benchmarks/results/local, untracked; with --quick "
                        "benchmarks/results/quick); for 'report', the records folder, with README.md written beside it")
    s.add_argument("--publish", action="store_true",
                   help="write the record to benchmarks/results, replacing the committed one the docs quote")
    s.add_argument("--quick", action="store_true",
                   help="tiny sizes: a smoke run of a few seconds (not a measurement: goals are not judged)")
    _add_quantize_args(s, "decode: quantize the benchmark's model (weight-only) before measuring it")
    s.set_defaults(func=cmd_bench)

    from .tokenizer import FAMILY_NAMES as TOKENIZER_FAMILIES
    from .tokenizer import MODEL_TYPES

    s = sub.add_parser("train-tokenizer",
                       help="train a SentencePiece (or GLM-4 BPE) tokenizer with a family's specials")
    s.add_argument("corpus", nargs="+", help="text files or globs")
    s.add_argument("out", help="output folder")
    s.add_argument("--vocab-size", type=int, default=None,
                   help="total vocabulary, special tokens included; required for unigram and bpe, optional for "
                        "char (the corpus sets it: left out, it is taken; given, it must match)")
    s.add_argument("--family", choices=list(TOKENIZER_FAMILIES), required=True)
    s.add_argument("--model-type", choices=MODEL_TYPES, default=None,
                   help="unigram (default), bpe, or char: one id per distinct character of the corpus; glm4 is "
                        "always byte-level bpe")
    s.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True,
                   help="256 byte pieces encode characters the model lacks (default on); with --no-byte-fallback "
                        "they become <unk> (glm4 is byte-level and cannot turn it off)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace a tokenizer saved in OUT (only its model file and tokenizer_config.json; "
                        "OUT holding anything else is refused)")
    s.set_defaults(func=cmd_train_tokenizer)
    return p


# A GLMError is a user's mistake the message explains, an OSError one the system explains; anything else is
# a bug in glm and keeps its traceback.
USER_ERRORS = (GLMError, OSError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `glm bench SUITE [options] -- ARGS`: ARGS go to the benchmark script untouched. Every other
    # command leaves "--" to argparse, which rejects anything it does not know.
    extra: list[str] = []
    if argv[:1] == ["bench"] and "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    args.extra = extra
    for name in ("prompt", "text"):
        if getattr(args, name, None) == []:  # Python 3.11's argparse turns --prompt=-- into []
            setattr(args, name, "--")
    try:
        return args.func(args)
    except USER_ERRORS as e:
        # A user mistake gets one clear line, not a stack trace.
        print(f"glm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Writers clean up on their way out (atomic renames); say so in one line, exit like a shell.
        print(f"\nglm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
