"""GLM's cloze-style classification (the GLM paper's way of fine-tuning on NLU), and the two baselines it is
compared with: a classification head on the final hidden state, and the same cloze scores zero-shot.

A task is a template with one ``[MASK]`` and a verbalizer per label::

    task = ClozeTask("{text} It was [MASK].", labels=["pos", "neg"], verbalizers={"pos": "good", "neg": "bad"})
    loss = cloze_loss(model, tok, task, texts, labels)        # cross entropy over the label scores
    probs = predict(model, tok, task, texts)                   # [{"pos": 0.9, "neg": 0.1}, ...]

A label's score is the log-probability of its verbalizer filling the blank:

- 2D families (GLM, ChatGLM-6B), as THUDM/GLM's finetune_glm.py scores it: Part A is the filled template
  with the blank as ``[MASK]`` (GLM wraps it as ``[CLS] A <eos>``, tasks/data_utils.py build_input_from_ids),
  attended bidirectionally; Part B is ``<sop>`` + the verbalizer at the mask's position with block positions
  1, 2, ... . When every verbalizer of the task is one token, the score is that token's log-probability at
  ``<sop>`` (GLMForSingleTokenCloze); otherwise each verbalizer is followed by ``<eop>`` and the score is the
  sum of the log-probabilities of its tokens and the ``<eop>``, with no length normalisation
  (GLMForMultiTokenCloze, ``--length-penalty`` 0).
- 1D families (ChatGLM2/3, GLM-4, Glm, Glm4) cannot fill a blank; they score the filled template left to
  right: the text before the blank is the prompt in the release's own input format (``[gMASK] <sop>`` +
  text), and the score is the log-probability of the verbalizer, the rest of the template and the eos
  after it. The prompt is the same for every label, so the label softmax is the posterior over the filled
  templates, and the text after the blank is still read.

Verbalizers are tokenised on their own (``tokenizer.encode``), as THUDM's get_verbalization_ids does: with
a byte-level tokenizer (GLM-4) a verbalizer that follows a space carries it (``" good"``).

The head (`ClassificationHead`) is THUDM's PoolingModel: ``tanh(Linear)`` -> dropout -> ``Linear`` on the
final hidden state of the plain text in the release's input format (``tokenizer.build_inputs``), read at
its last token, which sees the whole text in every family (2D families attend over it bidirectionally).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import positions
from .errors import InputError
from .generate import encode_blank_text, left_pad
from .model import GLM

MASK = "[MASK]"
TEXT = "{text}"
OTHER_MASKS = ("[sMASK]", "[gMASK]")


@dataclass
class ClozeTask:
    """A classification task as a cloze: ``template`` holds ``{text}`` and exactly one ``[MASK]``;
    ``verbalizers`` maps each label to the text that fills the blank (empty: each label is its own
    verbalizer). Checked when made; the checks that need a tokenizer run in `verbalizer_ids`."""

    template: str
    labels: list[str]
    verbalizers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.template, str) or TEXT not in self.template:
            raise InputError(f"the cloze template must contain {TEXT} where each example's text goes, got "
                             f"{self.template!r}; e.g. '{{text}} It was [MASK].'")
        n = self.template.count(MASK)
        if n != 1:
            raise InputError(f"the cloze template must contain exactly one {MASK} (the blank the label fills), "
                             f"found {n} in {self.template!r}")
        other = [m for m in OTHER_MASKS if m in self.template]
        if other:
            raise InputError(f"the cloze template holds {other[0]}; its one blank is written {MASK}")
        if isinstance(self.labels, str) or not isinstance(self.labels, Sequence) or len(self.labels) < 2:
            raise InputError(f"a cloze task needs a list of at least two labels, got {self.labels!r}")
        self.labels = list(self.labels)
        if not all(isinstance(label, str) and label for label in self.labels):
            raise InputError(f"labels must be non-empty strings, got {self.labels!r}")
        dup = sorted({label for label in self.labels if self.labels.count(label) > 1})
        if dup:
            raise InputError(f"label {dup[0]!r} is listed twice in {self.labels!r}; list each label once")
        verbalizers = dict(self.verbalizers or {})
        if verbalizers:
            missing = [label for label in self.labels if label not in verbalizers]
            if missing:
                raise InputError(f"label {missing[0]!r} has no verbalizer; give every label one "
                                 f"(e.g. --verbalizer {missing[0]}=WORD) or none (each label is then its own)")
            unknown = [k for k in verbalizers if k not in self.labels]
            if unknown:
                raise InputError(f"verbalizer for {unknown[0]!r}, which is not a label ({', '.join(self.labels)})")
        for label, word in verbalizers.items():
            if not isinstance(word, str) or not word.strip():
                raise InputError(f"the verbalizer of label {label!r} is {word!r}; it must be non-empty text")
        self.verbalizers = verbalizers

    def verbalizer(self, label: str) -> str:
        """The text that fills the blank for ``label``."""
        return self.verbalizers.get(label, label)

    def render(self, text: str) -> str:
        """The template with ``text`` in place of ``{text}``."""
        return self.template.replace(TEXT, text)

    def verbalizer_ids(self, tokenizer) -> list[list[int]]:
        """Each label's verbalizer tokenised on its own (THUDM's get_verbalization_ids), in label order.
        Refuses a verbalizer with no tokens and two labels whose verbalizers are the same tokens."""
        out: list[list[int]] = []
        seen: dict[tuple[int, ...], str] = {}
        for label in self.labels:
            word = self.verbalizer(label)
            ids = list(tokenizer.encode(word))
            if not ids:
                raise InputError(f"the verbalizer {word!r} of label {label!r} tokenizes to nothing; choose a word "
                                 f"the tokenizer encodes")
            if tuple(ids) in seen:
                raise InputError(f"labels {seen[tuple(ids)]!r} and {label!r} have verbalizers with the same tokens "
                                 f"{ids}; the blank cannot tell them apart: give them different words")
            seen[tuple(ids)] = label
            out.append(ids)
        return out

    def label_index(self, labels: Sequence[str]) -> Tensor:
        """``labels`` as indices into ``self.labels`` ([N] int64)."""
        index = {label: i for i, label in enumerate(self.labels)}
        if isinstance(labels, str) or not isinstance(labels, Sequence):
            raise InputError(f"labels must be a list of label names, got {type(labels).__name__}")
        bad = [(i, label) for i, label in enumerate(labels) if label not in index]
        if bad:
            i, label = bad[0]
            raise InputError(f"example {i}: label {label!r} is not one of the task's labels ({', '.join(self.labels)})")
        return torch.tensor([index[label] for label in labels], dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# Scored sequences

@dataclass
class _Scored:
    """One (text, label) sequence: ``ids`` at ``position_ids`` (one list per stream), keys before
    ``prefix_len`` visible to all; the tokens ``targets`` are scored at slots ``start ..`` (each slot
    predicts the next token)."""

    ids: list[int]
    position_ids: list[list[int]]
    prefix_len: int
    start: int
    targets: list[int]


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise InputError(f"texts must be a list of strings, got {type(texts).__name__}")
    if not texts:
        raise InputError("texts is empty; pass at least one text")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise InputError(f"text {bad[0]} is {type(texts[bad[0]]).__name__}, not a string")
    return list(texts)


def _name(names: Optional[Sequence[str]], i: int) -> str:
    return names[i] if names is not None else f"text {i}"


def _blank_ids(tokenizer, task: ClozeTask, text: str, where: str) -> tuple[list[int], int]:
    """The rendered template's ids (the blank as ``[MASK]``) and the blank's index."""
    mask_id = tokenizer.mask_ids.get("MASK")
    if mask_id is None:
        raise InputError(f"the {tokenizer.family} tokenizer has no {MASK} token, which cloze scoring puts in the "
                         f"blank; use the tokenizer of the model's release")
    rendered = task.render(text)
    blanks = sum(rendered.count(m) for m in (MASK, *OTHER_MASKS))
    if blanks != 1:
        raise InputError(f"{where} contains a mask token ([MASK], [sMASK] or [gMASK]) of its own; the template's "
                         f"blank must be the only one: remove it from the text")
    ids = encode_blank_text(tokenizer, rendered)
    return ids, ids.index(mask_id)


def _part_a(tokenizer, ids: list[int]) -> list[int]:
    # THUDM's build_input_from_ids wraps Part A as [CLS] A <eos> (GLM's build_inputs) even when the blank
    # ends the text, as glm.data's [MASK] spans never cover the eos; a release without [CLS] (ChatGLM-6B)
    # takes the text as it is, as glm's infilling does (tokenizer.infill_prompt).
    return tokenizer.build_inputs(ids) if tokenizer.cls_id is not None else tokenizer.infill_prompt(ids)


def _sequences(model: GLM, tokenizer, task: ClozeTask, texts: Sequence[str],
               names: Optional[Sequence[str]] = None) -> list[_Scored]:
    """The ``len(texts) * len(task.labels)`` sequences of `label_scores`, text-major."""
    cfg = model.config
    verbal = task.verbalizer_ids(tokenizer)
    limit = cfg.max_positions
    out: list[_Scored] = []
    if cfg.position_streams == 2:
        if tokenizer.sop_id is None or tokenizer.eop_id is None:
            raise InputError(f"the {tokenizer.family} tokenizer has no <sop>/<eop>, which a 2D-position model "
                             f"(family {cfg.family}) fills blanks with; use the tokenizer of the model's release")
        single = all(len(v) == 1 for v in verbal)
        longest = max(len(v) for v in verbal) + (0 if single else 1)
        if longest >= limit:
            raise InputError(f"a verbalizer of {longest - 1} tokens takes the blank's block position past the "
                             f"model's {limit} positions; use shorter verbalizers")
        for i, text in enumerate(texts):
            ids, _ = _blank_ids(tokenizer, task, text, _name(names, i))
            part_a = _part_a(tokenizer, ids)
            if len(part_a) > limit:
                raise InputError(f"{_name(names, i)} is {len(part_a)} tokens in the template, more than the model's "
                                 f"{limit} positions; shorten the text")
            slot = part_a.index(tokenizer.mask_ids["MASK"])
            for v in verbal:
                span = [] if single else v  # fed after <sop>; the scored tokens are each one slot later
                targets = list(v) if single else [*v, tokenizer.eop_id]
                pos, block = positions.blank_layout(len(part_a), [slot], [len(span)])
                out.append(_Scored(part_a + [tokenizer.sop_id] + span, [pos, block], len(part_a), len(part_a),
                                   targets))
        return out
    if not tokenizer.eos_ids:
        raise InputError(f"the {tokenizer.family} tokenizer names no eos token, which ends a scored text")
    eos = tokenizer.eos_ids[0]
    for i, text in enumerate(texts):
        ids, m = _blank_ids(tokenizer, task, text, _name(names, i))
        prompt = tokenizer.build_inputs(ids[:m])
        for v in verbal:
            targets = [*v, *ids[m + 1:], eos]
            seq = prompt + targets[:-1]
            if len(seq) > limit:
                raise InputError(f"{_name(names, i)} is {len(seq)} tokens in the template with a verbalizer, more "
                                 f"than the model's {limit} positions; shorten the text")
            if not prompt:
                raise InputError(f"{_name(names, i)}: the {tokenizer.family} tokenizer's build_inputs gave an empty "
                                 f"prompt for the text before the blank")
            out.append(_Scored(seq, [list(range(len(seq)))], 0, len(prompt) - 1, targets))
    return out


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_ids[0]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _score(model: GLM, rows: Sequence[_Scored], pad_id: int) -> Tensor:
    """Sum of the log-probabilities of each row's targets ([len(rows)] fp32), one forward for all rows.

    Rows are right-padded: a pad comes after every real token, so causal attention keeps it out of
    their view, and the prefix covers Part A only. The vocabulary is projected only where a target is."""
    device = _device(model)
    B, T = len(rows), max(len(r.ids) for r in rows)
    S = model.config.position_streams
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, S, T), dtype=torch.long)
    at = torch.zeros((B, T), dtype=torch.bool)
    targets: list[int] = []
    for b, r in enumerate(rows):
        n = len(r.ids)
        ids[b, :n] = torch.tensor(r.ids)
        pos[b, :, :n] = torch.tensor(r.position_ids)
        at[b, r.start:r.start + len(r.targets)] = True
        targets += r.targets
    prefix = torch.tensor([r.prefix_len for r in rows], device=device) if S == 2 else None
    at = at.to(device)
    logits = model(ids.to(device), pos.to(device), prefix_len=prefix, logits_at=at)  # [N, V], row-major
    logp = logits.float().log_softmax(-1).gather(1, torch.tensor(targets, device=device)[:, None])[:, 0]
    row = at.nonzero()[:, 0]
    return torch.zeros(B, device=device).index_add(0, row, logp)


def _batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    return batch_size


def label_scores(model: GLM, tokenizer, task: ClozeTask, texts: Sequence[str], *, batch_size: int = 16,
                 names: Optional[Sequence[str]] = None) -> Tensor:
    """``[len(texts), len(task.labels)]`` fp32: the log-probability of each label's verbalizer filling the
    blank of each text (the module docstring gives the rule per family). One sequence per (text, label),
    ``batch_size`` sequences per forward; differentiable when grad is enabled. ``names`` (one per text,
    e.g. ``"train.jsonl:12"``) name a text in errors instead of its index."""
    texts = _check_texts(texts)
    batch_size = _batch_size(batch_size)
    if names is not None and len(names) != len(texts):
        raise InputError(f"names has {len(names)} entries for {len(texts)} texts; give one per text")
    model.check_runnable()
    rows = _sequences(model, tokenizer, task, texts, names)
    pad = _pad_id(tokenizer)
    scores = torch.cat([_score(model, rows[i:i + batch_size], pad) for i in range(0, len(rows), batch_size)])
    return scores.view(len(texts), len(task.labels))


def check_texts(model: GLM, tokenizer, task: ClozeTask, texts: Sequence[str],
                names: Optional[Sequence[str]] = None) -> None:
    """Every check `label_scores` makes of ``texts`` (length, stray masks, verbalizers), without a forward:
    run it on a data file before training so a bad row is named before any step."""
    texts = _check_texts(texts)
    if names is not None and len(names) != len(texts):
        raise InputError(f"names has {len(names)} entries for {len(texts)} texts; give one per text")
    _sequences(model, tokenizer, task, texts, names)


def _check_labels(texts: Sequence[str], labels: Sequence[str]) -> None:
    if isinstance(labels, str) or not isinstance(labels, Sequence) or len(labels) != len(texts):
        got = len(labels) if isinstance(labels, Sequence) and not isinstance(labels, str) else repr(labels)
        raise InputError(f"labels must be a list with one label per text ({len(texts)}), got {got}")


def cloze_loss(model: GLM, tokenizer, task: ClozeTask, texts: Sequence[str], labels: Sequence[str], *,
               batch_size: int = 16) -> Tensor:
    """Mean cross entropy of the true labels under the softmax of `label_scores` (finetune_glm.py's
    default loss; for a single-token task the same as THUDM's CE over the raw verbalizer logits, since
    the log-softmax over the vocabulary shifts every label's score of a text by the same amount)."""
    texts = _check_texts(texts)
    _check_labels(texts, labels)
    target = task.label_index(labels)
    scores = label_scores(model, tokenizer, task, texts, batch_size=batch_size)
    return F.cross_entropy(scores, target.to(scores.device))


def _as_dicts(task: ClozeTask, probs: Tensor) -> list[dict[str, float]]:
    return [dict(zip(task.labels, row)) for row in probs.tolist()]


@torch.no_grad()
def predict(model: GLM, tokenizer, task: ClozeTask, texts: Sequence[str], *,
            batch_size: int = 16) -> list[dict[str, float]]:
    """Each text's label probabilities (softmax of `label_scores`), ``{label: probability}``. With the
    pretrained model this is zero-shot cloze classification."""
    return _as_dicts(task, label_scores(model, tokenizer, task, texts, batch_size=batch_size).softmax(-1))


# ---------------------------------------------------------------------------------------------
# The classification-head baseline

class ClassificationHead(nn.Module):
    """THUDM/GLM's PoolingModel head: ``Linear(H, H)`` -> tanh -> dropout -> ``Linear(H, num_labels)``
    on one final hidden state ([N, H] -> logits [N, num_labels])."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.0):
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("num_labels", num_labels)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"ClassificationHead {name} must be a whole number >= 1, got {v!r}")
        if not 0 <= dropout < 1:
            raise InputError(f"ClassificationHead dropout must lie in [0, 1), got {dropout!r}")
        self.pool = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.out(self.dropout(torch.tanh(self.pool(hidden.to(self.out.weight.dtype)))))


def _head_inputs(model: GLM, tokenizer, texts: Sequence[str]) -> list[list[int]]:
    limit = model.config.max_positions
    out = []
    for i, text in enumerate(texts):
        ids = tokenizer.build_inputs(tokenizer.encode(text))
        if not ids:
            raise InputError(f"text {i} is empty; a classified text needs at least one token")
        if len(ids) > limit:
            raise InputError(f"text {i} is {len(ids)} tokens, more than the model's {limit} positions; shorten it")
        out.append(ids)
    return out


def head_logits(model: GLM, head: ClassificationHead, tokenizer, task: ClozeTask, texts: Sequence[str], *,
                batch_size: int = 16) -> Tensor:
    """``[len(texts), len(task.labels)]`` logits of ``head`` on the final hidden state at the last token of
    each text in the release's input format (``tokenizer.build_inputs``). Rows are left-padded so that
    token is the last slot of every row; 2D families attend over the whole text bidirectionally (THUDM's
    classifier reads [CLS] under that attention, which sees the same tokens)."""
    texts = _check_texts(texts)
    batch_size = _batch_size(batch_size)
    if not isinstance(head, ClassificationHead):
        raise InputError(f"head must be a ClassificationHead, got {type(head).__name__}")
    if head.out.out_features != len(task.labels):
        raise InputError(f"the head has {head.out.out_features} outputs but the task {len(task.labels)} labels; "
                         f"make it with ClassificationHead(hidden_size, {len(task.labels)})")
    if head.pool.in_features != model.config.hidden_size:
        H = model.config.hidden_size
        raise InputError(f"the head reads {head.pool.in_features} hidden features but the model has {H}; make it "
                         f"with ClassificationHead({H}, {len(task.labels)})")
    model.check_runnable()
    inputs = _head_inputs(model, tokenizer, texts)
    device = _device(model)
    out = []
    for i in range(0, len(inputs), batch_size):
        ids, pad_left = left_pad(inputs[i:i + batch_size], _pad_id(tokenizer))
        B, T = ids.shape
        prefix = torch.full((B,), T, device=device) if model.config.position_streams == 2 else None
        hidden = model(ids.to(device), pad_left=pad_left.to(device), prefix_len=prefix, last_only=True,
                       return_hidden=True)[:, -1]
        out.append(head(hidden))
    return torch.cat(out).float()


def head_loss(model: GLM, head: ClassificationHead, tokenizer, task: ClozeTask, texts: Sequence[str],
              labels: Sequence[str], *, batch_size: int = 16) -> Tensor:
    """Mean cross entropy of ``head``'s logits against the true labels."""
    texts = _check_texts(texts)
    _check_labels(texts, labels)
    target = task.label_index(labels)
    logits = head_logits(model, head, tokenizer, task, texts, batch_size=batch_size)
    return F.cross_entropy(logits, target.to(logits.device))


@torch.no_grad()
def head_predict(model: GLM, head: ClassificationHead, tokenizer, task: ClozeTask, texts: Sequence[str], *,
                 batch_size: int = 16) -> list[dict[str, float]]:
    """Each text's label probabilities under ``head`` (its dropout off), ``{label: probability}``."""
    was_training = head.training
    head.eval()
    try:
        logits = head_logits(model, head, tokenizer, task, texts, batch_size=batch_size)
    finally:
        head.train(was_training)
    return _as_dicts(task, logits.softmax(-1))


# ---------------------------------------------------------------------------------------------

def accuracy(probs_or_preds: Sequence, labels: Sequence[str]) -> float:
    """The fraction of examples whose prediction is their label. A prediction is a label, or a
    ``{label: probability}`` dict (`predict`, `head_predict`) whose most probable label counts (ties: the
    first in the dict's order)."""
    if isinstance(labels, str) or not isinstance(labels, Sequence) or not labels:
        raise InputError("accuracy needs a non-empty list of labels")
    if isinstance(probs_or_preds, (str, Mapping)) or not isinstance(probs_or_preds, Sequence):
        raise InputError(f"accuracy takes a list of predictions, got {type(probs_or_preds).__name__}")
    if len(probs_or_preds) != len(labels):
        raise InputError(f"accuracy got {len(probs_or_preds)} predictions for {len(labels)} labels")
    preds = [max(p, key=p.get) if isinstance(p, Mapping) else p for p in probs_or_preds]
    return sum(p == y for p, y in zip(preds, labels)) / len(labels)
