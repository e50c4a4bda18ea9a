"""Fine-tuning a pretrained GLM: supervised fine-tuning in the release's chat format, or classification
(GLM's cloze scoring, or a head on the final hidden state), with every weight trained (``full``), LoRA
adapters (``lora``, `glm.lora`) or P-tuning v2 prefixes (``ptuning``, `glm.ptuning`).

The loop is the pretraining loop's (`glm.train`) in miniature, with the same guarantees: the batch of
step ``s`` is a function of ``(seed, s)`` (an epoch-seeded permutation of the examples), a checkpoint
holds the trained parameters, the optimizer, the step and torch's RNG, so ``resume`` continues bit for
bit on CPU; metrics go to ``OUT/metrics.jsonl`` and ``OUT/loss.png``; checkpoints are checksummed and
written atomically (`glm.run_folder`).

The result lands in ``OUT/model``, in the layout its method calls for: a glm checkpoint (``full``),
peft's adapter files (``lora``) or THUDM's P-tuning files (``ptuning``), with the tokenizer beside it
and ``glm_finetune.json`` saying what the run wrote. `glm.from_pretrained` finds the base of an
adapter or prefix folder by itself, so ``glm chat OUT`` works for all three.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Literal, Optional

import safetensors.torch
import torch

from . import lora, ptuning, sft
from .cloze import ClassificationHead, ClozeTask, accuracy, cloze_loss, head_loss, head_predict, predict
from .corpus import jsonl_objects
from .errors import ArgumentError, DataError, TrainingError
from .files import atomic_write, read_bounded
from .formats.peft import save_adapter
from .formats.ptuning_checkpoint import save_prefix
from .generate import stream_text
from .hub import from_pretrained, resolve_model_folder
from .model import GLM
from .run_folder import (
    RUN_FILES,
    append_record,
    checkpoints,
    keep_records_until,
    load_checkpoint,
    plot_metrics,
    remove_stale_temp_files,
    run_lock,
    save_checkpoint,
)
from .sft import SFTExample, collate, load_jsonl
from .tokenizer import Tokenizer, load
from .train import Progress, lr_at, resolve_device, step_record

Method = Literal["full", "lora", "ptuning"]
Task = Literal["sft", "cloze", "head"]
METHODS = ("full", "lora", "ptuning")
TASKS = ("sft", "cloze", "head")
# Peak learning rates that work for each method out of the box: every weight moves little; an adapter's
# few weights start at zero and move more; THUDM's P-tuning scripts train the prefix at 2e-2.
DEFAULT_LR = {"full": 5e-5, "lora": 1e-3, "ptuning": 2e-2}
RECORD = "glm_finetune.json"  # written last into OUT/model: what the run wrote there, and the task
HEAD_FILE = "classification_head.safetensors"


@dataclass
class FinetuneConfig:
    """A fine-tuning run. ``base`` is a model folder (any format glm reads, with its tokenizer);
    ``data`` / ``eval_data`` are JSONL files: conversations or prompt/response pairs for ``task="sft"``
    (`glm.sft`), ``{"text", "label"}`` rows for ``cloze`` and ``head`` (`glm.cloze`)."""
    base: str
    data: str
    out_dir: str
    method: Method = "lora"
    task: Task = "sft"
    eval_data: Optional[str] = None
    tokenizer: Optional[str] = None  # default: the base folder's
    # sft: THUDM's ptuning scripts' max_source_length / max_target_length (their defaults)
    max_source_len: int = sft.DEFAULT_MAX_SOURCE_LEN
    max_target_len: int = sft.DEFAULT_MAX_TARGET_LEN
    # cloze / head
    template: str = "{text} [MASK]"
    labels: Optional[tuple[str, ...]] = None
    verbalizers: Optional[dict[str, str]] = None
    # lora
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: Optional[tuple[str, ...]] = None
    lora_mlp: bool = False
    # ptuning
    pre_seq_len: int = 16
    prefix_projection: bool = False
    prefix_hidden_size: Optional[int] = None  # the MLP's width; None: the model's hidden size, THUDM's layout
    prefix_dropout: float = 0.0
    # the base loaded weight-only quantized ("int8" / "int4"; glm.quant), with adapters trained over it in
    # the compute dtype (QLoRA's arrangement); full fine-tuning needs the float base
    quantize: Optional[str] = None
    group_size: Optional[int] = None
    # optimisation
    steps: int = 200
    batch_size: int = 8
    lr: Optional[float] = None  # None: DEFAULT_LR[method]
    warmup: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    eval_every: int = 0  # 0: after the last step only
    ckpt_every: int = 0  # 0: after the last step only
    keep_last: int = 2
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    verify: bool = True

    @property
    def peak_lr(self) -> float:
        return DEFAULT_LR[self.method] if self.lr is None else self.lr

    def validate(self) -> None:
        def bad(name: str, why: str) -> ArgumentError:
            flag = "--" + name.replace("_", "-")
            return ArgumentError(f"FinetuneConfig.{name} ({flag}) {why}")

        if self.method not in METHODS:
            raise bad("method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.task not in TASKS:
            raise bad("task", f"must be one of {', '.join(TASKS)}, got {self.task!r}")
        for name in ("steps", "batch_size", "max_source_len", "max_target_len", "keep_last", "lora_r",
                     "pre_seq_len", "prefix_hidden_size"):
            v = getattr(self, name)
            if v is None and name == "prefix_hidden_size":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(name, f"must be a whole number >= 1, got {v!r}")
        for name in ("warmup", "eval_every", "ckpt_every", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise bad(name, f"must be a whole number >= 0, got {v!r}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", f"must be a finite number > 0, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise bad("min_lr_ratio", f"must lie in [0, 1], got {self.min_lr_ratio!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise bad("weight_decay", f"must be a finite number >= 0, got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise bad("betas", f"must be two numbers in [0, 1), got {self.betas!r}")
        if not self.grad_clip > 0:
            raise bad("grad_clip", f"must be > 0 (inf: no clipping), got {self.grad_clip!r}")
        for name in ("lora_dropout", "prefix_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise bad(name, f"must lie in [0, 1), got {getattr(self, name)!r}")
        if self.task != "sft" and not self.labels:
            raise bad("labels", f"is required for task {self.task!r}: the classes, e.g. --labels positive negative")
        if self.quantize not in (None, "int8", "int4"):
            raise bad("quantize", f"must be 'int8' or 'int4' (or unset for the float base), got {self.quantize!r}")
        if self.quantize is not None and self.method == "full":
            raise bad("quantize", "cannot go with method 'full': quantized weights are integers and do not train; "
                                  "use --method lora or ptuning over the quantized base, or fine-tune in full "
                                  "precision and quantize the result (glm quantize)")
        if self.group_size is not None and self.quantize is None:
            raise bad("group_size", "applies only with --quantize int8|int4")
        if self.resume and self.overwrite:
            raise ArgumentError("--resume continues the run in OUT and --overwrite deletes it: pass one of them")
        for name in ("data", "eval_data"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise bad(name, f"names {path!r}, which is not a file; pass a JSONL file")

    def cloze_task(self) -> ClozeTask:
        labels = list(self.labels or ())
        return ClozeTask(template=self.template, labels=labels, verbalizers=dict(self.verbalizers or {}))


# Settings that decide what is trained and on what: a resume must keep them.
RUN_FIELDS = ("base", "data", "method", "task", "tokenizer", "max_source_len", "max_target_len", "template", "labels",
              "verbalizers", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "lora_mlp", "pre_seq_len",
              "prefix_projection", "prefix_hidden_size", "prefix_dropout", "batch_size", "seed", "lr", "warmup",
              "min_lr_ratio", "weight_decay", "betas", "grad_clip", "dtype", "quantize", "group_size")


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))


# ------------------------------------------------------------------------------------------------
# Data

@dataclass
class Labelled:
    """One classification row of a JSONL file (``tokens``: its text's token count, for the speed log)."""
    text: str
    label: str
    line: int
    tokens: int = 0


def load_labelled(path: str, labels: tuple[str, ...]) -> list[Labelled]:
    """``{"text": str, "label": str}`` rows; a DataError naming ``path:line`` for a row that is not one, or
    whose label is not in ``labels``."""
    rows: list[Labelled] = []
    for n, row in jsonl_objects(path, example='{"text": "...", "label": "..."}'):
        if not isinstance(row.get("text"), str) or not isinstance(row.get("label"), str):
            raise DataError(f'{path} line {n}: a classification row is {{"text": "...", "label": "..."}} with two '
                            f"strings; got {str(row)[:120]}")
        if row["label"] not in labels:
            raise DataError(f"{path} line {n}: label {row['label']!r} is not one of the task's labels "
                            f"{list(labels)}; add it to --labels or fix the row")
        rows.append(Labelled(row["text"], row["label"], n))
    if not rows:
        raise DataError(f"{path}: holds no rows; write one JSON object per line")
    return rows


@functools.lru_cache(maxsize=8)
def _permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(f"glm-finetune:{seed}:{epoch}").shuffle(order)
    return tuple(order)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The examples of optimizer step ``step``: consecutive slices of one seeded permutation per epoch,
    so every example is seen once an epoch and a resumed run draws the same batches."""
    out = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, k = divmod(i, n)
        out.append(_permutation(n, seed, epoch)[k])
    return out


# ------------------------------------------------------------------------------------------------
# Losses

def sft_loss_sum(model: GLM, examples: list[SFTExample], tok: Tokenizer, device: torch.device) -> tuple[torch.Tensor,
                                                                                                          int]:
    """Summed cross entropy over the label tokens of ``examples`` and their count; the vocabulary
    projection runs only at those positions (`glm.sft.loss_sum`)."""
    batch = {k: v.to(device) for k, v in collate(examples, tok.pad_id).items()}
    return sft.loss_sum(model, batch)


@dataclass
class _Run:
    cfg: FinetuneConfig
    device: torch.device
    model: GLM
    tok: Tokenizer
    head: Optional[ClassificationHead]
    optimizer: torch.optim.Optimizer
    train: list
    eval: list
    start: int
    metrics: str
    last_ckpt: Optional[str]

    def named_trainable(self) -> dict[str, torch.nn.Parameter]:
        out = {f"model.{n}": p for n, p in self.model.named_parameters() if p.requires_grad}
        if self.head is not None:
            out.update({f"head.{n}": p for n, p in self.head.named_parameters()})
        return out


def _batch_loss(run: _Run, rows: list) -> tuple[torch.Tensor, int]:
    """(loss to backpropagate, tokens or rows it covers): the mean over label tokens (sft) or rows."""
    cfg = run.cfg
    if cfg.task == "sft":
        total, n = sft_loss_sum(run.model, rows, run.tok, run.device)
        return total / max(n, 1), n
    texts, labels = [r.text for r in rows], [r.label for r in rows]
    if cfg.task == "cloze":
        return cloze_loss(run.model, run.tok, cfg.cloze_task(), texts, labels), len(rows)
    return head_loss(run.model, run.head, run.tok, cfg.cloze_task(), texts, labels), len(rows)


@torch.no_grad()
def evaluate(run: _Run) -> dict:
    """Held-out loss (sft: per label token) or accuracy and loss (classification) over all of ``run.eval``."""
    if not run.eval:
        return {}
    was_training = run.model.training
    run.model.eval()
    cfg, out = run.cfg, {}
    try:
        if cfg.task == "sft":
            total, count = 0.0, 0
            for i in range(0, len(run.eval), cfg.batch_size):
                s, n = sft_loss_sum(run.model, run.eval[i:i + cfg.batch_size], run.tok, run.device)
                total, count = total + float(s), count + n
            out["eval_loss"] = total / max(count, 1)
            out["eval_ppl"] = math.exp(min(out["eval_loss"], 50.0))
        else:
            out.update(classification_scores(run.model, run.tok, cfg.cloze_task(), run.eval, run.head))
    finally:
        run.model.train(was_training)
    return out


def classification_scores(model: GLM, tok: Tokenizer, task: ClozeTask, rows: list[Labelled],
                          head: Optional[ClassificationHead] = None) -> dict:
    """Accuracy of the cloze scores (or of ``head``) on ``rows``, and the most-frequent-label baseline."""
    texts, labels = [r.text for r in rows], [r.label for r in rows]
    probs = head_predict(model, head, tok, task, texts) if head is not None else predict(model, tok, task, texts)
    majority = max(task.labels, key=labels.count)
    return {"eval_accuracy": accuracy(probs, labels), "baseline": labels.count(majority) / len(labels)}


# ------------------------------------------------------------------------------------------------
# The run

def _apply_method(model: GLM, cfg: FinetuneConfig) -> None:
    """Adapters or a prefix on ``model`` (its base weights frozen); ``full`` trains the model as it is."""
    if cfg.method == "lora":
        lora.apply(model, lora.LoraConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                          targets=cfg.lora_targets, mlp=cfg.lora_mlp))
    elif cfg.method == "ptuning":
        ptuning.apply(model, ptuning.PrefixConfig(pre_seq_len=cfg.pre_seq_len, prefix_projection=cfg.prefix_projection,
                                                  prefix_hidden_size=cfg.prefix_hidden_size,
                                                  dropout=cfg.prefix_dropout))


def _optimizer(params: dict[str, torch.nn.Parameter], cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only, as in pretraining (`glm.train.make_optimizer`)."""
    decay = [p for n, p in params.items() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in params.items() if not (p.dim() >= 2 and "embed" not in n)]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params.values())
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.peak_lr, betas=tuple(cfg.betas),
                             fused=fused or None)


