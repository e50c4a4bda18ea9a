"""Parity harness: run a folder's reference cases (cases.json + cases.safetensors) through glm.

The case format is that of ../shared/reference/README.md. ``forward`` cases compare logits (and the
loss, when the case has labels); ``decode`` cases prefill the prompt into a static KV cache and feed
the reference's greedy tokens one at a time, comparing each step's logits, the greedy choice and the
position ids glm derives for each fed token with the ones the reference fed.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from . import formats
from .checkpoint import CheckpointError
from .errors import ArgumentError
from .files import ensure_regular, read_bounded
from .hub import from_pretrained
from .model import GLM, lm_loss


@dataclass
class CaseResult:
    name: str
    kind: str
    max_abs_diff: float
    tokens_agree: int
    tokens_total: int
    atol: float
    extra: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.atol and self.tokens_agree == self.tokens_total and not self.problems

    def line(self) -> str:
        extras = "".join(f"  {k} {v:.2e}" if isinstance(v, float) else f"  {k} {v}" for k, v in self.extra.items())
        probs = "".join(f"  [{p}]" for p in self.problems)
        return (f"{'PASS' if self.passed else 'FAIL'}  {self.name:<20} {self.kind:<8} max|dlogits| "
                f"{self.max_abs_diff:.3e}  tokens {self.tokens_agree}/{self.tokens_total}{extras}{probs}")


def load_cases(path: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read ``cases.json`` and its tensors. ``path`` is the folder, the .json or the .safetensors."""
    from safetensors.torch import load_file

    if os.path.isdir(path):
        json_path, st_path = os.path.join(path, "cases.json"), os.path.join(path, "cases.safetensors")
    else:
        stem = os.path.splitext(path)[0]
        json_path, st_path = stem + ".json", stem + ".safetensors"
    for p in (json_path, st_path):
        if not os.path.exists(p):
            raise CheckpointError(f"{p}: no such file; a cases file is a .json with its .safetensors beside it "
                                  f"(see docs/parity.md for how to dump one)")
        # A FIFO or device here would block the reads below forever.
        ensure_regular(p, "cases file")
    try:
        meta = json.loads(read_bounded(json_path, what="cases file").decode("utf-8"))
        cases = meta["cases"]
        if not isinstance(cases, list) or not all(isinstance(c, dict) for c in cases):
            raise TypeError
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, RecursionError):
        raise CheckpointError(f"{json_path}: not a cases file (needs a JSON object with a 'cases' list of "
                              f"objects)") from None
    if not cases:
        # An empty list would "pass" having checked nothing.
        raise CheckpointError(f"{json_path}: the 'cases' list is empty; a parity check needs at least one case")
    try:
        tensors = load_file(st_path)
    except Exception as e:
        raise CheckpointError(f"{st_path}: cannot read the case tensors ({e})") from None
    return meta, tensors


def _resolve(values: dict[str, Any], tensors: dict[str, Tensor], where: str) -> dict[str, Any]:
    out = {}
    for k, v in values.items():
        if isinstance(v, str):
            if v not in tensors:
                raise CheckpointError(f"{where}: field {k!r} names tensor {v!r}, which is not in the .safetensors")
            out[k] = tensors[v]
        else:
            out[k] = v
    return out


def _pad_left(inputs: dict[str, Any]) -> Optional[Tensor]:
    if "pad_left" in inputs:
        return inputs["pad_left"]
    if "attention_mask" in inputs:  # left padding: count the leading zeros
        return (inputs["attention_mask"] == 0).long().cumprod(dim=1).sum(dim=1)
    return None


def reference_loss(model: GLM, logits: Tensor, labels: Tensor) -> Tensor:
    """The reference's own loss convention: GLM's labels are already next tokens (no shift); every
    ChatGLM/HF family shifts by one. The release format says which (`Format.labels_are_next_tokens`)."""
    if formats.get(model.config.family).labels_are_next_tokens:
        return lm_loss(logits, labels)
    return lm_loss(logits[:, :-1], labels[:, 1:])


def _forward_case(model: GLM, name: str, inputs: dict, outputs: dict, atol: float,
                  backend: Optional[str]) -> CaseResult:
    ids = inputs["input_ids"]
    with torch.no_grad():
        logits = model(ids, inputs.get("position_ids"), prefix_len=inputs.get("prefix_len"),
                       pad_left=_pad_left(inputs), backend=backend).float()
    ref = outputs["logits"].float()
    cmp = outputs.get("compare_mask", torch.ones(ids.shape, dtype=torch.bool))
    diff = (logits - ref)[cmp].abs().max().item() if cmp.any() else 0.0
    agree = int((logits.argmax(-1) == ref.argmax(-1))[cmp].sum())
    res = CaseResult(name, "forward", diff, agree, int(cmp.sum()), atol)
    if "loss" in outputs and "labels" in inputs:
        dl = abs(reference_loss(model, logits, inputs["labels"]).item() - outputs["loss"].float().item())
        res.extra["|dloss|"] = dl
        if dl > atol:
            res.problems.append(f"loss differs by {dl:.2e}")
    return res


