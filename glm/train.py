"""Pretraining small GLMs: a plain loop with the knobs in one dataclass.

Reproducibility is structural: the batch of step ``s`` is drawn from an RNG seeded by
``(seed, s)``, so data order needs no saved state, and a checkpoint holds the model, the optimizer,
the schedule, the step and torch's RNG. Resuming on CPU therefore reproduces the uninterrupted
run's losses bit for bit.

The run folder's housekeeping (the lock, claiming and clearing a folder, checksummed checkpoints,
the metrics log) is `glm.run_folder`. A checkpoint also records the run's settings: a resume
compares them field by field (``RUN_FIELDS`` ... ``FREE_FIELDS``).

Multi-process (``torchrun --nproc_per_node N -m glm train ...``): every rank builds the same global
batch and takes its own rows; each rank's loss is its token-loss *sum* over the global token count
times the world size, so DDP's gradient average equals the single-process gradient of the same
global batch. Rank 0 logs and writes checkpoints.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Optional, Union, get_args

import numpy as np
import torch
import torch.nn.functional as F

from .config import GLMConfig
from .corpus import (
    CorpusSizeName,
    InfillExample,
    baseline_accuracy,
    exact_match,
    first_word,
    generate_corpus,
    read_documents,
)
from .data import (
    Batch,
    Collator,
    Objective,
    PackedRows,
    SpecialIds,
    batch_rng,
    end_of_text_id,
    join_documents,
    sentence_end_ids,
)
from .devices import check_device
from .errors import ArgumentError, DataError, TrainingError
from .files import atomic_write, ensure_regular, read_bounded
from .generate import encode_blank_text, eop_after_answer, infill_ids, tokenizer_infill_args
from .model import GLM
from .presets import preset
from .run_folder import (
    TOKENIZER_RECORD,
    append_record,
    checkpoints,
    claim_run_folder,
    keep_records_until,
    load_checkpoint,
    plot_metrics,
    refuse_strangers,
    remove_stale_temp_files,
    run_lock,
    save_checkpoint,
)
from .tokenizer import ModelType as TokenizerType
from .tokenizer import Tokenizer, load
from .tokenizer import train as train_tokenizer
from .tokenizer.load import MODEL_FILES

ObjectiveKind = Literal["glm", "causal", "prefix"]
DocSplit = Literal["file", "blank-line", "lines"]  # how a text file becomes documents (glm.corpus.read_documents)
EvalIters = Union[int, Literal["all"]]


@dataclass
class TrainConfig:
    out_dir: str = "runs/glm"
    # Model: a preset name, with overrides; vocab_size always comes from the tokenizer.
    model: str = "tiny-glm"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # Data: None = the embedded synthetic corpus; else text files / globs / JSONL (`text` field).
    data: Optional[list[str]] = None
    # A text file is one document ("file"), split at blank lines ("blank-line") or one per line ("lines");
    # line breaks inside a document are kept. JSONL is one document per line whatever this says.
    doc_split: DocSplit = "file"
    # Held-out files (read as `data`); None = the end of the training data (see `prepare`).
    val_data: Optional[list[str]] = None
    corpus_size: CorpusSizeName = "small"  # the embedded corpus's size
    tokenizer: Optional[str] = None  # a tokenizer folder; None = train one on the training text
    # Ids of the tokenizer trained for the run; None only with tokenizer_type "char", whose size is the
    # corpus's characters (a number must then be exactly that size: glm.tokenizer.train refuses others).
    vocab_size: Optional[int] = 1000
    tokenizer_type: TokenizerType = "bpe"  # the model type of the tokenizer trained for the run
    objective: ObjectiveKind = "glm"  # glm = blank infilling, causal = left-to-right LM, prefix = prefix LM
    mix: Optional[tuple[float, float]] = None  # (bert_prob, gap_sentence_prob); None = the data default
    seq_len: int = 128
    batch_size: int = 16  # global batch (rows), split across ranks
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    decay_embeddings: bool = False  # weight decay on the embedding tables too (nanoGPT decays every matrix)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max gradient norm; math.inf = no clipping
    eval_every: int = 250
    eval_iters: EvalIters = 20  # held-out batches per evaluation; "all" = every held-out row once
    eval_examples: int = 200
    ckpt_every: int = 250
    keep_last: int = 2
    seed: int = 0
    compile: bool = False
    device: str = "auto"  # auto = cuda if available else cpu
    fsdp: bool = False
    progress: bool = True  # a tqdm bar on a terminal, else a plain line every ~10% of the run (stderr)
    resume: bool = False  # continue the newest checkpoint in out_dir
    overwrite: bool = False  # delete an earlier run in out_dir (its checkpoints, metrics, tokenizer, model) first
    verify: bool = True  # check a checkpoint's sha256 before loading it (resume)
    allow_optimizer_change: bool = False  # resume may change OPTIMIZER_FIELDS (recorded in metrics.jsonl)

    def validate(self) -> None:
        """Every field's type and range, before anything is read or written: a value outside them would
        not fail but train wrongly (a negative grad_clip reverses the update, 0 freezes it)."""
        def bad(name: str, why: str) -> ArgumentError:
            flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
            return ArgumentError(f"TrainConfig.{name}{f' ({flag})' if flag else ''} {why}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_real(v: Any) -> bool:  # an int or float that is not NaN (a bool is not a number here)
            return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)

        for name in ("compile", "fsdp", "progress", "resume", "overwrite", "verify", "allow_optimizer_change",
                     "decay_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, f"must be True or False, got {getattr(self, name)!r}")
        for name, low in (("seq_len", 2), ("batch_size", 1), ("grad_accum", 1), ("steps", 1),
                          ("keep_last", 1), ("warmup", 0), ("eval_every", 0), ("eval_examples", 0),
                          ("ckpt_every", 0), ("seed", 0)):
            v = getattr(self, name)
            if not is_int(v) or v < low:
                raise bad(name, f"must be an integer >= {low}, got {v!r}")
        if self.tokenizer_type not in get_args(TokenizerType):
            raise bad("tokenizer_type", f"must be one of {', '.join(get_args(TokenizerType))}, got "
                                        f"{self.tokenizer_type!r}")
        if self.vocab_size is None:
            if self.tokenizer_type != "char":
                raise bad("vocab_size", f"may be None only with tokenizer_type 'char' (the corpus's characters "
                                        f"set the size); a {self.tokenizer_type} tokenizer needs a size such as 1000")
        elif not is_int(self.vocab_size) or self.vocab_size < 1:
            raise bad("vocab_size", f"must be an integer >= 1 (or None with tokenizer_type 'char'), got "
                                    f"{self.vocab_size!r}")
        if self.seed >= 2**63:
            raise bad("seed", f"must be below 2**63 (torch's seed range), got {self.seed}")
        if not (is_real(self.lr) and math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", f"must be a finite number > 0, got {self.lr!r}")
        if not (is_real(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1):
            raise bad("min_lr_ratio", f"must lie in [0, 1] (the final lr as a share of lr), got {self.min_lr_ratio!r}")
        if not (is_real(self.weight_decay) and math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise bad("weight_decay", f"must be a finite number >= 0, got {self.weight_decay!r}")
        if not (is_real(self.grad_clip) and self.grad_clip > 0):
            raise bad("grad_clip", f"must be > 0 (the max gradient norm, e.g. 1.0; inf turns clipping off), got "
                                   f"{self.grad_clip!r}")
        if not (isinstance(self.betas, (tuple, list)) and len(self.betas) == 2
                and all(is_real(b) and 0 <= b < 1 for b in self.betas)):
            raise bad("betas", f"must be two numbers in [0, 1) (AdamW's moment decays, e.g. (0.9, 0.95)), got "
                               f"{self.betas!r}")
        if self.mix is not None and not (isinstance(self.mix, (tuple, list)) and len(self.mix) == 2
                                         and all(is_real(p) and 0 <= p <= 1 for p in self.mix)
                                         and sum(self.mix) <= 1):
            raise bad("mix", f"must be None or (bert_prob, gap_sentence_prob), two numbers in [0, 1] summing to at "
                             f"most 1, got {self.mix!r}")
        for name in ("out_dir", "model", "device"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise bad(name, f"must be a non-empty string, got {getattr(self, name)!r}")
        if self.tokenizer is not None and (not isinstance(self.tokenizer, str) or not self.tokenizer):
            raise bad("tokenizer", f"must be None or a tokenizer folder, got {self.tokenizer!r}")
        for name in ("data", "val_data"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (list, tuple)) and v and all(isinstance(p, str) and p for p in v)):
                what = "the embedded corpus" if name == "data" else "held out from the training data"
                raise bad(name, f"must be None ({what}) or a non-empty list of file names or globs, such as "
                                f"['books/*.txt'], got {v!r}")
        if self.doc_split not in get_args(DocSplit):
            raise bad("doc_split", f"must be file (one document per file), blank-line (documents separated by blank "
                                   f"lines) or lines (one per line), got {self.doc_split!r}")
        if self.eval_iters != "all" and not (is_int(self.eval_iters) and self.eval_iters >= 1):
            raise bad("eval_iters", f"must be an integer >= 1 (held-out batches per evaluation) or 'all', got "
                                    f"{self.eval_iters!r}")
        if self.corpus_size not in get_args(CorpusSizeName):
            raise bad("corpus_size", f"must be tiny, small or base, got {self.corpus_size!r}")
        if self.resume and self.overwrite:
            raise ArgumentError("TrainConfig: resume continues the run in out_dir and overwrite deletes it; pass one "
                             "of them (--resume or --overwrite), not both")
        if not isinstance(self.model_overrides, dict):
            raise ArgumentError(f"TrainConfig.model_overrides must be a dict of GLMConfig fields (--model-overrides "
                             f"takes a JSON object such as '{{\"num_layers\": 4}}'), got "
                             f"{type(self.model_overrides).__name__}")
        if "vocab_size" in self.model_overrides:
            raise ArgumentError("TrainConfig.model_overrides sets vocab_size, but the model's vocabulary is the "
                             "tokenizer's: set vocab_size (--vocab-size) to size the tokenizer trained for the "
                             "run, or tokenizer (--tokenizer) to use an existing one")
        known = {f.name for f in dataclasses.fields(GLMConfig)}
        unknown = sorted(set(self.model_overrides) - known)
        if unknown:
            raise ArgumentError(f"TrainConfig.model_overrides has unknown GLMConfig fields {unknown}; known fields: "
                             f"{sorted(known)}")
        # Every objective's row uses positions below seq_len (causal / prefix rows count 0 .. seq_len-1;
        # a blank-infilling sample's positions and block positions stay below its length).
        max_pos = self.model_overrides.get("max_positions", self.seq_len)
        if not isinstance(max_pos, int) or isinstance(max_pos, bool) or max_pos < self.seq_len:
            raise ArgumentError(f"TrainConfig.model_overrides sets max_positions {max_pos!r}, but rows of seq_len "
                             f"{self.seq_len} need an int of at least {self.seq_len}; raise it or lower seq_len "
                             f"(--seq-len)")
        if self.objective not in get_args(ObjectiveKind):
            raise ArgumentError(f"TrainConfig.objective must be glm, causal or prefix, got {self.objective!r}")


# The command-line flag of each TrainConfig field where it is not --field-name ("" = none).
_FLAGS = {"out_dir": "--out", "progress": "--quiet", "verify": "--no-verify"}

# How `--resume` treats each field when it differs from the checkpoint's record (every field is in
# exactly one group; tests check that). RUN_FIELDS fix what the model is and which batches it sees:
# a change is refused. RESOLVED_FIELDS are compared as what they resolve to: model and
# model_overrides as the GLMConfig (every field but vocab_size, which follows the tokenizer), and
# tokenizer as its files' sha256, so the same tokenizer in another folder is the same run.
# OPTIMIZER_FIELDS may change with allow_optimizer_change, recorded in metrics.jsonl. FREE_FIELDS
# say where and how the run executes, evaluates and saves, so they may differ; so may steps, which
# stretches or shortens the cosine schedule (extending a run is what resume is for; it is recorded
# like an optimizer change).
# decay_embeddings is a RUN_FIELD: it moves the embedding tables into the other AdamW parameter group,
# which a checkpoint's optimizer state cannot follow.
RUN_FIELDS = ("data", "doc_split", "val_data", "corpus_size", "vocab_size", "tokenizer_type", "objective", "mix",
              "seq_len", "batch_size", "grad_accum", "seed", "decay_embeddings")
RESOLVED_FIELDS = ("model", "model_overrides", "tokenizer")
OPTIMIZER_FIELDS = ("lr", "min_lr_ratio", "warmup", "weight_decay", "betas", "grad_clip")
FREE_FIELDS = ("out_dir", "steps", "eval_every", "eval_iters", "eval_examples", "ckpt_every", "keep_last", "compile",
               "device", "fsdp", "progress", "resume", "overwrite", "verify", "allow_optimizer_change")
# What a checkpoint that predates a RUN_FIELD ran with: .txt files were read one document per line.
_BEFORE_FIELD = {"doc_split": "lines"}
# The data layout a checkpoint's batches came from: 2 = causal / prefix rows packed from one stream
# (`glm.data.PackedRows`); checkpoints without it cut each document into its own rows.
DATA_LAYOUT = 2


# ------------------------------------------------------------------------------------------------
# Optimisation

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay on matrices only: not on biases and norms, nor on the
    embedding tables unless ``decay_embeddings`` (nanoGPT decays every matrix, embeddings included)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and (cfg.decay_embeddings or "embed" not in name) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # torch's fused AdamW (one kernel over all tensors) takes a small model's optimizer step from ~5 ms
    # to ~1 ms on CPU; it needs every parameter floating point on a device it supports.
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)


# ------------------------------------------------------------------------------------------------
# Resume: the checkpoint's record of the run against the settings now

def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples become lists): what a checkpoint stores and compares."""
    return json.loads(json.dumps(value))


