"""Pretraining data: GLM's blank-infilling objective (GLM_SPEC §4), the causal-LM and prefix-LM
objectives it is compared with, and the typed `Batch` that carries a batch from the span masker to
the model and the loss without anything being re-derived on the way.

    from glm.data import Collator, Objective, SpecialIds, sentence_end_ids
    special = SpecialIds.from_tokenizer(tok)
    collate = Collator(special, max_len=512, pack=True, is_sentence_end=sentence_end_ids(tok))
    batch = collate(documents, rng=np.random.default_rng(0))     # documents: lists of token ids
    loss = batch.loss(model(**batch.model_inputs()))

One sample is one document: its *text* is ``[CLS]? + document + [eos]?`` (``Objective.add_cls`` /
``add_eos``). Blank infilling turns the text into ``Part A ‖ Part B``:

- Part A: the text with every span replaced by one mask token, at positions ``0 .. |A|-1``, block
  position 0, attended bidirectionally (``prefix_len = |A|``), no loss;
- Part B: for each span (shuffled), inputs ``[sop] + span`` and targets ``span + [eop]``, all at the
  position of the span's mask in Part A, block positions ``1 .. len+1``, causal, with loss.

Rows are right-padded (pad id, position 0, no loss). With ``pack=True`` several samples share a row;
each keeps its own positions (restarting at 0), and ``doc_start`` / per-query ``prefix_len`` keep
attention inside each document. All randomness comes from an explicit ``numpy.random.Generator``.

The trainer's causal and prefix LM do not make one sample per document: `join_documents` joins the
documents, each followed by a separator, into one token stream, and `PackedRows` reads full rows of
it (no inserted token, no padding) at a random offset and in a random order per epoch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Collection, Literal, Optional, Sequence, Union, get_args

import numpy as np
import torch
from torch import Tensor

from . import positions
from .errors import DataError
from .model import lm_loss

Kind = Literal["glm", "causal", "prefix"]
BlankMode = Literal["token", "sentence", "document"]
LMMode = Literal["causal", "prefix"]
Mode = Literal[BlankMode, LMMode]
BatchMode = Literal[Mode, "mixed"]  # "mixed": samples made in different modes, batched together
KINDS: tuple[Kind, ...] = get_args(Kind)
BLANK_MODES: tuple[BlankMode, ...] = get_args(BlankMode)
SENTENCE_END_CHARS = ".?!;:\n"
RngLike = Union[np.random.Generator, int]
SentenceEnd = Union[Callable[[int], bool], Collection[int]]


def as_rng(rng: RngLike) -> np.random.Generator:
    """A ``numpy.random.Generator``: passed through, or seeded from an int. Never the global RNG."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise DataError(f"rng must be a numpy.random.Generator or an int seed, got {type(rng).__name__}; "
                    f"pass np.random.default_rng(seed)")


def batch_rng(seed: int, step: int) -> np.random.Generator:
    """The generator for batch ``step`` of a run seeded ``seed``: batch ``step`` is then the same whatever
    order data-loader workers produce batches in, and a resumed run redraws it identically."""
    return np.random.default_rng([int(seed), int(step)])


# ---------------------------------------------------------------------------------------------
# Special tokens

@dataclass(frozen=True)
class SpecialIds:
    """The ids the objectives insert. ``cls`` is optional (ChatGLM-6B and later have no [CLS])."""

    mask: int
    smask: int
    gmask: int
    sop: int
    eop: int
    eos: int
    pad: int
    cls: Optional[int] = None

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None and f.name == "cls":
                continue
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
                raise DataError(f"SpecialIds.{f.name} must be a non-negative token id, got {v!r}")
            object.__setattr__(self, f.name, int(v))

    @classmethod
    def from_tokenizer(cls, tok, eos: Optional[int] = None) -> "SpecialIds":
        """From a `glm.tokenizer` tokenizer (``mask_ids``, ``sop_id``, ``eop_id``, ``cls_id``, ``eos_ids``,
        ``pad_id``). ``eos`` (the id that ends every document) defaults to ``tok.eos_ids[0]``; it must
        differ from every id the layout inserts itself. ChatGLM-6B's generation eos is ``<eop>``, which is
        also the span end, so pass its end-of-text ``</s>`` there (``end_of_text_id(tok)``). Without a
        pad id the eos id pads (padding never gets loss or attention)."""
        masks = dict(tok.mask_ids)
        missing = [k for k in ("MASK", "sMASK", "gMASK") if k not in masks]
        if missing:
            raise DataError(f"tokenizer {tok!r} has no {missing} token(s); blank infilling needs [MASK], [sMASK] "
                            f"and [gMASK]: build SpecialIds(...) by hand for a tokenizer without them")
        if tok.sop_id is None or tok.eop_id is None or (eos is None and not tok.eos_ids):
            raise DataError(f"tokenizer {tok!r} lacks sop, eop or eos ids; build SpecialIds(...) by hand")
        resolved = tok.eos_ids[0] if eos is None else eos
        special = cls(mask=masks["MASK"], smask=masks["sMASK"], gmask=masks["gMASK"], sop=tok.sop_id,
                      eop=tok.eop_id, eos=resolved, pad=tok.pad_id if tok.pad_id is not None else resolved,
                      cls=tok.cls_id)
        clash = [name for name, tid in special.inserted.items() if tid == special.eos]
        if clash:
            # Documents end in eos and Part B spans end in eop; one id for both would put the span end
            # inside Part A and make a [gMASK] suffix's targets end twice (<eop> <eop>).
            where = "eos" if eos is not None else "its first eos id (tok.eos_ids[0])"
            end = end_of_text_id(tok)
            hint = (f"pass eos={end} (this tokenizer's end-of-text </s>)" if end is not None
                    else "pass eos= a distinct end-of-text id")
            raise DataError(f"tokenizer {tok!r}: {where} {special.eos} is also the {' and '.join(clash)} token the "
                            f"objective inserts itself (every document would end in a span end); {hint} to "
                            f"SpecialIds.from_tokenizer")
        return special

    @property
    def inserted(self) -> dict[str, int]:
        """The ids the blank-infilling layout inserts itself; a document must not contain them."""
        return {"[MASK]": self.mask, "[sMASK]": self.smask, "[gMASK]": self.gmask, "sop": self.sop, "eop": self.eop}

    @property
    def not_text(self) -> frozenset[int]:
        """Every id here: targets that are a document end, padding or a token the layout inserts, which
        held-out loss on real text leaves out."""
        return frozenset({*self.inserted.values(), self.eos, self.pad, *([] if self.cls is None else [self.cls])})


