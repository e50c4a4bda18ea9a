"""Pretraining small GLMs: a plain loop with the knobs in one dataclass.

Reproducibility is structural: the batch of step ``s`` is drawn from an RNG seeded by
``(seed, s)``, so data order needs no saved state, and a checkpoint holds the model, the optimizer,
the schedule, the step and torch's RNG. Resuming on CPU therefore reproduces the uninterrupted
run's losses bit for bit.

A checkpoint is plain data (tensors, numbers, strings, lists, dicts), read back with
``weights_only=True`` so a planted pickle cannot run code, and ends with the sha256 of the bytes
before it (``CHECKSUM_TAG``), checked before loading. It also records the run's settings: a resume
compares them field by field (``RUN_FIELDS`` ... ``FREE_FIELDS``). One run at a time holds the run
folder (``run_lock``).

Multi-process (``torchrun --nproc_per_node N -m glm train ...``): every rank builds the same global
batch and takes its own rows; each rank's loss is its token-loss *sum* over the global token count
times the world size, so DDP's gradient average equals the single-process gradient of the same
global batch. Rank 0 logs and writes checkpoints.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import math
import os
import pickle
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

try:
    import fcntl
except ImportError:  # Windows: runs are not locked there
    fcntl = None  # type: ignore[assignment]

import torch
import torch.nn.functional as F

from .checkpoint import foreign_files, written_by_glm
from .config import GLMConfig, preset
from .devices import check_device
from .errors import TrainingError
from .files import FileKindError, atomic_write, ensure_regular, read_bounded, write_failed
from .model import GLM
from .tokenizer.load import MODEL_FILES


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
    grad_clip: float = 1.0  # max gradient norm; math.inf = no clipping
    eval_every: int = 250
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
        def bad(name: str, why: str) -> ValueError:
            flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
            return ValueError(f"TrainConfig.{name}{f' ({flag})' if flag else ''} {why}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_real(v: Any) -> bool:  # an int or float that is not NaN (a bool is not a number here)
            return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)

        for name in ("compile", "fsdp", "progress", "resume", "overwrite", "verify", "allow_optimizer_change"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, f"must be True or False, got {getattr(self, name)!r}")
        for name, low in (("seq_len", 2), ("batch_size", 1), ("grad_accum", 1), ("steps", 1), ("vocab_size", 1),
                          ("keep_last", 1), ("warmup", 0), ("eval_every", 0), ("eval_examples", 0),
                          ("ckpt_every", 0), ("seed", 0)):
            v = getattr(self, name)
            if not is_int(v) or v < low:
                raise bad(name, f"must be an integer >= {low}, got {v!r}")
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
        if self.data is not None and not (isinstance(self.data, (list, tuple)) and self.data
                                          and all(isinstance(p, str) and p for p in self.data)):
            raise bad("data", f"must be None (the embedded corpus) or a non-empty list of file names or globs, such "
                              f"as ['books/*.txt'], got {self.data!r}")
        if self.corpus_size not in ("tiny", "small", "base"):
            raise bad("corpus_size", f"must be tiny, small or base, got {self.corpus_size!r}")
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


# The command-line flag of each TrainConfig field where it is not --field-name ("" = none).
_FLAGS = {"out_dir": "--out", "progress": "--quiet", "verify": "--no-verify", "mix": "", "betas": "",
          "min_lr_ratio": "", "eval_examples": ""}

# How `--resume` treats each field when it differs from the checkpoint's record (every field is in
# exactly one group; tests check that). RUN_FIELDS fix what the model is and which batches it sees:
# a change is refused. RESOLVED_FIELDS are compared as what they resolve to: model and
# model_overrides as the GLMConfig (every field but vocab_size, which follows the tokenizer), and
# tokenizer as its files' sha256, so the same tokenizer in another folder is the same run.
# OPTIMIZER_FIELDS may change with allow_optimizer_change, recorded in metrics.jsonl. FREE_FIELDS
# say where and how the run executes, evaluates and saves, so they may differ; so may steps, which
# stretches or shortens the cosine schedule (extending a run is what resume is for; it is recorded
# like an optimizer change).
RUN_FIELDS = ("data", "corpus_size", "vocab_size", "objective", "mix", "seq_len", "batch_size", "grad_accum",
              "seed")
RESOLVED_FIELDS = ("model", "model_overrides", "tokenizer")
OPTIMIZER_FIELDS = ("lr", "min_lr_ratio", "warmup", "weight_decay", "betas", "grad_clip")
FREE_FIELDS = ("out_dir", "steps", "eval_every", "eval_examples", "ckpt_every", "keep_last", "compile", "device",
               "fsdp", "progress", "resume", "overwrite", "verify", "allow_optimizer_change")


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
# Checkpoints: atomic, checksummed, keep-last-K, read back as plain data only

# The last bytes of every trainer checkpoint: this tag, the sha256 of all bytes before it (64 hex
# digits) and "\n". It goes into the temp file before the rename, so the digest is as atomic as the
# checkpoint; torch.load reads the zip archive in front of it and ignores what follows.
CHECKSUM_TAG = b"\nglm-sha256:"
CHECKSUM_TRAILER = len(CHECKSUM_TAG) + 64 + 1


def checkpoints(out_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(out_dir, "ckpt-*.pt")))


class _HashingWriter:
    """The file object torch.save writes to: hashes each byte on its way into ``f`` and keeps the first
    OSError the disk raised. torch's zip writer reports a failed write as a RuntimeError ("unexpected
    pos ...") when it then tries to close the archive; the kept OSError says what really happened."""

    def __init__(self, f) -> None:
        self.f, self.sha, self.error = f, hashlib.sha256(), None

    def write(self, data) -> int:
        try:
            n = self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise
        self.sha.update(data)
        return n

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            self.error = self.error or e
            raise


