"""glm.tokenizer: special-token layouts, chat formats, round trips, load/save/train and their errors.

Everything runs on tiny tokenizers trained here on a synthetic English + Chinese corpus (GLM_SPEC §5
layouts, relative to the trained piece count n). Tests against real release vocabularies read
$GLM_TOKENIZER_DIR (subfolders chatglm3-6b, glm-4-9b-chat, optionally chatglm-6b, chatglm2-6b,
glm-large-chinese) and skip when it is unset.
"""
import base64
import importlib.util
import json
import os
import random
import re
import shutil
import sys

import pytest
import sentencepiece as spm
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from glm.tokenizer import Tokenizer, TokenizerError, load, train

HAS_TIKTOKEN = importlib.util.find_spec("tiktoken") is not None
needs_tiktoken = pytest.mark.skipif(not HAS_TIKTOKEN, reason="tiktoken is not installed: the GLM-4 tokenizer needs "
                                                             "the optional dependency (pip install tiktoken)")
SP_FAMILIES = ["glm", "chatglm", "chatglm2", "chatglm3"]
FAMILIES = SP_FAMILIES + [pytest.param("glm4", marks=needs_tiktoken)]
CHAT_FAMILIES = ["chatglm", "chatglm2", "chatglm3", pytest.param("glm4", marks=needs_tiktoken)]
VOCAB = {"glm": 600, "chatglm": 700, "chatglm2": 600, "chatglm3": 600, "glm4": 420}
MODEL_FILE = {"glm": "cog-pretrain.model", "chatglm": "ice_text.model", "chatglm2": "tokenizer.model",
              "chatglm3": "tokenizer.model", "glm4": "tokenizer.model"}

# The layouts of GLM_SPEC §5, written out here (not imported) so a reordering in the package fails.
APPENDED = {
    "glm": ["<|endoftext|>", "[SEP]", "[CLS]", "[MASK]", "[UNUSED1]", "[UNUSED2]", "<|startofpiece|>",
            "<|endofpiece|>", "[sMASK]", "[gMASK]"],
    "chatglm": ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"],
    "chatglm2": ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"],
    "chatglm3": ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                 "<|observation|>"],
    "glm4": ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
             "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
             "<|end_of_video|>"],
}

EN = ("the quick brown fox jumps over a lazy dog while the model reads tokens and language data to train "
      "and test its weights print return def class for in if else").split()
ZH = list("你好世界我们的模型语言数据训练测试中文分词器是一个在有这个人大中国"
          "上来到时和地为子也说生年着就那要下以会可家么去过问答")


def corpus_text(seed: int = 0, lines: int = 1500) -> str:
    r = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [r.choice(EN) if r.random() < 0.5 else "".join(r.choice(ZH) for _ in range(r.randint(1, 4)))
                 for _ in range(r.randint(3, 14))]
        s = " ".join(words)
        if r.random() < 0.3:
            s = "    " * r.randint(1, 3) + s  # code-like indentation
        if r.random() < 0.2:
            s += "\t" + r.choice(EN)
        if r.random() < 0.1:
            s += " " * r.randint(2, 9) + "# " + r.choice(EN)
        out.append(s)
    return "\n".join(out) + "\n"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tok_corpus") / "corpus.txt"
    path.write_text(corpus_text(), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, corpus):
    """family -> (Tokenizer, its saved folder); each family is trained once per session, on first use."""
    root = tmp_path_factory.mktemp("tok_trained")
    cache: dict = {}

    def get(family: str):
        if family not in cache:
            out = str(root / family)
            cache[family] = (train([corpus], out, VOCAB[family], family), out)
        return cache[family]
    return get


def text_pieces(tok: Tokenizer, folder: str) -> int:
    """n, read from the saved model file itself rather than from the tokenizer under test."""
    path = os.path.join(folder, MODEL_FILE[tok.family])
    if tok.family == "glm4":
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    n = spm.SentencePieceProcessor(model_file=path).get_piece_size()
    return n - len(APPENDED["chatglm"]) if tok.family == "chatglm" else n


# ---------------------------------------------------------------------------------------------
# layouts

