"""Blank-infilling generation: Part A bidirectional, each blank generated after <sop> at its mask's position."""
import pytest
import torch
from conftest import reference_dir

import glm
from glm.errors import InputError
from glm.generate import encode_blank_text, infill_ids, stream_infill, stream_text, tokenizer_infill_args
from glm.parity import load_cases

# The GLM fixture's special ids (cases.json special_token_ids).
MASK, SMASK, GMASK, SOP, EOP, CLS = 153, 154, 155, 156, 157, 158
EOS = 0  # stands in for <|endoftext|> (the fixture's pad)
# ChatGLM-6B-layout ids in the tiny-chatglm vocabulary.
MASK6, GMASK6, SOP6, EOP6 = 152, 153, 156, 157


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


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static-step"])
def test_chatglm6b_infill_uses_2d_rope_positions(static):
    """The positions that reach RoPE, recorded at every forward of a sampled infill: Part A at 0..A-1
    with block position 0, <sop> at the blank's position with block position 1, then every fed span
    token at the same position with block positions 2, 3, ... (both streams rotate: 2D RoPE)."""
    model = glm.GLM(glm.preset("tiny-chatglm")).eval()
    model.init_weights(std=0.3, seed=2)
    assert model.pos_embed is None and model.rotary.segments == 2
    fed = []
    real = model.rotary.cos_sin

    def recording(position_ids, dtype):
        fed.append(position_ids.detach().cpu().clone())
        return real(position_ids, dtype)

    model.rotary.cos_sin = recording
    text = [11, 130, 104, 127, 77]
    kw = dict(mask_ids=[MASK6], gmask_id=GMASK6, sop_id=SOP6, eop_id=EOP6, max_span_tokens=4, temperature=0.8,
              seed=0, static=static)
    res = infill_ids(model, text, **kw)
    assert len(res.spans) == 1 and res.tokens[:5] == text
    span = res.spans[0]
    assert len(span) >= 2, span  # enough fed span tokens to see the block position count up
    A = len(text) + 1  # [gMASK] appended at index 5: the blank's position
    want = [torch.tensor([[list(range(A)), [0] * A]])]
    # <sop>, then each span token (the token ending the span, <eop> or the one over the cap, is not fed).
    want += [torch.tensor([[[A - 1], [blk]]]) for blk in range(1, 2 + len(span))]
    assert len(fed) == len(want), [f.tolist() for f in fed]
    for got, exp in zip(fed, want):
        assert torch.equal(got, exp), (got.tolist(), exp.tolist())
    # The same seed samples the same span.
    fed.clear()
    assert infill_ids(model, text, **kw) == res


def test_generation_gmask_replaces_a_trailing_eos():
    """Without a mask, [gMASK] is appended in place of the trailing eos that GLM's build_inputs adds:
    Part A is [CLS] text [gMASK], as THUDM's generate_samples.py builds it (and training never has an
    eos before [gMASK]). A text with a mask keeps [CLS] text <eos>."""
    model = _glm_model()
    kw = dict(mask_ids=[MASK, SMASK], gmask_id=GMASK, sop_id=SOP, eop_id=EOP, cls_id=CLS, max_span_tokens=4,
              eos_token_ids=[EOS])
    built = infill_ids(model, [CLS, 7, 139, 86, EOS], **kw)
    typed = infill_ids(model, [CLS, 7, 139, 86, GMASK], **kw)
    assert built == typed and built.tokens == [7, 139, 86, *built.spans[0]]
    with_mask = infill_ids(model, [CLS, 7, MASK, 86, EOS], **kw)
    assert with_mask.tokens == [7, *with_mask.spans[0], 86, EOS]


def test_span_ends_at_an_eos_as_well_as_at_eop():
    """THUDM ends a span at <eop> or the eod token, and glm.data's direct [gMASK] samples end with the
    eos and no <eop>: an eos id ends the span, complete, and is not spliced in."""
    model = _glm_model()
    kw = dict(mask_ids=[MASK], gmask_id=GMASK, sop_id=SOP, eop_id=EOP, cls_id=CLS, max_span_tokens=6)
    free = infill_ids(model, [7, 139, 86], eos_token_ids=(), **kw)
    span = free.spans[0]
    assert len(span) >= 3 and span[2] != 86, span  # the seed gives a long enough span to cut
    res = infill_ids(model, [7, 139, 86], eos_token_ids=[span[2]], **kw)
    first = span.index(span[2])
    assert res.spans == [span[:first]] and res.complete == [True]
    assert res.tokens == [7, 139, 86, *span[:first]]