def _load_data(cfg: FinetuneConfig, tok: Tokenizer, model: GLM, path: Optional[str]) -> list:
    if path is None:
        return []
    if cfg.task == "sft":
        # A P-tuning prefix takes key slots but no positions: rows keep the model's whole position range.
        return load_jsonl(path, tok, model.config.family, max_source_len=cfg.max_source_len,
                          max_target_len=cfg.max_target_len, max_positions=model.config.max_positions)
    rows = load_labelled(path, tuple(cfg.labels or ()))
    for r in rows:
        r.tokens = len(tok.encode(r.text))
    return rows


def _claim(cfg: FinetuneConfig) -> None:
    """Refuse to mix with an earlier run in OUT unless resuming it; ``overwrite`` deletes what an earlier
    fine-tuning run wrote (its record lists the files of OUT/model) and nothing else."""
    ckpts = checkpoints(cfg.out_dir)
    model_dir = os.path.join(cfg.out_dir, "model")
    if ckpts and not cfg.resume and not cfg.overwrite:
        raise TrainingError(f"{cfg.out_dir} already holds a run (checkpoints up to {os.path.basename(ckpts[-1])}); "
                            f"pass --resume to continue it, --overwrite to delete it and start over, or a new --out")
    written = _written_files(model_dir)
    strangers = sorted(set(os.listdir(model_dir)) - set(written)) if os.path.isdir(model_dir) else []
    if strangers:
        raise TrainingError(f"{model_dir} holds files this fine-tuning run did not write "
                            f"({', '.join(strangers[:10])}); the run's final save replaces that folder, so move them "
                            f"or use another --out")
    if cfg.overwrite:
        for path in checkpoints(cfg.out_dir) + [os.path.join(cfg.out_dir, n) for n in RUN_FILES]:
            if os.path.isfile(path):
                os.remove(path)
        _clear_model_dir(model_dir, written)


