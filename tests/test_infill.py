"""Blank-infilling generation: Part A bidirectional, each blank generated after <sop> at its mask's position."""
import pytest
import torch

import glm
from glm.generate import infill_ids
from glm.model import InputError
from glm.parity import load_cases

from conftest import reference_dir

# The GLM fixture's special ids (cases.json special_token_ids).
MASK, SMASK, GMASK, SOP, EOP, CLS = 153, 154, 155, 156, 157, 158


def test_gmask_infill_reproduces_reference_decode():
    """The fixture's decode case is `[CLS] text [gMASK] <sop>` + greedy: infill of the same text must
    generate the same tokens (it builds the same prompt and positions itself)."""
    d = reference_dir("glm")
    model = glm.from_pretrained(d)
    _, t = load_cases(d)
    ids = t["decode.input_ids"][0].tolist()
    assert ids[0] == CLS and ids[-2:] == [GMASK, SOP]
    res = infill_ids(model, ids[1:-2], mask_ids=[MASK, SMASK], gmask_id=GMASK, sop_id=SOP, eop_id=EOP,
                     cls_id=CLS, max_span_tokens=t["decode.tokens"].shape[1])
    assert res.spans == [t["decode.tokens"][0].tolist()]
    assert res.tokens == ids[1:-2] + res.spans[0]


def _glm_model():
    model = glm.GLM(glm.preset("tiny-glm")).eval()
    model.init_weights(std=0.3, seed=1)
    return model


def test_spans_are_spliced_at_their_masks():
    model = _glm_model()
    text = [7, 139, MASK, 86, 132, 73, MASK, 112, 126]
    res = infill_ids(model, text, mask_ids=[MASK, SMASK], gmask_id=GMASK, sop_id=SOP, eop_id=EOP, cls_id=CLS,
                     max_span_tokens=3)
    a, b = res.spans
    assert res.tokens == [7, 139, *a, 86, 132, 73, *b, 112, 126]
    assert len(res.spans) == 2 == len(res.complete)


def test_second_blank_equals_full_forward_of_the_layout():
    """Each step of the cached infill equals an uncached forward of the whole Part A / Part B layout:
    Part A bidirectional, span i at its mask's position with block positions 1, 2, ..."""
    model = _glm_model()
    text = [7, 139, MASK, 86, 132, MASK, 112]
    res = infill_ids(model, text, mask_ids=[MASK], sop_id=SOP, eop_id=EOP, cls_id=CLS, max_span_tokens=3)
    part_a = [CLS] + text
    A = len(part_a)
    ids, pos, blk = list(part_a), list(range(A)), [0] * A
    for m, span in zip([3, 6], res.spans):
        ids += [SOP] + span
        pos += [m] * (1 + len(span))
        blk += list(range(1, 2 + len(span)))
    with torch.no_grad():
        logits = model(torch.tensor([ids]), torch.tensor([[pos, blk]]), prefix_len=torch.tensor([A]))[0]
    # Greedy choice after each fed token of each span reproduces the span (or eop / the length cap).
    at = A
    for span, done in zip(res.spans, res.complete):
        choices = logits[at : at + len(span) + 1].argmax(-1).tolist()
        assert choices[: len(span)] == span
        if done:
            assert choices[len(span)] == EOP
        at += 1 + len(span)


def test_infill_rejects_1d_families_and_empty_text():
    model = glm.GLM(glm.preset("tiny-chatglm3")).eval()
    with pytest.raises(InputError, match="2D positions"):
        infill_ids(model, [1, 2, 3], mask_ids=[5], sop_id=6, eop_id=7)
    with pytest.raises(InputError, match="non-empty"):
        infill_ids(_glm_model(), [], mask_ids=[MASK], sop_id=SOP, eop_id=EOP)
    with pytest.raises(InputError, match="no mask token"):
        infill_ids(_glm_model(), [1, 2, 3], mask_ids=[MASK], sop_id=SOP, eop_id=EOP)


def test_chatglm6b_infill_uses_2d_rope_positions():
    model = glm.GLM(glm.preset("tiny-chatglm")).eval()
    model.init_weights(std=0.3, seed=2)
    res = infill_ids(model, [11, 130, 104, 127, 77], mask_ids=[152], gmask_id=153, sop_id=156, eop_id=157,
                     max_span_tokens=4, temperature=0.8, seed=0)
    again = infill_ids(model, [11, 130, 104, 127, 77], mask_ids=[152], gmask_id=153, sop_id=156, eop_id=157,
                       max_span_tokens=4, temperature=0.8, seed=0)
    assert res == again and len(res.spans) == 1
    assert res.tokens[:5] == [11, 130, 104, 127, 77]


@pytest.fixture(scope="module")
def corpus_tokenizers(tmp_path_factory):
    from glm import corpus
    from glm.tokenizer import load, train

    d = tmp_path_factory.mktemp("blank-corpus")
    train_file, heldout = corpus.write_corpus(corpus.generate_corpus(seed=0, size="tiny"), str(d))
    toks = {}
    for family in ("glm", "chatglm", "chatglm3"):
        train([train_file], str(d / family), vocab_size=600, family=family)
        toks[family] = load(str(d / family))
    import json

    with open(heldout, encoding="utf-8") as f:
        examples = [json.loads(line) for line in f][:40]
    return toks, examples


@pytest.mark.parametrize("family", ["glm", "chatglm", "chatglm3"])
def test_blank_text_encodes_like_the_training_layout(corpus_tokenizers, family):
    """A text with a blank encodes as the whole text's tokens with the answer's run replaced by one
    mask: no stray dummy-prefix piece after the mask ("[MASK]." must not become [MASK] "▁" ".")."""
    from glm.generate import encode_blank_text

    toks, examples = corpus_tokenizers
    tok = toks[family]
    mask = tok.special_tokens["[MASK]"]
    checked = glued = 0
    for ex in examples:
        ids, whole = encode_blank_text(tok, ex["text"]), tok.encode(ex["text"].replace("[MASK]", ex["answer"]))
        k = ids.index(mask)
        head, tail = ids[:k], ids[k + 1:]
        through_answer = tok.encode(ex["text"].split("[MASK]")[0] + ex["answer"])
        if whole[:len(head)] != head or whole[:len(through_answer)] != through_answer:
            continue  # the answer merges with its neighbours ("13." or unsegmented Chinese): no boundary
        # Where the whole text has a token boundary after the answer, what follows the blank is the
        # whole text's tail, token for token.
        assert tail == whole[len(through_answer):], (ex, [tok.decode([i]) for i in tail])
        checked += 1
        glued += "[MASK]." in ex["text"]
    assert checked >= len(examples) // 2 and glued >= 3, (checked, glued)
