"""glm.data: the blank-infilling objective (GLM_SPEC §4), the LM objectives, batching and packing.

The layout checks here re-derive everything from a sample's own arrays (Part B segments are found by
their sop tokens, spans are put back at their masks), not from the masker's bookkeeping, so a wrong
layout cannot agree with itself. Text tokens are 10..159 (10 and 11 end sentences) and the special
ids are 0..7, so a special id in a layout can only have been put there by the objective.
"""
from __future__ import annotations

import functools
import math
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import glm
from glm.attention import visible_mask
from glm.data import (
    Batch,
    Collator,
    DataError,
    Objective,
    Sample,
    SpecialIds,
    batch_rng,
    blank_sample,
    causal_sample,
    document_span,
    end_of_text_id,
    infill_layout,
    make_batch,
    make_sample,
    pack_rows,
    prefix_sample,
    sentence_end_ids,
    span_length_weights,
)

SP = SpecialIds(mask=1, smask=2, gmask=3, sop=4, eop=5, eos=7, pad=0, cls=6)
MASKS = {"token": SP.mask, "sentence": SP.smask, "document": SP.gmask}
ENDS = frozenset({10, 11})  # sentence-end ids of the tests
TEXT_LO, VOCAB = 12, 160  # ordinary text ids: 12..159 (tiny-glm has 160 ids)
ATOL = 1e-5
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MODEL_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.one_thread)