def end_of_text_id(tok) -> Optional[int]:
    """The SentencePiece ``</s>`` id of ``tok`` when it has one that is not already a special token, else
    None. ChatGLM-6B's release tokenizer names it ``end_token`` (its eos, ``<eop>``, ends a generation),
    which makes it the document end to use with `SpecialIds.from_tokenizer` for that family."""
    sp = getattr(tok, "sp", None)
    if sp is None:
        return None
    piece = int(sp.piece_to_id("</s>"))
    if piece < 0 or sp.id_to_piece(piece) != "</s>":  # piece_to_id answers unk for an unknown piece
        return None
    return piece + int(getattr(tok, "num_image_tokens", 0))


def sentence_end_ids(tok, chars: str = SENTENCE_END_CHARS) -> frozenset[int]:
    """Ids of the text tokens whose decoded text contains one of ``chars`` (GLM's sentence ends:
    ``. ? ! ; :`` and newline). Decodes the whole vocabulary once: keep the result."""
    specials = set(getattr(tok, "special_tokens", {}).values())
    return frozenset(i for i in range(tok.vocab_size)
                     if i not in specials and any(c in tok.decode([i]) for c in chars))


def _sentence_end_fn(is_end: Optional[SentenceEnd]) -> Callable[[int], bool]:
    if is_end is None:
        raise DataError("sentence mode needs is_sentence_end: pass sentence_end_ids(tokenizer) (a set of ids) "
                        "or a callable token_id -> bool, or set Objective.gap_sentence_prob=0")
    if callable(is_end):
        return is_end
    ids = frozenset(int(i) for i in is_end)
    return ids.__contains__


# ---------------------------------------------------------------------------------------------
# The objective