def save_checkpoint(out_dir: str, state: dict, step: int, keep_last: int) -> str:
    """Write ``ckpt-{step}.pt`` atomically (temp file + fsync + rename) with its sha256 at the end, then
    drop all but the last ``keep_last``. A failure (disk full, ...) leaves the earlier checkpoints as
    they were and is an OSError naming the file, whatever layer of torch.save met it."""
    path = os.path.join(out_dir, f"ckpt-{step:07d}.pt")

    def write(f) -> None:
        out = _HashingWriter(f)
        try:
            torch.save(state, out)
        except RuntimeError:
            if out.error is None:
                raise
            raise out.error from None
        f.write(CHECKSUM_TAG + out.sha.hexdigest().encode() + b"\n")

    try:
        atomic_write(path, write)
    except OSError as e:
        raise write_failed(e, path, f"the earlier checkpoints in {out_dir} are intact; free space (or lower "
                                    f"--keep-last), then rerun with --resume") from e
    for old in checkpoints(out_dir)[:-keep_last]:
        os.remove(old)
    return path


def verify_checkpoint(path: str) -> None:
    """Compare a trainer checkpoint's bytes with the sha256 recorded at its end; a TrainingError naming
    the file when the record is missing (cut short, not glm's) or does not match (flipped bytes)."""
    size = os.path.getsize(path)
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        tail = b""
        if size >= CHECKSUM_TRAILER:
            f.seek(size - CHECKSUM_TRAILER)
            tail = f.read(CHECKSUM_TRAILER)
        fix = "delete it to resume from the previous one, or pass verify=False (--no-verify) to load it anyway"
        if not (tail.startswith(CHECKSUM_TAG) and tail.endswith(b"\n")):
            raise TrainingError(f"{path}: cannot read this checkpoint (its sha256 record is missing: the file was "
                                f"cut short, or not written by glm's trainer); {fix}")
        f.seek(0)
        left = size - CHECKSUM_TRAILER
        while left > 0:
            chunk = f.read(min(left, 1 << 24))
            if not chunk:
                break
            sha.update(chunk)
            left -= len(chunk)
    if sha.hexdigest().encode() != tail[len(CHECKSUM_TAG):-1]:
        raise TrainingError(f"{path}: cannot read this checkpoint (its bytes differ from the sha256 recorded when "
                            f"glm wrote it: changed on disk or in a copy); {fix}")


# What a trainer checkpoint holds, with the type of each entry.
_STATE = {"model": dict, "optimizer": dict, "step": int, "torch_rng": torch.Tensor, "config": dict,
          "model_config": dict}