def _decode_case(model: GLM, name: str, inputs: dict, outputs: dict, atol: float, backend: Optional[str]) -> CaseResult:
    ids = inputs["input_ids"]
    steps = int(inputs["steps"])
    ref_tokens, ref_logits = outputs["tokens"], outputs["step_logits"].float()
    B, P = ids.shape
    cache = model.new_cache(B, P + steps)
    diffs, agree, fed = [], 0, []
    with torch.no_grad():
        logits = model(ids, inputs.get("position_ids"), prefix_len=inputs.get("prefix_len"),
                       pad_left=_pad_left(inputs), cache=cache, backend=backend, last_only=True)[:, -1]
        for i in range(steps):
            if i > 0:
                # Teacher-force the reference's own choices so one flipped argmax cannot cascade.
                logits = model(ref_tokens[:, i - 1 : i], cache=cache, backend=backend, last_only=True)[:, -1]
                fed.append(cache.last_position_ids)
            diffs.append((logits.float() - ref_logits[:, i]).abs().max().item())
            agree += int((logits.argmax(-1) == ref_tokens[:, i]).sum())
    res = CaseResult(name, "decode", max(diffs), agree, B * steps, atol)
    if "fed_position_ids" in outputs and fed:
        mine = torch.stack(fed, dim=-1)  # [B, S, steps-1]
        ref_pos = outputs["fed_position_ids"]
        ref_pos = ref_pos.unsqueeze(1) if ref_pos.dim() == 2 else ref_pos
        if mine.shape != ref_pos.shape or not torch.equal(mine.to(ref_pos.device), ref_pos):
            res.problems.append("decode position ids differ from the reference's")
    return res


def run_parity(model_or_dir: "GLM | str", cases: Optional[str] = None, atol: Optional[float] = None,
               backend: Optional[str] = None, device: "str | torch.device" = "cpu") -> list[CaseResult]:
    """Run every case and return one `CaseResult` each. ``cases`` defaults to the model folder.

    ``atol`` defaults to the cases file's own ``atol`` (1e-4 for the shared fixtures).
    """
    if isinstance(model_or_dir, GLM):
        model = model_or_dir
        if cases is None:
            raise ArgumentError("run_parity: pass cases= when giving a model instead of a folder")
    else:
        model = from_pretrained(model_or_dir, dtype=torch.float32, device=device)
        cases = cases or model_or_dir
    meta, tensors = load_cases(cases)
    raw = atol if atol is not None else meta.get("atol", 1e-4)
    # inf would pass every case whatever the logits, NaN none; a string or list is no tolerance at all.
    if isinstance(raw, bool) or not isinstance(raw, numbers.Real) or not math.isfinite(raw) or raw <= 0:
        raise ArgumentError(f"atol must be a finite number > 0, got {raw!r} (--atol, or the cases file's 'atol')")
    tol = float(raw)
    dev = next(model.parameters()).device
    results = []
    for case in meta["cases"]:
        where = f"{cases}: case {case.get('name', '?')!r}"
        try:
            inputs = _resolve(case["inputs"], tensors, where)
            outputs = _resolve(case["outputs"], tensors, where)
            kind, name = case["kind"], case["name"]
        except KeyError as e:
            raise CheckpointError(f"{where}: missing field {e.args[0]!r}") from None
        except AttributeError:
            raise CheckpointError(f"{where}: 'inputs' and 'outputs' must be JSON objects") from None
        ref = outputs.get("logits", outputs.get("step_logits"))
        if isinstance(ref, Tensor) and ref.shape[-1] != model.config.vocab_size:
            raise CheckpointError(f"{where}: the reference logits have {ref.shape[-1]} vocabulary entries, the "
                                  f"model {model.config.vocab_size}; these cases belong to another checkpoint")
        inputs = {k: v.to(dev) if isinstance(v, Tensor) else v for k, v in inputs.items()}
        outputs = {k: v.to(dev) if isinstance(v, Tensor) else v for k, v in outputs.items()}
        if kind not in ("forward", "decode"):
            raise CheckpointError(f"{where}: unknown case kind {kind!r} (expected 'forward' or 'decode')")
        run = _forward_case if kind == "forward" else _decode_case
        try:
            results.append(run(model, name, inputs, outputs, tol, backend))
        except (RuntimeError, IndexError, TypeError, KeyError) as e:
            # The model checks its own inputs (InputError); what fails past them is a reference tensor
            # (or field) of another shape or type than the inputs.
            raise CheckpointError(f"{where}: the case's tensors do not fit together or this model "
                                  f"({type(e).__name__}: {e})") from None
    return results


def summary(results: list[CaseResult]) -> str:
    passed = sum(r.passed for r in results)
    worst = max((r.max_abs_diff for r in results), default=0.0)
    return f"{passed} passed, {len(results) - passed} failed  (worst max|dlogits| {worst:.3e})"