@pytest.mark.parametrize("family", FAMILIES)
def test_special_token_layout(trained, family):
    tok, folder = trained(family)
    n = text_pieces(tok, folder)
    assert tok.family == family
    for i, name in enumerate(APPENDED[family]):
        assert tok.token_id(name) == n + i, name
    assert tok.vocab_size == n + len(APPENDED[family]) == VOCAB[family]
    sp = tok.token_id
    expected_roles = {
        "glm": lambda: (sp("<|endoftext|>"), (sp("<|endoftext|>"),), None, sp("<|startofpiece|>"),
                        sp("<|endofpiece|>"), sp("[CLS]")),
        "chatglm": lambda: (3, (sp("<eop>"),), sp("<sop>"), sp("<sop>"), sp("<eop>"), None),
        "chatglm2": lambda: (0, (2,), 1, sp("sop"), sp("eop"), None),
        "chatglm3": lambda: (0, (2, sp("<|user|>"), sp("<|observation|>")), 1, sp("sop"), sp("eop"), None),
        "glm4": lambda: (sp("<|endoftext|>"), (sp("<|endoftext|>"), sp("<|user|>"), sp("<|observation|>")), None,
                         sp("<sop>"), sp("<eop>"), None),
    }[family]()
    assert (tok.pad_id, tok.eos_ids, tok.bos_id, tok.sop_id, tok.eop_id, tok.cls_id) == expected_roles
    assert tok.mask_ids == {"MASK": sp("[MASK]"), "sMASK": sp("[sMASK]"), "gMASK": sp("[gMASK]")}


def test_chatglm6b_pad_is_piece_3(trained):
    tok, folder = trained("chatglm")
    model = spm.SentencePieceProcessor(model_file=os.path.join(folder, "ice_text.model"))
    assert tok.pad_id == 3 == model.piece_to_id("<pad>")
    # the specials are pieces of the model itself, right after the text pieces
    assert [model.id_to_piece(tok.token_id(p)) for p in APPENDED["chatglm"]] == APPENDED["chatglm"]


@pytest.mark.parametrize("family", FAMILIES)
def test_build_inputs(trained, family):
    tok, _ = trained(family)
    ids = tok.encode("你好 world")
    g = tok.mask_ids["gMASK"]
    expected = {"glm": lambda: [tok.cls_id, *ids, tok.token_id("<|endoftext|>")],
                "chatglm": lambda: [*ids, g, tok.token_id("<sop>")],
                "chatglm2": lambda: [g, tok.token_id("sop"), *ids],
                "chatglm3": lambda: [g, tok.token_id("sop"), *ids],
                "glm4": lambda: [g, tok.token_id("<sop>"), *ids]}[family]()
    assert tok.build_inputs(ids) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_infill_prompt(trained, family):
    """The Part A a text with blanks is infilled from: original GLM wraps it as [CLS] text <|endoftext|>
    (no eos after a final mask, as THUDM's generate_samples.py); the other releases take the ids as they are."""
    tok, _ = trained(family)
    text, m = tok.encode("你好 world"), tok.mask_ids["MASK"]
    for ids in ([*text, m, *text], [*text, m], []):
        if family == "glm":
            wrapped = [tok.cls_id, *ids, tok.token_id("<|endoftext|>")]
            expected = wrapped[:-1] if ids and ids[-1] == m else wrapped
        else:
            expected = ids
        assert tok.infill_prompt(ids) == expected


# ---------------------------------------------------------------------------------------------
# chat formats, rebuilt by hand from encode() and the special ids

def test_chat_chatglm6b(trained):
    tok, _ = trained("chatglm")
    tail = [tok.token_id("[gMASK]"), tok.token_id("<sop>")]
    assert tok.chat_ids("你好") == tok.encode("你好") + tail  # empty history: the raw query
    prompt = "[Round 0]\n问：q one\n答：r one\n[Round 1]\n问：q two\n答：r two\n[Round 2]\n问：你好\n答："
    history = [("q one", "r one"), ("q two", "r two")]
    assert tok.chat_ids("你好", history) == tok.encode(prompt) + tail
    msgs = [{"role": "user", "content": "q one"}, {"role": "assistant", "content": "r one"},
            {"role": "user", "content": "q two"}, {"role": "assistant", "content": "r two"},
            {"role": "user", "content": "你好"}]
    assert tok.chat_ids(messages=msgs) == tok.encode(prompt) + tail
    with pytest.raises(TokenizerError, match="role 'system'"):
        tok.chat_ids("你好", system="be brief")