def _written_files(model_dir: str) -> list[str]:
    record = os.path.join(model_dir, RECORD)
    if not os.path.isfile(record):
        return []
    try:
        files = json.loads(read_bounded(record, what=RECORD)).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [f for f in files if isinstance(f, str) and os.sep not in f] + [RECORD]


def _clear_model_dir(model_dir: str, written: list[str]) -> None:
    for name in written:
        path = os.path.join(model_dir, name)
        if os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)
    if os.path.isdir(model_dir) and not os.listdir(model_dir):
        os.rmdir(model_dir)


def _check_resume(path: str, state: dict, cfg: FinetuneConfig) -> None:
    saved, now = state["config"], _plain(dataclasses.asdict(cfg))
    changed = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in RUN_FIELDS if saved.get(k) != now[k]]
    if changed:
        raise TrainingError(f"{path} was written with other settings ({'; '.join(changed)}); resume with the run's "
                            f"settings, or start over with --overwrite")


def _start(cfg: FinetuneConfig, device: torch.device) -> _Run:
    _claim(cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)
    remove_stale_temp_files(cfg.out_dir)
    ckpts = checkpoints(cfg.out_dir)
    state = None
    if cfg.resume and ckpts:
        state = load_checkpoint(ckpts[-1], device, verify=cfg.verify)
        _check_resume(ckpts[-1], state, cfg)
    elif cfg.resume:
        print(f"--resume: no checkpoint in {cfg.out_dir}; starting from step 0")
    base = resolve_model_folder(cfg.base)
    # Quantized as the shards stream in: the float base is never whole in memory.
    model = from_pretrained(base, dtype=cfg.dtype, device=device, quantize=cfg.quantize, group_size=cfg.group_size)
    if lora.lora_parameters(model) or getattr(model, "prefix_encoder", None) is not None:
        raise ArgumentError(f"FinetuneConfig.base ({cfg.base}) is itself an adapter or a prefix; fine-tune from a "
                            f"full model (merge an adapter first with glm merge-lora)")
    tok = load(cfg.tokenizer or base)
    train_rows = _load_data(cfg, tok, model, cfg.data)
    eval_rows = _load_data(cfg, tok, model, cfg.eval_data)
    torch.manual_seed(cfg.seed)
    _apply_method(model, cfg)
    lora.check_trainable(model)
    head = None
    if cfg.task == "head":
        head = ClassificationHead(model.config.hidden_size, len(cfg.labels or ())).to(device)
    model.train()
    run = _Run(cfg, device, model, tok, head, None, train_rows, eval_rows, 0,  # type: ignore[arg-type]
               os.path.join(cfg.out_dir, "metrics.jsonl"), ckpts[-1] if state else None)
    params = run.named_trainable()
    run.optimizer = _optimizer(params, cfg)
    if state is not None:
        try:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(state["model"][name])
            run.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise TrainingError(f"{ckpts[-1]}: this checkpoint does not fit the model being fine-tuned "
                                f"({str(e)[:200]}); start over with --overwrite") from None
        torch.set_rng_state(state["torch_rng"].cpu())
        run.start = state["step"]
    keep_records_until(run.metrics, run.start)
    return run


