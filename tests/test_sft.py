"""glm.sft: each release's fine-tuning layout against examples built by hand the way the references'
scripts build them (HF-style unshifted labels, shifted here), truncation, the errors and their lines,
and collation without padding leaks.

The expected sequences below follow, step by step: ChatGLM-6B and ChatGLM2-6B ``ptuning/main.py``
preprocess_function_train, ChatGLM3 ``finetune_demo/finetune_hf.py`` and GLM-4
``finetune_demo/finetune.py`` process_batch, THUDM/GLM ``tasks/seq2seq/dataset.py`` Seq2SeqDataset.
"""
import importlib.util
import json
import os
import random

import pytest
import torch

from glm import GLM, preset
from glm.errors import ArgumentError, DataError
from glm.sft import IGNORE, collate, encode_row, load_jsonl, loss_sum
from glm.tokenizer import train

needs_tiktoken = pytest.mark.skipif(importlib.util.find_spec("tiktoken") is None,
                                    reason="the GLM-4 tokenizer needs the optional package tiktoken")
VOCAB = {"glm": 600, "chatglm": 700, "chatglm2": 600, "chatglm3": 600, "glm4": 420}
FAMILIES = ["glm", "chatglm", "chatglm2", "chatglm3", pytest.param("glm4", marks=needs_tiktoken)]
PRESET = {"glm": "tiny-glm", "chatglm": "tiny-chatglm", "chatglm2": "tiny-chatglm2", "chatglm3": "tiny-chatglm3",
          "glm4": "tiny-glm4-chatglm"}
EN = "what is the colour of belia red blue lives in kelda hello world tool weather sunny round".split()
ZH = list("问答你好世界我们的模型语言数据训练测试今天天气很好")

CONV = [{"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is red"},
        {"role": "assistant", "content": "blue 你好"},
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "kelda", "metadata": "weather"},
        {"role": "observation", "content": "sunny"},
        {"role": "assistant", "content": "今天天气很好"}]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_toks")
    r = random.Random(0)
    lines = [" ".join(r.choice(EN) if r.random() < 0.5 else "".join(r.choice(ZH) for _ in range(3))
                      for _ in range(10)) for _ in range(800)]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = train([str(corpus)], str(root / family), VOCAB[family], family)
        return cache[family]
    return get


def shift(hf_labels):
    """HF labels (the model shifts them) -> glm's aligned labels (slot t's target)."""
    return list(hf_labels[1:]) + [IGNORE]


# ---------------------------------------------------------------------------------------------
# Layouts against the references' steps

def test_chatglm6b_layout(toks):
    tok = toks("chatglm")
    row = {"prompt": "hello world", "response": "blue 你好", "history": [["what is red", "kelda"]]}
    ex = encode_row(row, tok, "chatglm")
    prompt = "[Round 0]\n问：what is red\n答：kelda\n[Round 1]\n问：hello world\n答："
    a, b = tok.encode(prompt), tok.encode("blue 你好")
    gmask, sop, eop = tok.token_id("[gMASK]"), tok.token_id("<sop>"), tok.token_id("<eop>")
    ids = a + [gmask, sop] + b + [eop]  # build_inputs_with_special_tokens(a, b)
    ctx = ids.index(sop)
    assert ex.input_ids == ids
    assert ex.labels == shift([IGNORE] * ctx + ids[ctx:])
    assert ex.labels[ctx - 1] == sop  # [gMASK] predicts <sop>, as the reference's labels say
    mask = ctx - 1
    assert ex.position_ids == [list(range(ctx)) + [mask] * (len(ids) - ctx),
                               [0] * ctx + list(range(1, len(ids) - ctx + 1))]
    assert ex.prefix_len == ctx
    # the prompt part is the chat prompt generation uses
    assert ids[:ctx + 1] == tok.chat_ids("hello world", history=[("what is red", "kelda")])


def test_chatglm2_layout(toks):
    tok = toks("chatglm2")
    row = {"messages": [{"role": "user", "content": "what is red"}, {"role": "assistant", "content": "kelda"},
                        {"role": "user", "content": "hello world"}, {"role": "assistant", "content": "blue 你好"}]}
    ex = encode_row(row, tok, "chatglm2")
    prompt = "[Round 1]\n\n问：what is red\n\n答：kelda\n\n[Round 2]\n\n问：hello world\n\n答："
    a = [tok.token_id("[gMASK]"), tok.token_id("sop")] + tok.encode(prompt)
    b = tok.encode("blue 你好")
    eos = tok.eos_ids[0]
    assert ex.input_ids == a + b + [eos]
    hf = [tok.pad_id] * len(a) + b + [eos]
    assert ex.labels == shift([IGNORE if x == tok.pad_id else x for x in hf])
    assert ex.position_ids is None and ex.prefix_len == 0
    assert a == tok.chat_ids("hello world", history=[("what is red", "kelda")])