def test_chat_chatglm2(trained):
    tok, _ = trained("chatglm2")
    head = [tok.token_id("[gMASK]"), tok.token_id("sop")]
    assert tok.chat_ids("你好") == head + tok.encode("[Round 1]\n\n问：你好\n\n答：")
    prompt = "[Round 1]\n\n问：q one\n\n答：r one\n\n[Round 2]\n\n问：你好\n\n答："
    assert tok.chat_ids("你好", [("q one", "r one")]) == head + tok.encode(prompt)
    with pytest.raises(TokenizerError, match="user/assistant"):
        tok.chat_ids(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_chat_chatglm3(trained):
    tok, _ = trained("chatglm3")
    t, enc = tok.token_id, tok.encode
    tools = [{"name": "get_weather", "parameters": {"城市": "str"}}]
    msgs = [{"role": "system", "content": "You are GLM.", "tools": tools},
            {"role": "user", "content": "天气 in 北京?"},
            {"role": "assistant", "metadata": "get_weather", "content": "call(城市='北京')"},
            {"role": "observation", "content": '{"t": 20}'}]
    expected = [t("[gMASK]"), t("sop"),
                t("<|system|>"), *enc("\n"), *enc("You are GLM.\n" + json.dumps(tools, indent=4, ensure_ascii=False)),
                t("<|user|>"), *enc("\n"), *enc("天气 in 北京?"),
                t("<|assistant|>"), *enc("get_weather\n"), *enc("call(城市='北京')"),
                t("<|observation|>"), *enc("\n"), *enc('{"t": 20}'),
                t("<|assistant|>")]
    assert tok.chat_ids(messages=msgs) == expected
    # query/history/system form: the same per-message encoding
    expected = [t("[gMASK]"), t("sop"), t("<|system|>"), *enc("\n"), *enc("sys"),
                t("<|user|>"), *enc("\n"), *enc("q1"), t("<|assistant|>"), *enc("\n"), *enc("r1"),
                t("<|user|>"), *enc("\n"), *enc("你好"), t("<|assistant|>")]
    assert tok.chat_ids("你好", [("q1", "r1")], system="sys") == expected


@needs_tiktoken
def test_chat_glm4(trained):
    tok, _ = trained("glm4")
    t, enc = tok.token_id, tok.encode
    expected = [t("[gMASK]"), t("<sop>"), t("<|system|>"), *enc("\nsys"), t("<|user|>"), *enc("\nq1"),
                t("<|assistant|>"), *enc("\nr1"), t("<|user|>"), *enc("\n你好 world"), t("<|assistant|>")]
    assert tok.chat_ids("你好 world", [("q1", "r1")], system="sys") == expected
    msgs = [{"role": "user", "content": "天气?"}, {"role": "assistant", "metadata": "get_weather", "content": "x"},
            {"role": "observation", "content": "20"}]
    assert tok.chat_ids(messages=msgs) == [t("[gMASK]"), t("<sop>"), t("<|user|>"), *enc("\n天气?"),
                                           t("<|assistant|>"), *enc("get_weather\nx"), t("<|observation|>"),
                                           *enc("\n20"), t("<|assistant|>")]


@needs_tiktoken
def test_chat_glm4_skips_empty_messages(trained):
    """glm-4-9b-chat writes a message only `{% if item['content'] %}`: an empty one adds no role token,
    metadata or newline. ChatGLM3's build_chat_input has no such test and keeps it."""
    tok, _ = trained("glm4")
    t, enc = tok.token_id, tok.encode
    msgs = [{"role": "system", "content": ""}, {"role": "user", "content": "hi"},
            {"role": "assistant", "metadata": "get_weather", "content": ""}, {"role": "user", "content": "again"}]
    assert tok.chat_ids(messages=msgs) == [t("[gMASK]"), t("<sop>"), t("<|user|>"), *enc("\nhi"), t("<|user|>"),
                                           *enc("\nagain"), t("<|assistant|>")]
    assert tok.chat_ids("", [("q", "")]) == [t("[gMASK]"), t("<sop>"), t("<|user|>"), *enc("\nq"), t("<|assistant|>")]
    tok3, _ = trained("chatglm3")
    ids = tok3.chat_ids(messages=msgs)
    assert [i for i in ids if i in tok3.special_tokens.values()] == [
        tok3.token_id(n) for n in ("[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>", "<|user|>",
                                   "<|assistant|>")]


def test_glm_has_no_chat_format(trained):
    tok, _ = trained("glm")
    with pytest.raises(TokenizerError, match="no chat format"):
        tok.chat_ids("你好")


def test_chat_argument_errors(trained):
    tok, _ = trained("chatglm3")
    with pytest.raises(TokenizerError, match="not both"):
        tok.chat_ids("q", messages=[{"role": "user", "content": "q"}])
    with pytest.raises(TokenizerError, match="role 'robot'"):
        tok.chat_ids(messages=[{"role": "robot", "content": "q"}])
    with pytest.raises(TokenizerError, match="string 'content'"):
        tok.chat_ids(messages=[{"role": "user", "content": 3}])


# ---------------------------------------------------------------------------------------------
# round trips

CHUNKS = st.one_of(
    st.sampled_from(EN), st.sampled_from(ZH + ["你好世界", "分词器", "語言", "モデル", "🙂", "é"]),
    st.integers(1, 100).map(lambda k: " " * k),
    st.sampled_from(["\t", "\n", "\n\n", "\t\t", " \n", "\n    ", "\r\n"]),
    # SentencePiece writes spaces as U+2581 and decodes U+2581 back as a space, so it is left out here
    # (test_round_trip_exceptions pins that down).
    st.text(st.characters(codec="utf-8", exclude_characters="\u2581"), max_size=8),
)
TEXTS = st.lists(CHUNKS, max_size=14).map("".join)
CHATGLM_PLACEHOLDERS = ("<n>", "<|tab|>", "<|blank_")


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=50, deadline=None, derandomize=True)
@given(text=TEXTS)
def test_round_trip(trained, family, text):
    tok, _ = trained(family)
    if family == "chatglm":
        assume(not any(p in text for p in CHATGLM_PLACEHOLDERS))
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(tok.build_inputs(ids), skip_special_tokens=True) == text
    if family == "chatglm":
        # Without the dummy prefix a leading single space is a bare "\u2581" piece, which SentencePiece's
        # decoder strips like a dummy prefix (the release does the same).
        lost = text.startswith(" ") and not text.startswith("  ")
        assert tok.decode(tok.encode(text, add_dummy_prefix=False)) == (text[1:] if lost else text)


