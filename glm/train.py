"""Pretraining small GLMs: a plain loop with the knobs in one dataclass.

Reproducibility is structural: the batch of step ``s`` is drawn from an RNG seeded by
``(seed, s)``, so data order needs no saved state, and a checkpoint holds the model, the optimizer,
the schedule, the step and torch's RNG. Resuming on CPU therefore reproduces the uninterrupted
run's losses bit for bit.

Multi-process (``torchrun --nproc_per_node N -m glm train ...``): every rank builds the same global
batch and takes its own rows; each rank's loss is its token-loss *sum* over the global token count
times the world size, so DDP's gradient average equals the single-process gradient of the same
global batch. Rank 0 logs and writes checkpoints.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .checkpoint import atomic_write, check_device, write_failed
from .config import GLMConfig, preset
from .model import GLM


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. a non-finite loss); the message says what to change."""


@dataclass
class TrainConfig:
    out_dir: str = "runs/glm"
    # Model: a preset name, with overrides; vocab_size always comes from the tokenizer.
    model: str = "tiny-glm"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # Data: None = the embedded synthetic corpus; else text files / globs / JSONL (`text` field).
    data: Optional[list[str]] = None
    corpus_size: str = "small"  # embedded corpus: tiny | small | base
    tokenizer: Optional[str] = None  # a tokenizer folder; None = train one on the training text
    vocab_size: int = 1000
    objective: str = "glm"  # glm (blank infilling) | causal | prefix
    mix: Optional[tuple[float, float]] = None  # (bert_prob, gap_sentence_prob); None = the data default
    seq_len: int = 128
    batch_size: int = 16  # global batch (rows), split across ranks
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_examples: int = 200
    ckpt_every: int = 250
    keep_last: int = 2
    seed: int = 0
    compile: bool = False
    device: str = "auto"  # auto = cuda if available else cpu
    fsdp: bool = False
    progress: bool = True  # a tqdm bar on stderr, drawn only when stderr is a terminal (never into a log)
    resume: bool = False  # continue the newest checkpoint in out_dir
    overwrite: bool = False  # delete an earlier run in out_dir (its checkpoints, metrics, tokenizer, model) first

    def validate(self) -> None:
        for f in ("seq_len", "batch_size", "grad_accum", "steps", "vocab_size", "keep_last"):
            if getattr(self, f) < 1:
                raise ValueError(f"TrainConfig.{f} must be >= 1, got {getattr(self, f)}")
        if self.resume and self.overwrite:
            raise ValueError("TrainConfig: resume continues the run in out_dir and overwrite deletes it; pass one "
                             "of them (--resume or --overwrite), not both")
        if not isinstance(self.model_overrides, dict):
            raise ValueError(f"TrainConfig.model_overrides must be a dict of GLMConfig fields (--model-overrides "
                             f"takes a JSON object such as '{{\"num_layers\": 4}}'), got "
                             f"{type(self.model_overrides).__name__}")
        if "vocab_size" in self.model_overrides:
            raise ValueError("TrainConfig.model_overrides sets vocab_size, but the model's vocabulary is the "
                             "tokenizer's: set vocab_size (--vocab-size) to size the tokenizer trained for the "
                             "run, or tokenizer (--tokenizer) to use an existing one")
        known = {f.name for f in dataclasses.fields(GLMConfig)}
        unknown = sorted(set(self.model_overrides) - known)
        if unknown:
            raise ValueError(f"TrainConfig.model_overrides has unknown GLMConfig fields {unknown}; known fields: "
                             f"{sorted(known)}")
        max_pos = self.model_overrides.get("max_positions", self.seq_len + 1)
        if not isinstance(max_pos, int) or isinstance(max_pos, bool) or max_pos < self.seq_len + 1:
            raise ValueError(f"TrainConfig.model_overrides sets max_positions {max_pos!r}, but rows of seq_len "
                             f"{self.seq_len} need an int of at least {self.seq_len + 1}; raise it or lower seq_len "
                             f"(--seq-len)")
        if self.objective not in ("glm", "causal", "prefix"):
            raise ValueError(f"TrainConfig.objective must be glm, causal or prefix, got {self.objective!r}")
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1 and self.warmup >= 0):
            raise ValueError("TrainConfig: lr must be > 0, min_lr_ratio in [0, 1], warmup >= 0")