def _checkpoint(run: _Run, step: int) -> None:
    state = {"model": {n: p.detach() for n, p in run.named_trainable().items()},
             "optimizer": run.optimizer.state_dict(), "step": step, "torch_rng": torch.get_rng_state(),
             "config": _plain(dataclasses.asdict(run.cfg)), "model_config": _plain(run.model.config.to_dict())}
    run.last_ckpt = save_checkpoint(run.cfg.out_dir, state, step, run.cfg.keep_last)


def _step(run: _Run, step: int) -> tuple[float, float, float, int]:
    cfg = run.cfg
    lr = lr_at(step, _Schedule(cfg))
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    run.optimizer.zero_grad(set_to_none=True)
    rows = [run.train[i] for i in batch_indices(len(run.train), cfg.batch_size, step, cfg.seed)]
    loss, n = _batch_loss(run, rows)
    value = float(loss.detach())
    if not math.isfinite(value):
        where = f"the last good checkpoint is {run.last_ckpt}" if run.last_ckpt else "no checkpoint was written yet"
        raise TrainingError(f"step {step + 1}: the loss is {value}; stopping ({where}). Lower --lr or check the data")
    loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(list(run.named_trainable().values()), cfg.grad_clip))
    run.optimizer.step()
    tokens = sum(len(r.input_ids) for r in rows) if cfg.task == "sft" else sum(r.tokens for r in rows)
    return value, lr, grad_norm, tokens