def load_checkpoint(path: str, device: torch.device, verify: bool = True) -> dict:
    """A trainer checkpoint, or a TrainingError naming the file and what to do.

    Only tensors and plain containers load (``weights_only=True``): a pickle that would build other
    objects, i.e. run code, is refused, as a file glm's trainer never writes."""
    try:
        ensure_regular(path, "trainer checkpoint")
    except FileKindError as e:
        raise TrainingError(f"{e}; or move it out of the run folder") from None
    if verify:
        verify_checkpoint(path)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise TrainingError(f"{path}: cannot read this checkpoint (UnpicklingError: {str(e)[:200]}); delete it "
                                f"to resume from the previous one, or start over without --resume") from None
        raise TrainingError(f"{path}: refused: this file holds pickled objects other than tensors and plain data, "
                            f"which glm never loads because unpickling them can run code; glm's trainer did not "
                            f"write it, so move it out of the run folder") from None
    except Exception as e:  # truncated / corrupted: zip and EOF errors of many kinds
        raise TrainingError(f"{path}: cannot read this checkpoint ({type(e).__name__}: {e}); delete it to resume "
                            f"from the previous one, or start over without --resume") from None
    if not isinstance(state, dict) or not all(isinstance(state.get(k), t) and not isinstance(state.get(k), bool)
                                              for k, t in _STATE.items()):
        raise TrainingError(f"{path}: not a glm trainer checkpoint (needs {', '.join(_STATE)}); move it out of the "
                            f"run folder")
    return state


# ------------------------------------------------------------------------------------------------
# The run folder: one run at a time, and --overwrite deletes only what the trainer wrote

# What `train` writes at the top of out_dir, with the temp names it writes them under first.
RUN_FILES = ("metrics.jsonl", "metrics.jsonl.tmp", "loss.png", "loss.png.tmp.png", "train_text.txt",
             "train_text.txt.tmp")