@pytest.mark.parametrize("family", ["chatglm3", pytest.param("glm4", marks=needs_tiktoken)])
def test_multiturn_chat_layout(toks, family):
    tok = toks(family)
    ex = encode_row({"messages": CONV}, tok, family)
    ids, mask = [tok.token_id("[gMASK]"), tok.sop_id], [False, False]
    for m in CONV:
        role = tok.token_id(f"<|{m['role']}|>")
        meta = m.get("metadata", "")
        if family == "chatglm3":  # build_single_message
            part = [role] + tok.encode(f"{meta}\n") + tok.encode(m["content"])
        else:  # apply_chat_template([message])[2:]
            part = [role] + tok.encode(f"{meta}\n{m['content']}")
        ids += part
        mask += [m["role"] == "assistant"] * len(part)
    ids.append(tok.eos_ids[0] if family == "chatglm3" else tok.token_id("<|user|>"))
    mask = [False] + mask  # the references' right shift of the loss mask
    hf = [x if k else IGNORE for x, k in zip(ids, mask)]
    assert ex.input_ids == ids
    assert ex.labels == shift(hf)
    # every assistant turn (its metadata too) is trained, with the token that ends it; nothing else is
    trained = [ids[t + 1] for t, lab in enumerate(ex.labels) if lab != IGNORE]
    text = tok.decode(trained, skip_special_tokens=True)
    assert text.replace("\n", "").replace(" ", "") == "blue你好weatherkelda今天天气很好"
    assert ex.position_ids is None and ex.prefix_len == 0
    # the context before each reply is what chat_ids builds for generation (its <|assistant|> included)
    last = len(ids) - 1 - ids[::-1].index(tok.token_id("<|assistant|>"))
    assert ids[:last + 1] == tok.chat_ids(messages=CONV[:-1])


def test_glm_part_a_and_b(toks):
    tok = toks("glm")
    ex = encode_row({"prompt": "what is red", "response": "blue 你好"}, tok, "glm")
    cls, gmask, sop, eop = (tok.token_id(t) for t in ("[CLS]", "[gMASK]", "<|startofpiece|>", "<|endofpiece|>"))
    source = [cls] + tok.encode("what is red") + [gmask]
    target = tok.encode("blue 你好") + [eop]
    assert ex.input_ids == source + [sop] + target[:-1]
    assert ex.labels == [IGNORE] * len(source) + target  # Seq2SeqDataset's target_ids, already aligned
    n = len(source)
    assert ex.position_ids == [list(range(n)) + [n - 1] * len(target), [0] * n + list(range(1, len(target) + 1))]
    assert ex.prefix_len == n


# ---------------------------------------------------------------------------------------------
# Truncation

def test_truncation_rules(toks):
    long_q, long_a = " ".join(["hello world"] * 20), " ".join(["blue red"] * 20)
    row = {"prompt": long_q, "response": long_a}
    tok = toks("chatglm")
    ex = encode_row(row, tok, "chatglm", max_source_len=8, max_target_len=6)
    ctx = ex.input_ids.index(tok.sop_id)
    assert ctx - 1 == 7 and len(ex) - ctx - 2 == 4  # a: max_source - 1, b: max_target - 2
    assert ex.input_ids[:7] == tok.encode(long_q)[:7]
    tok = toks("chatglm2")
    ex = encode_row(row, tok, "chatglm2", max_source_len=8, max_target_len=6)
    assert len(ex) == 8 + 6 + 1 and ex.input_ids[-1] == tok.eos_ids[0]
    tok = toks("chatglm3")
    ex = encode_row({"messages": CONV}, tok, "chatglm3", max_source_len=20, max_target_len=10)
    full = encode_row({"messages": CONV}, tok, "chatglm3")
    assert len(full) > 31  # the whole sequence is cut to max_source + max_target + 1
    assert ex.input_ids == full.input_ids[:31] and ex.labels[:-1] == full.labels[:30] and ex.labels[-1] == IGNORE
    tok = toks("glm")
    ex = encode_row(row, tok, "glm", max_source_len=8, max_target_len=6)
    assert ex.prefix_len == 8 and len(ex) == 8 + 6  # [CLS] 6 ids [gMASK]; <sop> + 5 of the 6 targets
    assert ex.labels[-1] != tok.eop_id  # a cut answer loses its <eop>, as the reference's does


# ---------------------------------------------------------------------------------------------
# Errors name the file and line

def _write(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return str(path)


GOOD = {"prompt": "what is red", "response": "blue"}
BAD_ROWS = [
    ("{not json", "not valid JSON"),
    ([1, 2], "not an object"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "role 'robot'"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "has no \"content\""),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "has content 3"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}, "non-empty string"),
    ({"messages": []}, "non-empty list"),
    ({"prompt": "q"}, "\"response\" must be a non-empty string"),
    ({"text": "q"}, "needs \"messages\""),
    ({"prompt": "q", "response": "a", "messages": []}, "keep one form"),
    ({"prompt": "q", "response": "a", "history": [["q"]]}, "history entry 0"),
]


@pytest.mark.parametrize("row,message", BAD_ROWS)
def test_bad_rows_name_their_line(toks, tmp_path, row, message):
    tok = toks("chatglm3")
    path = _write(tmp_path, [GOOD, "", GOOD, row])
    with pytest.raises(DataError, match=rf"{path} line 4: .*{message}"):
        load_jsonl(path, tok, "chatglm3")