def model_config_for(cfg: TrainConfig) -> GLMConfig:
    """The GLMConfig a run of ``cfg`` trains, before the tokenizer sets vocab_size."""
    base = preset(cfg.model)
    # validate() checked the overrides (no vocab_size: the tokenizer sets it; max_positions >= seq_len).
    return base.replace(**{"vocab_size": max(base.vocab_size, 1),
                           "max_positions": max(base.max_positions, cfg.seq_len), **cfg.model_overrides})


def resumed_model_config(saved_model: dict, cfg: TrainConfig, model_cfg: GLMConfig) -> GLMConfig:
    """``model_cfg`` for resuming a checkpoint whose model config is ``saved_model``: with the checkpoint's
    max_positions where it is what the earlier rule (seq_len + 1 positions for every objective) gave
    the same settings, so such a run continues with the position table it was trained with."""
    old, base = saved_model.get("max_positions"), preset(cfg.model).max_positions
    if ("max_positions" not in cfg.model_overrides and old == max(base, cfg.seq_len + 1)
            and model_cfg.max_positions == max(base, cfg.seq_len)):
        return model_cfg.replace(max_positions=old)
    return model_cfg


def setting_changes(saved: dict, saved_model: dict, cfg: TrainConfig,
                    model_cfg: GLMConfig) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """What differs between a checkpoint's record (its ``config`` and ``model_config``) and the run of
    ``cfg`` now, as ``name -> (checkpoint's value, value now)``: the RUN_FIELDS and model changes, and
    the OPTIMIZER_FIELDS and ``steps`` changes. Model fields are named ``model_config.FIELD``. The
    tokenizer is compared once it exists (`check_resumed_tokenizer`)."""
    defaults = _plain(dataclasses.asdict(TrainConfig()))
    now = _plain(dataclasses.asdict(cfg))
    was = {k: saved.get(k, _BEFORE_FIELD.get(k, defaults[k])) for k in now}
    run = {k: (was[k], now[k]) for k in RUN_FIELDS if was[k] != now[k]}
    model_now = _plain(resumed_model_config(saved_model, cfg, model_cfg).to_dict())
    model_defaults = {f.name: _plain(f.default) for f in dataclasses.fields(GLMConfig)
                      if f.default is not dataclasses.MISSING}  # fields to_dict leaves out at their default
    for k in sorted(set(model_now) | set(saved_model)):
        old, new = saved_model.get(k, model_defaults.get(k)), model_now.get(k, model_defaults.get(k))
        if k != "vocab_size" and old != new:
            run[f"model_config.{k}"] = (old, new)
    optimizer = {k: (was[k], now[k]) for k in (*OPTIMIZER_FIELDS, "steps") if was[k] != now[k]}
    return run, optimizer