def random_doc(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(TEXT_LO, VOCAB, size=n).tolist()


# A document as sentences: runs of text ids each closed by a sentence end, maybe an unterminated tail.
sentences_st = st.lists(st.tuples(st.lists(st.integers(TEXT_LO, VOCAB - 1), max_size=12),
                                  st.sampled_from(sorted(ENDS))), max_size=8)
tail_st = st.lists(st.integers(TEXT_LO, VOCAB - 1), max_size=10)


@st.composite
def documents(draw, min_size: int = 1, max_size: int = 120):
    if draw(st.booleans()):
        doc = [t for words, end in draw(sentences_st) for t in (*words, end)] + draw(tail_st)
    else:
        doc = draw(st.lists(st.integers(TEXT_LO, VOCAB - 1), min_size=min_size, max_size=max_size))
    doc = doc[:max_size]
    if len(doc) < min_size:
        doc += [TEXT_LO] * (min_size - len(doc))
    return doc


# ---------------------------------------------------------------------------------------------
# Independent readers of a layout

def segments(tokens, prefix_len: int) -> list[tuple[int, int]]:
    """Part B as ``[start, end)`` slot ranges, one per span, each starting at a sop token."""
    starts = [prefix_len + i for i, t in enumerate(tokens[prefix_len:]) if t == SP.sop]
    assert not starts or starts[0] == prefix_len, "Part B must start with sop"
    return list(zip(starts, starts[1:] + [len(tokens)]))


def check_layout(tokens, targets, loss, pos, blk, prefix_len: int, text, mask_id: int) -> None:
    """Every GLM_SPEC §4 layout rule for one sample, and un-masking Part B gives back ``text``."""
    tokens, targets, loss, pos, blk, text = (list(map(int, x)) for x in (tokens, targets, loss, pos, blk, text))
    A = prefix_len
    assert A >= 1
    # Part A: positions 0..A-1, block 0, no loss; its targets are its own tokens (THUDM), unused.
    assert pos[:A] == list(range(A)) and blk[:A] == [0] * A
    assert loss == [0] * A + [1] * (len(tokens) - A), "loss must be exactly Part B"
    assert SP.sop not in tokens[:A] and SP.eop not in tokens
    segs = segments(tokens, A)
    mask_slots = [i for i, t in enumerate(tokens[:A]) if t == mask_id]
    assert len(segs) == len(mask_slots) >= 1, "one Part B segment per mask"
    fills = {}
    for k, (s, e) in enumerate(segs):
        p = pos[s]
        assert pos[s:e] == [p] * (e - s), "a span's tokens all sit at its mask's position"
        assert tokens[p] == mask_id and p < A, "a span sits at a mask of Part A"
        assert blk[s:e] == list(range(1, e - s + 1)), "block positions 1..len+1"
        # Targets are the next input inside the segment; the last target ends the span.
        assert targets[s:e - 1] == tokens[s + 1:e]
        last = k == len(segs) - 1
        if targets[e - 1] == SP.eop:
            span = targets[s:e - 1]
        else:
            # THUDM's direct [gMASK] layout: the final eop slot is left off (only ever the last segment).
            assert last and mask_id == SP.gmask, "only a direct [gMASK] layout may omit the eop"
            span = targets[s:e]
        assert span and SP.eop not in span
        assert p not in fills, "two segments at one mask"
        fills[p] = span
    assert sorted(fills) == mask_slots
    restored = []
    for i, t in enumerate(tokens[:A]):
        restored.extend(fills[i] if i in fills else [t])
    assert restored == text, "un-masking Part B must give back the text"


def check_sample(s: Sample) -> None:
    check_layout(s.tokens, s.targets, s.loss_mask, s.position, s.block_position, s.prefix_len, s.text, MASKS[s.mode])


def masked_runs(s: Sample) -> list[tuple[int, int]]:
    """The masked ``[start, end)`` ranges of the text, recovered from Part A (a mask replaced ``end-start``
    tokens, known from its segment's length), in text order."""
    A = s.prefix_len
    seg_len = {int(s.position[a]): (b - a - 1 if s.targets[b - 1] == SP.eop else b - a)
               for a, b in segments(s.tokens.tolist(), A)}
    runs, at = [], 0
    for i in range(A):
        if i in seg_len:
            runs.append((at, at + seg_len[i]))
            at += seg_len[i]
        else:
            at += 1
    assert at == len(s.text)
    return runs


def text_of(doc, cls=True, eos=True) -> list[int]:
    return ([SP.cls] if cls else []) + list(doc) + ([SP.eos] if eos else [])


# ---------------------------------------------------------------------------------------------
# The worked example of docs/objective.md

def test_worked_example_of_the_docs():
    """x1..x6 with spans [x3] and [x5 x6], Part B in the order (x5 x6), (x3) -- the paper's Figure 2."""
    x = [101, 102, 103, 104, 105, 106]
    s = infill_layout(x, [(2, 3), (4, 6)], SP.mask, SP, order=[1, 0])
    M, S, E = SP.mask, SP.sop, SP.eop
    assert s.tokens.tolist() == [101, 102, M, 104, M, S, 105, 106, S, 103]
    assert s.targets.tolist() == [101, 102, M, 104, M, 105, 106, E, 103, E]
    assert s.position.tolist() == [0, 1, 2, 3, 4, 4, 4, 4, 2, 2]
    assert s.block_position.tolist() == [0, 0, 0, 0, 0, 1, 2, 3, 1, 2]
    assert s.loss_mask.tolist() == [False] * 5 + [True] * 5
    assert s.prefix_len == 5
    grid = visible_mask(1, 10, 10, causal=True, prefix_len=torch.tensor([5]))[0, 0]
    drawn = ["".join("x" if v else "." for v in row) for row in grid.tolist()]
    assert drawn == ["xxxxx....."] * 5 + ["x" * k + "." * (10 - k) for k in range(6, 11)]
    check_layout(s.tokens, s.targets, s.loss_mask, s.position, s.block_position, 5, x, M)


# ---------------------------------------------------------------------------------------------
# Span masking

@SETTINGS
@given(doc=documents(), mode=st.sampled_from(["token", "sentence", "document"]), seed=st.integers(0, 2**32 - 1),
       shuffle=st.booleans(), cls=st.booleans(), eos=st.booleans())
def test_every_token_once_and_unmasking_restores(doc, mode, seed, shuffle, cls, eos):
    obj = Objective(shuffle_spans=shuffle, add_cls=cls, add_eos=eos)
    s = blank_sample(doc, mode, seed, SP, obj, is_sentence_end=ENDS)
    assert s.text.tolist() == text_of(doc, cls, eos)
    check_sample(s)
    assert len(s) <= obj.max_sample_len(len(doc), modes=[mode]), "longer than the bound Collator checks with"
    if not shuffle:
        assert list(s.order) == sorted(s.order)


@SETTINGS
@given(n=st.integers(1, 400), seed=st.integers(0, 2**32 - 1), ratio=st.sampled_from([0.15, 0.3, 0.5]))
def test_token_mode_fraction_and_placement(n, seed, ratio):
    obj = Objective(mask_ratio=ratio)
    doc = random_doc(np.random.default_rng(seed), n)
    s = blank_sample(doc, "token", seed, SP, obj)
    check_sample(s)
    runs = masked_runs(s)
    assert runs == list(s.spans)
    lengths = [e - b for b, e in runs]
    total = sum(lengths)
    # Drawn until the target is reached: the total reaches it, and it did not before the last span.
    assert total >= ratio * n - 1e-9
    assert total - max(lengths) < ratio * n - 1e-9
    assert max(lengths) <= obj.max_block_length - 1
    assert runs[0][0] >= 1, "[CLS] is never masked"
    assert runs[-1][1] <= n + 1, "eos is never masked in token mode"
    assert all(b[0] > a[1] for a, b in zip(runs, runs[1:])), "spans neither overlap nor touch"


def test_token_mode_statistics():
    """Long documents: ~15% masked, and span lengths follow Poisson(3) truncated to 1..39 (seeded)."""
    obj = Objective()
    rng = np.random.default_rng(0)
    fractions, lengths, shuffled = [], [], []
    where = np.zeros(402)
    for _ in range(300):
        s = blank_sample(random_doc(rng, 400), "token", rng, SP, obj)
        runs = masked_runs(s)
        lengths += [e - b for b, e in runs]
        fractions.append(sum(e - b for b, e in runs) / 400)
        for b, e in runs:
            where[b:e] += 1
        # Part B in text order would have its segments' positions increasing.
        starts = [int(s.position[a]) for a, _ in segments(s.tokens.tolist(), s.prefix_len)]
        shuffled.append(starts != sorted(starts))
    assert 0.15 <= np.mean(fractions) < 0.16 and max(fractions) < 0.15 + 39 / 400
    assert np.mean(shuffled) > 0.95, "Part B spans are shuffled"
    # Spans land anywhere in the document: every quarter is masked about as often.
    quarters = where[1:401].reshape(4, 100).mean(axis=1) / 300
    assert np.abs(quarters - 0.15).max() < 0.02, quarters
    w = span_length_weights(3.0, 40)
    mean = float((np.arange(1, 40) * w).sum())
    assert abs(mean - 3 / (1 - math.exp(-3))) < 1e-6  # zero-truncated Poisson(3): 3.157
    assert abs(np.mean(lengths) - mean) < 0.15, (np.mean(lengths), mean)
    counts = np.bincount(lengths, minlength=40)[1:40] / len(lengths)
    assert np.abs(counts - w).max() < 0.03


def sentences_of(doc) -> set[tuple[int, int]]:
    out, start = set(), 0
    for i, t in enumerate(doc):
        if t in ENDS:
            out.add((start, i + 1))
            start = i + 1
    if start < len(doc):
        out.add((start, len(doc)))
    return out


@SETTINGS
@given(doc=documents(), seed=st.integers(0, 2**32 - 1), cls=st.booleans())
def test_sentence_mode_masks_whole_sentences(doc, seed, cls):
    obj = Objective(add_cls=cls)
    s = blank_sample(doc, "sentence", seed, SP, obj, is_sentence_end=ENDS)
    check_sample(s)
    off = int(cls)
    runs = [(b - off, e - off) for b, e in masked_runs(s)]
    sentences = sentences_of(doc)
    assert set(runs) <= sentences, "every span is one whole sentence"
    lengths = [e - b for b, e in runs]
    total, n = sum(lengths), len(doc)
    assert total >= 0.15 * n - 1e-9 or set(runs) == sentences
    assert total - max(lengths) < 0.15 * n - 1e-9, "stops at the first sentence that reaches 15%"


def test_sentence_mode_examples():
    # One-token sentences: exactly ceil(15%) of them are taken.
    s = blank_sample([10] * 20, "sentence", 0, SP, is_sentence_end=ENDS)
    assert len(s.spans) == 3 and all(e - b == 1 for b, e in s.spans)
    # Ten three-token sentences, two taken per sample: each is taken about as often (they are shuffled).
    doc = [t for k in range(10) for t in (20 + k, 40 + k, 10)]
    rng = np.random.default_rng(0)
    taken = np.zeros(10)
    for _ in range(300):
        s = blank_sample(doc, "sentence", rng, SP, is_sentence_end=ENDS)
        assert len(s.spans) == 2
        for b, _ in s.spans:
            taken[(b - 1) // 3] += 1
    assert taken.min() / 300 > 0.12 and taken.max() / 300 < 0.28, taken


def test_sentence_end_as_callable_and_missing():
    doc = [20, 21, 10, 22, 23, 11, 24]
    a = blank_sample(doc, "sentence", 3, SP, is_sentence_end=ENDS)
    b = blank_sample(doc, "sentence", 3, SP, is_sentence_end=lambda t: t in ENDS)
    assert a.tokens.tolist() == b.tokens.tolist()
    with pytest.raises(DataError, match="is_sentence_end"):
        blank_sample(doc, "sentence", 3, SP)


@SETTINGS
@given(doc=documents(), seed=st.integers(0, 2**32 - 1), ratio=st.sampled_from([0.25, 0.5, 1.0]),
       eos=st.booleans())
def test_document_mode_is_one_suffix(doc, seed, ratio, eos):
    obj = Objective(gpt_min_ratio=ratio, add_eos=eos)
    s = blank_sample(doc, "document", seed, SP, obj)
    check_sample(s)
    runs = masked_runs(s)
    assert len(runs) == 1 and (s.tokens[:s.prefix_len] == SP.gmask).sum() == 1
    (b, e), n = runs[0], len(s.text) - 1  # the suffix is drawn from the n tokens after [CLS]
    assert e == len(s.text), "the [gMASK] span is a suffix (eos included)"
    cap = n - 1 if n >= 2 else n  # THUDM: at most len(text) - 2 with [CLS] counted
    assert min(math.ceil(round(ratio * n, 9)), cap) <= e - b <= cap


@pytest.mark.parametrize("cls", [True, False])
def test_document_mode_keeps_context(cls):
    """A [gMASK] suffix never takes the whole document: Part A keeps at least one token of it (THUDM
    caps the generation length at len(text) - 2, [CLS] counted). Before, a 3-token document was
    blanked whole in a third of its samples."""
    obj = Objective(add_cls=cls)
    rng = np.random.default_rng(0)
    for n_doc in (1, 2, 3, 10):
        doc = random_doc(rng, n_doc)
        for _ in range(300):
            s = blank_sample(doc, "document", rng, SP, obj)
            (b, _e), = s.spans
            assert b >= int(cls) + 1, (n_doc, s.spans)  # a token of the document stays in Part A
    assert document_span(5, rng, Objective(gpt_min_ratio=1.0)) == (1, 5)  # lowered to the cap
    assert document_span(1, rng, Objective()) == (0, 1)  # a one-token text has nothing to keep


def test_document_mode_direct_layout_rate():
    """gpt_infill_prob = 0.5: half of the [gMASK] samples drop the final eop slot (THUDM's direct layout)."""
    rng = np.random.default_rng(1)
    direct = [blank_sample(random_doc(rng, 30), "document", rng, SP).targets[-1] != SP.eop for _ in range(400)]
    assert 0.42 < np.mean(direct) < 0.58
    never = Objective(gpt_infill_prob=0.0)
    assert all(blank_sample(random_doc(rng, 30), "document", rng, SP, never).targets[-1] == SP.eop
               for _ in range(50))


def test_mode_for_batch_mix():
    rng = np.random.default_rng(0)
    modes = [Objective().mode_for_batch(rng) for _ in range(6000)]
    for m, p in (("token", 0.4), ("sentence", 0.3), ("document", 0.3)):
        assert abs(modes.count(m) / len(modes) - p) < 0.025, m
    only = Objective(bert_prob=1.0, gap_sentence_prob=0.0)
    assert only.modes() == ("token",) and {only.mode_for_batch(rng) for _ in range(200)} == {"token"}
    assert Objective(kind="causal").mode_for_batch(rng) == "causal"


def test_collator_uses_one_mode_per_batch():
    col = Collator(SP, max_len=64, is_sentence_end=ENDS)
    rng = np.random.default_rng(5)
    seen = set()
    for step in range(30):
        b = col([random_doc(rng, 12) for _ in range(4)], batch_rng(0, step))
        masks = {t for t in b.tokens.flatten().tolist() if t in (SP.mask, SP.smask, SP.gmask)}
        assert len(masks) == 1 and masks == {MASKS[b.mode]}, "one mask kind (= one mode) per batch"
        seen.add(b.mode)
    assert seen == {"token", "sentence", "document"}


# ---------------------------------------------------------------------------------------------
# Comparison objectives

@SETTINGS
@given(doc=documents(min_size=2), seed=st.integers(0, 2**32 - 1))
def test_causal_and_prefix_lm_layout(doc, seed):
    text = text_of(doc)
    c = causal_sample(doc, SP)
    assert c.tokens.tolist() == text and c.prefix_len == 0
    assert c.targets[:-1].tolist() == text[1:] and c.loss_mask.tolist() == [True] * (len(text) - 1) + [False]
    assert c.position.tolist() == list(range(len(text))) and not c.block_position.any()
    p = prefix_sample(doc, seed, SP)
    k = p.prefix_len
    assert 1 <= k <= len(text) - 1
    assert p.tokens.tolist() == text and p.targets[:-1].tolist() == text[1:]
    # The prefix is context; its last slot predicts the first token after it, and so on to the end.
    assert p.loss_mask.tolist() == [False] * (k - 1) + [True] * (len(text) - k) + [False]


def test_prefix_split_is_uniform():
    rng = np.random.default_rng(0)
    splits = np.bincount([prefix_sample([20] * 8, rng, SP).prefix_len for _ in range(900)], minlength=10)
    assert splits[0] == 0 and splits[1:].min() > 60, splits  # text of 10: splits 1..9, ~100 each


# ---------------------------------------------------------------------------------------------
# Batches

def split_rows(b: Batch):
    """Each sample's slots back out of a batch: (row, slice) per sample, from the batch's placement."""
    for r, start in b.placement:
        end = start
        # a sample ends where the next document starts or the row's real slots end
        while end < int(b.lengths[r]) and (b.doc_start is None or int(b.doc_start[r, end]) == start):
            end += 1
        yield r, slice(start, end)


@SETTINGS
@given(docs=st.lists(documents(max_size=40), min_size=1, max_size=6), seed=st.integers(0, 2**32 - 1),
       pack=st.booleans(), mode=st.sampled_from(["token", "sentence", "document"]))
def test_batch_layout_padding_and_packing(docs, seed, pack, mode):
    col = Collator(SP, max_len=64, is_sentence_end=ENDS, pack=pack)
    b = col(docs, seed, mode=mode)
    B, T = b.tokens.shape
    assert b.position_ids.shape == (B, 2, T) and b.mode == mode
    assert b.prefix_len.shape == ((B, T) if pack else (B,)) and (b.doc_start is not None) == pack
    assert T == int(b.lengths.max()) <= 64
    for r in range(B):
        n = int(b.lengths[r])
        assert (b.tokens[r, n:] == SP.pad).all() and not b.loss_mask[r, n:].any() and not b.position_ids[r, :, n:].any()
        if pack:  # pads are one more "document" after the real ones
            assert (b.doc_start[r, n:] == n).all() and (b.prefix_len[r, n:] == n).all()
    covered = torch.zeros(B, T, dtype=torch.int64)
    for i, (r, sl) in enumerate(split_rows(b)):
        covered[r, sl] += 1
        A = int(b.prefix_len[r, sl.start] - sl.start) if pack else int(b.prefix_len[r])
        check_layout(b.tokens[r, sl], b.targets[r, sl], b.loss_mask[r, sl], b.position_ids[r, 0, sl],
                     b.position_ids[r, 1, sl], A, text_of(docs[i]), MASKS[mode])
        if pack:
            assert (b.doc_start[r, sl] == sl.start).all() and (b.prefix_len[r, sl] == sl.start + A).all()
    assert torch.equal(covered, (torch.arange(T) < b.lengths[:, None]).long()), "samples tile the real slots once"


@functools.lru_cache(maxsize=None)
def tiny_model(name: str) -> glm.GLM:
    model = glm.GLM(glm.preset(name)).eval()
    model.init_weights(std=0.1, seed=0)  # logits O(1), as in test_invariants
    return model


def hand_loss(logits: torch.Tensor, b: Batch) -> float:
    lp = torch.log_softmax(logits.double(), dim=-1)
    picked = [-lp[r, t, int(b.targets[r, t])] for r, t in b.loss_mask.nonzero().tolist()]
    return float(torch.stack(picked).mean())


@torch.no_grad()
def test_batch_feeds_the_model_and_loss_is_cross_entropy():
    model = tiny_model("tiny-glm")
    rng = np.random.default_rng(0)
    col = Collator(SP, max_len=64, is_sentence_end=ENDS)
    for mode in ("token", "sentence", "document"):
        b = col([random_doc(rng, n) for n in (30, 7, 18)], rng, mode=mode)
        logits = model(**b.model_inputs())
        assert logits.shape == (*b.tokens.shape, VOCAB)
        loss = b.loss(logits)
        assert abs(float(loss) - hand_loss(logits, b)) < 1e-5
        # targets outside the loss mask must not matter
        b2 = Batch(**{**b.__dict__, "targets": b.targets.masked_fill(~b.loss_mask, 99)})
        assert float(b2.loss(logits)) == float(loss)


@torch.no_grad()
def test_loss_backpropagates():
    model = glm.GLM(glm.preset("tiny-glm"))
    b = Collator(SP, max_len=64, is_sentence_end=ENDS)([random_doc(np.random.default_rng(1), 20)] * 2, 0)
    with torch.enable_grad():
        b.loss(model(**b.model_inputs())).backward()
    assert model.embed.weight.grad is not None and model.embed.weight.grad.abs().sum() > 0


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    err = (a - b).abs().max().item()
    assert err <= ATOL, f"{what}: max |dlogits| {err:.2e} > {ATOL:.0e}"


@MODEL_SETTINGS
@given(docs=st.lists(documents(max_size=40), min_size=2, max_size=5), seed=st.integers(0, 2**32 - 1),
       backend=st.sampled_from(["reference", "sdpa"]))
@torch.no_grad()
def test_padded_rows_equal_rows_alone(docs, seed, backend):
    model = tiny_model("tiny-glm")
    b = Collator(SP, max_len=64, is_sentence_end=ENDS)(docs, seed)
    full = model(**b.model_inputs(), backend=backend)
    for r in range(b.tokens.shape[0]):
        n = int(b.lengths[r])
        alone = model(b.tokens[r:r + 1, :n], b.position_ids[r:r + 1, :, :n], prefix_len=b.prefix_len[r:r + 1],
                      backend=backend)
        assert_close(full[r, :n], alone[0], f"row {r}")


@MODEL_SETTINGS
# Documents of <= 18 tokens make samples of <= 26 slots, so at least two share a 64-slot row.
@given(docs=st.lists(documents(max_size=18), min_size=2, max_size=6), seed=st.integers(0, 2**32 - 1),
       mode=st.sampled_from(["token", "sentence", "document", "causal", "prefix"]),
       backend=st.sampled_from(["reference", "sdpa"]))
@torch.no_grad()
def test_packing_does_not_leak_between_documents(docs, seed, mode, backend):
    """A packed row gives each document the logits it gets alone (attention never crosses documents)."""
    model = tiny_model("tiny-glm")
    samples = [make_sample(d, mode, np.random.default_rng([seed, i]), SP, is_sentence_end=ENDS, index=i)
               for i, d in enumerate(docs)]
    packed = make_batch(samples, pad_id=SP.pad, pack=True, max_len=64)
    assert packed.tokens.shape[0] < len(docs), "the test must actually pack"
    out = model(**packed.model_inputs(), backend=backend)
    for i, (r, start) in enumerate(packed.placement):
        alone = make_batch([samples[i]], pad_id=SP.pad)
        ref = model(**alone.model_inputs(), backend=backend)
        assert_close(out[r, start:start + len(samples[i])], ref[0], f"document {i}")
    # Per-document loss pieces add up: the packed loss is the token-weighted mean of the documents'.
    lp = [(make_batch([s], pad_id=SP.pad), s.loss_mask.sum()) for s in samples]
    per_doc = sum(float(b.loss(model(**b.model_inputs(), backend=backend))) * n for b, n in lp) / sum(n for _, n in lp)
    assert abs(float(packed.loss(out)) - per_doc) < 1e-5


def test_packing_first_fit():
    assert pack_rows([30, 40, 24, 10, 64, 1], 64) == [[0, 2, 3], [1, 5], [4]]
    with pytest.raises(DataError, match="max_len"):
        make_batch([causal_sample([20] * 70, SP)], pad_id=0, pack=True, max_len=64)


@pytest.mark.parametrize("kind", ["glm", "causal", "prefix"])
@torch.no_grad()
def test_one_dimensional_families(kind):
    """1D families (ChatGLM2+, GLM-4): [B, T] positions counting per document; packing still isolates."""
    model = tiny_model("tiny-chatglm2")
    assert model.config.position_streams == 1
    rng = np.random.default_rng(2)
    docs = [random_doc(rng, n) for n in (9, 14, 5)]
    col = Collator(SP, max_len=64, objective=Objective(kind=kind), position_streams=1, is_sentence_end=ENDS, pack=True)
    b = col(docs, 3)
    assert b.position_ids.shape == b.tokens.shape and b.tokens.shape[0] == 1
    out = model(**b.model_inputs())
    for (r, sl), s in zip(split_rows(b), col.samples(docs, 3)):
        assert b.position_ids[r, sl].tolist() == list(range(len(s)))
        alone = make_batch([s], pad_id=SP.pad, position_streams=1)
        assert_close(out[r, sl], model(**alone.model_inputs())[0], "1D packed vs alone")
    if kind == "causal":
        assert (b.prefix_len == b.doc_start).all(), "causal: no bidirectional prefix"


# ---------------------------------------------------------------------------------------------
# Determinism, errors, tokenizers

def test_same_seed_same_batch_and_no_global_rng():
    rng = np.random.default_rng(9)
    docs = [random_doc(rng, n) for n in (40, 3, 22, 17)]
    col = Collator(SP, max_len=64, is_sentence_end=ENDS, pack=True)
    a = [col(docs, batch_rng(7, step)) for step in range(6)]
    np.random.seed(123), random.seed(123), torch.manual_seed(123)  # must not matter
    b = [col(docs, batch_rng(7, step)) for step in range(6)]
    for x, y in zip(a, b):
        assert x.mode == y.mode and x.placement == y.placement
        for name in ("tokens", "targets", "loss_mask", "position_ids", "prefix_len", "doc_start", "lengths"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
    assert any(not torch.equal(x.tokens, y.tokens) for x, y in zip(a, [col(docs, batch_rng(8, s)) for s in range(6)]))
    np.random.seed(0), random.seed(0), torch.manual_seed(0)
    untouched = (np.random.get_state()[1].copy(), random.getstate(), torch.get_rng_state().clone())
    col(docs, 1), blank_sample(docs[0], "token", 2, SP), prefix_sample(docs[0], 3, SP)
    assert np.array_equal(np.random.get_state()[1], untouched[0]) and random.getstate() == untouched[1]
    assert torch.equal(torch.get_rng_state(), untouched[2])


def test_batch_to_and_model_inputs():
    b = Collator(SP, max_len=64, is_sentence_end=ENDS, pack=True)([[20] * 5, [21] * 6], 0)
    c = b.to("cpu")
    assert c.mode == b.mode and c.placement == b.placement and torch.equal(c.doc_start, b.doc_start)
    assert set(b.model_inputs()) == {"input_ids", "position_ids", "prefix_len", "doc_start"}
    u = Collator(SP, max_len=64, is_sentence_end=ENDS)([[20] * 5], 0)
    assert set(u.model_inputs()) == {"input_ids", "position_ids", "prefix_len"}
    if torch.cuda.is_available():
        assert b.to("cuda").tokens.is_cuda


def test_document_errors():
    col = Collator(SP, max_len=64, is_sentence_end=ENDS)
    with pytest.raises(DataError, match="document 1 is empty"):
        col([[20, 21], []], 0)
    limit = col.objective.max_doc_len(64)
    col([[20] * limit], 0, mode="token")  # the limit itself fits in every mode
    for mode in ("token", "sentence", "document"):
        assert len(blank_sample([20] * limit, mode, 0, SP, is_sentence_end=ENDS)) <= 64
    with pytest.raises(DataError, match=rf"document 0 has {limit + 1} tokens.*split long documents.*<= {limit}"):
        col([[20] * (limit + 1)], 0)
    with pytest.raises(DataError, match=r"contains sop \(id 4\) at index 2"):
        col([[20, 21, SP.sop]], 0)
    with pytest.raises(DataError, match="dtype float"):
        col([[1.5, 2.0]], 0)
    with pytest.raises(DataError, match="flat list"):
        col([[[20, 21]]], 0)
    with pytest.raises(DataError, match="negative"):
        col([[20, -1]], 0)
    with pytest.raises(DataError, match="at least 2 tokens"):
        causal_sample([20], SP, Objective(kind="causal", add_cls=False, add_eos=False))
    with pytest.raises(DataError, match="no documents"):
        col([], 0)
    with pytest.raises(DataError, match="rng must be"):
        col([[20]], "seed")
    with pytest.raises(DataError, match="not a blank-infilling mode"):
        blank_sample([20], "bert", 0, SP)


def test_objective_and_collator_errors():
    with pytest.raises(DataError, match=r"bert_prob \+ gap_sentence_prob"):
        Objective(bert_prob=0.8, gap_sentence_prob=0.3)
    with pytest.raises(DataError, match="Objective.mask_ratio"):
        Objective(mask_ratio=0.6)
    with pytest.raises(DataError, match="Objective.kind"):
        Objective(kind="mlm")
    with pytest.raises(DataError, match="max_block_length"):
        Objective(max_block_length=1)
    with pytest.raises(DataError, match="Collator.is_sentence_end"):
        Collator(SP, max_len=64)
    Collator(SP, max_len=64, objective=Objective(bert_prob=1.0, gap_sentence_prob=0.0))  # no sentences: fine
    with pytest.raises(DataError, match="SpecialIds.sop"):
        SpecialIds(mask=1, smask=2, gmask=3, sop=-4, eop=5, eos=7, pad=0)
    with pytest.raises(DataError, match="overlaps"):
        infill_layout([20, 21, 22, 23], [(0, 2), (1, 3)], SP.mask, SP)


def test_batch_field_errors():
    b = Collator(SP, max_len=64, is_sentence_end=ENDS)([[20] * 8, [21] * 3], 0)
    fields = dict(b.__dict__)
    with pytest.raises(DataError, match=r"Batch.position_ids must be torch.int64 of shape \(2, 2, \d+\) or"):
        Batch(**{**fields, "position_ids": b.position_ids[:, :, :-1]})
    with pytest.raises(DataError, match="Batch.loss_mask"):
        Batch(**{**fields, "loss_mask": b.loss_mask.long()})
    with pytest.raises(DataError, match="Batch.prefix_len must be per query"):
        Batch(**{**fields, "doc_start": torch.zeros_like(b.tokens)})
    with pytest.raises(DataError, match="last_only"):
        b.loss(torch.zeros(2, 1, VOCAB))


def test_special_ids_and_sentence_ends_from_a_tokenizer(tmp_path):
    from glm.tokenizer import train
    words = "the quick brown fox jumps over a lazy dog. Where is it? Here! Yes; no: maybe\n".split(" ")
    r = random.Random(0)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(" ".join(r.choice(words) for _ in range(12)) for _ in range(500)))
    tok = train([str(corpus)], str(tmp_path / "tok"), 310, "glm")
    sp = SpecialIds.from_tokenizer(tok)
    t = tok.special_tokens
    assert sp == SpecialIds(mask=t["[MASK]"], smask=t["[sMASK]"], gmask=t["[gMASK]"], sop=t["<|startofpiece|>"],
                            eop=t["<|endofpiece|>"], eos=t["<|endoftext|>"], pad=t["<|endoftext|>"], cls=t["[CLS]"])
    ends = sentence_end_ids(tok)
    assert ends and not ends & set(t.values())
    for i in range(tok.vocab_size):
        if i not in t.values():
            assert (i in ends) == any(c in tok.decode([i]) for c in ".?!;:\n")
    doc = tok.encode("Where is it? Here! the dog")
    s = blank_sample(doc, "sentence", 0, sp, is_sentence_end=ends)
    masked = [tok.decode(s.text[b:e].tolist()) for b, e in s.spans]
    assert all(m.strip() in ("Where is it?", "Here!", "the dog") for m in masked), masked

    class NoMasks:
        mask_ids = {"MASK": 1}
        sop_id, eop_id, cls_id, eos_ids, pad_id = 2, 3, None, (4,), None
    with pytest.raises(DataError, match=r"no \['sMASK', 'gMASK'\]"):
        SpecialIds.from_tokenizer(NoMasks())
    assert SpecialIds.from_tokenizer(tok, eos=t["[SEP]"]).eos == t["[SEP]"]  # an explicit end of text
    with pytest.raises(DataError, match=r"eos \d+ is also the eop token .* pass eos="):
        SpecialIds.from_tokenizer(tok, eos=t["<|endofpiece|>"])


def test_chatglm6b_documents_do_not_end_in_eop(tmp_path):
    """ChatGLM-6B's eos is <eop> (it ends a generation), which is also the span end: taken as the
    document end it put <eop> in Part A and made [gMASK] targets end <eop> <eop>. from_tokenizer
    refuses it and names the release's end token </s>; with that, the layout is the usual one."""
    from glm.tokenizer import train
    r = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog 你好 世界 模型 语言 数据".split()
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(" ".join(r.choice(words) for _ in range(12)) for _ in range(500)), encoding="utf-8")
    tok = train([str(corpus)], str(tmp_path / "tok"), 400, "chatglm")
    assert tok.eos_ids[0] == tok.eop_id
    end = end_of_text_id(tok)
    assert end is not None and end not in (tok.eop_id, tok.sop_id, *tok.mask_ids.values())
    with pytest.raises(DataError, match=rf"ChatGLM6BTokenizer.*{tok.eop_id} is also the eop token.*pass eos={end} "):
        SpecialIds.from_tokenizer(tok)
    sp = SpecialIds.from_tokenizer(tok, eos=end)
    assert sp.eos == end and sp.eop == tok.eop_id
    doc = tok.encode("the quick brown fox 你好 世界")
    s = blank_sample(doc, "document", 1, sp, Objective(gpt_infill_prob=0.0))
    assert s.text.tolist() == doc + [end]
    assert s.targets[-2:].tolist() == [end, tok.eop_id] and tok.eop_id not in s.tokens