@dataclass
class Objective:
    """What a batch is trained on.

    ``kind="glm"``: blank infilling, each batch in one mode drawn by `mode_for_batch` — token spans
    ([MASK]) with ``bert_prob``, whole sentences ([sMASK]) with ``gap_sentence_prob``, one suffix
    ([gMASK]) with the rest. The defaults are GLM-10B's mix (THUDM ``config/ds_block_10B.sh``) with the
    ``ConstructBlockStrategy`` defaults for everything else (that script sets ``gpt_min_ratio 0.25``).
    ``kind="causal"`` / ``"prefix"``: the comparison objectives (left-to-right LM; LM with a random
    bidirectional prefix).
    """

    kind: Kind = "glm"
    bert_prob: float = 0.4
    gap_sentence_prob: float = 0.3
    mask_ratio: float = 0.15  # token mode: spans until this fraction of the document is masked
    gap_sentence_ratio: float = 0.15  # sentence mode: whole sentences until this fraction
    poisson_lambda: float = 3.0
    max_block_length: int = 40  # span lengths 1 .. max_block_length - 1
    gpt_min_ratio: float = 0.5  # document mode: the suffix is 50% .. all but one token of the text
    # Document mode, as THUDM: with this probability the [gMASK] sample is laid out "directly",
    # source ‖ [gMASK] ‖ sop ‖ suffix[:-1] with targets suffix -- the Part A/B layout minus its last
    # slot, so it has no eop to predict.
    gpt_infill_prob: float = 0.5
    shuffle_spans: bool = True
    add_cls: bool = True  # prepend SpecialIds.cls to every text (when the tokenizer has one); never masked
    add_eos: bool = True  # append SpecialIds.eos; never masked by token/sentence spans, ends the [gMASK] suffix

    def __post_init__(self):
        self.validate()

    @property
    def generation_prob(self) -> float:
        return max(0.0, 1.0 - self.bert_prob - self.gap_sentence_prob)

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"Objective.kind is {self.kind!r}; use 'glm', 'causal' or 'prefix'")
        for name in ("bert_prob", "gap_sentence_prob", "gpt_min_ratio", "gpt_infill_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise DataError(f"Objective.{name} is {v}; it must lie in [0, 1]")
        if self.bert_prob + self.gap_sentence_prob > 1.0 + 1e-9:
            raise DataError(f"Objective.bert_prob + gap_sentence_prob = {self.bert_prob + self.gap_sentence_prob} "
                            f"> 1; generation gets the rest, so the two must sum to at most 1")
        for name in ("mask_ratio", "gap_sentence_ratio"):
            v = getattr(self, name)
            # <= 0.5 keeps a gap token between spans always available (see sample_span_lengths).
            if not 0.0 < v <= 0.5:
                raise DataError(f"Objective.{name} is {v}; it must lie in (0, 0.5]")
        if self.poisson_lambda <= 0:
            raise DataError(f"Objective.poisson_lambda is {self.poisson_lambda}; it must be > 0")
        if self.max_block_length < 2:
            raise DataError(f"Objective.max_block_length is {self.max_block_length}; spans are 1 .. "
                            f"max_block_length-1 tokens long, so it must be >= 2")

    def modes(self) -> tuple[Mode, ...]:
        """The modes a batch of this objective can be drawn in."""
        if self.kind != "glm":
            return (self.kind,)
        probs = (self.bert_prob, self.gap_sentence_prob, self.generation_prob)
        return tuple(m for m, p in zip(BLANK_MODES, probs) if p > 1e-12)

    def mode_for_batch(self, rng: RngLike) -> Mode:
        """One mode for a whole batch (THUDM draws one per batch): token with ``bert_prob``, sentence with
        ``gap_sentence_prob``, document otherwise. Consumes exactly one draw for ``kind="glm"``."""
        if self.kind != "glm":
            return self.kind
        u = as_rng(rng).random()
        if u < self.bert_prob:
            return "token"
        if u < self.bert_prob + self.gap_sentence_prob:
            return "sentence"
        return "document"

    def max_sample_len(self, doc_len: int, modes: Optional[Sequence[Mode]] = None, cls: bool = True) -> int:
        """The longest a sample of a ``doc_len``-token document can become, over ``modes`` (default: every
        mode this objective can draw). A blank-infilling sample is ``text + 2 × spans`` long; each span
        has at least one token and the last one is drawn while fewer than ``ratio × n`` tokens are
        masked, so there are at most ``ceil(ratio × n)`` spans."""
        n_text = doc_len + int(self.add_cls and cls) + int(self.add_eos)
        worst = n_text
        for m in modes or self.modes():
            if m == "token":
                worst = max(worst, n_text + 2 * max(1, _ceil(self.mask_ratio * doc_len)))
            elif m == "sentence":
                worst = max(worst, n_text + 2 * max(1, _ceil(self.gap_sentence_ratio * doc_len)))
            elif m == "document":
                worst = max(worst, n_text + 2)
        return worst

    def max_doc_len(self, max_len: int, cls: bool = True, modes: Optional[Sequence[Mode]] = None) -> int:
        """The longest document that always fits ``max_len`` slots (split longer ones before batching)."""
        n = max_len
        while n > 0 and self.max_sample_len(n, modes, cls=cls) > max_len:
            n -= 1
        return n


def _ceil(x: float) -> int:
    # 0.15 * 20 is 3.0000000000000004 in floating point; a count of 3 must reach it.
    return math.ceil(round(x, 9))


def _reached(count: int, ratio: float, n: int) -> bool:
    return count >= round(ratio * n, 9)


# ---------------------------------------------------------------------------------------------
# Samples

@dataclass
class Sample:
    """One document laid out for an objective (numpy, unpadded). ``spans`` are the masked ``[start, end)``
    ranges of ``text`` in text order; ``order`` is the Part B order (indices into ``spans``)."""

    tokens: np.ndarray  # [L] int64
    targets: np.ndarray  # [L] int64: aligned with tokens (the token to predict at each slot)
    loss_mask: np.ndarray  # [L] bool
    position: np.ndarray  # [L] int64: the position stream
    block_position: np.ndarray  # [L] int64: the block-position stream (0 outside Part B)
    prefix_len: int  # slots 0..prefix_len-1 are attended bidirectionally (|Part A|; 0 = causal)
    mode: Mode
    text: np.ndarray  # the text this sample was made from ([CLS]? + document + [eos]?)
    spans: tuple[tuple[int, int], ...] = ()
    order: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.tokens)


def _as_document(doc, index: int, special: Optional[SpecialIds]) -> np.ndarray:
    arr = doc.detach().cpu().numpy() if isinstance(doc, Tensor) else np.asarray(doc)
    if arr.ndim != 1:
        raise DataError(f"document {index} has shape {arr.shape}; a document is a flat list of token ids")
    if arr.size == 0:
        raise DataError(f"document {index} is empty; drop empty documents before batching (there is nothing "
                        f"to mask or predict)")
    if arr.dtype.kind not in "iu":
        raise DataError(f"document {index} has dtype {arr.dtype}; token ids must be integers (tokenize the text "
                        f"first)")
    arr = arr.astype(np.int64)
    if arr.min() < 0:
        raise DataError(f"document {index} has a negative token id {int(arr.min())}")
    if special is not None:
        for name, tid in special.inserted.items():
            hit = np.flatnonzero(arr == tid)
            if hit.size:
                raise DataError(f"document {index} contains {name} (id {tid}) at index {int(hit[0])}; the objective "
                                f"inserts that token itself, so strip it from the text before batching")
    return arr


def _make_text(doc: np.ndarray, special: SpecialIds, objective: Objective) -> tuple[np.ndarray, int]:
    """``[CLS]? + doc + [eos]?`` and the index of the document's first token in it."""
    head = [special.cls] if objective.add_cls and special.cls is not None else []
    tail = [special.eos] if objective.add_eos else []
    return np.concatenate((np.asarray(head, np.int64), doc, np.asarray(tail, np.int64))), len(head)


def span_length_weights(poisson_lambda: float, max_block_length: int) -> np.ndarray:
    """Poisson(λ) probabilities of lengths ``1 .. max_block_length-1``, renormalised (THUDM samples with
    these as weights)."""
    k = np.arange(1, max_block_length, dtype=np.float64)
    logp = k * math.log(poisson_lambda) - poisson_lambda - np.array([math.lgamma(x + 1) for x in k])
    w = np.exp(logp - logp.max())
    return w / w.sum()