@needs_tiktoken
@settings(max_examples=50, deadline=None, derandomize=True)
@given(text=st.text())
def test_round_trip_glm4_any_text(trained, text):
    tok, _ = trained("glm4")  # byte-level: every string, U+2581 and placeholders included
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("family", SP_FAMILIES)
def test_round_trip_exceptions(trained, family):
    """The documented non-round-trips: U+2581 (all SentencePiece families) and, for ChatGLM-6B, text
    that spells its whitespace placeholders."""
    tok, _ = trained(family)
    assert tok.decode(tok.encode("a\u2581b")) == "a b"
    if family == "chatglm":
        assert tok.decode(tok.encode("a<n>b<|tab|>c<|blank_3|>d")) == "a\nb\tc   d"


@pytest.mark.parametrize("family", SP_FAMILIES)
@settings(max_examples=40, deadline=None, derandomize=True)
@given(text=st.lists(st.one_of(CHUNKS, st.sampled_from(["\u2581", "\u2581\u2581", "a\u2581b", " \u2581 "])),
                     max_size=10).map("".join))
def test_round_trip_guaranteed_form(trained, family, text):
    """What docs/tokenizers.md guarantees for text that holds U+2581 (as glm's own sources do): the text
    with each U+2581 as a space."""
    tok, _ = trained(family)
    if family == "chatglm":
        assume(not any(p in text for p in CHATGLM_PLACEHOLDERS))
    assert tok.decode(tok.encode(text)) == text.replace("\u2581", " ")


def test_chatglm6b_whitespace_pieces(trained):
    tok, folder = trained("chatglm")
    model = spm.SentencePieceProcessor(model_file=os.path.join(folder, "ice_text.model"))
    pid = model.piece_to_id
    ids = tok.encode("a\tb\nc" + " " * 85 + "d")
    ws = [i for i in ids if model.id_to_piece(i) == "<n>" or model.id_to_piece(i).startswith("<|")]
    # 85 spaces: longest run first, so <|blank_80|> then <|blank_5|>
    assert ws == [pid("<|tab|>"), pid("<n>"), pid("<|blank_80|>"), pid("<|blank_5|>")]
    # "without dummy prefix": "<n>" + text encoded, the dummy-prefix piece and <n> dropped
    with_prefix = tok.encode("\nabc")
    assert with_prefix[:2] == [pid("\u2581"), pid("<n>")]
    assert tok.encode("\nabc", add_dummy_prefix=False) == with_prefix[1:]
    assert not model.id_to_piece(tok.encode("hello", add_dummy_prefix=False)[0]).startswith("\u2581")


# ---------------------------------------------------------------------------------------------
# specials in text, decoding, names

def test_encode_with_specials(trained):
    tok, _ = trained("chatglm3")
    t, enc = tok.token_id, tok.encode
    text = "[gMASK]sop<|user|>\nhi desktop"
    # "sop" is an ordinary word as well as ChatGLM2/3's token name, so only token_id() reaches it
    assert tok.encode_with_specials(text) == [t("[gMASK]"), *enc("sop"), t("<|user|>"), *enc("\nhi desktop")]
    assert not set(enc(text)) & set(tok.special_tokens.values())  # plain encode never yields specials
    tok6, _ = trained("chatglm")
    assert tok6.encode_with_specials("问[MASK]答[gMASK]") == [*tok6.encode("问"), tok6.token_id("[MASK]"),
                                                              *tok6.encode("答"), tok6.token_id("[gMASK]")]
    assert not set(tok6.encode("问[MASK]答")) & set(tok6.special_tokens.values())


@needs_tiktoken
def test_encode_with_specials_glm4(trained):
    tok, _ = trained("glm4")
    assert tok.encode_with_specials("<|user|>\nhi[MASK]") == [tok.token_id("<|user|>"), *tok.encode("\nhi"),
                                                             tok.token_id("[MASK]")]
    assert tok.token_id("<|user|>") not in tok.encode("<|user|>")


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_special_tokens(trained, family):
    tok, _ = trained(family)
    s = "你好 world"
    g = tok.mask_ids["gMASK"]
    ids = [g, *tok.encode(s), tok.eop_id]
    names = {v: k for k, v in tok.special_tokens.items()}
    assert tok.decode(ids) == names[g] + s + names[tok.eop_id]
    assert tok.decode(ids, skip_special_tokens=True) == s