def check_resume(path: str, state: dict, cfg: TrainConfig, model_cfg: GLMConfig) -> dict[str, tuple]:
    """Refuse to resume the checkpoint at ``path`` with settings other than its run's (TrainingError
    naming each field with both values); OPTIMIZER_FIELDS may differ with ``allow_optimizer_change``.
    Returns the changes that are allowed (optimizer fields, steps)."""
    run, optimizer = setting_changes(state["config"], state["model_config"], cfg, model_cfg)

    def listed(changes: dict) -> str:
        return "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in changes.items())

    if run:
        raise TrainingError(f"{path}: this checkpoint was written for another model or data setup ({listed(run)}); "
                            f"resume with the run's original settings, or start a new run with a new --out (or "
                            f"--overwrite)")
    if cfg.objective != "glm" and state.get("data_layout") != DATA_LAYOUT:
        raise TrainingError(f"{path}: this {cfg.objective} run was written by an earlier glm that cut every document "
                            f"into its own rows ending in an inserted eos; rows are now packed from one stream of "
                            f"documents, so the run cannot continue with the batches it had: start a new run with a "
                            f"new --out (or --overwrite)")
    if cfg.steps < state["step"]:
        raise TrainingError(f"{path}: the run is already at step {state['step']}, past steps={cfg.steps}; pass "
                            f"steps (--steps) of at least {state['step']} to resume it")
    changed = {k: v for k, v in optimizer.items() if k != "steps"}
    if changed and not cfg.allow_optimizer_change:
        raise TrainingError(f"{path}: resuming with other optimizer settings ({listed(changed)}); pass "
                            f"allow_optimizer_change=True (--allow-optimizer-change) to change them from step "
                            f"{state['step']} on (recorded in metrics.jsonl), or resume with the run's values")
    return optimizer


def tokenizer_fingerprint(tok_dir: str) -> Optional[str]:
    """sha256 of a tokenizer folder's tokenizer_config.json and model file (the one the config names,
    else the release names in MODEL_FILES): what a resume compares, so the same tokenizer under another
    path is the same run. None when they cannot be read."""
    try:
        config = read_bounded(os.path.join(tok_dir, "tokenizer_config.json"), what="tokenizer_config.json")
        named = json.loads(config).get("model_file")
    except (OSError, ValueError, AttributeError):
        return None
    names = [named] if isinstance(named, str) and named else [
        n for n in MODEL_FILES if os.path.isfile(os.path.join(tok_dir, n))]
    sha = hashlib.sha256(config)
    try:
        for name in names:
            path = os.path.join(tok_dir, os.path.basename(name))
            ensure_regular(path, "tokenizer model file")
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    sha.update(chunk)
    except (OSError, ValueError):
        return None
    return sha.hexdigest()


