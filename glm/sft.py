"""Supervised fine-tuning data: conversations and prompt/response pairs encoded in each release's own
fine-tuning layout, with the loss on the assistant's tokens only.

    from glm.sft import load_jsonl, collate, model_inputs
    examples = load_jsonl("train.jsonl", tok, "chatglm3")
    batch = collate(examples[:8], tok.pad_id)
    logits = model(**model_inputs(batch), logits_at=batch["labels"] != IGNORE)

A row is ``{"messages": [{"role": "system"|"user"|"assistant"|"observation", "content": ...}, ...]}``
(``"conversations"`` is read the same way, as ChatGLM3's finetune_demo names it) or
``{"prompt": ..., "response": ..., "history": [[query, answer], ...]}`` (THUDM's ptuning data; history is
optional). Other top-level keys are ignored.

Labels follow glm's trainer convention (`glm.data.Batch`): ``labels[t]`` is the token the model must
predict at slot ``t`` (already shifted; -100 = no loss). The references keep HF's unshifted labels and
shift inside the model; every layout below is written in their terms and shifted once here.

Layouts (docs: "Supervised fine-tuning"; GLM_ADAPT_SPEC §2, §3):

- ``chatglm`` (ChatGLM-6B ``ptuning/main.py`` preprocess_function_train): ``a + [gMASK] <sop> b <eop>``,
  ``a`` the round prompt cut to ``max_source_len - 1`` ids, ``b`` the response cut to
  ``max_target_len - 2``; loss from ``<sop>`` on (so ``[gMASK]`` predicts ``<sop>``); 2D positions, the
  context up to ``<sop>`` bidirectional.
- ``chatglm2`` (ChatGLM2-6B ``ptuning/main.py``): ``([gMASK] sop + prompt)[:max_source_len] + b + </s>``,
  ``b`` cut to ``max_target_len``; loss on ``b`` and ``</s>``.
- ``chatglm3`` / ``glm4`` (ChatGLM3 ``finetune_demo/finetune_hf.py``, GLM-4 ``finetune_demo/finetune.py``
  process_batch): ``[gMASK] sop`` then every message as the chat format writes it, then ``</s>``
  (ChatGLM3) or ``<|user|>`` (GLM-4); every token of an assistant message predicts the next one (its
  content, and the role token or end that follows it); the whole sequence cut to
  ``max_source_len + max_target_len + 1``.
- ``glm`` (THUDM/GLM ``tasks/seq2seq/dataset.py``): Part A ``[CLS] prompt [gMASK]`` (prompt cut to
  ``max_source_len - 2``), Part B ``<sop> answer`` with targets ``answer <eop>`` (cut to
  ``max_target_len``), 2D positions by `glm.positions.blank_layout`, Part A bidirectional.

ChatGLM-6B/2 and original GLM train one response per row; earlier turns are the prompt's history.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import positions
from .corpus import jsonl_objects
from .errors import ArgumentError, DataError, TokenizerError
from .tokenizer import Tokenizer, canonical_family

IGNORE = -100  # a label that gets no loss (torch's cross_entropy ignore_index default)
ROLES = ("system", "user", "assistant", "observation")
# ChatGLM-6B ptuning/arguments.py defaults (max_source_length 1024, max_target_length 128).
DEFAULT_MAX_SOURCE_LEN = 1024
DEFAULT_MAX_TARGET_LEN = 128


@dataclass
class SFTExample:
    """One encoded row. ``labels[t]`` is the target of slot ``t`` (-100: none); ``position_ids`` are
    ``[position, block_position]`` for 2D families, None where the plain count applies; the first
    ``prefix_len`` slots are seen bidirectionally (0: causal); ``line`` is the 1-based source line."""

    input_ids: list[int]
    labels: list[int]
    position_ids: Optional[list[list[int]]] = None
    prefix_len: int = 0
    line: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def _at(where: str, line: int) -> str:
    return f"{where} line {line}" if line else where


# ---------------------------------------------------------------------------------------------
# Rows -> messages

def _check_len_arg(name: str, value: Any, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ArgumentError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _messages(row: Any, at: str) -> list[dict]:
    """The row as a list of ``{"role", "content"[, "metadata", "tools"]}`` dicts, checked."""
    if not isinstance(row, Mapping):
        raise DataError(f"{at}: a JSON {type(row).__name__}, not an object; each row is "
                        f"{{\"messages\": [...]}} or {{\"prompt\": ..., \"response\": ...}}")
    key = "messages" if "messages" in row else "conversations" if "conversations" in row else None
    pair = "prompt" in row or "response" in row
    if key and pair:
        raise DataError(f"{at}: has both \"{key}\" and \"prompt\"/\"response\"; keep one form per row")
    if key:
        msgs = row[key]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{at}: \"{key}\" must be a non-empty list of {{\"role\": ..., \"content\": ...}} "
                            f"objects, got {json.dumps(msgs, ensure_ascii=False)[:60]}")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, Mapping):
                raise DataError(f"{at}: message {i} is a JSON {type(m).__name__}; write it as "
                                f"{{\"role\": ..., \"content\": ...}}")
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise DataError(f"{at}: message {i} has role {role!r}; use one of {', '.join(ROLES)} (a tool's "
                                f"result is an \"observation\" message)")
            if not isinstance(content, str) or not content:
                what = "has no \"content\"" if content is None else f"has content {content!r}"
                raise DataError(f"{at}: message {i} ({role}) {what}; give it a non-empty string, or drop the "
                                f"message")
            metadata = m.get("metadata", "")
            if metadata is None:
                metadata = ""
            if not isinstance(metadata, str):
                raise DataError(f"{at}: message {i}'s \"metadata\" must be a string (e.g. a tool name), got "
                                f"{metadata!r}")
            msg = {"role": role, "content": content, "metadata": metadata}
            if "tools" in m and m["tools"] is not None:
                if role != "system":
                    raise DataError(f"{at}: message {i} ({role}) has \"tools\"; tool descriptions belong to "
                                    f"the system message")
                msg["tools"] = m["tools"]
            out.append(msg)
    elif pair:
        prompt, response = row.get("prompt"), row.get("response")
        for name, v in (("prompt", prompt), ("response", response)):
            if not isinstance(v, str) or not v:
                raise DataError(f"{at}: \"{name}\" must be a non-empty string, got {v!r}")
        history = row.get("history") or []
        if not isinstance(history, list):
            raise DataError(f"{at}: \"history\" must be a list of [query, answer] pairs, got {history!r}")
        out = []
        for i, turn in enumerate(history):
            if (not isinstance(turn, (list, tuple)) or len(turn) != 2
                    or not all(isinstance(x, str) and x for x in turn)):
                raise DataError(f"{at}: history entry {i} must be a [query, answer] pair of non-empty strings, "
                                f"got {json.dumps(turn, ensure_ascii=False)[:60]}")
            out += [{"role": "user", "content": turn[0], "metadata": ""},
                    {"role": "assistant", "content": turn[1], "metadata": ""}]
        out += [{"role": "user", "content": prompt, "metadata": ""},
                {"role": "assistant", "content": response, "metadata": ""}]
    else:
        raise DataError(f"{at}: needs \"messages\" (a conversation) or \"prompt\" and \"response\"; got keys "
                        f"{sorted(row)}")
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{at}: no assistant message, so nothing to learn; add the reply as "
                        f"{{\"role\": \"assistant\", \"content\": ...}}")
    return out


def _rounds(msgs: list[dict], family: str, at: str) -> tuple[list[tuple[str, str]], str, str]:
    """(history pairs, query, response) of a conversation in a one-reply-per-row family."""
    roles = [m["role"] for m in msgs]
    unsupported = [r for r in roles if r in ("system", "observation")]
    if unsupported or any(m["metadata"] or "tools" in m for m in msgs):
        what = f"{unsupported[0]} role" if unsupported else "message metadata or tools"
        raise DataError(f"{at}: the {family} format has no {what}; write the row as alternating user/assistant "
                        f"messages (fold a system text into the first user message)")
    if len(msgs) % 2 or roles != ["user", "assistant"] * (len(msgs) // 2):
        raise DataError(f"{at}: the {family} format takes alternating user/assistant messages ending with the "
                        f"assistant's reply; got roles {roles}")
    pairs = [(q["content"], a["content"]) for q, a in zip(msgs[0::2], msgs[1::2])]
    return pairs[:-1], pairs[-1][0], pairs[-1][1]


# ---------------------------------------------------------------------------------------------
# Per-family layouts: (input_ids, labels, position_ids or None, prefix_len)

Layout = tuple[list[int], list[int], Optional[list[list[int]]], int]


def _shifted(ids: list[int], trained: list[bool]) -> list[int]:
    """Aligned labels: slot ``t`` predicts ``ids[t + 1]`` where ``trained[t]``."""
    return [ids[t + 1] if trained[t] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


def _from(ids: list[int], start: int, pad_id: Optional[int]) -> list[int]:
    """Aligned labels predicting every token from slot ``start`` on; with ``pad_id``, targets equal to it get
    no loss (THUDM ptuning's ignore_pad_token_for_loss, on by default)."""
    labels = [IGNORE] * max(start - 1, 0) + ids[max(start, 1):] + [IGNORE]
    return [IGNORE if pad_id is not None and x == pad_id else x for x in labels]


def _chatglm6b(tok: Tokenizer, msgs: list[dict], src: int, tgt: int, at: str) -> Layout:
    history, query, response = _rounds(msgs, "chatglm", at)
    # the chat prompt of ChatGLM-6B (0-based rounds), as tok.chat_ids builds it
    prompt = query if not history else (
        "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
        + f"[Round {len(history)}]\n问：{query}\n答：")
    a = tok.encode(prompt)[:src - 1]
    b = tok.encode(response)[:tgt - 2]
    ids = tok.build_inputs(a) + b + [tok.eop_id]
    ctx = ids.index(tok.sop_id)  # the reference's context_length: input_ids.index(bos)
    mask_slot = ids.index(tok.token_id("[gMASK]"))
    pos, block = positions.blank_layout(ctx, [mask_slot], [len(ids) - ctx - 1])
    return ids, _from(ids, ctx, tok.pad_id), [pos, block], ctx


def _chatglm2(tok: Tokenizer, msgs: list[dict], src: int, tgt: int, at: str) -> Layout:
    history, query, response = _rounds(msgs, "chatglm2", at)
    # tokenizer.build_prompt (1-based rounds, blank lines), wrapped with [gMASK] sop, cut to max_source_len
    prompt = "".join(f"[Round {i}]\n\n问：{q}\n\n答：{r}\n\n" for i, (q, r) in enumerate(history, 1))
    prompt += f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："
    a = tok.build_inputs(tok.encode(prompt)[:max(src - 2, 0)])
    b = tok.encode(response)[:tgt]
    ids = a + b + [tok.eos_ids[0]]
    return ids, _from(ids, len(a), tok.pad_id), None, 0


@dataclass(frozen=True)
class ChatStyle:
    """How a release's chat format writes one message and ends a training row (the two releases with
    role tokens differ in these three points only)."""
    name: str
    metadata_apart: bool  # ChatGLM3's build_single_message encodes metadata + "\n" and the content apart
    takes_tools: bool  # ChatGLM3 renders a system message's "tools" into its content
    row_end: str  # the token after the last message: ChatGLM3's eos, GLM-4's <|user|> (its chat EOS)


CHATGLM3 = ChatStyle("chatglm3", metadata_apart=True, takes_tools=True, row_end="</s>")
GLM4 = ChatStyle("glm4", metadata_apart=False, takes_tools=False, row_end="<|user|>")


def _message_ids(tok: Tokenizer, m: dict, style: ChatStyle, at: str, i: int) -> list[int]:
    """One message as the release's chat format writes it (tok.chat_ids' per-message rule)."""
    role_id = tok.token_id(f"<|{m['role']}|>")
    content = m["content"]
    if "tools" in m:
        if not style.takes_tools:
            raise DataError(f"{at}: message {i} has \"tools\", but glm does not reproduce the {style.name} tools "
                            f"system prompt; render the tool descriptions into the system message's content")
        try:
            content = content + "\n" + json.dumps(m["tools"], indent=4, ensure_ascii=False)
        except (TypeError, ValueError) as e:
            raise DataError(f"{at}: message {i}'s \"tools\" must be JSON data: {e}") from None
    if style.metadata_apart:
        # build_single_message: role token, encode(metadata + "\n"), encode(content), two encodes
        return [role_id] + tok.encode(f"{m['metadata']}\n") + tok.encode(content)
    # GLM-4's template: <|role|>{metadata}\n{content}, the text encoded as one piece of text
    return [role_id] + tok.encode(f"{m['metadata']}\n{content}")


def _chat_messages(tok: Tokenizer, msgs: list[dict], src: int, tgt: int, at: str, style: ChatStyle) -> Layout:
    ids = tok.build_inputs([])  # [gMASK] sop
    trained = [False] * len(ids)
    for i, m in enumerate(msgs):
        part = _message_ids(tok, m, style, at, i)
        ids += part
        # Only the assistant's tokens are trained; ChatGLM3's current finetune_hf.py also trains observation
        # messages (every role but system/user), its earlier finetune_chatmodel_demo and GLM-4 do not.
        trained += [m["role"] == "assistant"] * len(part)
    ids.append(tok.eos_ids[0] if style.row_end == "</s>" else tok.token_id(style.row_end))
    trained.append(False)
    limit = src + tgt + 1
    ids, trained = ids[:limit], trained[:limit]
    return ids, _shifted(ids, trained), None, 0


def _glm(tok: Tokenizer, msgs: list[dict], src: int, tgt: int, at: str) -> Layout:
    roles = [m["role"] for m in msgs]
    if roles != ["user", "assistant"] or msgs[0]["metadata"] or msgs[1]["metadata"]:
        raise DataError(f"{at}: the glm family has no chat format: give one user message and the assistant's "
                        f"reply (or \"prompt\"/\"response\" without history); got roles {roles}")
    prompt = tok.encode(msgs[0]["content"])[:max(src - 2, 0)]
    part_a = tok.infill_prompt(prompt + [tok.token_id("[gMASK]")])  # [CLS] prompt [gMASK], as generation
    span = (tok.encode(msgs[1]["content"]) + [tok.eop_id])[:tgt]
    ids = part_a + [tok.sop_id] + span[:-1]
    mask_slot = len(part_a) - 1 - part_a[::-1].index(tok.token_id("[gMASK]"))
    pos, block = positions.blank_layout(len(part_a), [mask_slot], [len(span) - 1])
    return ids, [IGNORE] * len(part_a) + span, [pos, block], len(part_a)


# family -> (layout, smallest max_source_len, smallest max_target_len) that leave one token of each
_LAYOUTS: dict[str, tuple[Callable[..., Layout], int, int]] = {
    "chatglm": (_chatglm6b, 2, 3),
    "chatglm2": (_chatglm2, 3, 1),
    "chatglm3": (partial(_chat_messages, style=CHATGLM3), 1, 1),
    "glm4": (partial(_chat_messages, style=GLM4), 1, 1),
    "glm": (_glm, 3, 1),
}


def resolve_family(family: Any, tokenizer: Tokenizer) -> str:
    """The tokenizer family whose fine-tuning layout ``family`` (a model or tokenizer family name) uses,
    checked against ``tokenizer``."""
    try:
        fam = canonical_family(family, "family")
    except TokenizerError as e:
        raise ArgumentError(str(e)) from None
    if getattr(tokenizer, "family", None) != fam:
        raise ArgumentError(f"family {family!r} fine-tunes with the {fam} tokenizer, but the tokenizer given is "
                            f"{tokenizer!r}; load the model's own tokenizer")
    return fam


def encode_row(row: Mapping, tokenizer: Tokenizer, family: str, *, max_source_len: int = DEFAULT_MAX_SOURCE_LEN,
               max_target_len: int = DEFAULT_MAX_TARGET_LEN, max_positions: Optional[int] = None, line: int = 0,
               where: str = "data") -> SFTExample:
    """One row in ``family``'s fine-tuning layout (module docstring). ``max_source_len`` /
    ``max_target_len`` cut the prompt and the answer as the family's reference script does; a row that
    still needs more than ``max_positions`` positions, or keeps no trained token, is a `DataError`
    naming ``where`` and ``line``."""
    fam = resolve_family(family, tokenizer)
    layout, min_src, min_tgt = _LAYOUTS[fam]
    src = _check_len_arg("max_source_len", max_source_len, min_src)
    tgt = _check_len_arg("max_target_len", max_target_len, min_tgt)
    if max_positions is not None:
        _check_len_arg("max_positions", max_positions, 1)
    at = _at(where, line)
    msgs = _messages(row, at)
    try:
        ids, labels, pos, prefix = layout(tokenizer, msgs, src, tgt, at)
    except TokenizerError as e:
        raise DataError(f"{at}: {e}") from None
    if all(label == IGNORE for label in labels):
        raise DataError(f"{at}: no answer token is left after cutting the row to the length limits "
                        f"(max_source_len={src}, max_target_len={tgt}); raise them or shorten the row")
    if max_positions is not None:
        need = max(max(p) for p in pos) + 1 if pos is not None else len(ids)
        if need > max_positions:
            raise DataError(f"{at}: the row needs {need} positions after cutting it to max_source_len={src}, "
                            f"max_target_len={tgt}, more than the model's {max_positions}; lower those limits "
                            f"or shorten the row")
    return SFTExample(ids, labels, pos, prefix, line)


def load_jsonl(path: str, tokenizer: Tokenizer, family: str, *, max_source_len: int = DEFAULT_MAX_SOURCE_LEN,
               max_target_len: int = DEFAULT_MAX_TARGET_LEN, max_positions: Optional[int] = None) -> list[SFTExample]:
    """Every row of a JSONL file (one JSON object per non-blank line), encoded by `encode_row`; errors
    name ``path`` and the line."""
    path = os.fspath(path)
    resolve_family(family, tokenizer)  # argument errors before the file is read
    try:
        rows = jsonl_objects(path, example='{"messages": [...]} or {"prompt": "...", "response": "..."}')
    except DataError as e:
        if "the file is empty" not in str(e):
            raise
        rows = []
    out = [encode_row(row, tokenizer, family, max_source_len=max_source_len, max_target_len=max_target_len,
                      max_positions=max_positions, line=lineno, where=path) for lineno, row in rows]
    if not out:
        raise DataError(f"{path}: the file holds no rows; write one JSON object per line")
    return out


# ---------------------------------------------------------------------------------------------
# Batches

def collate(examples: Sequence[SFTExample], pad_id: int) -> dict[str, Tensor]:
    """Right-pad ``examples`` into tensors: ``input_ids`` ``[B, T]`` (pads ``pad_id``), ``labels`` ``[B, T]``
    (pads -100), ``position_ids`` ``[B, 2, T]`` for 2D families (pads at 0) or ``[B, T]`` counting from 0,
    ``prefix_len`` ``[B]``, ``lengths`` ``[B]``.

    Right padding needs no ``pad_left``: every real query comes before the pads, so causal attention
    never reaches them, and a bidirectional prefix ends before them."""
    if not examples:
        raise DataError("collate got no examples")
    two_d = {e.position_ids is not None for e in examples}
    if len(two_d) > 1:
        raise DataError("collate got examples of 2D and 1D families together; batch one family's examples")
    B, T = len(examples), max(len(e) for e in examples)
    ids = torch.full((B, T), int(pad_id), dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    prefix = torch.tensor([e.prefix_len for e in examples], dtype=torch.long)
    lengths = torch.tensor([len(e) for e in examples], dtype=torch.long)
    if two_d.pop():
        pos = torch.zeros((B, 2, T), dtype=torch.long)
    else:
        pos = torch.arange(T).expand(B, T).clone()
    for i, e in enumerate(examples):
        n = len(e)
        if len(e.labels) != n:
            raise DataError(f"example {i} (line {e.line}) has {len(e.labels)} labels for {n} tokens")
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        if e.position_ids is not None:
            pos[i, :, :n] = torch.tensor(e.position_ids)
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "prefix_len": prefix, "lengths": lengths}


def model_inputs(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The keyword arguments of ``model(...)`` in a `collate` batch."""
    return {k: batch[k] for k in ("input_ids", "position_ids", "prefix_len")}


def loss_sum(model: torch.nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, int]:
    """Sum of the token cross entropies (fp32) over the batch's labelled slots, and how many there are.
    The model projects onto the vocabulary only at those slots."""
    trained = batch["labels"] != IGNORE
    logits = model(**model_inputs(batch), logits_at=trained)
    return F.cross_entropy(logits.float(), batch["labels"][trained], reduction="sum"), int(trained.sum())


__all__ = ["IGNORE", "ROLES", "DEFAULT_MAX_SOURCE_LEN", "DEFAULT_MAX_TARGET_LEN", "SFTExample", "encode_row",
           "load_jsonl", "collate", "model_inputs", "loss_sum", "resolve_family"]