def test_unknown_special_token_name(trained):
    tok, _ = trained("chatglm3")
    with pytest.raises(TokenizerError, match="known: ") as e:
        tok.token_id("<|tool|>")
    known = str(e.value).split("known: ")[1].split(", ")
    assert "'<|tool|>'" in str(e.value) and {"[gMASK]", "sop", "<|user|>", "<|observation|>"} <= set(known)


def test_decode_rejects_foreign_ids(trained):
    tok, _ = trained("chatglm2")
    with pytest.raises(TokenizerError, match=f"0..{tok.vocab_size - 1}"):
        tok.decode([5, tok.vocab_size])


# ---------------------------------------------------------------------------------------------
# load / save

@pytest.mark.parametrize("family", FAMILIES)
def test_load_picks_family_from_saved_dir(trained, family):
    tok, folder = trained(family)
    with open(os.path.join(folder, "tokenizer_config.json")) as f:
        assert json.load(f)["glm_tokenizer_family"] == family
    for path in (folder, os.path.join(folder, MODEL_FILE[family])):
        again = load(path)
        assert again.family == family
        assert again.special_tokens == tok.special_tokens
        assert again.encode("你好\n  world") == tok.encode("你好\n  world")


def _release_dir(tmp_path, name: str, src: str, file: str, cfg=None) -> str:
    d = tmp_path / name
    d.mkdir()
    shutil.copy(src, d / file)
    if cfg is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False))
    return str(d)


def test_load_release_layouts(trained, tmp_path):
    """Folders laid out like the releases (their file names and tokenizer_config.json, no key of ours)."""
    _, f6 = trained("chatglm")
    _, f2 = trained("chatglm2")
    _, fg = trained("glm")
    auto = {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}
    d = _release_dir(tmp_path, "c6", f"{f6}/ice_text.model", "ice_text.model",
                     {"tokenizer_class": "ChatGLMTokenizer", "auto_map": auto, "num_image_tokens": 0})
    assert load(d).family == "chatglm"
    d = _release_dir(tmp_path, "c2", f"{f2}/tokenizer.model", "tokenizer.model",
                     {"tokenizer_class": "ChatGLMTokenizer", "auto_map": auto, "remove_space": False})
    assert load(d).family == "chatglm2"
    d = _release_dir(tmp_path, "c3a", f"{f2}/tokenizer.model", "tokenizer.model",
                     {"tokenizer_class": "ChatGLMTokenizer", "auto_map": auto,
                      "chat_template": "{% for m in messages %}<|{{ m['role'] }}|>{% endfor %}<|assistant|>"})
    assert load(d).family == "chatglm3"
    d = _release_dir(tmp_path, "c3b", f"{f2}/tokenizer.model", "tokenizer.model",
                     {"tokenizer_class": "ChatGLMTokenizer", "name_or_path": "THUDM/chatglm3-6b"})
    assert load(d).family == "chatglm3"
    d = _release_dir(tmp_path, "g", f"{fg}/cog-pretrain.model", "cog-pretrain.model",
                     {"tokenizer_class": "GLMChineseTokenizer"})
    assert load(d).family == "glm"
    # a renamed ice_text.model with no config: its [gMASK] piece gives it away
    d = _release_dir(tmp_path, "bare", f"{f6}/ice_text.model", "tokenizer.model")
    assert load(d).family == "chatglm"
    # family= overrides detection
    assert load(f"{f2}/tokenizer.model", family="chatglm3").family == "chatglm3"