# ------------------------------------------------------------------------------------------------
# Optimisation

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay on matrices only (not on biases, norms or embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


# ------------------------------------------------------------------------------------------------
# Checkpoints: atomic, keep-last-K

def checkpoints(out_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(out_dir, "ckpt-*.pt")))


def save_checkpoint(out_dir: str, state: dict, step: int, keep_last: int) -> str:
    """Write ``ckpt-{step}.pt`` atomically (temp file + fsync + rename), then drop all but the last
    ``keep_last``. A failure (disk full, ...) leaves the earlier checkpoints as they were."""
    path = os.path.join(out_dir, f"ckpt-{step:07d}.pt")
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except OSError as e:
        raise write_failed(e, path, f"the earlier checkpoints in {out_dir} are intact; free space (or lower "
                                    f"--keep-last), then rerun with --resume") from e
    for old in checkpoints(out_dir)[:-keep_last]:
        os.remove(old)
    return path


# What `train` writes at the top of out_dir, with the temp names it writes them under first.
RUN_FILES = ("metrics.jsonl", "metrics.jsonl.tmp", "loss.png", "loss.png.tmp.png", "train_text.txt",
             "train_text.txt.tmp")
TOKENIZER_RECORD = "glm_train_settings.json"  # beside a tokenizer the trainer trained: what it was trained with


def claim_run_folder(cfg: TrainConfig, is_main: bool = True) -> None:
    """Make sure ``cfg.out_dir`` holds no other run this one would mix with: without ``resume``, a folder
    with checkpoints is refused (keep-newest-K pruning goes by step number, so the old run's later
    checkpoints would outlive the new run's, and a later resume would continue the old run), unless
    ``overwrite`` asks to delete that run first (done by rank 0)."""
    ckpts = checkpoints(cfg.out_dir)
    if ckpts and not cfg.resume and not cfg.overwrite:
        raise TrainingError(f"{cfg.out_dir} already holds a run (checkpoints up to {os.path.basename(ckpts[-1])}); "
                            f"pass resume=True (--resume) to continue it, overwrite=True (--overwrite) to delete its "
                            f"checkpoints, metrics, tokenizer and model and start over, or use a new out_dir (--out)")
    if cfg.overwrite and is_main:
        clear_run(cfg.out_dir, keep=cfg.tokenizer)


def clear_run(out_dir: str, keep: Optional[str] = None) -> list[str]:
    """Delete what `train` writes into ``out_dir`` (checkpoints and their temp files, metrics, plot,
    tokenizer training text, ``tokenizer/``, ``model/``) and nothing else; ``keep`` (a folder this run
    reads, e.g. ``--tokenizer OUT/tokenizer``) is left alone. Returns the deleted paths."""
    if not os.path.isdir(out_dir):
        return []
    kept = os.path.realpath(keep) if keep else None

    def ours(folder: str) -> bool:  # a real folder (never through a link), not the kept one nor one holding it
        real = os.path.realpath(folder)
        return (os.path.isdir(folder) and not os.path.islink(folder)
                and not (kept and (kept == real or kept.startswith(real + os.sep))))

    gone = glob.glob(os.path.join(out_dir, "ckpt-*.pt")) + glob.glob(os.path.join(out_dir, "ckpt-*.pt.tmp-*"))
    gone += [os.path.join(out_dir, name) for name in RUN_FILES]
    gone = [p for p in gone if os.path.isfile(p)]
    for path in gone:
        os.remove(path)
    tok_dir = os.path.join(out_dir, "tokenizer")
    if ours(tok_dir):
        # Only the files the tokenizer trainer wrote (model file, config, our record); a folder that then
        # still holds something else is not ours to delete.
        names = [TOKENIZER_RECORD, "tokenizer_config.json"]
        try:
            with open(os.path.join(tok_dir, "tokenizer_config.json"), encoding="utf-8") as f:
                names.append(os.path.basename(str(json.load(f).get("model_file", ""))))
        except (OSError, ValueError, AttributeError):
            pass
        for name in filter(None, names):
            for path in glob.glob(os.path.join(tok_dir, glob.escape(name))) + glob.glob(
                    os.path.join(tok_dir, glob.escape(name) + ".tmp-*")):
                os.remove(path)
                gone.append(path)
        if not os.listdir(tok_dir):
            os.rmdir(tok_dir)
    model_dir = os.path.join(out_dir, "model")
    if ours(model_dir):
        # The final save replaces this folder whole (save_pretrained(overwrite=True)); deleting it now
        # keeps a crashed new run from leaving the old run's model beside the new run's metrics.
        shutil.rmtree(model_dir)
        gone.append(model_dir)
    return gone