def check_resumed_tokenizer(path: str, state: dict, tok_dir: str, fingerprint: Optional[str]) -> None:
    """Refuse to resume the checkpoint at ``path`` with another tokenizer than its run's (compared by
    `tokenizer_fingerprint`; a checkpoint without the record, or a folder that cannot say, passes)."""
    was = state.get("tokenizer_sha256")
    if isinstance(was, str) and fingerprint is not None and was != fingerprint:
        raise TrainingError(f"{path}: this checkpoint was written for another model or data setup (tokenizer: the "
                            f"run trained with a tokenizer of sha256 {was[:12]}..., but {tok_dir} has "
                            f"{fingerprint[:12]}...); resume with the run's tokenizer (--tokenizer), or start a new "
                            f"run with a new --out (or --overwrite)")


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", _dist_info()[2])
        return torch.device("cpu")
    device = check_device(name)
    if device.type == "meta":
        raise ArgumentError("TrainConfig.device (--device) 'meta' holds shapes but no data, so nothing can be trained "
                         "on it; use cpu or cuda")
    return device


# ------------------------------------------------------------------------------------------------
# Memory: a step that cannot fit is refused before anything is allocated

def step_memory_floor(cfg: TrainConfig, model_cfg: GLMConfig, world: int = 1) -> tuple[int, int]:
    """A lower bound on the bytes one step of ``cfg`` needs: (on the training device, in host memory).

    Device: fp32 weights, gradients and AdamW's two moments (16 bytes per parameter), plus one fp32
    vector per token and layer that backward keeps (a block's input; a real block keeps several
    more). Host: the step's micro-batches, built up front, as int64 token ids and targets. Being a
    floor it never refuses a run that fits; it catches sizes that are off by orders of magnitude."""
    # A char tokenizer's size is not known before it is trained; one id is the floor.
    vocab = (cfg.vocab_size or 1) if cfg.tokenizer is None else model_cfg.vocab_size
    params = model_cfg.replace(vocab_size=vocab).num_parameters
    rows = cfg.batch_size // world
    device = 16 * params + 4 * rows * cfg.seq_len * model_cfg.hidden_size * model_cfg.num_layers
    host = 2 * 8 * cfg.grad_accum * cfg.batch_size * cfg.seq_len
    return device, host


def _host_available() -> Optional[int]:
    """Bytes of memory this machine can still give (MemAvailable), or None where it cannot say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _device_available(device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    try:
        return torch.cuda.mem_get_info(device)[0]
    except RuntimeError:
        return None


def check_memory(cfg: TrainConfig, model_cfg: GLMConfig, device: torch.device, world: int = 1) -> None:
    """TrainingError with the numbers when `step_memory_floor` exceeds the memory available now."""
    on_device, on_host = step_memory_floor(cfg, model_cfg, world)
    if device.type == "cpu":
        checks = [("memory", on_device + on_host, _host_available())]
    else:
        checks = [(f"{device} memory", on_device, _device_available(device)), ("host memory", on_host,
                                                                                _host_available())]
    for where, need, have in checks:
        if have is not None and need > have:
            raise TrainingError(f"batch_size {cfg.batch_size} x seq_len {cfg.seq_len} (grad_accum {cfg.grad_accum}) "
                                f"needs at least {need / 2**30:.1f} GiB of {where} per step, but "
                                f"{have / 2**30:.1f} GiB is available; lower batch_size (--batch-size) and raise "
                                f"grad_accum (--grad-accum) to keep the tokens per step, or lower seq_len (--seq-len)")


# ------------------------------------------------------------------------------------------------
# Data preparation

@dataclass
class Prepared:
    """Everything the loop needs, derived once from the config. The glm objective draws documents
    (``train_docs``, cut to fit a row) for the collator; causal and prefix LM read packed rows
    (``train_rows``) of one token stream instead, and their ``*_docs`` are empty."""
    tokenizer: Tokenizer
    train_docs: list[list[int]]
    heldout_docs: list[list[int]]
    examples: list[InfillExample]  # the embedded corpus's held-out blanks (none for user data)
    baseline: Optional[float]
    collator: Collator  # the glm objective's batches; its special ids serve every objective
    train_rows: Optional[PackedRows] = None  # causal / prefix
    heldout_rows: Optional[PackedRows] = None  # causal / prefix; None: no held-out text


def _chunk(ids: list[int], limit: int) -> list[list[int]]:
    return [ids[i:i + limit] for i in range(0, len(ids), limit)]


# The held-out part cut from the training data without val_data: the last 1/20 (5%) of the documents
# (glm objective) or of the token stream (causal / prefix).
HELDOUT_EVERY = 20


def _read_texts(cfg: TrainConfig) -> tuple[list[str], Optional[list[str]], list[InfillExample], Optional[float]]:
    """The training texts, the held-out texts (None: to be cut from the training data), the embedded
    corpus's held-out blanks and their most-frequent-answer baseline."""
    examples: list[InfillExample] = []
    baseline, held = None, None
    if cfg.data is None:
        corpus = generate_corpus(seed=cfg.seed, size=cfg.corpus_size)
        texts, examples, baseline = list(corpus.train), list(corpus.heldout), baseline_accuracy(corpus)
        held = [e.text_with_blank.replace("[MASK]", e.answer) for e in examples]
    else:
        texts = read_documents(cfg.data, mode=cfg.doc_split)
    if cfg.val_data is not None:
        held = read_documents(cfg.val_data, mode=cfg.doc_split)
    return texts, held, examples, baseline