@needs_tiktoken
def test_load_release_layout_glm4(trained, tmp_path):
    _, f4 = trained("glm4")
    d = _release_dir(tmp_path, "g4", f"{f4}/tokenizer.model", "tokenizer.model",
                     {"tokenizer_class": "ChatGLM4Tokenizer",
                      "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]}})
    tok = load(d)
    assert tok.family == "glm4" and tok.token_id("[gMASK]") == text_pieces(tok, f4) + 2


def test_model_family_names_are_accepted(trained, tmp_path):
    """`glm convert --family` names (glm.FAMILIES, registered by glm.formats) work as tokenizer families:
    glm4-chatglm, glm-hf and glm4-hf mean the GLM-4 tokenizer (their formats' tokenizer_family); the names
    shared with the tokenizer mean themselves."""
    from glm.config import FAMILIES as MODEL_FAMILIES
    from glm.tokenizer import FAMILY_NAMES, canonical_family
    assert set(MODEL_FAMILIES) <= set(FAMILY_NAMES)
    assert {name: canonical_family(name, "test") for name in MODEL_FAMILIES} == {
        "glm": "glm", "chatglm": "chatglm", "chatglm2": "chatglm2", "chatglm3": "chatglm3",
        "glm4-chatglm": "glm4", "glm-hf": "glm4", "glm4-hf": "glm4"}
    _, f2 = trained("chatglm2")
    assert load(f2, family="chatglm3").family == "chatglm3"
    with pytest.raises(TokenizerError, match="unknown tokenizer family 'glm5'.*glm4-chatglm, glm-hf, glm4-hf"):
        load(f2, family="glm5")
    with pytest.raises(TokenizerError, match="unknown tokenizer family 'glm5'"):
        train([f"{f2}/tokenizer.model"], str(tmp_path / "x"), 600, "glm5")


@needs_tiktoken
@pytest.mark.parametrize("alias", ["glm4-chatglm", "glm-hf", "glm4-hf"])
def test_model_family_names_mean_glm4(trained, tmp_path, corpus, alias):
    tok, f4 = trained("glm4")
    assert load(f4, family=alias).special_tokens == tok.special_tokens
    d = _release_dir(tmp_path, "g4", f"{f4}/tokenizer.model", "tokenizer.model", {"glm_tokenizer_family": alias})
    assert load(d).family == "glm4"
    again = train([corpus], str(tmp_path / "t"), VOCAB["glm4"], alias)
    assert again.family == "glm4" and again.special_tokens == tok.special_tokens


def test_release_added_token_table_wins(trained, tmp_path):
    tok, folder = trained("glm")
    n = text_pieces(tok, folder)
    d = _release_dir(tmp_path, "g", f"{folder}/cog-pretrain.model", "cog-pretrain.model",
                     {"tokenizer_class": "GLMChineseTokenizer"})
    with open(os.path.join(d, "added_tokens.json"), "w") as f:
        json.dump({"[gMASK]": n + 8, "[sMASK]": n + 9}, f)
    swapped = load(d)
    assert (swapped.mask_ids["gMASK"], swapped.mask_ids["sMASK"]) == (n + 8, n + 9)
    with open(os.path.join(d, "added_tokens.json"), "w") as f:
        json.dump({"[gMASK]": n + 8}, f)  # now collides with [sMASK]
    with pytest.raises(TokenizerError, match="share an id"):
        load(d)


def test_chatglm6b_num_image_tokens(trained, tmp_path):
    tok, folder = trained("chatglm")
    d = _release_dir(tmp_path, "c6", f"{folder}/ice_text.model", "ice_text.model",
                     {"tokenizer_class": "ChatGLMTokenizer", "num_image_tokens": 20000})
    shifted = load(d)
    assert shifted.token_id("[gMASK]") == tok.token_id("[gMASK]") + 20000
    assert shifted.vocab_size == tok.vocab_size + 20000
    assert shifted.encode("你好\n x") == [i + 20000 for i in tok.encode("你好\n x")]
    assert shifted.decode([5, *shifted.encode("你好")]) == "你好"  # image-token ids are dropped, as in the release


def test_chatglm6b_num_image_tokens_from_config_json(trained, tmp_path):
    """Without num_image_tokens in tokenizer_config.json the offset comes from config.json's vocab_size:
    the reference default 20000 when the embedding rows have room for it, else 0. The releases pad their
    rows 184 past ice_text.model's 130344 pieces: 150528 rows (first release, offset 20000), 130528 (0)."""
    tok, folder = trained("chatglm")
    pieces = spm.SentencePieceProcessor(model_file=os.path.join(folder, "ice_text.model")).get_piece_size()
    gmask = tok.token_id("[gMASK]")

    def offset(rows=None, **cfg) -> int:
        nested = cfg.pop("_glm_format", False)  # glm's own format nests the model fields in "config"
        d = _release_dir(tmp_path, f"c6-{len(os.listdir(tmp_path))}", f"{folder}/ice_text.model", "ice_text.model",
                         {"tokenizer_class": "ChatGLMTokenizer", **cfg})
        if rows is not None:
            with open(os.path.join(d, "config.json"), "w") as f:
                fields = {"config": {"vocab_size": rows}} if nested else {"model_type": "chatglm", "vocab_size": rows}
                json.dump(fields, f)
        loaded = load(d)
        assert loaded.encode("你好") == [i + loaded.num_image_tokens for i in tok.encode("你好")]
        return loaded.token_id("[gMASK]") - gmask

    assert offset(pieces + 20000 + 184) == 20000  # as the first release
    assert offset(pieces + 20000 + 184, _glm_format=True) == 20000  # the same, converted to glm's format
    assert offset(pieces + 20000) == 20000
    assert offset(pieces + 184) == 0  # as the current release
    assert offset(pieces) == 0
    assert offset(pieces - 1) == 0  # a config that cannot hold the pieces says nothing about the offset
    assert offset() == 0  # no config.json
    assert offset("150528") == 0  # not an int: ignored
    assert offset(pieces + 20184, num_image_tokens=0) == 0  # the tokenizer's own key wins
    assert offset(pieces, num_image_tokens=20000) == 20000
    with pytest.raises(TokenizerError, match="num_image_tokens is '20000'; set it to an integer"):
        offset(num_image_tokens="20000")


def test_save_is_atomic_and_keeps_other_files(trained, tmp_path):
    tok, _ = trained("chatglm3")
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text("{}")
    tok.save(str(d))
    tok.save(str(d))  # overwriting in place is fine
    assert sorted(os.listdir(d)) == ["config.json", "tokenizer.model", "tokenizer_config.json"]
    assert load(str(d)).special_tokens == tok.special_tokens


def test_load_missing_file(tmp_path):
    with pytest.raises(TokenizerError) as e:
        load(str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path) in msg and all(n in msg for n in ("ice_text.model", "tokenizer.model", "cog-pretrain.model"))
    with pytest.raises(TokenizerError, match="does not exist"):
        load(str(tmp_path / "nope"))
    (tmp_path / "tokenizer_config.json").write_text('{"glm_tokenizer_family": "chatglm2"}')
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        load(str(tmp_path))


def test_load_bad_files(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\xff\xff\xff\xff garbage")
    with pytest.raises(TokenizerError, match="tokenizer.model: not a readable SentencePiece model"):
        load(str(tmp_path))
    rank = tmp_path / "r"
    rank.mkdir()
    (rank / "tokenizer.model").write_text("IQ== 0\nnot-base64!! x\n")
    with pytest.raises(TokenizerError, match=r"tokenizer.model:2: expected"):
        load(str(rank), family="glm4") if HAS_TIKTOKEN else _raise_parse(rank / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: not valid JSON"):
        load(str(tmp_path))
    with pytest.raises(TokenizerError, match="unknown tokenizer family 'gpt2'"):
        load(str(rank), family="gpt2")


def _raise_parse(path):
    from glm.tokenizer.glm4 import parse_ranks
    parse_ranks(path.read_bytes(), str(path))


def test_glm4_without_tiktoken_says_how_to_install(tmp_path, monkeypatch):
    from glm.tokenizer.glm4 import format_ranks
    (tmp_path / "tokenizer.model").write_bytes(format_ranks({bytes([b]): b for b in range(256)}))
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # makes `import tiktoken` fail
    with pytest.raises(TokenizerError, match="pip install tiktoken"):
        load(str(tmp_path))
    with pytest.raises(TokenizerError, match="pip install tiktoken"):
        train([str(tmp_path / "tokenizer.model")], str(tmp_path / "out"), 400, "glm4")
    assert not (tmp_path / "out").exists()


@needs_tiktoken
def test_glm4_hand_built_rank_file(tmp_path):
    ranks = {bytes([b]): b for b in range(256)}
    for tok in (b"th", b"the", b" the", "你".encode()[:2], "你".encode()):
        ranks[tok] = len(ranks)
    lines = "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items())
    (tmp_path / "tokenizer.model").write_text(lines)
    tok = load(str(tmp_path))
    assert tok.family == "glm4" and tok.vocab_size == 261 + 14
    assert tok.encode("the the") == [257, 258]  # "the", " the": the regex keeps the space with the word
    assert tok.encode("你x") == [260, ord("x")]
    assert tok.encode("th\n") == [256, 10]
    assert [tok.token_id(n) for n in APPENDED["glm4"]] == list(range(261, 275))
    assert tok.decode([258, 260, 261]) == " the你<|endoftext|>"


# ---------------------------------------------------------------------------------------------
# train

def test_train_errors(corpus, tmp_path):
    with pytest.raises(TokenizerError, match="unknown tokenizer family 'gpt2'.*glm, chatglm, chatglm2, chatglm3, glm4"):
        train([corpus], str(tmp_path / "x"), 600, "gpt2")
    with pytest.raises(TokenizerError, match="missing or empty"):
        train([str(tmp_path / "none.txt")], str(tmp_path / "x"), 600, "chatglm2")
    with pytest.raises(TokenizerError, match="too small for chatglm: .* distinct character"):
        train([corpus], str(tmp_path / "x"), 300, "chatglm")
    assert not (tmp_path / "x").exists()


def _advised_size(error: TokenizerError, direction: str) -> int:
    msg = str(error)
    assert "--" not in msg and "character_coverage" not in msg, msg  # no SentencePiece trainer flags
    match = re.search(rf"use vocab_size {direction} (\d+)", msg)
    assert match, msg
    return int(match.group(1))


def test_train_size_advice_is_exact(corpus, tmp_path):
    """Each SentencePiece size failure says which way to move vocab_size and how far, and the size it
    names trains: too small for the corpus's characters (needs more), too large for its text (needs less)."""
    with pytest.raises(TokenizerError, match="too small for glm") as e:
        train([corpus], str(tmp_path / "a"), 300, "glm")  # passes the reserved-pieces check, not the characters
    assert "lower" not in str(e.value)
    least = _advised_size(e.value, ">=")
    with pytest.raises(TokenizerError, match="too small"):
        train([corpus], str(tmp_path / "a"), least - 1, "glm")
    assert train([corpus], str(tmp_path / "a"), least, "glm").vocab_size == least
    with pytest.raises(TokenizerError, match="too large for chatglm2") as e:
        train([corpus], str(tmp_path / "b"), 60000, "chatglm2")
    most = _advised_size(e.value, "<=")
    with pytest.raises(TokenizerError, match="too large"):
        train([corpus], str(tmp_path / "b"), most + 1, "chatglm2")
    assert train([corpus], str(tmp_path / "b"), most, "chatglm2").vocab_size == most


@needs_tiktoken
def test_train_glm4_size_advice_is_exact(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("the cat sat on the mat\n" * 20, encoding="utf-8")
    with pytest.raises(TokenizerError, match="too large for glm4") as e:
        train([str(small)], str(tmp_path / "g"), 1000, "glm4")
    most = _advised_size(e.value, "<=")
    assert train([str(small)], str(tmp_path / "g"), most, "glm4").vocab_size == most


# ---------------------------------------------------------------------------------------------
# real release vocabularies ($GLM_TOKENIZER_DIR)

def release_dir(name: str) -> str:
    root = os.environ.get("GLM_TOKENIZER_DIR")
    if not root:
        pytest.skip("GLM_TOKENIZER_DIR is unset: point it at a folder with the releases' tokenizer files in "
                    f"subfolders (e.g. {name}/) to check the real ids")
    path = os.path.join(root, name)
    if not os.path.isdir(path):
        pytest.skip(f"{path} not found (GLM_TOKENIZER_DIR has no {name}/ subfolder)")
    return path


RELEASE_TEXT = "你好 世界! Hello world\n\tdef f(x):\n        return x  # 注释"


def test_release_chatglm3():
    tok = load(release_dir("chatglm3-6b"))
    assert tok.family == "chatglm3"
    assert {n: tok.token_id(n) for n in APPENDED["chatglm3"]} == dict(zip(APPENDED["chatglm3"], range(64789, 64798)))
    assert (tok.pad_id, tok.bos_id, tok.eos_ids, tok.vocab_size) == (0, 1, (2, 64795, 64797), 64798)
    ids = tok.chat_ids("你好")
    assert ids[:3] == [64790, 64792, 64795] and ids[-1] == 64796
    assert tok.decode(tok.encode(RELEASE_TEXT)) == RELEASE_TEXT


def test_release_chatglm2():
    tok = load(release_dir("chatglm2-6b"))
    assert tok.family == "chatglm2"
    assert [tok.token_id(n) for n in APPENDED["chatglm2"]] == list(range(64789, 64794))
    assert tok.vocab_size == 64794


def test_release_chatglm6b():
    tok = load(release_dir("chatglm-6b"))
    assert tok.family == "chatglm"
    assert [tok.token_id(n) for n in APPENDED["chatglm"]] == list(range(130000, 130008))
    assert tok.pad_id == 3
    # the release tokenizes "你好" as [5, 74874] and appends [gMASK] <sop>
    assert tok.build_inputs(tok.encode("你好")) == [5, 74874, 130001, 130004]
    assert tok.decode(tok.encode(RELEASE_TEXT)) == RELEASE_TEXT


def test_release_glm_chinese():
    tok = load(release_dir("glm-large-chinese"))
    assert tok.family == "glm"
    assert [tok.token_id(n) for n in APPENDED["glm"]] == list(range(50000, 50010))


@needs_tiktoken
def test_release_glm4():
    folder = release_dir("glm-4-9b-chat")
    tok = load(folder)
    assert tok.family == "glm4"
    assert [tok.token_id(n) for n in APPENDED["glm4"]] == list(range(151329, 151343))
    assert tok.eos_ids == (151329, 151336, 151338) and tok.pad_id == 151329
    ids = tok.chat_ids("你好")
    assert ids[:3] == [151331, 151333, 151336] and ids[-1] == 151337
    assert tok.decode(tok.encode(RELEASE_TEXT)) == RELEASE_TEXT
    if os.path.exists(os.path.join(folder, "tokenizer.json")):  # the HF fast tokenizer as a live reference
        tokenizers = pytest.importorskip("tokenizers")
        ref = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        assert ref.encode(RELEASE_TEXT, add_special_tokens=False).ids == tok.encode(RELEASE_TEXT)