def remove_stale_temp_files(out_dir: str) -> list[str]:
    """Delete ``ckpt-*.pt.tmp-*`` files that a killed run (kill -9, power loss) left mid-write; they
    are never read (`checkpoints` only lists complete ``ckpt-*.pt``). Call only when no other run
    writes to ``out_dir``."""
    stale = glob.glob(os.path.join(out_dir, "ckpt-*.pt.tmp-*"))
    for path in stale:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
    return stale


def load_checkpoint(path: str, device: torch.device) -> dict:
    """A trainer checkpoint, or a TrainingError naming the file and what to do."""
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # truncated / corrupted: pickle, zip and EOF errors of many kinds
        raise TrainingError(f"{path}: cannot read this checkpoint ({type(e).__name__}: {e}); delete it to resume "
                            f"from the previous one, or start over without --resume") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "step", "torch_rng"} <= set(state):
        raise TrainingError(f"{path}: not a glm trainer checkpoint (needs model, optimizer, step and torch_rng); "
                            f"move it out of the run folder")
    return state


# ------------------------------------------------------------------------------------------------
# Distributed helpers

def _dist_info() -> tuple[int, int, int]:
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), ws, int(os.environ.get("LOCAL_RANK", "0"))


def _setup_distributed(device: torch.device) -> tuple[int, int]:
    rank, world, _ = _dist_info()
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", _dist_info()[2])
        return torch.device("cpu")
    return check_device(name)


# ------------------------------------------------------------------------------------------------
# Data preparation

@dataclass
class Prepared:
    """Everything the loop needs, derived once from the config."""
    tokenizer: Any
    train_docs: list[list[int]]
    heldout_docs: list[list[int]]
    examples: list  # glm.corpus.InfillExample (empty for user data)
    baseline: Optional[float]
    collator: Any


def _chunk(ids: list[int], limit: int) -> list[list[int]]:
    return [ids[i:i + limit] for i in range(0, len(ids), limit)]