TOKENIZER_RECORD = "glm_train_settings.json"  # beside a tokenizer the trainer trained: what it was trained with
LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_lock(out_dir: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``out_dir/.lock`` (holding this process's id) for the block, so a
    second run into the same folder, from any process, fails at once instead of interleaving its
    checkpoints, pruning and metrics with this one. The file is removed on the way out, while still
    locked; a run that opened it just before then sees it is gone and locks the new one instead."""
    if fcntl is None:  # no flock on this platform
        yield
        return
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise TrainingError(f"{out_dir} exists and is not a folder; pass a folder for the run (--out)")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise TrainingError(f"{out_dir}: cannot create the run folder ({e.strerror or e}); pass a writable folder "
                            f"(--out)") from None
    path = os.path.join(out_dir, LOCK_FILE)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            raise TrainingError(f"{path}: cannot open the run folder's lock file ({e.strerror or e}); remove it "
                                f"if it is not glm's, then rerun") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise TrainingError(f"{out_dir} is in use by another glm train run (process {holder or 'unknown'} holds "
                                f"{path}); wait for it to finish, or use another out_dir (--out)") from None
        try:
            current = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(current, os.fstat(fd)):
            break
        os.close(fd)  # locked a file the previous holder had just removed
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)


def _json_or_none(path: str) -> Any:
    try:
        return json.loads(read_bounded(path, what=os.path.basename(path)))
    except (OSError, ValueError):
        return None


# The tokenizer files the final save adds to OUT/model beside glm's checkpoint writer's files.
_TOKENIZER_FILES = ("tokenizer_config.json", *MODEL_FILES)


def model_folder_strangers(model_dir: str) -> list[str]:
    """The entries of ``model_dir`` (OUT/model) that the run's final save did not write, sorted; folders
    end in "/". Ours are what glm's checkpoint writer writes (config.json, weights, index, checksum
    record) and the tokenizer's files, in a folder that writer wrote; in any other folder nothing is
    ours. Empty when the folder is absent (or a link, which clear_run never follows)."""
    if not os.path.isdir(model_dir) or os.path.islink(model_dir):
        return []
    if not written_by_glm(model_dir):
        return [name + ("/" if os.path.isdir(os.path.join(model_dir, name)) else "")
                for name in sorted(os.listdir(model_dir))]
    return foreign_files(model_dir, carried=_TOKENIZER_FILES)


def _refuse_strangers(model_dir: str) -> None:
    strangers = model_folder_strangers(model_dir)
    if strangers:
        shown = ", ".join(strangers[:10]) + (f" and {len(strangers) - 10} more" if len(strangers) > 10 else "")
        raise TrainingError(f"{model_dir} holds files glm's trainer did not write ({shown}); the run's final save "
                            f"replaces that folder, so move them elsewhere first, or use another out_dir (--out)")


def claim_run_folder(cfg: TrainConfig, is_main: bool = True) -> None:
    """Make sure ``cfg.out_dir`` holds no other run this one would mix with: without ``resume``, a folder
    with checkpoints is refused (keep-newest-K pruning goes by step number, so the old run's later
    checkpoints would outlive the new run's, and a later resume would continue the old run), unless
    ``overwrite`` asks to delete that run first (done by rank 0). OUT/model holding files the trainer
    did not write is refused up front, since the final save replaces that folder."""
    ckpts = checkpoints(cfg.out_dir)
    if ckpts and not cfg.resume and not cfg.overwrite:
        raise TrainingError(f"{cfg.out_dir} already holds a run (checkpoints up to {os.path.basename(ckpts[-1])}); "
                            f"pass resume=True (--resume) to continue it, overwrite=True (--overwrite) to delete its "
                            f"checkpoints, metrics, tokenizer and model and start over, or use a new out_dir (--out)")
    _refuse_strangers(os.path.join(cfg.out_dir, "model"))
    if cfg.overwrite and is_main:
        clear_run(cfg.out_dir, keep=cfg.tokenizer)


def clear_run(out_dir: str, keep: Optional[str] = None) -> list[str]:
    """Delete what `train` writes into ``out_dir`` (checkpoints and their temp files, metrics, plot,
    tokenizer training text, the trainer's files in ``tokenizer/`` and ``model/``) and nothing else;
    ``keep`` (a folder this run reads, e.g. ``--tokenizer OUT/tokenizer``) is left alone. A ``model/``
    that holds anything else is a TrainingError before anything is deleted. Returns the deleted paths."""
    if not os.path.isdir(out_dir):
        return []
    kept = os.path.realpath(keep) if keep else None

    def ours(folder: str) -> bool:  # a real folder (never through a link), not the kept one nor one holding it
        real = os.path.realpath(folder)
        return (os.path.isdir(folder) and not os.path.islink(folder)
                and not (kept and (kept == real or kept.startswith(real + os.sep))))

    model_dir = os.path.join(out_dir, "model")
    if ours(model_dir):
        _refuse_strangers(model_dir)
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
        tok_config = _json_or_none(os.path.join(tok_dir, "tokenizer_config.json"))
        if isinstance(tok_config, dict):
            names.append(os.path.basename(str(tok_config.get("model_file", ""))))
        for name in filter(None, names):
            for path in glob.glob(os.path.join(tok_dir, glob.escape(name))) + glob.glob(
                    os.path.join(tok_dir, glob.escape(name) + ".tmp-*")):
                os.remove(path)
                gone.append(path)
        if not os.listdir(tok_dir):
            os.rmdir(tok_dir)
    if ours(model_dir):
        # Deleting the old run's model now keeps a crashed new run from leaving it beside the new
        # run's metrics; _refuse_strangers above made sure every file here is one the final save wrote.
        for name in os.listdir(model_dir):
            os.remove(os.path.join(model_dir, name))
            gone.append(os.path.join(model_dir, name))
        os.rmdir(model_dir)
        gone.append(model_dir)
    return gone


def remove_stale_temp_files(out_dir: str) -> list[str]:
    """Delete ``ckpt-*.pt.tmp-*`` files that a killed run (kill -9, power loss) left mid-write; they
    are never read (`checkpoints` only lists complete ``ckpt-*.pt``). Call only under `run_lock`."""
    stale = glob.glob(os.path.join(out_dir, "ckpt-*.pt.tmp-*"))
    for path in stale:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
    return stale


# ------------------------------------------------------------------------------------------------
# Resume: the checkpoint's record of the run against the settings now

def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples become lists): what a checkpoint stores and compares."""
    return json.loads(json.dumps(value))


def model_config_for(cfg: TrainConfig) -> GLMConfig:
    """The GLMConfig a run of ``cfg`` trains, before the tokenizer sets vocab_size."""
    base = preset(cfg.model)
    # validate() checked the overrides (no vocab_size: the tokenizer sets it; max_positions >= seq_len + 1).
    return base.replace(**{"vocab_size": max(base.vocab_size, 1),
                           "max_positions": max(base.max_positions, cfg.seq_len + 1), **cfg.model_overrides})


def setting_changes(saved: dict, saved_model: dict, cfg: TrainConfig,
                    model_cfg: GLMConfig) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """What differs between a checkpoint's record (its ``config`` and ``model_config``) and the run of
    ``cfg`` now, as ``name -> (checkpoint's value, value now)``: the RUN_FIELDS and model changes, and
    the OPTIMIZER_FIELDS and ``steps`` changes. Model fields are named ``model_config.FIELD``. The
    tokenizer is compared once it exists (`check_resumed_tokenizer`)."""
    defaults = _plain(dataclasses.asdict(TrainConfig()))
    now = _plain(dataclasses.asdict(cfg))
    was = {k: saved.get(k, defaults[k]) for k in now}
    run = {k: (was[k], now[k]) for k in RUN_FIELDS if was[k] != now[k]}
    model_now = _plain(model_cfg.to_dict())
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


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", _dist_info()[2])
        return torch.device("cpu")
    device = check_device(name)
    if device.type == "meta":
        raise ValueError("TrainConfig.device (--device) 'meta' holds shapes but no data, so nothing can be trained "
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
    vocab = cfg.vocab_size if cfg.tokenizer is None else model_cfg.vocab_size
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
    from .data import Collator, Objective, sentence_end_ids
    from .tokenizer import load
    from .tokenizer import train as train_tokenizer

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
        train_tokenizer([corpus_file], tok_dir, cfg.vocab_size, wanted["family"], model_type=wanted["model_type"],
                        overwrite=True)
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
    if limit < 1:
        enough = next(n for n in range(cfg.seq_len + 1, cfg.seq_len + 1000)
                      if objective.max_doc_len(n, cls=tok.cls_id is not None) >= 1)
        raise TrainingError(f"seq_len {cfg.seq_len} leaves no room for a document token once the {cfg.objective} "
                            f"objective's special tokens are placed; use seq_len (--seq-len) of at least {enough}")
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


def _progress_every(steps: int) -> int:
    """Steps between plain progress lines: about a tenth of the run, at least every 100 steps."""
    return max(1, min(100, math.ceil(steps / 10)))


def train(cfg: TrainConfig, *, on_step: Optional[Callable[[int, float], None]] = None) -> dict:
    """Run (or resume) a pretraining run; returns a summary. See the module docstring."""
    cfg.validate()
    device = _resolve_device(cfg.device)
    rank, world = _setup_distributed(device)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the {world} processes")
    model_cfg = model_config_for(cfg)
    check_memory(cfg, model_cfg, device, world)
    # Rank 0 holds the folder for the whole run; the other ranks of the same run follow it.
    with run_lock(cfg.out_dir) if rank == 0 else contextlib.nullcontext():
        return _train_locked(cfg, model_cfg, device, rank, world, on_step)


def _train_locked(cfg: TrainConfig, model_cfg: GLMConfig, device: torch.device, rank: int, world: int,
                  on_step: Optional[Callable[[int, float], None]]) -> dict:
    is_main = rank == 0
    claim_run_folder(cfg, is_main)
    if world > 1:
        torch.distributed.barrier()  # rank 0 has cleared an overwritten run before anyone reads the folder
    os.makedirs(cfg.out_dir, exist_ok=True)
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if is_main:
        remove_stale_temp_files(cfg.out_dir)
    ckpts = checkpoints(cfg.out_dir)
    state, start, changes = None, 0, {}
    if cfg.resume and ckpts:
        # Read and compared before the data is prepared: a refused resume changes nothing in the folder.
        state = load_checkpoint(ckpts[-1], device, verify=cfg.verify)
        changes = check_resume(ckpts[-1], state, cfg, model_cfg)
        start = state["step"]
    elif cfg.resume and is_main:
        print(f"--resume: no checkpoint in {cfg.out_dir}; starting from step 0")
    prep = prepare(cfg, model_cfg, rank, world)
    tok_dir = cfg.tokenizer or os.path.join(cfg.out_dir, "tokenizer")
    tok_sha = tokenizer_fingerprint(tok_dir)
    if state is not None:
        check_resumed_tokenizer(ckpts[-1], state, tok_dir, tok_sha)
    model_cfg = model_cfg.replace(vocab_size=prep.tokenizer.vocab_size)
    torch.manual_seed(cfg.seed)
    model = GLM(model_cfg).to(device)
    model.init_weights(seed=cfg.seed)
    model.train()
    optimizer = make_optimizer(model, cfg)

    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            first = " ".join(lines[:2])[:300] if lines else type(e).__name__
            raise TrainingError(f"{ckpts[-1]}: this checkpoint was written for another model or optimizer setup "
                                f"({first}); resume with the run's original settings or use a new --out") from None
        # load_state_dict restores the checkpoint's hyperparameters; an allowed change takes effect
        # here (the lr is set every step from the schedule).
        optimizer.param_groups[0]["weight_decay"] = cfg.weight_decay
        for g in optimizer.param_groups:
            g["betas"] = tuple(cfg.betas)
        torch.set_rng_state(state["torch_rng"].cpu())  # map_location moved it with the rest
        del state
    if is_main:
        # Keep what the run logged up to the step it continues from (none for a fresh start, also when
        # --resume found no checkpoint); drop later records and a line torn by a kill.
        keep = []
        if start and os.path.exists(metrics_path):
            keep = [line for line in open(metrics_path, encoding="utf-8", errors="replace")
                    if (rec := _parse_record(line)) is not None and isinstance(rec.get("step"), int)
                    and rec["step"] <= start]
        if keep:
            with open(metrics_path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(keep)
            os.replace(metrics_path + ".tmp", metrics_path)
        elif os.path.exists(metrics_path):
            os.remove(metrics_path)
        if changes:
            _log(metrics_path, {"step": start, "event": "settings_changed",
                                "changes": {k: {"from": old, "to": new} for k, (old, new) in changes.items()}})

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

    bar, every = None, 0
    if cfg.progress and is_main:
        if _is_terminal(sys.stderr):
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True)
        else:  # a log file or pipe: a plain line now and then instead of a bar nobody sees until the end
            every = _progress_every(cfg.steps)
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
        done = step + 1 == cfg.steps
        if is_main:
            _log(metrics_path, record)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
            elif every and ((step + 1) % every == 0 or done):
                print(f"train: step {step + 1}/{cfg.steps} ({(step + 1) / cfg.steps:.0%})  loss {loss:.4f}  "
                      f"{record['tokens_per_s']:.0f} tokens/s  {elapsed:.0f} s", file=sys.stderr, flush=True)
        if is_main and (done or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
            ev = evaluate(raw_model, prep, cfg, device, cfg.eval_examples)
            preds = ev.pop("_predictions", None)
            _log(metrics_path, {"step": step + 1, **ev})
            summary.update(ev)
            if done and preds is not None:
                summary["predictions"] = preds
                summary["examples"] = [(e.text_with_blank, e.answer, e.kind) for e in prep.examples[:len(preds)]]
        if is_main and (done or (cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0)):
            # Plain data only (tensors, dicts, lists, numbers, strings), so it loads with weights_only=True.
            state = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1,
                     "torch_rng": torch.get_rng_state(), "config": _plain(dataclasses.asdict(cfg)),
                     "model_config": _plain(model_cfg.to_dict()), "tokenizer_sha256": tok_sha}
            last_ckpt = save_checkpoint(cfg.out_dir, state, step + 1, cfg.keep_last)
            del state
        if world > 1 and (done or (cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0)):
            torch.distributed.barrier()
    if bar is not None:
        bar.close()
    if is_main:
        final = os.path.join(cfg.out_dir, "model")
        # Files put into OUT/model during the run would be lost to the save below: refuse instead
        # (the checkpoint holds the run; after moving them, --resume only writes the model).
        _refuse_strangers(final)
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
    """Whether ``cfg.out_dir``'s newest checkpoint was written by a run of ``cfg`` (up to its length:
    only `FREE_FIELDS` may differ). A checkpoint that does not load (checksum, pickled code) is not."""
    ckpts = checkpoints(cfg.out_dir)
    if not ckpts:
        return False
    try:
        state = load_checkpoint(ckpts[-1], torch.device("cpu"), verify=cfg.verify)
        run, optimizer = setting_changes(state["config"], state["model_config"], cfg, model_config_for(cfg))
    except (TrainingError, ValueError):  # unreadable or refused: not provably ours
        return False
    return not run and set(optimizer) <= {"steps"}


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