def prepare(cfg: TrainConfig, model_cfg: GLMConfig, rank: int = 0, world: int = 1) -> Prepared:
    """Read the data, train (or load) the tokenizer, and tokenize: documents for the glm objective,
    packed rows for causal / prefix LM. Without ``val_data`` the held-out text is the embedded
    corpus's own (its held-out facts, filled in), else the last 5% of the documents (glm objective)
    or of the token stream (causal / prefix: so one long file still has a held-out part). A tokenizer
    trained here learns from all of ``data``, whatever is held out of it."""
    texts, held_texts, examples, baseline = _read_texts(cfg)
    tok_dir = cfg.tokenizer or os.path.join(cfg.out_dir, "tokenizer")
    wanted = _tokenizer_settings(cfg, model_cfg)
    if cfg.tokenizer is None and rank == 0 and not os.path.exists(os.path.join(tok_dir, "tokenizer_config.json")):
        os.makedirs(tok_dir, exist_ok=True)
        corpus_file = os.path.join(cfg.out_dir, "train_text.txt")
        # The documents as written, line breaks included, a blank line after each: the tokenizer's
        # trainer ends a sentence at a blank line, so a one-paragraph document is one sentence that starts
        # with the word-boundary mark, as encode starts the document.
        with open(corpus_file + ".tmp", "w", encoding="utf-8", newline="") as f:
            f.write("\n\n".join(texts) + "\n")
        os.replace(corpus_file + ".tmp", corpus_file)
        # BPE keeps most short answers (numbers, names) in one or two pieces on this little text.
        train_tokenizer([corpus_file], tok_dir, cfg.vocab_size, wanted["family"], model_type=wanted["model_type"],
                        overwrite=True)
        atomic_write(os.path.join(tok_dir, TOKENIZER_RECORD), (json.dumps(wanted, indent=2) + "\n").encode())
    if world > 1:
        torch.distributed.barrier()
    tok = load(tok_dir)
    if cfg.tokenizer is None:
        _check_reused_tokenizer(tok, tok_dir, wanted)
    if rank == 0:
        _warn_if_line_breaks_are_lost(tok, tok_dir, texts)

    objective = Objective(kind=cfg.objective)
    if cfg.mix is not None:
        objective = Objective(kind=cfg.objective, bert_prob=cfg.mix[0], gap_sentence_prob=cfg.mix[1])
    special = _special_ids(tok, tok_dir)
    collator = Collator(special=special, max_len=cfg.seq_len, objective=objective,
                        position_streams=model_cfg.position_streams, is_sentence_end=sentence_end_ids(tok))
    if cfg.objective != "glm":
        train_rows, heldout_rows = _packed_rows(cfg, tok, special, model_cfg.position_streams, texts, held_texts)
        return Prepared(tok, [], [], examples, baseline, collator, train_rows, heldout_rows)
    limit = objective.max_doc_len(cfg.seq_len, cls=tok.cls_id is not None)
    if limit < 1:
        enough = next(n for n in range(cfg.seq_len + 1, cfg.seq_len + 1000)
                      if objective.max_doc_len(n, cls=tok.cls_id is not None) >= 1)
        raise TrainingError(f"seq_len {cfg.seq_len} leaves no room for a document token once the {cfg.objective} "
                            f"objective's special tokens are placed; use seq_len (--seq-len) of at least {enough}")
    if held_texts is None:
        n_held = max(1, len(texts) // HELDOUT_EVERY) if len(texts) > 1 else 0
        texts, held_texts = texts[: len(texts) - n_held], texts[len(texts) - n_held:]
    # Long documents are split into consecutive chunks that fit (stated here, never silent truncation).
    train_docs = [c for t in texts for c in _chunk(tok.encode(t), limit) if c]
    heldout_docs = [c for t in held_texts for c in _chunk(tok.encode(t), limit) if c]
    if not train_docs:
        raise TrainingError("the training corpus tokenised to nothing; check --data")
    return Prepared(tok, train_docs, heldout_docs, examples, baseline, collator)


def _packed_rows(cfg: TrainConfig, tok: Tokenizer, special: SpecialIds, position_streams: int, texts: list[str],
                 held_texts: Optional[list[str]]) -> tuple[PackedRows, Optional[PackedRows]]:
    """The training stream's rows and the held-out stream's: documents joined with the end-of-text id."""
    def stream(docs: list[str]) -> Optional[np.ndarray]:
        ids = [d for d in (tok.encode(t) for t in docs) if d]
        return join_documents(ids, special.eos) if ids else None

    def rows(s: np.ndarray) -> PackedRows:
        return PackedRows(s, cfg.seq_len, cfg.objective, pad_id=special.pad, position_streams=position_streams)

    train, L = stream(texts), cfg.seq_len
    if train is None:
        raise TrainingError("the training corpus tokenised to nothing; check --data")
    held = stream(held_texts) if held_texts is not None else None
    n_held = max(len(train) // HELDOUT_EVERY, L + 1)
    if held_texts is None and len(train) - n_held >= L + 1:
        held, train = train[len(train) - n_held:], train[: len(train) - n_held]
        if train[-1] != special.eos:  # the cut fell inside a document: end it where the rows wrap around
            train = np.append(train, special.eos)
    if len(train) < L + 1:
        raise TrainingError(f"the training text is {len(train)} tokens, but a row of seq_len {L} reads {L + 1} "
                            f"(its tokens and the next one); lower seq_len (--seq-len) or add text")
    return rows(train), (rows(held) if held is not None and len(held) >= 2 else None)


def _warn_if_line_breaks_are_lost(tok: Tokenizer, tok_dir: str, texts: list[str]) -> None:
    """A warning when the documents hold line breaks that ``tok`` cannot give back (no byte fallback
    and no line-break piece): they would become unknown tokens, not data."""
    if not any("\n" in t for t in texts):
        return
    probe = "a\nb"
    back = tok.decode(tok.encode(probe))
    if back != probe:
        warnings.warn(f"tokenizer {tok_dir} does not keep line breaks ({probe!r} decodes as {back!r}), so the "
                      f"documents' line breaks are lost in training; use a tokenizer with byte fallback (glm "
                      f"train-tokenizer's default) or pass --doc-split lines to make each line a document",
                      stacklevel=3)


def _tokenizer_settings(cfg: TrainConfig, model_cfg: GLMConfig) -> dict:
    """What the tokenizer `prepare` trains for ``cfg`` depends on (recorded beside it as TOKENIZER_RECORD)."""
    text = ({"data": list(cfg.data), "doc_split": cfg.doc_split} if cfg.data is not None
            else {"corpus_size": cfg.corpus_size, "seed": cfg.seed})
    return {"vocab_size": cfg.vocab_size, "family": "glm" if model_cfg.position_streams == 2 else "chatglm3",
            "model_type": cfg.tokenizer_type, **text}


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
    eos = None
    inserted = {tok.sop_id, tok.eop_id, *dict(tok.mask_ids).values()}
    if tok.eos_ids and tok.eos_ids[0] in inserted:
        eos = end_of_text_id(tok)
    try:
        return SpecialIds.from_tokenizer(tok, eos=eos)
    except DataError as e:
        raise TrainingError(f"tokenizer {tok_dir} cannot be trained on with this objective: {e}") from None


def global_batch(prep: Prepared, cfg: TrainConfig, micro_step: int, docs: Optional[list] = None) -> Batch:
    """The global batch of micro-step ``micro_step``: a function of (seed, micro_step) only. Causal /
    prefix LM: packed rows (`PackedRows.batch`); glm: ``batch_size`` documents drawn with replacement
    from ``docs`` (default the training documents), masked by the collator."""
    if docs is None and prep.train_rows is not None:
        return prep.train_rows.batch(cfg.seed, micro_step, cfg.batch_size)
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

def target_losses(model: torch.nn.Module, batch: Batch, autocast: bool, device: torch.device) -> torch.Tensor:
    """The cross entropy (fp32) of each target in the batch's loss mask, in row-major order."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(**batch.model_inputs(), logits_at=batch.loss_mask)
    return F.cross_entropy(logits.float(), batch.targets[batch.loss_mask], reduction="none")


# Held-out batches are drawn as the micro-steps from here on, far from any training run's.
EVAL_MICRO_STEP = 10**9


def heldout_batches(prep: Prepared, cfg: TrainConfig) -> Iterator[Batch]:
    """The held-out batches of one evaluation, the same at every evaluation of a run.

    Causal / prefix: rows of one pass over the held-out stream (`PackedRows.rows_at`, no wrapping),
    all of them with ``eval_iters="all"`` (every held-out target once), else ``eval_iters *
    batch_size`` rows chosen once from the seed, spread over the stream. glm: ``eval_iters`` batches
    drawn like training batches from the held-out documents, or with "all" every document once, in
    order; the masking comes from the micro-steps after `EVAL_MICRO_STEP`."""
    B = cfg.batch_size
    if prep.heldout_rows is not None:
        rows = prep.heldout_rows
        n = rows.num_rows
        if cfg.eval_iters == "all" or cfg.eval_iters * B >= n:
            pick = np.arange(n)
        else:
            # The third seed word keeps this draw apart from batch_rng(seed, EVAL_MICRO_STEP).
            chosen = np.random.default_rng([cfg.seed, EVAL_MICRO_STEP, 2]).choice(n, cfg.eval_iters * B, replace=False)
            pick = np.sort(chosen)
        for k, i in enumerate(range(0, len(pick), B)):
            yield rows.rows_at(pick[i:i + B], batch_rng(cfg.seed, EVAL_MICRO_STEP + k))
    elif prep.heldout_docs and cfg.eval_iters == "all":
        docs = prep.heldout_docs
        for k, i in enumerate(range(0, len(docs), B)):
            yield prep.collator(docs[i:i + B], batch_rng(cfg.seed, EVAL_MICRO_STEP + k))
    elif prep.heldout_docs:
        for k in range(cfg.eval_iters):
            yield global_batch(prep, cfg, EVAL_MICRO_STEP + k, docs=prep.heldout_docs)


@torch.no_grad()
def evaluate(model: GLM, prep: Prepared, cfg: TrainConfig, device: torch.device, max_examples: int) -> dict:
    """Held-out loss and blank-infilling exact match.

    ``eval_loss`` (and ``eval_ppl``) average over targets that are text: a target that is the
    document separator / end-of-text, padding, or a token the objective inserts itself (eop, sop,
    the masks, [CLS]) is left out, since predicting it says little about the text and an inserted
    one is often trivial. ``eval_loss_all`` averages over every target the objective trains on;
    ``eval_targets`` / ``eval_targets_all`` count both."""
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    not_text = torch.tensor(sorted(prep.collator.special.not_text), device=device)
    total = total_all = 0.0
    count = count_all = 0
    for b in heldout_batches(prep, cfg):
        b = b.to(device)
        losses = target_losses(model, b, False, device)
        text = ~torch.isin(b.targets[b.loss_mask], not_text)
        total_all += float(losses.sum())
        count_all += losses.numel()
        total += float(losses[text].sum())
        count += int(text.sum())
    if count_all:
        out["eval_loss"] = total / max(count, 1)
        out["eval_ppl"] = math.exp(min(out["eval_loss"], 50.0))
        out["eval_loss_all"] = total_all / count_all
        out["eval_targets"], out["eval_targets_all"] = count, count_all
    if prep.examples and model.config.position_streams == 2:
        tok = prep.tokenizer
        args = tokenizer_infill_args(tok)
        hits, first_hits, preds, eops = 0, 0, [], []
        for ex in prep.examples[:max_examples]:
            ids = tok.infill_prompt(encode_blank_text(tok, ex.text_with_blank))  # as glm.generate.infill
            res = infill_ids(model, ids, max_span_tokens=12, **args)
            pred = tok.decode(res.spans[0], skip_special_tokens=True) if res.spans else ""
            preds.append(pred)
            hits += exact_match(pred, ex.answer)
            first_hits += exact_match(first_word(pred), ex.answer)
            p_eop = eop_after_answer(model, tok, ex.text_with_blank, ex.answer)
            if p_eop is not None:
                eops.append(p_eop)
        n = max(1, min(len(prep.examples), max_examples))
        # A small model may fill the blank right and then run on instead of closing the span with
        # <eop> ("48 years old. Belius"); the first word of the fill is scored as well, and so is how
        # likely <eop> is right after the right answer, over the blanks whose answer is whole tokens.
        out["exact_match"] = hits / n
        out["exact_match_first_word"] = first_hits / n
        out["answers_whole_tokens"] = len(eops) / n
        if eops:
            out["eop_after_answer"] = sum(eops) / len(eops)
        out["_predictions"] = preds  # type: ignore[assignment]
    model.train(was_training)
    return out


# ------------------------------------------------------------------------------------------------
# The loop

def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _progress_every(steps: int) -> int:
    """Steps between plain progress lines: about a tenth of the run, at least every 100 steps."""
    return max(1, min(100, math.ceil(steps / 10)))


class Progress:
    """Progress on stderr: a tqdm bar on a terminal; in a log file or pipe, a plain line every
    `_progress_every` steps instead of a bar nobody sees until the end; nothing when not ``show``."""

    def __init__(self, steps: int, start: int, show: bool, desc: str = "train") -> None:
        self.steps, self.bar, self.every, self.desc = steps, None, 0, desc
        if show and _is_terminal(sys.stderr):
            from tqdm import tqdm

            self.bar = tqdm(total=steps, initial=start, desc=desc, dynamic_ncols=True)
        elif show:
            self.every = _progress_every(steps)

    def update(self, record: dict, elapsed: float) -> None:
        step, loss, speed = record["step"], record["loss"], record["tokens_per_s"]
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{speed:.0f}")
            self.bar.update(1)
        elif self.every and (step % self.every == 0 or step == self.steps):
            print(f"{self.desc}: step {step}/{self.steps} ({step / self.steps:.0%})  loss {loss:.4f}  "
                  f"{speed:.0f} tokens/s  {elapsed:.0f} s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class _Run:
    """What the loop works on, set up once by `_start_run`."""
    cfg: TrainConfig
    model_cfg: GLMConfig  # vocab_size is the tokenizer's
    device: torch.device
    rank: int
    world: int
    prep: Prepared
    model: GLM  # what checkpoints and OUT/model hold
    wrapped: torch.nn.Module  # the model under DDP / FSDP (world > 1), else the model: its gradients are clipped
    forward: torch.nn.Module  # wrapped, compiled when cfg.compile
    optimizer: torch.optim.Optimizer
    start: int  # the first step to run: the resumed checkpoint's, else 0
    tokenizer_sha256: Optional[str]
    metrics: str  # OUT/metrics.jsonl
    last_ckpt: Optional[str]  # this run's newest checkpoint, named when a non-finite loss stops the run

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def train(cfg: TrainConfig, *, on_step: Optional[Callable[[int, float], None]] = None) -> dict:
    """Run (or resume) a pretraining run; returns a summary. See the module docstring."""
    cfg.validate()
    device = resolve_device(cfg.device)
    rank, world = _setup_distributed(device)
    if cfg.batch_size % world:
        raise ArgumentError(f"batch_size {cfg.batch_size} must be divisible by the {world} processes")
    model_cfg = model_config_for(cfg)
    check_memory(cfg, model_cfg, device, world)
    # Rank 0 holds the folder for the whole run; the other ranks of the same run follow it.
    with run_lock(cfg.out_dir) if rank == 0 else contextlib.nullcontext():
        return _train_locked(cfg, model_cfg, device, rank, world, on_step)


def _train_locked(cfg: TrainConfig, model_cfg: GLMConfig, device: torch.device, rank: int, world: int,
                  on_step: Optional[Callable[[int, float], None]]) -> dict:
    run = _start_run(cfg, model_cfg, device, rank, world)
    progress = Progress(cfg.steps, run.start, show=cfg.progress and run.is_main)
    t_start, tokens_seen = time.perf_counter(), 0
    summary: dict[str, Any] = {}
    for step in range(run.start, cfg.steps):
        loss, lr, grad_norm, tokens = _step(run, step)
        tokens_seen += tokens
        elapsed = time.perf_counter() - t_start
        record = step_record(step + 1, loss, lr, grad_norm, tokens_seen, elapsed)
        if on_step is not None:
            on_step(step + 1, loss)
        done = step + 1 == cfg.steps
        if run.is_main:
            append_record(run.metrics, record)
            progress.update(record, elapsed)
        if run.is_main and _due(cfg.eval_every, step + 1, done):
            summary.update(_evaluate_and_log(run, step + 1, final=done))
        if _due(cfg.ckpt_every, step + 1, done):
            _checkpoint(run, step + 1)
    progress.close()
    if run.is_main:
        summary.update(_finish(run, t_start))
    if world > 1:
        # Every rank returns once the run is complete (the final model written), so the ranks also
        # reach the process group's teardown together: a rank tearing down while rank 0 still
        # saved was seen to abort once in CI (gloo, "terminate called without an active exception").
        torch.distributed.barrier()
    return summary


def step_record(step: int, loss: float, lr: float, grad_norm: float, tokens_seen: int, elapsed: float) -> dict:
    """The metrics.jsonl record of one optimizer step (the trainers' shared format)."""
    return {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": tokens_seen / max(elapsed, 1e-9)}


def _due(every: int, step: int, done: bool) -> bool:
    """Whether an every-``every``-steps cadence (0: only after the last step) falls after ``step``."""
    return done or bool(every and step % every == 0)


def _start_run(cfg: TrainConfig, model_cfg: GLMConfig, device: torch.device, rank: int, world: int) -> _Run:
    """Everything before the first step: the run folder claimed, the checkpoint to resume read and
    checked against the settings, the data prepared, the model and optimizer built (and restored),
    the metrics log cut back to the step the run continues from, the model wrapped and compiled."""
    is_main = rank == 0
    claim_run_folder(cfg.out_dir, resume=cfg.resume, overwrite=cfg.overwrite, keep=cfg.tokenizer, is_main=is_main)
    if world > 1:
        torch.distributed.barrier()  # rank 0 has cleared an overwritten run before anyone reads the folder
    os.makedirs(cfg.out_dir, exist_ok=True)
    if is_main:
        remove_stale_temp_files(cfg.out_dir)
    ckpts = checkpoints(cfg.out_dir)
    resume_from = ckpts[-1] if cfg.resume and ckpts else None
    state, changes = None, {}
    if resume_from is not None:
        # Read and compared before the data is prepared: a refused resume changes nothing in the folder.
        state = load_checkpoint(resume_from, device, verify=cfg.verify)
        model_cfg = resumed_model_config(state.get("model_config", {}), cfg, model_cfg)
        changes = check_resume(resume_from, state, cfg, model_cfg)
    elif cfg.resume and is_main:
        print(f"--resume: no checkpoint in {cfg.out_dir}; starting from step 0")
    prep = prepare(cfg, model_cfg, rank, world)
    tok_dir = cfg.tokenizer or os.path.join(cfg.out_dir, "tokenizer")
    tok_sha = tokenizer_fingerprint(tok_dir)
    model_cfg = model_cfg.replace(vocab_size=prep.tokenizer.vocab_size)
    model, optimizer = _build_model(cfg, model_cfg, device)
    start = 0
    if resume_from is not None:
        check_resumed_tokenizer(resume_from, state, tok_dir, tok_sha)
        _restore(resume_from, state, model, optimizer, cfg)
        start = state["step"]
        del state  # the model and optimizer hold their own copies now
    metrics = os.path.join(cfg.out_dir, "metrics.jsonl")
    if is_main:
        # Keep what the run logged up to the step it continues from (none for a fresh start, also when
        # --resume found no checkpoint); drop later records and a line torn by a kill.
        keep_records_until(metrics, start)
        if changes:
            append_record(metrics, {"step": start, "event": "settings_changed",
                                    "changes": {k: {"from": old, "to": new} for k, (old, new) in changes.items()}})
    wrapped = _distribute(model, cfg, device, world)
    return _Run(cfg, model_cfg, device, rank, world, prep, model, wrapped, torch.compile(wrapped) if cfg.compile
                else wrapped, optimizer, start, tok_sha, metrics, last_ckpt=resume_from)


def _build_model(cfg: TrainConfig, model_cfg: GLMConfig, device: torch.device) -> tuple[GLM, torch.optim.Optimizer]:
    torch.manual_seed(cfg.seed)
    model = GLM(model_cfg).to(device)
    model.init_weights(seed=cfg.seed)
    model.train()
    return model, make_optimizer(model, cfg)


def _restore(path: str, state: dict, model: GLM, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """Load the checkpoint ``state`` (read from ``path``) into the model and optimizer, then apply the
    optimizer settings of ``cfg`` (changes `check_resume` allowed) and restore torch's RNG."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        first = " ".join(lines[:2])[:300] if lines else type(e).__name__
        raise TrainingError(f"{path}: this checkpoint was written for another model or optimizer setup "
                            f"({first}); resume with the run's original settings or use a new --out") from None
    # load_state_dict restores the checkpoint's hyperparameters; an allowed change takes effect
    # here (the lr is set every step from the schedule).
    optimizer.param_groups[0]["weight_decay"] = cfg.weight_decay
    for g in optimizer.param_groups:
        g["betas"] = tuple(cfg.betas)
    torch.set_rng_state(state["torch_rng"].cpu())  # map_location moved it with the rest


def _distribute(model: GLM, cfg: TrainConfig, device: torch.device, world: int) -> torch.nn.Module:
    """``model`` under FSDP (``cfg.fsdp``, one unit per block) or DDP when there are several processes."""
    if world == 1:
        return model
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        return fully_shard(model)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                     else None)


def _step(run: _Run, step: int) -> tuple[float, float, float, int]:
    """Optimizer step ``step`` (0-based) on its global batch of ``grad_accum`` micro-batches, of which
    this process runs its rows. Returns the loss per target token of the global batch, the lr, the
    gradient norm before clipping and the tokens of the global batch."""
    cfg = run.cfg
    lr = lr_at(step, cfg)
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    run.optimizer.zero_grad(set_to_none=True)
    total_loss, total_tokens = 0.0, 0
    micro = [global_batch(run.prep, cfg, step * cfg.grad_accum + m) for m in range(cfg.grad_accum)]
    global_tokens = sum(b.num_loss_tokens for b in micro)
    for b in micro:
        mine = _rows(b, run.rank, run.world).to(run.device)
        ls = loss_sum(run.forward, mine, run.device.type == "cuda", run.device)
        # Divide by the global token count (not this rank's): DDP's average of these gradients
        # times world is the single-process gradient of the whole global batch.
        (ls * run.world / max(global_tokens, 1)).backward()
        total_loss += float(ls.detach())
        total_tokens += int(b.tokens.shape[0] * b.tokens.shape[1])
    if run.world > 1:
        t = torch.tensor([total_loss], dtype=torch.float64, device=run.device)
        torch.distributed.all_reduce(t)
        total_loss = float(t)
    loss = total_loss / max(global_tokens, 1)
    if not math.isfinite(loss):
        where = f"the last good checkpoint is {run.last_ckpt}" if run.last_ckpt else "no checkpoint was written yet"
        raise TrainingError(f"step {step + 1}: the loss is {loss}; stopping ({where}). Lower --lr, raise --warmup "
                            f"or check the data, then resume with --resume")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.wrapped.parameters(), cfg.grad_clip))
    run.optimizer.step()
    return loss, lr, grad_norm, total_tokens


def _evaluate_and_log(run: _Run, step: int, final: bool) -> dict:
    """`evaluate` after ``step``, logged to the metrics; what the summary gets (after the last step, with
    the predictions and the examples they answer)."""
    ev = evaluate(run.model, run.prep, run.cfg, run.device, run.cfg.eval_examples)
    preds = ev.pop("_predictions", None)
    append_record(run.metrics, {"step": step, **ev})
    if final and preds is not None:
        ev["predictions"] = preds
        ev["examples"] = [(e.text_with_blank, e.answer, e.kind) for e in run.prep.examples[:len(preds)]]
    return ev


def _checkpoint(run: _Run, step: int) -> None:
    """Rank 0 writes the checkpoint of ``step``; the other ranks wait for it."""
    if run.is_main:
        # Plain data only (tensors, dicts, lists, numbers, strings), so it loads with weights_only=True.
        state = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "step": step,
                 "torch_rng": torch.get_rng_state(), "config": _plain(dataclasses.asdict(run.cfg)),
                 "model_config": _plain(run.model_cfg.to_dict()), "tokenizer_sha256": run.tokenizer_sha256,
                 "data_layout": DATA_LAYOUT}
        run.last_ckpt = save_checkpoint(run.cfg.out_dir, state, step, run.cfg.keep_last)
    if run.world > 1:
        torch.distributed.barrier()


def _finish(run: _Run, t_start: float) -> dict:
    """Save the model and tokenizer to OUT/model, plot the metrics; the summary's paths and numbers."""
    out = run.cfg.out_dir
    final = os.path.join(out, "model")
    # Files put into OUT/model during the run would be lost to the save below: refuse instead
    # (the checkpoint holds the run; after moving them, --resume only writes the model).
    refuse_strangers(final)
    run.model.save_pretrained(final, format="glm", overwrite=True)
    run.prep.tokenizer.save(final)
    return dict(model_dir=final, metrics=run.metrics, checkpoint=run.last_ckpt,
                plot=plot_metrics(run.metrics, os.path.join(out, "loss.png")), baseline=run.prep.baseline,
                parameters=run.model_cfg.num_parameters, seconds=time.perf_counter() - t_start)