def prepare(cfg: TrainConfig, model_cfg: GLMConfig, rank: int = 0, world: int = 1) -> Prepared:
    from .corpus import baseline_accuracy, generate_corpus, read_documents
    from .data import Collator, Objective, SpecialIds, sentence_end_ids
    from .tokenizer import load, train as train_tokenizer

    examples, baseline = [], None
    if cfg.data is None:
        corpus = generate_corpus(seed=cfg.seed, size=cfg.corpus_size)
        texts, examples, baseline = list(corpus.train), list(corpus.heldout), baseline_accuracy(corpus)
        held_texts = [e.text_with_blank.replace("[MASK]", e.answer) for e in examples]
    else:
        texts = read_documents(cfg.data)
        n_held = max(1, len(texts) // 20) if len(texts) > 1 else 0
        texts, held_texts = texts[: len(texts) - n_held], texts[len(texts) - n_held:]

    tok_dir = cfg.tokenizer or os.path.join(cfg.out_dir, "tokenizer")
    wanted = _tokenizer_settings(cfg, model_cfg)
    if cfg.tokenizer is None and rank == 0 and not os.path.exists(os.path.join(tok_dir, "tokenizer_config.json")):
        os.makedirs(tok_dir, exist_ok=True)
        corpus_file = os.path.join(cfg.out_dir, "train_text.txt")
        with open(corpus_file + ".tmp", "w", encoding="utf-8") as f:
            f.write("\n".join(t.replace("\n", " ") for t in texts) + "\n")
        os.replace(corpus_file + ".tmp", corpus_file)
        # BPE keeps most short answers (numbers, names) in one or two pieces on this little text.
        train_tokenizer([corpus_file], tok_dir, cfg.vocab_size, wanted["family"], model_type=wanted["model_type"])
        atomic_write(os.path.join(tok_dir, TOKENIZER_RECORD), (json.dumps(wanted, indent=2) + "\n").encode())
    if world > 1:
        torch.distributed.barrier()
    tok = load(tok_dir)
    if cfg.tokenizer is None:
        _check_reused_tokenizer(tok, tok_dir, wanted)

    objective = Objective(kind=cfg.objective)
    if cfg.mix is not None:
        objective = Objective(kind=cfg.objective, bert_prob=cfg.mix[0], gap_sentence_prob=cfg.mix[1])
    collator = Collator(special=_special_ids(tok, tok_dir), max_len=cfg.seq_len, objective=objective,
                        position_streams=model_cfg.position_streams, is_sentence_end=sentence_end_ids(tok))
    limit = objective.max_doc_len(cfg.seq_len, cls=tok.cls_id is not None)
    # Long documents are split into consecutive chunks that fit (stated here, never silent truncation).
    train_docs = [c for t in texts for c in _chunk(tok.encode(t), limit) if c]
    heldout_docs = [c for t in held_texts for c in _chunk(tok.encode(t), limit) if c]
    if not train_docs:
        raise TrainingError("the training corpus tokenised to nothing; check --data")
    return Prepared(tok, train_docs, heldout_docs, examples, baseline, collator)


def _tokenizer_settings(cfg: TrainConfig, model_cfg: GLMConfig) -> dict:
    """What the tokenizer `prepare` trains for ``cfg`` depends on (recorded beside it as TOKENIZER_RECORD)."""
    text = {"data": list(cfg.data)} if cfg.data is not None else {"corpus_size": cfg.corpus_size, "seed": cfg.seed}
    return {"vocab_size": cfg.vocab_size, "family": "glm" if model_cfg.position_streams == 2 else "chatglm3",
            "model_type": "bpe", **text}


def _check_reused_tokenizer(tok, tok_dir: str, wanted: dict) -> None:
    """An OUT/tokenizer left by an earlier run is reused only when it was trained as this run asks; a
    folder from before the record existed is checked on what the tokenizer itself shows."""
    try:
        with open(os.path.join(tok_dir, TOKENIZER_RECORD), encoding="utf-8") as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        recorded = {"vocab_size": tok.vocab_size, "family": tok.family}
    if not isinstance(recorded, dict):
        recorded = {}
    differ = [k for k in wanted if k in recorded and recorded[k] != wanted[k]]
    if differ:
        was = ", ".join(f"{k}={recorded[k]!r}" for k in differ)
        now = ", ".join(f"{k}={wanted[k]!r}" for k in differ)
        raise TrainingError(f"{tok_dir} was trained with {was}, but this run asks for {now}; rerun with the run's "
                            f"settings, pass tokenizer={tok_dir!r} (--tokenizer) to use it as it is, or start over "
                            f"with overwrite=True (--overwrite) or a new out_dir (--out)")


def _special_ids(tok, tok_dir: str):
    """The objective's special ids for ``tok``. ChatGLM-6B's eos is <eop>, also the span end the objective
    inserts; its release tokenizer's ``end_token`` </s> ends the documents instead."""
    from .data import DataError, SpecialIds, end_of_text_id

    eos = None
    inserted = {tok.sop_id, tok.eop_id, *dict(tok.mask_ids).values()}
    if tok.eos_ids and tok.eos_ids[0] in inserted:
        eos = end_of_text_id(tok)
    try:
        return SpecialIds.from_tokenizer(tok, eos=eos)
    except DataError as e:
        raise TrainingError(f"tokenizer {tok_dir} cannot be trained on with this objective: {e}") from None


def global_batch(prep: Prepared, cfg: TrainConfig, micro_step: int, docs: Optional[list] = None):
    """The global batch of micro-step ``micro_step``: a function of (seed, micro_step) only."""
    from .data import batch_rng

    docs = docs if docs is not None else prep.train_docs
    rng = batch_rng(cfg.seed, micro_step)
    idx = rng.integers(0, len(docs), size=cfg.batch_size)
    return prep.collator([docs[i] for i in idx], rng)


def _rows(batch, rank: int, world: int):
    """This rank's rows of a global batch (contiguous blocks; B must divide by the world size)."""
    if world == 1:
        return batch
    B = batch.tokens.shape[0]
    lo, hi = rank * B // world, (rank + 1) * B // world
    take = lambda t: None if t is None else t[lo:hi]  # noqa: E731
    return dataclasses.replace(batch, tokens=take(batch.tokens), targets=take(batch.targets),
                               loss_mask=take(batch.loss_mask), position_ids=take(batch.position_ids),
                               prefix_len=take(batch.prefix_len), lengths=take(batch.lengths),
                               doc_start=take(batch.doc_start), placement=())


def loss_sum(model: torch.nn.Module, batch, autocast: bool, device: torch.device) -> torch.Tensor:
    """Sum of token cross entropies over the batch's loss mask (fp32). The model projects onto the
    vocabulary only where there are targets (GLM's Part B is ~15-25% of a row)."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(**batch.model_inputs(), logits_at=batch.loss_mask)
    return F.cross_entropy(logits.float(), batch.targets[batch.loss_mask], reduction="sum")


# ------------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate(model: GLM, prep: Prepared, cfg: TrainConfig, device: torch.device, max_examples: int) -> dict:
    """Held-out loss/perplexity (same objective, fixed batches) and blank-infilling exact match."""
    from .corpus import exact_match, first_word
    from .generate import _tokenizer_infill_args, encode_blank_text, infill_ids

    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    if prep.heldout_docs:
        total, count = 0.0, 0
        for k in range(4):  # fixed micro-steps far from the training ones
            b = global_batch(prep, cfg, 10**9 + k, docs=prep.heldout_docs).to(device)
            total += float(loss_sum(model, b, False, device))
            count += b.num_loss_tokens
        out["eval_loss"] = total / max(count, 1)
        out["eval_ppl"] = math.exp(min(out["eval_loss"], 50.0))
    if prep.examples and model.config.position_streams == 2:
        tok = prep.tokenizer
        args = _tokenizer_infill_args(tok)
        hits, first_hits, preds = 0, 0, []
        for ex in prep.examples[:max_examples]:
            ids = encode_blank_text(tok, ex.text_with_blank)
            ids = tok.build_inputs(ids) if tok.family == "glm" else ids
            res = infill_ids(model, ids, max_span_tokens=12, **args)
            pred = tok.decode(res.spans[0], skip_special_tokens=True) if res.spans else ""
            preds.append(pred)
            hits += exact_match(pred, ex.answer)
            first_hits += exact_match(first_word(pred), ex.answer)
        n = max(1, min(len(prep.examples), max_examples))
        # A tiny model often fills the blank right and then runs on instead of closing the span with
        # <eop> ("48 years old. Belius"); the first word of the fill is scored as well.
        out["exact_match"] = hits / n
        out["exact_match_first_word"] = first_hits / n
        out["_predictions"] = preds  # type: ignore[assignment]
    model.train(was_training)
    return out


# ------------------------------------------------------------------------------------------------
# The loop

def _parse_record(line: str) -> Optional[dict]:
    """One metrics.jsonl line, or None for a torn / foreign one."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and line.endswith("\n") else None


def _log(path: str, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def plot_metrics(metrics_path: str, png_path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in open(metrics_path, encoding="utf-8") if line.strip()]
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if tr:
        ax.plot(*zip(*tr), lw=0.8, label="train loss")
    if ev:
        ax.plot(*zip(*ev), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def train(cfg: TrainConfig, *, on_step: Optional[Callable[[int, float], None]] = None) -> dict:
    """Run (or resume) a pretraining run; returns a summary. See the module docstring."""
    cfg.validate()
    device = _resolve_device(cfg.device)
    rank, world = _setup_distributed(device)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the {world} processes")
    is_main = rank == 0
    base = preset(cfg.model)
    # validate() checked the overrides (no vocab_size: the tokenizer sets it; max_positions >= seq_len + 1).
    model_cfg = base.replace(**{"vocab_size": max(base.vocab_size, 1),
                                "max_positions": max(base.max_positions, cfg.seq_len + 1), **cfg.model_overrides})
    claim_run_folder(cfg, is_main)
    if world > 1:
        torch.distributed.barrier()  # rank 0 has cleared an overwritten run before anyone reads the folder
    os.makedirs(cfg.out_dir, exist_ok=True)
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    prep = prepare(cfg, model_cfg, rank, world)
    model_cfg = model_cfg.replace(vocab_size=prep.tokenizer.vocab_size)
    torch.manual_seed(cfg.seed)
    model = GLM(model_cfg).to(device)
    model.init_weights(seed=cfg.seed)
    model.train()
    optimizer = make_optimizer(model, cfg)

    start = 0
    if is_main:
        remove_stale_temp_files(cfg.out_dir)
    ckpts = checkpoints(cfg.out_dir)
    if cfg.resume and ckpts:
        state = load_checkpoint(ckpts[-1], device)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            first = " ".join(lines[:2])[:300] if lines else type(e).__name__
            raise TrainingError(f"{ckpts[-1]}: this checkpoint was written for another model or optimizer setup "
                                f"({first}); resume with the run's original settings or use a new --out") from None
        torch.set_rng_state(state["torch_rng"])
        start = state["step"]
        if is_main and os.path.exists(metrics_path):
            # Drop what the interrupted run logged after its last checkpoint, and a line torn by a kill.
            keep = [line for line in open(metrics_path, encoding="utf-8", errors="replace")
                    if (rec := _parse_record(line)) is not None and isinstance(rec.get("step"), int)
                    and rec["step"] <= start]
            with open(metrics_path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(keep)
            os.replace(metrics_path + ".tmp", metrics_path)
    elif cfg.resume and not ckpts and is_main:
        print(f"--resume: no checkpoint in {cfg.out_dir}; starting from step 0")
    if not cfg.resume and is_main and os.path.exists(metrics_path):
        os.remove(metrics_path)

    raw_model = model
    if world > 1:
        if cfg.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in model.layers:
                fully_shard(block)
            model = fully_shard(model)
        else:
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    fwd_model = torch.compile(model) if cfg.compile else model
    autocast = device.type == "cuda"

    bar = None
    if cfg.progress and is_main and _is_terminal(sys.stderr):
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True)
    last_ckpt = ckpts[-1] if ckpts and cfg.resume else None
    t_start = time.perf_counter()
    tokens_seen = 0
    summary: dict[str, Any] = {}
    for step in range(start, cfg.steps):
        lr = lr_at(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        total_loss, total_tokens = 0.0, 0
        micro = [global_batch(prep, cfg, step * cfg.grad_accum + m) for m in range(cfg.grad_accum)]
        global_tokens = sum(b.num_loss_tokens for b in micro)
        for b in micro:
            mine = _rows(b, rank, world).to(device)
            ls = loss_sum(fwd_model, mine, autocast, device)
            # Divide by the global token count (not this rank's): DDP's average of these gradients
            # times world is the single-process gradient of the whole global batch.
            (ls * world / max(global_tokens, 1)).backward()
            total_loss += float(ls.detach())
            total_tokens += int(b.tokens.shape[0] * b.tokens.shape[1])
        if world > 1:
            t = torch.tensor([total_loss], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(t)
            total_loss = float(t)
        loss = total_loss / max(global_tokens, 1)
        if not math.isfinite(loss):
            where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
            raise TrainingError(f"step {step + 1}: the loss is {loss}; stopping ({where}). Lower --lr, raise --warmup "
                                f"or check the data, then resume with --resume")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        optimizer.step()
        tokens_seen += total_tokens
        elapsed = time.perf_counter() - t_start
        record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens_seen / max(elapsed, 1e-9)}
        if on_step is not None:
            on_step(step + 1, loss)
        if is_main:
            _log(metrics_path, record)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
        done = step + 1 == cfg.steps
        if is_main and (done or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
            ev = evaluate(raw_model, prep, cfg, device, cfg.eval_examples)
            preds = ev.pop("_predictions", None)
            _log(metrics_path, {"step": step + 1, **ev})
            summary.update(ev)
            if done and preds is not None:
                summary["predictions"] = preds
                summary["examples"] = [(e.text_with_blank, e.answer, e.kind) for e in prep.examples[:len(preds)]]
        if is_main and (done or (cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0)):
            state = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1,
                     "torch_rng": torch.get_rng_state(), "config": dataclasses.asdict(cfg),
                     "model_config": model_cfg.to_dict()}
            last_ckpt = save_checkpoint(cfg.out_dir, state, step + 1, cfg.keep_last)
        if world > 1 and (done or (cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0)):
            torch.distributed.barrier()
    if bar is not None:
        bar.close()
    if is_main:
        final = os.path.join(cfg.out_dir, "model")
        raw_model.save_pretrained(final, format="glm", overwrite=True)
        prep.tokenizer.save(final)
        summary.update(model_dir=final, metrics=metrics_path, checkpoint=last_ckpt,
                       plot=plot_metrics(metrics_path, os.path.join(cfg.out_dir, "loss.png")),
                       baseline=prep.baseline, parameters=model_cfg.num_parameters,
                       seconds=time.perf_counter() - t_start)
    if world > 1:
        # Every rank returns once the run is complete (the final model written), so the ranks also
        # reach the process group's teardown together: a rank tearing down while rank 0 still
        # saved was seen to abort once in CI (gloo, "terminate called without an active exception").
        torch.distributed.barrier()
    return summary


# ------------------------------------------------------------------------------------------------
# make demo

DEMO = TrainConfig(
    out_dir="runs/demo", model="tiny-glm",
    model_overrides={"hidden_size": 192, "num_layers": 4, "num_heads": 6, "num_kv_heads": 6, "head_dim": 32,
                     "ffn_hidden_size": 768},
    corpus_size="tiny", vocab_size=1000, seq_len=128, batch_size=32, steps=1500, lr=3e-3, warmup=100,
    eval_every=0, ckpt_every=500, eval_examples=160)


def _earlier_run_of(cfg: TrainConfig) -> bool:
    """Whether ``cfg.out_dir``'s newest checkpoint was written by a run of ``cfg`` (up to its length)."""
    ckpts = checkpoints(cfg.out_dir)
    if not ckpts:
        return False
    try:
        saved = torch.load(ckpts[-1], map_location="cpu", weights_only=False).get("config", {})
    except Exception:  # unreadable: not provably ours
        return False
    loose = ("out_dir", "steps", "resume", "overwrite", "progress")
    mine = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in loose}
    return isinstance(saved, dict) and {k: v for k, v in saved.items() if k not in loose} == mine


def demo(cfg: TrainConfig = DEMO, show: int = 10) -> dict:
    """Pretrain a tiny GLM on the embedded corpus, then show held-out blanks, fills and answers.

    Rerunning the demo replaces an earlier demo run in ``cfg.out_dir`` (the same command rebuilds it);
    any other run there is refused as `train` refuses it."""
    t0 = time.perf_counter()
    if not cfg.resume and not cfg.overwrite and _earlier_run_of(cfg):
        cfg = dataclasses.replace(cfg, overwrite=True)
    summary = train(cfg)
    print()
    print(f"pretrained a {summary['parameters'] / 1e6:.1f}M-parameter GLM for {cfg.steps} steps in "
          f"{time.perf_counter() - t0:.0f} s (blank infilling: [MASK] spans, [sMASK] sentences, [gMASK] suffixes)")
    print()
    print("held-out examples (the model never saw these sentences):")
    from .corpus import exact_match, first_word

    for (text, answer, kind), pred in list(zip(summary.get("examples", []), summary.get("predictions", [])))[:show]:
        mark = "ok " if exact_match(first_word(pred), answer) else "   "
        print(f"  {mark} [{kind}] {text}\n        model: {pred!r}   answer: {answer!r}")
    print()
    n = len(summary.get("predictions", []))
    print(f"held-out exact match on {n} blanks: {summary['exact_match_first_word']:.1%} on the fill's first word, "
          f"{summary['exact_match']:.1%} on the whole fill   (most-frequent-answer baseline: {summary['baseline']:.1%})")
    print(f"held-out loss {summary.get('eval_loss', float('nan')):.3f} (perplexity {summary.get('eval_ppl', float('nan')):.1f})")
    print(f"loss curve: {summary['plot']}\nmodel + tokenizer: {summary['model_dir']}\ncheckpoint: {summary['checkpoint']}"
          f"\nmetrics: {summary['metrics']}")
    return summary