@pytest.mark.parametrize("family,row,message", [
    ("chatglm2", {"messages": CONV}, "no system role"),
    ("chatglm", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                              {"role": "assistant", "content": "c"}]}, "alternating user/assistant"),
    ("glm", {"prompt": "q", "response": "a", "history": [["q", "a"]]}, "no chat format"),
    pytest.param("glm4", {"messages": [{"role": "system", "content": "s", "tools": [{"name": "f"}]},
                                       {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
                 "tools system prompt", marks=needs_tiktoken),
])
def test_family_specific_errors(toks, tmp_path, family, row, message):
    path = _write(tmp_path, [GOOD, row])
    with pytest.raises(DataError, match=rf"line 2: .*{message}"):
        load_jsonl(path, toks(family), family)


@pytest.mark.parametrize("family", FAMILIES)
def test_too_long_for_the_model(toks, tmp_path, family):
    row = {"prompt": "what is the colour of belia", "response": " ".join(["blue red"] * 30)}
    path = _write(tmp_path, [GOOD, GOOD, row])
    with pytest.raises(DataError, match=r"line 3: the row needs \d+ positions .* more than the model's 32"):
        load_jsonl(path, toks(family), family, max_positions=32)
    assert len(load_jsonl(path, toks(family), family, max_source_len=12, max_target_len=12, max_positions=32)) == 3


def test_file_and_argument_errors(toks, tmp_path):
    tok = toks("chatglm3")
    with pytest.raises(DataError, match="holds no rows"):
        load_jsonl(_write(tmp_path, ["", "  "]), tok, "chatglm3")
    with pytest.raises(DataError, match="no such file"):
        load_jsonl(str(tmp_path / "missing.jsonl"), tok, "chatglm3")
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "caf\xe9", "response": "x"}\n')
    with pytest.raises(DataError, match="line 2: not valid UTF-8"):
        load_jsonl(str(bad), tok, "chatglm3")
    with pytest.raises(ArgumentError, match="family 'chatglm2' fine-tunes with the chatglm2 tokenizer"):
        encode_row(GOOD, tok, "chatglm2")
    with pytest.raises(ArgumentError, match="unknown tokenizer family"):
        encode_row(GOOD, tok, "gpt2")
    with pytest.raises(ArgumentError, match="max_target_len must be an int >= 3"):
        encode_row(GOOD, toks("chatglm"), "chatglm", max_target_len=2)
    with pytest.raises(DataError, match="no answer token is left"):
        encode_row({"messages": CONV}, tok, "chatglm3", max_source_len=4, max_target_len=2)
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "latin1.jsonl"]  # reading writes nothing


def test_model_family_names_map_to_their_tokenizer(toks):
    pytest.importorskip("tiktoken")
    tok = toks("glm4")
    rows = [encode_row({"messages": CONV}, tok, fam).input_ids for fam in ("glm4", "glm4-chatglm", "glm-hf",
                                                                             "glm4-hf")]
    assert all(r == rows[0] for r in rows)


# ---------------------------------------------------------------------------------------------
# Collation

@pytest.mark.parametrize("family", FAMILIES)
def test_collate_loss_equals_per_example_loss(toks, family):
    tok = toks(family)
    rows = [{"prompt": "what is red", "response": "blue"},
            {"prompt": "hello world what is the colour of belia", "response": "kelda 你好 red blue"},
            {"prompt": "今天", "response": "天气很好"}]
    if family in ("chatglm3", "glm4"):
        rows[1] = {"messages": CONV[:5]}
    examples = [encode_row(r, tok, family) for r in rows]
    batch = collate(examples, tok.pad_id)
    B, T = len(examples), max(len(e) for e in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == (B, T)
    assert batch["position_ids"].shape == ((B, 2, T) if examples[0].position_ids else (B, T))
    for i, e in enumerate(examples):
        assert batch["input_ids"][i, len(e):].eq(tok.pad_id).all() and batch["labels"][i, len(e):].eq(IGNORE).all()
        assert batch["prefix_len"][i] == e.prefix_len and batch["lengths"][i] == len(e)
    torch.manual_seed(0)
    cfg = preset(PRESET[family]).replace(vocab_size=tok.vocab_size)
    model = GLM(cfg).eval()
    model.init_weights(seed=0)
    with torch.no_grad():
        total, n = loss_sum(model, batch)
        alone = [loss_sum(model, collate([e], tok.pad_id)) for e in examples]
    assert n == sum(e.num_targets for e in examples) == sum(k for _, k in alone)
    torch.testing.assert_close(total, sum(s for s, _ in alone), rtol=1e-5, atol=1e-5)


def test_collate_errors(toks):
    with pytest.raises(DataError, match="no examples"):
        collate([], 0)
    one_d = encode_row(GOOD, toks("chatglm2"), "chatglm2")
    two_d = encode_row(GOOD, toks("chatglm"), "chatglm")
    with pytest.raises(DataError, match="2D and 1D"):
        collate([one_d, two_d], 0)