def sample_span_lengths(n: int, rng: np.random.Generator, objective: Objective) -> list[int]:
    """Span lengths for token mode on ``n`` maskable tokens: truncated-Poisson draws until at least
    ``mask_ratio × n`` tokens are covered, in random order.

    Each draw is limited to the lengths that still fit (with one gap token per span), so every draw
    can be placed and no sample is rejected. While below the target, ``total + spans <= 2 × total <
    2 × mask_ratio × n``, so the room left is more than ``(1 - 2 × mask_ratio) × n``: at least one
    length always fits, and once that is ``>= max_block_length - 1`` (n >= 56 with the defaults) the
    limit never binds and the lengths are exactly THUDM's.
    """
    weights = span_length_weights(objective.poisson_lambda, objective.max_block_length)
    lengths: list[int] = []
    total = 0
    while not _reached(total, objective.mask_ratio, n):
        room = min(len(weights), n - total - len(lengths))
        if room < 1:  # unreachable for mask_ratio <= 0.5 (see above)
            raise DataError(f"cannot fit another span in {n} tokens; lower Objective.mask_ratio")
        w = weights[:room]
        length = 1 + int(rng.choice(room, p=w / w.sum()))
        lengths.append(length)
        total += length
    return [lengths[i] for i in rng.permutation(len(lengths))]