@dataclass
class _Schedule:
    """The fields `glm.train.lr_at` reads, from a FinetuneConfig."""
    lr: float
    warmup: int
    steps: int
    min_lr_ratio: float

    def __init__(self, cfg: FinetuneConfig):
        self.lr, self.warmup, self.steps, self.min_lr_ratio = cfg.peak_lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio


def save_result(run: _Run) -> str:
    """Write the trained result into OUT/model in its method's layout, the tokenizer beside it, and the
    record of the files last (a folder without it is not a finished result)."""
    cfg, model_dir = run.cfg, os.path.join(run.cfg.out_dir, "model")
    _clear_model_dir(model_dir, _written_files(model_dir))
    os.makedirs(model_dir, exist_ok=True)
    base = os.path.abspath(resolve_model_folder(cfg.base))
    if cfg.method == "lora":
        save_adapter(run.model, model_dir, base_model_name_or_path=base)
    elif cfg.method == "ptuning":
        save_prefix(run.model, model_dir, base_model_name_or_path=base)
    else:
        run.model.save_pretrained(model_dir, format="glm", overwrite=True)
    run.tok.save(model_dir)
    if run.head is not None:
        tensors = {n: p.detach().contiguous().cpu() for n, p in run.head.state_dict().items()}
        atomic_write(os.path.join(model_dir, HEAD_FILE), lambda f: f.write(safetensors.torch.save(tensors)))
    record = {"method": cfg.method, "task": cfg.task, "base": base,
              "files": sorted(n for n in os.listdir(model_dir) if n != RECORD)}
    if cfg.task != "sft":
        record["cloze_task"] = {"template": cfg.template, "labels": list(cfg.labels or ()),
                                "verbalizers": dict(cfg.verbalizers or {})}
    atomic_write(os.path.join(model_dir, RECORD), lambda f: f.write(json.dumps(record, indent=2).encode()))
    return model_dir