def test_chatglm6b_generates_only_the_gmask_blank():
    """ChatGLM-6B's mask position is the first [gMASK] if present, else the first [MASK] (GLM_SPEC
    §2.6): a [MASK] before the [gMASK] stays a Part A token. Without a [gMASK] every [MASK] is filled."""
    model = glm.GLM(glm.preset("tiny-chatglm")).eval()
    model.init_weights(std=0.3, seed=2)
    kw = dict(mask_ids=[MASK6], gmask_id=GMASK6, sop_id=SOP6, eop_id=EOP6, max_span_tokens=4)
    text = [11, MASK6, 130, 104, GMASK6]
    res = infill_ids(model, text, **kw)
    assert len(res.spans) == 1 and res.tokens == [11, MASK6, 130, 104, *res.spans[0]]
    # The span is generated at the [gMASK]'s position (4): one forward of that layout reproduces it.
    span = res.spans[0]
    ids = text + [SOP6] + span
    pos = [[0, 1, 2, 3, 4] + [4] * (1 + len(span)), [0] * 5 + list(range(1, 2 + len(span)))]
    with torch.no_grad():
        logits = model(torch.tensor([ids]), torch.tensor([pos]), prefix_len=torch.tensor([5]))[0]
    assert logits[5:5 + len(span)].argmax(-1).tolist() == span
    assert len(infill_ids(model, [11, MASK6, 130, MASK6], **kw).spans) == 2


@pytest.mark.parametrize("name", ["tiny-glm", "tiny-chatglm"])
def test_infill_span_past_the_position_table_fails_up_front(name):
    """A span's block positions run 1 .. max_span_tokens + 1; past the table it used to fail mid-way
    (IndexError, learned positions) or extrapolate silently (RoPE)."""
    model = glm.GLM(glm.preset(name)).eval()
    model.init_weights(std=0.3, seed=1)
    fit = model.config.max_positions - 2
    # An <eop> id the model never emits, so the span runs to max_span_tokens.
    kw = dict(mask_ids=[MASK], gmask_id=GMASK, sop_id=SOP, eop_id=10**6, eos_token_ids=())
    with pytest.raises(InputError, match=f"at most {fit} tokens per blank fit"):
        stream_infill(model, [7, MASK], max_span_tokens=fit + 1, **kw)  # refused at the call, before output
    res = infill_ids(model, [7, MASK], max_span_tokens=fit, **kw)
    assert len(res.spans[0]) == fit and res.complete == [False]


def test_infill_refuses_generate_only_arguments():
    """max_new_tokens would read as a total and was silently ignored: infill's cap is per blank."""
    kw = dict(mask_ids=[MASK], sop_id=SOP, eop_id=EOP)
    with pytest.raises(InputError, match="max_span_tokens=2"):
        infill_ids(_glm_model(), [7, MASK], max_new_tokens=2, **kw)
    with pytest.raises(InputError, match="max_span_tokens must be >= 1"):
        infill_ids(_glm_model(), [7, MASK], max_span_tokens=0, **kw)
    with pytest.raises(InputError, match="temperature > 0"):
        infill_ids(_glm_model(), [7, MASK], top_p=0.5, **kw)


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


def test_tokenizer_paths_end_spans_at_eos_and_put_gmask_before_it(corpus_tokenizers):
    """`glm generate`'s prompt for GLM is build_inputs = [CLS] text <|endoftext|>; with no mask it is
    generated as [CLS] text [gMASK] (the eos dropped), and the tokenizer's eos ends the span."""
    toks, _ = corpus_tokenizers
    tok = toks["glm"]
    assert tokenizer_infill_args(tok)["eos_token_ids"] == tok.eos_ids
    model = glm.GLM(glm.preset("tiny-glm").replace(vocab_size=tok.vocab_size)).eval()
    model.init_weights(std=0.3, seed=0)
    text = tok.encode("the cat sat on the")
    built = "".join(stream_text(model, tok, tok.build_inputs(text), max_new_tokens=6))
    typed = "".join(stream_text(model, tok, [tok.cls_id, *text, tok.mask_ids["gMASK"]], max_new_tokens=6))
    assert built == typed and built


def test_glm_text_ending_in_a_mask_has_no_eos(corpus_tokenizers, monkeypatch):
    """THUDM's generate_samples.py appends the eod only when the text does not end in a mask: a
    trailing blank runs to the end of the document."""
    import importlib

    gen = importlib.import_module("glm.generate")  # the module (glm.generate is also the function)
    toks, _ = corpus_tokenizers
    tok = toks["glm"]
    model = glm.GLM(glm.preset("tiny-glm").replace(vocab_size=tok.vocab_size)).eval()
    seen = []
    real = gen.infill_ids
    monkeypatch.setattr(gen, "infill_ids", lambda m, ids, **kw: seen.append(list(ids)) or real(m, ids, **kw))
    gen.infill(model, tok, "the cat sat on the [MASK]", max_span_tokens=2)
    gen.infill(model, tok, "the [MASK] sat on the mat", max_span_tokens=2)
    eos = tok.special_tokens["<|endoftext|>"]
    assert seen[0][-1] == tok.mask_ids["MASK"] and eos not in seen[0]
    assert seen[1][-1] == eos