def place_spans(lengths: Sequence[int], n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Put spans of ``lengths`` (in this order) at random in ``[0, n)``, none overlapping or touching.

    The ``n - sum - (k-1)`` tokens not needed as separators are shared out among the ``k + 1`` gaps by
    sorting ``k`` uniform cut points, which makes every arrangement of the spans' gaps reachable."""
    k = len(lengths)
    free = n - sum(lengths) - (k - 1)
    if k == 0:
        return []
    if free < 0:
        raise DataError(f"spans of lengths {list(lengths)} with a gap between each do not fit in {n} tokens")
    cuts = np.sort(rng.integers(0, free + 1, size=k))
    spans, offset = [], 0
    for cut, length in zip(cuts.tolist(), lengths):
        start = offset + cut
        spans.append((start, start + length))
        offset += length + 1
    return spans


def token_spans(n: int, rng: np.random.Generator, objective: Objective) -> list[tuple[int, int]]:
    """Token mode ([MASK]): spans over ``n`` maskable tokens, in text order."""
    return place_spans(sample_span_lengths(n, rng, objective), n, rng)


def split_sentences(tokens: np.ndarray, is_end: Callable[[int], bool]) -> list[tuple[int, int]]:
    """``[start, end)`` of each sentence: a sentence ends with a sentence-end token (or the text's end)."""
    out, start = [], 0
    for i, t in enumerate(tokens.tolist()):
        if is_end(t):
            out.append((start, i + 1))
            start = i + 1
    if start < len(tokens):
        out.append((start, len(tokens)))
    return out


def sentence_spans(tokens: np.ndarray, is_end: Callable[[int], bool], rng: np.random.Generator,
                   objective: Objective) -> list[tuple[int, int]]:
    """Sentence mode ([sMASK]): whole sentences, in random order, until ``gap_sentence_ratio`` of the
    tokens are covered (at least one sentence); returned in text order."""
    sentences = split_sentences(tokens, is_end)
    chosen, total = [], 0
    for i in rng.permutation(len(sentences)).tolist():
        chosen.append(sentences[i])
        total += sentences[i][1] - sentences[i][0]
        if _reached(total, objective.gap_sentence_ratio, len(tokens)):
            break
    return sorted(chosen)


def document_span(n: int, rng: np.random.Generator, objective: Objective) -> tuple[int, int]:
    """Document mode ([gMASK]): one suffix of the ``n`` tokens after [CLS] (document + eos), its length
    uniform in ``[ceil(gpt_min_ratio × n), n - 1]``, so at least one token stays in Part A as context.

    THUDM caps the length at ``len(text) - 2`` with [CLS] counted, which is ``n - 1`` here; without the
    cap a short document was blanked whole (Part A = ``[CLS] [gMASK]``) in up to a third of its
    samples. A lower bound above the cap (``gpt_min_ratio`` near 1) is lowered to it. Only a
    one-token text (``n = 1``) has nothing to keep, and is its own suffix."""
    hi = n - 1 if n >= 2 else n
    lo = min(max(1, _ceil(objective.gpt_min_ratio * n)), hi)
    length = int(rng.integers(lo, hi + 1))
    return (n - length, n)


def infill_layout(text: Sequence[int], spans: Sequence[tuple[int, int]], mask_id: int, special: SpecialIds,
                  order: Optional[Sequence[int]] = None, mode: BlankMode = "token") -> Sample:
    """The Part A / Part B sample of ``text`` with ``spans`` (``[start, end)``, text order) blanked out.

    ``order`` is the Part B order as indices into ``spans`` (default: text order). This is the layout
    on its own, without any randomness: the masking functions choose the spans and the order.
    """
    text = np.asarray(text, dtype=np.int64)
    spans = [(int(s), int(e)) for s, e in spans]
    for i, (s, e) in enumerate(spans):
        if not 0 <= s < e <= len(text) or (i and s < spans[i - 1][1]):
            raise DataError(f"span {i} = [{s}, {e}) is empty, outside the {len(text)}-token text, or overlaps "
                            f"the span before it; spans must be non-empty, in text order and disjoint")
    order = list(range(len(spans))) if order is None else [int(i) for i in order]
    if sorted(order) != list(range(len(spans))):
        raise DataError(f"order {order} is not a permutation of the {len(spans)} spans")

    a_parts, mask_slot, last, a_len = [], [], 0, 0
    for s, e in spans:
        a_parts.append(text[last:s])
        a_len += s - last
        mask_slot.append(a_len)
        a_parts.append(np.array([mask_id], np.int64))
        a_len += 1
        last = e
    a_parts.append(text[last:])
    part_a = np.concatenate(a_parts)
    A = len(part_a)

    toks, tgts = [part_a], [part_a]
    for i in order:
        s, e = spans[i]
        span = text[s:e]
        toks.append(np.concatenate(([special.sop], span)))
        tgts.append(np.concatenate((span, [special.eop])))
    pos, blk = positions.blank_layout(A, [mask_slot[i] for i in order], [spans[i][1] - spans[i][0] for i in order])
    tokens = np.concatenate(toks).astype(np.int64)
    loss = np.zeros(len(tokens), dtype=bool)
    loss[A:] = True
    return Sample(tokens=tokens, targets=np.concatenate(tgts).astype(np.int64), loss_mask=loss,
                  position=np.asarray(pos, np.int64), block_position=np.asarray(blk, np.int64),
                  prefix_len=A, mode=mode, text=text, spans=tuple(spans), order=tuple(order))


def blank_sample(doc, mode: Mode, rng: RngLike, special: SpecialIds, objective: Optional[Objective] = None, *,
                 is_sentence_end: Optional[SentenceEnd] = None, index: int = 0) -> Sample:
    """One document masked in ``mode`` ("token", "sentence" or "document"); see the module docstring.

    The leading [CLS] is never masked; neither is the trailing eos in token and sentence mode, while in
    document mode the suffix runs to the end of the text, eos included (the model learns to end it).
    """
    objective = objective or Objective()
    rng = as_rng(rng)
    doc = _as_document(doc, index, special)
    text, lo = _make_text(doc, special, objective)
    if mode == "token":
        spans = [(lo + s, lo + e) for s, e in token_spans(len(doc), rng, objective)]
        mask_id = special.mask
    elif mode == "sentence":
        is_end = _sentence_end_fn(is_sentence_end)
        spans = [(lo + s, lo + e) for s, e in sentence_spans(doc, is_end, rng, objective)]
        mask_id = special.smask
    elif mode == "document":
        s, e = document_span(len(text) - lo, rng, objective)
        spans, mask_id = [(lo + s, lo + e)], special.gmask
    else:
        raise DataError(f"mode {mode!r} is not a blank-infilling mode; use one of {BLANK_MODES}")
    order = rng.permutation(len(spans)).tolist() if objective.shuffle_spans else None
    sample = infill_layout(text, spans, mask_id, special, order, mode)
    if mode == "document" and rng.random() < objective.gpt_infill_prob:
        # THUDM's direct layout: the same slots without the final eop input/target.
        n = len(sample) - 1
        sample = replace(sample, tokens=sample.tokens[:n], targets=sample.targets[:n], loss_mask=sample.loss_mask[:n],
                         position=sample.position[:n], block_position=sample.block_position[:n])
    return sample


def causal_sample(doc, special: SpecialIds, objective: Optional[Objective] = None, *, index: int = 0) -> Sample:
    """Left-to-right LM: every slot predicts the next token (the last slot has no loss)."""
    text = _lm_text(doc, special, objective or Objective(kind="causal"), index)
    return _lm_sample(text, 0, special, "causal")


def prefix_sample(doc, rng: RngLike, special: SpecialIds, objective: Optional[Objective] = None, *,
                  index: int = 0) -> Sample:
    """Prefix LM: a split point ``s`` uniform in ``[1, L-1]``; slots ``< s`` attend bidirectionally and
    the model predicts the tokens after the prefix (the prefix's last slot predicts the first one)."""
    text = _lm_text(doc, special, objective or Objective(kind="prefix"), index)
    split = int(as_rng(rng).integers(1, len(text)))
    return _lm_sample(text, split, special, "prefix")


def _lm_text(doc, special: SpecialIds, objective: Objective, index: int) -> np.ndarray:
    # The LM objectives insert no special token, so a document may contain any id.
    text, _ = _make_text(_as_document(doc, index, None), special, objective)
    if len(text) < 2:
        raise DataError(f"document {index} gives a {len(text)}-token text; a language model needs at least 2 "
                        f"tokens to predict one (set Objective.add_eos, or drop one-token documents)")
    return text


def _lm_sample(text: np.ndarray, prefix: int, special: SpecialIds, mode: LMMode) -> Sample:
    L = len(text)
    targets = np.concatenate((text[1:], [special.pad])).astype(np.int64)
    loss = np.zeros(L, dtype=bool)
    loss[max(prefix - 1, 0): L - 1] = True
    return Sample(tokens=text.copy(), targets=targets, loss_mask=loss, position=np.arange(L, dtype=np.int64),
                  block_position=np.zeros(L, np.int64), prefix_len=prefix, mode=mode, text=text)


def make_sample(doc, mode: Mode, rng: RngLike, special: SpecialIds, objective: Optional[Objective] = None, *,
                is_sentence_end: Optional[SentenceEnd] = None, index: int = 0) -> Sample:
    """One document in any mode: the three blank-infilling modes, "causal" or "prefix"."""
    if mode == "causal":
        return causal_sample(doc, special, objective, index=index)
    if mode == "prefix":
        return prefix_sample(doc, rng, special, objective, index=index)
    return blank_sample(doc, mode, rng, special, objective, is_sentence_end=is_sentence_end, index=index)


# ---------------------------------------------------------------------------------------------
# Batches

def _shape(t: Optional[Tensor]) -> Optional[tuple]:
    return None if t is None else tuple(t.shape)


@dataclass
class Batch:
    """A training batch, ``B`` rows of ``T`` slots, right-padded.

    tokens ``[B, T]`` int64; targets ``[B, T]`` int64, aligned with tokens (no shift at loss time);
    loss_mask ``[B, T]`` bool; position_ids ``[B, 2, T]`` (position, block position) or ``[B, T]``;
    prefix_len ``[B]``, or ``[B, T]`` per query when documents are packed; doc_start ``[B, T]`` (the
    row slot where each query's document starts) when packed, else None; lengths ``[B]`` real slots.
    ``placement[i] = (row, start)`` of sample ``i``; ``mode`` is the batch's mode.
    """

    tokens: Tensor
    targets: Tensor
    loss_mask: Tensor
    position_ids: Tensor
    prefix_len: Tensor
    lengths: Tensor
    doc_start: Optional[Tensor] = None
    mode: Optional[BatchMode] = None
    placement: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        t = self.tokens
        if not isinstance(t, Tensor) or t.dim() != 2 or t.dtype != torch.int64:
            raise DataError(f"Batch.tokens must be an int64 tensor [B, T], got "
                            f"{getattr(t, 'dtype', type(t).__name__)} {_shape(t) if isinstance(t, Tensor) else ''}")
        B, T = t.shape
        want = {
            "targets": ([(B, T)], torch.int64),
            "loss_mask": ([(B, T)], torch.bool),
            "position_ids": ([(B, 2, T), (B, T)], torch.int64),
            "prefix_len": ([(B,), (B, T)], torch.int64),
            "lengths": ([(B,)], torch.int64),
            "doc_start": ([(B, T)], torch.int64),
        }
        for name, (shapes, dtype) in want.items():
            v = getattr(self, name)
            if v is None and name == "doc_start":
                continue
            if not isinstance(v, Tensor) or tuple(v.shape) not in shapes or v.dtype != dtype:
                got = f"{v.dtype} {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
                raise DataError(f"Batch.{name} must be {dtype} of shape {' or '.join(map(str, shapes))} for tokens "
                                f"{(B, T)}, got {got}; build batches with glm.data.make_batch")
        if self.doc_start is not None and self.prefix_len.dim() != 2:
            raise DataError("Batch.prefix_len must be per query [B, T] when doc_start is set (packed rows): each "
                            "document has its own Part A")

    @property
    def position_streams(self) -> int:
        return 2 if self.position_ids.dim() == 3 else 1

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """The batch on ``device`` (tensors moved, metadata kept)."""
        move = {f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}
        return replace(self, **move)

    def model_inputs(self) -> dict:
        """Keyword arguments for ``model(...)`` (`glm.GLM.forward`)."""
        kw = dict(input_ids=self.tokens, position_ids=self.position_ids, prefix_len=self.prefix_len)
        if self.doc_start is not None:
            kw["doc_start"] = self.doc_start
        return kw

    def loss(self, logits: Tensor) -> Tensor:
        """Mean cross entropy of ``logits`` ``[B, T, V]`` over the loss-mask slots, in fp32."""
        if tuple(logits.shape[:2]) != tuple(self.tokens.shape):
            raise DataError(f"logits have shape {tuple(logits.shape)}; Batch.loss expects [B, T, V] with "
                            f"[B, T] = {tuple(self.tokens.shape)} (do not call the model with last_only)")
        return lm_loss(logits, self.targets.masked_fill(~self.loss_mask, -100))


def pack_rows(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """First-fit packing: sample ``i`` goes into the first row with ``lengths[i]`` slots left."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        for r, left in enumerate(room):
            if n <= left:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_len - n)
    return rows


def make_batch(samples: Sequence[Sample], *, pad_id: int, position_streams: Literal[1, 2] = 2, pack: bool = False,
               max_len: Optional[int] = None) -> Batch:
    """Right-pad ``samples`` into a `Batch` (one row each), or with ``pack=True`` put several samples in a
    row of at most ``max_len`` slots. ``position_streams=1`` gives 1D positions ``0 .. L-1`` per sample."""
    if not samples:
        raise DataError("make_batch got no samples")
    if position_streams not in (1, 2):
        raise DataError(f"position_streams is {position_streams}; use 2 (GLM, ChatGLM-6B) or 1 (the others)")
    if pack and max_len is None:
        raise DataError("make_batch(pack=True) needs max_len, the row length to pack documents into")
    if max_len is not None:
        for i, s in enumerate(samples):
            if len(s) > max_len:
                raise DataError(f"sample {i} is {len(s)} slots long, more than max_len={max_len}; split its "
                                f"document (Objective.max_doc_len gives the longest that always fits) or raise max_len")
    rows = pack_rows([len(s) for s in samples], max_len) if pack else [[i] for i in range(len(samples))]
    B = len(rows)
    T = max(sum(len(samples[i]) for i in row) for row in rows)
    tokens = np.full((B, T), pad_id, np.int64)
    targets = np.full((B, T), pad_id, np.int64)
    loss = np.zeros((B, T), bool)
    pos = np.zeros((B, position_streams, T), np.int64)
    prefix = np.zeros((B, T) if pack else (B,), np.int64)
    doc_start = np.zeros((B, T), np.int64)
    lengths = np.zeros(B, np.int64)
    placement: list[tuple[int, int]] = [(0, 0)] * len(samples)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            s = samples[i]
            sl = slice(at, at + len(s))
            tokens[r, sl], targets[r, sl], loss[r, sl] = s.tokens, s.targets, s.loss_mask
            if position_streams == 2:
                pos[r, 0, sl], pos[r, 1, sl] = s.position, s.block_position
            else:
                # 1D families have no block position: slots simply count. GLM_SPEC §4 defines Part A/B
                # positions for the 2D families only; counting is this library's choice for the rest.
                pos[r, 0, sl] = np.arange(len(s))
            if pack:
                prefix[r, sl] = at + s.prefix_len
                doc_start[r, sl] = at
            else:
                prefix[r] = s.prefix_len
            placement[i] = (r, at)
            at += len(s)
        lengths[r] = at
        if pack:
            # Pad queries form their own "document" after the last one: real queries never see them
            # (they are later and past every Part A), and the pads attend only among themselves.
            prefix[r, at:] = at
            doc_start[r, at:] = at
    modes = {s.mode for s in samples}
    t = torch.from_numpy
    return Batch(tokens=t(tokens), targets=t(targets), loss_mask=t(loss),
                 position_ids=t(pos if position_streams == 2 else pos[:, 0]), prefix_len=t(prefix),
                 lengths=t(lengths), doc_start=t(doc_start) if pack else None,
                 mode=modes.pop() if len(modes) == 1 else "mixed", placement=tuple(placement))


@dataclass
class Collator:
    """Documents -> a `Batch`: one mode per batch (`Objective.mode_for_batch`), each document masked on
    its own, rows right-padded (or packed). Every document is checked up front against the longest
    sample any mode could make of it, so whether it fits never depends on the random draw."""

    special: SpecialIds
    max_len: int
    objective: Objective = field(default_factory=Objective)
    position_streams: Literal[1, 2] = 2
    pack: bool = False
    is_sentence_end: Optional[SentenceEnd] = None

    def __post_init__(self):
        self.objective.validate()
        if self.max_len < 2:
            raise DataError(f"Collator.max_len is {self.max_len}; it must be at least 2")
        if "sentence" in self.objective.modes() and self.is_sentence_end is None:
            raise DataError("Collator.is_sentence_end is required when Objective.gap_sentence_prob > 0: pass "
                            "sentence_end_ids(tokenizer) or a callable token_id -> bool")
        if self.position_streams not in (1, 2):
            raise DataError(f"Collator.position_streams is {self.position_streams}; use model.config.position_streams")
        self._max_doc = self.objective.max_doc_len(self.max_len, cls=self.special.cls is not None)

    def samples(self, documents: Sequence, rng: RngLike, mode: Optional[Mode] = None) -> list[Sample]:
        """Each document as a `Sample` in ``mode`` (default: drawn for this batch)."""
        rng = as_rng(rng)
        if len(documents) == 0:
            raise DataError("Collator got no documents")
        cls = self.special.cls is not None
        limit = self._max_doc
        if mode is not None and mode not in self.objective.modes():
            limit = min(limit, self.objective.max_doc_len(self.max_len, cls=cls, modes=(mode,)))
        mode = mode or self.objective.mode_for_batch(rng)
        for i, d in enumerate(documents):
            n = len(d)
            if n > limit:
                raise DataError(f"document {i} has {n} tokens; with max_len={self.max_len} the objective fits at most "
                                f"{limit} (a sample adds [CLS]/eos and 2 slots per masked span, up to "
                                f"{self.objective.max_sample_len(n, cls=cls)} here). Nothing is truncated: split "
                                f"long documents into chunks of <= {limit} tokens, or raise max_len")
        return [make_sample(d, mode, rng, self.special, self.objective, is_sentence_end=self.is_sentence_end, index=i)
                for i, d in enumerate(documents)]

    def __call__(self, documents: Sequence, rng: RngLike, mode: Optional[Mode] = None) -> Batch:
        return make_batch(self.samples(documents, rng, mode), pad_id=self.special.pad,
                          position_streams=self.position_streams, pack=self.pack, max_len=self.max_len)


# ---------------------------------------------------------------------------------------------
# Language-model rows packed from one token stream

# The last word of an epoch's seed, so that epoch_rng(seed, e) never repeats batch_rng(seed, s).
_EPOCH_STREAM = 1


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator of epoch ``epoch``'s row offset and row order in a run seeded ``seed``."""
    return np.random.default_rng([int(seed), int(epoch), _EPOCH_STREAM])


def join_documents(documents: Sequence, separator: int) -> np.ndarray:
    """The documents (lists of token ids) as one stream, each followed by ``separator``:
    ``doc0 sep doc1 sep ... docN sep``. The separator is the only token the join adds; the one after
    the last document also divides it from the first where rows wrap around the stream's end."""
    arrays = [_as_document(d, i, None) for i, d in enumerate(documents)]
    if not arrays:
        raise DataError("join_documents got no documents")
    if isinstance(separator, bool) or not isinstance(separator, (int, np.integer)) or separator < 0:
        raise DataError(f"join_documents: separator must be a non-negative token id, got {separator!r}")
    out = np.empty(sum(len(a) + 1 for a in arrays), np.int64)
    at = 0
    for a in arrays:
        out[at: at + len(a)] = a
        out[at + len(a)] = separator
        at += len(a) + 1
    return out


class PackedRows:
    """Causal or prefix-LM rows of ``seq_len`` tokens read from one token stream (`join_documents`).

    The row starting at stream index ``o`` holds the tokens ``stream[o : o+L]`` and the targets
    ``stream[o+1 : o+L+1]``: ``L`` targets, none inserted, no padding. Attention is causal over the
    whole row, across document ends, as GPT-2 and nanoGPT train; the separator marks the ends.

    Training (`batch`) reads the stream as a circle. Epoch ``e`` cuts it into the
    ``rows_per_epoch = ceil(N / L)`` rows starting at ``r, r + L, r + 2L, ...`` and visits them in a
    random order, the offset ``r`` in ``[0, L)`` and the order both drawn from ``epoch_rng(seed, e)``,
    so every token is a target once per epoch (when ``L`` does not divide ``N``, the last row wraps
    past the offset and the few tokens there are targets twice). Row ``g`` of the run (``g =
    micro_step * batch_size + i``) is row ``g mod rows_per_epoch`` of epoch ``g // rows_per_epoch``:
    a batch depends on the seed and the micro-step only, and a resumed run redraws it.

    Evaluation (`rows_at`) reads the stream once from its start, without wrapping: row ``k`` starts at
    ``k * L`` and the last one stops at the stream's end (padded, no loss there).

    ``mode="prefix"`` draws a prefix length ``s`` per row, uniform over ``1 .. targets in the row``,
    from the batch's generator: slots ``< s`` attend to each other both ways, and the loss starts at
    slot ``s - 1``, whose target is the first token after the prefix.
    """

    def __init__(self, stream, seq_len: int, mode: LMMode = "causal", *, pad_id: int = 0,
                 position_streams: Literal[1, 2] = 2) -> None:
        arr = np.asarray(stream)
        if arr.ndim != 1 or arr.dtype.kind not in "iu" or arr.size < 2:
            raise DataError(f"PackedRows needs a flat integer token stream of at least 2 ids, got shape "
                            f"{arr.shape} of {arr.dtype}; build it with join_documents")
        if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
            raise DataError(f"PackedRows.seq_len must be an integer >= 1, got {seq_len!r}")
        if mode not in get_args(LMMode):
            raise DataError(f"PackedRows.mode is {mode!r}; use 'causal' or 'prefix'")
        if position_streams not in (1, 2):
            raise DataError(f"PackedRows.position_streams is {position_streams}; use model.config.position_streams")
        if arr.min() < 0:
            raise DataError(f"the token stream has a negative id {int(arr.min())}")
        # int32 halves the stream's memory; a batch is widened to int64 when it is cut.
        self.stream = arr.astype(np.int32 if arr.max() < 2**31 else np.int64)
        self.seq_len, self.mode, self.pad_id, self.position_streams = int(seq_len), mode, int(pad_id), position_streams
        self._epoch: Optional[tuple[int, int, int, np.ndarray]] = None  # (seed, epoch, offset, order) last drawn

    def __len__(self) -> int:
        return len(self.stream)

    @property
    def rows_per_epoch(self) -> int:
        return -(-len(self.stream) // self.seq_len)

    @property
    def num_rows(self) -> int:
        """Rows of a single pass from the stream's start (`rows_at`): every target once."""
        return -(-(len(self.stream) - 1) // self.seq_len)

    def epoch(self, seed: int, epoch: int) -> tuple[int, np.ndarray]:
        """Epoch ``epoch``'s offset and row order (a permutation of ``range(rows_per_epoch)``)."""
        if self._epoch is None or self._epoch[:2] != (seed, epoch):
            rng = epoch_rng(seed, epoch)
            offset = int(rng.integers(0, self.seq_len))
            self._epoch = (seed, epoch, offset, rng.permutation(self.rows_per_epoch))
        return self._epoch[2], self._epoch[3]

    def starts(self, seed: int, micro_step: int, batch_size: int) -> np.ndarray:
        """Stream indices where the rows of micro-step ``micro_step`` start (see the class docstring)."""
        n = self.rows_per_epoch
        g = int(micro_step) * int(batch_size) + np.arange(batch_size, dtype=np.int64)
        epochs = g // n
        out = np.empty(batch_size, np.int64)
        for e in np.unique(epochs).tolist():  # one epoch, or the two a batch straddles
            here = epochs == e
            offset, order = self.epoch(seed, e)
            out[here] = (offset + order[g[here] % n] * self.seq_len) % len(self.stream)
        return out

    def batch(self, seed: int, micro_step: int, batch_size: int) -> Batch:
        """The training batch of micro-step ``micro_step``: ``batch_size`` full rows."""
        window = np.take(self.stream, self.starts(seed, micro_step, batch_size)[:, None]
                         + np.arange(self.seq_len + 1), mode="wrap").astype(np.int64)
        loss = np.ones((batch_size, self.seq_len), bool)
        return self._batch(window[:, :-1], window[:, 1:], loss, batch_rng(seed, micro_step))

    def rows_at(self, rows: Sequence[int], rng: RngLike) -> Batch:
        """Rows ``rows`` (in ``range(num_rows)``) of one pass from the stream's start, without wrapping;
        ``rng`` draws the prefix lengths in prefix mode."""
        rows = np.asarray(rows, np.int64)
        if rows.ndim != 1 or rows.size == 0 or rows.min() < 0 or rows.max() >= self.num_rows:
            raise DataError(f"rows_at: rows must be a non-empty list of indices in [0, {self.num_rows}), got "
                            f"{rows.tolist()[:8]}")
        idx = rows[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        real = idx < len(self.stream)
        window = np.where(real, self.stream[np.minimum(idx, len(self.stream) - 1)], self.pad_id).astype(np.int64)
        return self._batch(window[:, :-1], window[:, 1:], real[:, 1:], as_rng(rng), lengths=real[:, :-1].sum(1))

    def _batch(self, tokens: np.ndarray, targets: np.ndarray, loss: np.ndarray, rng: np.random.Generator,
               lengths: Optional[np.ndarray] = None) -> Batch:
        B, L = tokens.shape
        prefix = np.zeros(B, np.int64)
        if self.mode == "prefix":
            prefix = rng.integers(1, loss.sum(1) + 1)
            loss = loss & (np.arange(L) >= prefix[:, None] - 1)
        pos = np.broadcast_to(np.arange(L, dtype=np.int64), (B, L))
        if self.position_streams == 2:
            pos = np.stack((pos, np.zeros_like(pos)), axis=1)  # block position 0: no Part B
        t = torch.from_numpy
        c = np.ascontiguousarray
        return Batch(tokens=t(c(tokens)), targets=t(c(targets)), loss_mask=t(c(loss)),
                     position_ids=t(np.ascontiguousarray(pos)), prefix_len=t(prefix),
                     lengths=t(np.full(B, L, np.int64) if lengths is None else lengths.astype(np.int64)),
                     mode=self.mode)