def finetune(cfg: FinetuneConfig) -> dict:
    """Run (or resume) a fine-tuning run; returns a summary (final metrics, where the result went)."""
    cfg.validate()
    device = resolve_device(cfg.device)
    with run_lock(cfg.out_dir):
        run = _start(cfg, device)
        progress = Progress(cfg.steps, run.start, show=cfg.progress, desc="finetune")
        t0, seen, summary = time.perf_counter(), 0, {}
        try:
            for step in range(run.start, cfg.steps):
                loss, lr, grad_norm, tokens = _step(run, step)
                seen += tokens
                elapsed = time.perf_counter() - t0
                record = step_record(step + 1, loss, lr, grad_norm, seen, elapsed)
                append_record(run.metrics, record)
                progress.update(record, elapsed)
                done = step + 1 == cfg.steps
                if done or (cfg.eval_every and (step + 1) % cfg.eval_every == 0):
                    ev = evaluate(run)
                    if ev:
                        append_record(run.metrics, {"step": step + 1, **ev})
                        summary.update(ev)
                if done or (cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0):
                    _checkpoint(run, step + 1)
        finally:
            progress.close()
        if run.start >= cfg.steps:
            summary.update(evaluate(run))
        model_dir = save_result(run)
        trainable = sum(p.numel() for p in run.named_trainable().values())
        summary.update(model_dir=model_dir, metrics=run.metrics, checkpoint=run.last_ckpt,
                       plot=plot_metrics(run.metrics, os.path.join(cfg.out_dir, "loss.png")),
                       trainable_parameters=trainable, parameters=sum(p.numel() for p in run.model.parameters()),
                       seconds=time.perf_counter() - t0)
        return summary


# ------------------------------------------------------------------------------------------------
# Using a result

def merge_lora(src: str, dst: str, *, format: str = "glm", overwrite: bool = False) -> str:
    """Load the LoRA adapter folder ``src`` onto its base, fold it into the weights and save a plain
    checkpoint to ``dst`` (``format`` "glm" or "hf", the release's own), with the tokenizer."""
    folder = resolve_model_folder(src)
    model = from_pretrained(folder)
    if not lora.lora_parameters(model):
        raise ArgumentError(f"{src} holds no LoRA adapter (adapter_config.json); nothing to merge")
    model = lora.remove(model)
    model.save_pretrained(dst, format=format, overwrite=overwrite)
    load(folder).save(dst)
    return dst


def load_classifier(folder: str, device: "torch.device | str" = "cpu"):
    """The classifier a ``task="cloze"`` or ``"head"`` run wrote to ``folder`` (the run folder or its model/):
    a function from texts to ``{label: probability}`` dicts."""
    model_dir = resolve_model_folder(folder)
    record_path = os.path.join(model_dir, RECORD)
    if not os.path.isfile(record_path):
        raise ArgumentError(f"{folder}: no {RECORD}: not the result of glm finetune; classify with a run of "
                            f"--task cloze or --task head")
    record = json.loads(read_bounded(record_path, what=RECORD))
    if record.get("task") not in ("cloze", "head") or not isinstance(record.get("cloze_task"), dict):
        raise ArgumentError(f"{folder}: this run fine-tuned for task {record.get('task')!r}, not classification; "
                            f"use glm chat / generate with it")
    t = record["cloze_task"]
    task = ClozeTask(template=t["template"], labels=list(t["labels"]), verbalizers=dict(t.get("verbalizers") or {}))
    model = from_pretrained(model_dir, device=device)
    tok = load(model_dir)
    head = None
    if record["task"] == "head":
        head = ClassificationHead(model.config.hidden_size, len(task.labels)).to(device)
        head.load_state_dict(safetensors.torch.load_file(os.path.join(model_dir, HEAD_FILE), device=str(device)))
        head.eval()

    def classify(texts: list[str]) -> list[dict[str, float]]:
        with torch.no_grad():
            if head is not None:
                return head_predict(model, head, tok, task, texts)
            return predict(model, tok, task, texts)

    return classify


def respond(model: GLM, tok: Tokenizer, question: str, max_new_tokens: int = 32) -> str:
    """The model's greedy reply to one user ``question``, prompted as `glm.sft` lays out a training row of
    its family: the release's chat prompt, or for original GLM (no chat format) ``[CLS] question [gMASK]``
    with the reply generated in the blank."""
    if tok.roles_in_chat:
        ids = tok.chat_ids(question)
    else:
        ids = tok.infill_prompt(tok.encode(question) + [tok.token_id("[gMASK]")])
    return "".join(stream_text(model, tok, ids, max_new_tokens=max_new_tokens)).strip()
