"""Tokenizers read from transformers' release files: a GLM-4 tokenizer.json (glm-4-9b-chat-hf, GLM-4-0414) and
original GLM's English vocabularies (GPT-2 BPE of glm-10b/glm-2b, RoBERTa BPE of glm-roberta-large, BERT
WordPiece of glm-large/glm-515m).

The folders are built here, small, with the release's file layout, added-token ids (relative to the
vocabulary size) and tokenizer_config.json, by the ``tokenizers`` trainers. transformers' tokenizer built
from the same files is the reference for the ids."""
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

import glm
from glm.generate import encode_blank_text, infill_ids, tokenizer_infill_args
from glm.tokenizer import (
    GLMBertTokenizer,
    GLMGPT2Tokenizer,
    GLMRobertaTokenizer,
    TokenizerError,
    TokenizerJSONTokenizer,
    load,
)
from glm.tokenizer.glm4 import GLM4_SPECIALS, PAT_STR

transformers = pytest.importorskip("transformers")

# Text that stresses the pre-tokenizers: emoji (with ZWJ and a skin tone), combining marks, CJK
# punctuation, runs of spaces / tabs / newlines, code, accents, digits.
FRAGMENTS = ["Hello", " world", "the", " quick brown fox", "你好", "，", "。", "「引用」", "中文分词", "👍", "👩‍💻",
             "👋🏽", "e\u0301", "a\u0308\u0323", "Ça va", " naïve", "  ", "\t", "\n", "\n\n", "   \t ", "\r\n",
             "def f(x):\n    return x**2", "for (int i = 0; i < n; ++i) {}", "x = {'a': [1, 2]}", "12345",
             " 3.14", "can't", "I'm", "#include <stdio.h>", "—", "…", "¿Qué?", "ÅÄÖ", "Straße", "ǅ", "ﬁ"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
    "def f(x):\n    return x ** 2\n\nfor i in range(10):\n\tprint(i)",
    "你好，世界。今天天气很好，我们去公园散步吧！「中文」分词测试。",
    "GLM is a General Language Model pretrained with an autoregressive blank-filling objective.",
    "Emoji 👍 and 👩‍💻 and combining e\u0301 marks, naïve café, Straße, ¿Qué tal?",
    "int main() { int x = 0; x += 1; return x; } // code with {braces} and [brackets]",
] * 8

GPT2_ADDED = ("<|startofpiece|>", "<|endofpiece|>", "[CLS]", "[MASK]", "[SEP]", "[UNUSED]", "[gMASK]", "[sMASK]")
GLM10B_CONFIG = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "cls_token": "[CLS]",
                 "mask_token": "[MASK]", "unk_token": "[UNK]",
                 "additional_special_tokens": ["<|startofpiece|>", "<|endofpiece|>", "[gMASK]", "[sMASK]"],
                 "add_prefix_space": False, "tokenizer_class": "GLMGPT2Tokenizer", "use_fast": False}
ROBERTA_CONFIG = {"eos_token": "</s>", "pad_token": "</s>", "cls_token": "<s>", "mask_token": "[MASK]",
                  "unk_token": "<unk>", "additional_special_tokens": ["<|startofpiece|>", "<|endofpiece|>"],
                  "add_prefix_space": False, "tokenizer_class": "GLMRobertaTokenizer", "use_fast": False}
BERT_CONFIG = {"do_lower_case": True, "tokenizer_class": "GLMBertTokenizer",
               "additional_special_tokens": ["<|startofpiece|>", "<|endofpiece|>"]}


def _write_json(path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)


def _byte_bpe(vocab_size: int, specials=()) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(specials), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _save_bpe(tok: Tokenizer, folder, first=(), last=()) -> int:
    """vocab.json (``first`` tokens at the front are already the trainer's specials, ``last`` appended) and
    merges.txt; returns the vocabulary size."""
    tok.model.save(str(folder))  # vocab.json + merges.txt, with the "#version" header
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    for t in last:
        vocab[t] = len(vocab)
    _write_json(folder / "vocab.json", vocab)
    return len(vocab)


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """glm-10b's layout: GPT-2 vocabulary ending in <|endoftext|>, GLM's tokens in added_tokens.json."""
    folder = tmp_path_factory.mktemp("glm-10b")
    n = _save_bpe(_byte_bpe(700), folder, last=["<|endoftext|>"])
    _write_json(folder / "added_tokens.json", {t: n + i for i, t in enumerate(GPT2_ADDED)})
    _write_json(folder / "tokenizer_config.json", GLM10B_CONFIG)
    return folder


@pytest.fixture(scope="module")
def roberta_folder(tmp_path_factory):
    """glm-roberta-large's layout: <s> <pad> </s> <unk> first, <mask> last, three added tokens after it."""
    folder = tmp_path_factory.mktemp("glm-roberta-large")
    n = _save_bpe(_byte_bpe(700, ["<s>", "<pad>", "</s>", "<unk>"]), folder, last=["<mask>"])
    _write_json(folder / "added_tokens.json", {"<|startofpiece|>": n, "<|endofpiece|>": n + 1, "[MASK]": n + 2})
    _write_json(folder / "tokenizer_config.json", ROBERTA_CONFIG)
    return folder


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    """glm-large's layout: a bert-uncased style vocab.txt, sop/eop after it."""
    folder = tmp_path_factory.mktemp("glm-large")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=500, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                                        show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.model.save(str(folder))
    n = len((folder / "vocab.txt").read_text(encoding="utf-8").splitlines())
    _write_json(folder / "added_tokens.json", {"<|startofpiece|>": n, "<|endofpiece|>": n + 1})
    _write_json(folder / "tokenizer_config.json", BERT_CONFIG)
    return folder


def _glm4_tokenizer_json(post_processor: bool) -> Tokenizer:
    """A tokenizer.json built as transformers' convert_glm_weights_to_hf.py builds glm-4-9b-chat-hf's:
    GLM-4's regex split, byte-level without its own regex, the 14 specials after the ranks, and (the
    chat-hf release) a post-processor that prefixes [gMASK] <sop>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    n = tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GLM4_SPECIALS])
    steps = [processors.ByteLevel(trim_offsets=False)]
    if post_processor:
        steps.append(processors.TemplateProcessing(single="[gMASK]:0 <sop>:0 $A:0", pair="[gMASK]:0 <sop>:0 $A:0 $B:1",
                                                   special_tokens=[("[gMASK]", n + 2), ("<sop>", n + 4)]))
    tok.post_processor = processors.Sequence(steps)
    return tok


def _glm4_config(n: int) -> dict:
    dec = {str(n + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": True} for i, t in enumerate(GLM4_SPECIALS)}
    return {"added_tokens_decoder": dec, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
            "clean_up_tokenization_spaces": False, "do_lower_case": False, "model_max_length": 128000,
            "padding_side": "left", "remove_space": False, "tokenizer_class": "PreTrainedTokenizerFast",
            "model_input_names": ["input_ids", "attention_mask"]}


@pytest.fixture(scope="module", params=["chat-hf", "0414"])
def glm4_json_folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"glm-4-{request.param}")
    tok = _glm4_tokenizer_json(post_processor=request.param == "chat-hf")
    tok.save(str(folder / "tokenizer.json"))
    _write_json(folder / "tokenizer_config.json", _glm4_config(tok.get_vocab_size() - len(GLM4_SPECIALS)))
    return folder


def _hf(folder, kind):
    cls = {"gpt2": transformers.GPT2Tokenizer, "roberta": transformers.RobertaTokenizer,
           "bert": transformers.BertTokenizer}[kind]
    return cls.from_pretrained(str(folder))


def _hf_json(folder):
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                                eos_token=cfg["eos_token"], pad_token=cfg["pad_token"])


texts = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=12).map("".join)
SPECIAL_STRINGS = ["[MASK]", "[gMASK]", "[sMASK]", "<|endoftext|>", "<|startofpiece|>", "[CLS]", "<s>", "</s>",
                   "[SEP]", "<|user|>", "<sop>", "<|assistant|>"]
texts_with_specials = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.sampled_from(SPECIAL_STRINGS),
                                         st.text(max_size=3)), max_size=12).map("".join)
FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---- detection --------------------------------------------------------------------------------------

def test_load_detects_each_kind(gpt2_folder, roberta_folder, bert_folder, glm4_json_folder):
    assert type(load(gpt2_folder)) is GLMGPT2Tokenizer
    assert type(load(roberta_folder)) is GLMRobertaTokenizer
    assert type(load(bert_folder)) is GLMBertTokenizer
    tok = load(glm4_json_folder)
    assert type(tok) is TokenizerJSONTokenizer and tok.family == "glm4"
    assert {load(f).family for f in (gpt2_folder, roberta_folder, bert_folder)} == {"glm"}
    # a file path works as well as its folder; a GPT-2 BPE is named by either of its files
    assert type(load(gpt2_folder / "merges.txt")) is GLMGPT2Tokenizer
    assert type(load(glm4_json_folder / "tokenizer.json")) is TokenizerJSONTokenizer
    # family= names the family, and a folder of another family's files says so
    assert type(load(bert_folder, family="glm")) is GLMBertTokenizer
    assert type(load(glm4_json_folder, family="glm4-hf")) is TokenizerJSONTokenizer
    with pytest.raises(TokenizerError, match="vocab.json is a glm tokenizer file, but family='glm4'"):
        load(gpt2_folder / "vocab.json", family="glm4")
    with pytest.raises(TokenizerError, match="looked for tokenizer.model, tokenizer.json"):
        load(gpt2_folder, family="glm4")  # a family looks only for its own files


def test_without_class_name_the_vocabulary_decides(gpt2_folder, roberta_folder, tmp_path):
    for src, want in ((gpt2_folder, GLMGPT2Tokenizer), (roberta_folder, GLMRobertaTokenizer)):
        dst = tmp_path / src.name
        dst.mkdir()
        for name in ("vocab.json", "merges.txt", "added_tokens.json"):
            (dst / name).write_bytes((src / name).read_bytes())
        cfg = json.loads((src / "tokenizer_config.json").read_text())
        del cfg["tokenizer_class"]
        _write_json(dst / "tokenizer_config.json", cfg)
        assert type(load(dst)) is want


def test_nothing_fits_lists_what_was_looked_for(tmp_path):
    with pytest.raises(TokenizerError) as e:
        load(tmp_path)
    for name in ("tokenizer.model", "tokenizer.json", "vocab.json", "vocab.txt"):
        assert name in str(e.value)


# ---- ids equal transformers' ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt2", "roberta", "bert"])
def test_special_ids_match_transformers(kind, gpt2_folder, roberta_folder, bert_folder):
    folder = {"gpt2": gpt2_folder, "roberta": roberta_folder, "bert": bert_folder}[kind]
    ref, tok = _hf(folder, kind), load(folder)
    for name, idx in tok.special_tokens.items():
        assert ref.convert_tokens_to_ids(name) == idx, name
    assert tok.vocab_size == len(ref)


def test_gpt2_layout_is_glm10b(gpt2_folder):
    tok = load(gpt2_folder)
    n = json.loads((gpt2_folder / "vocab.json").read_text())["<|endoftext|>"]  # 50256 in the release
    assert tok.mask_ids == {"MASK": n + 4, "sMASK": n + 8, "gMASK": n + 7}  # 50260 / 50264 / 50263
    assert (tok.sop_id, tok.eop_id, tok.cls_id, tok.pad_id, tok.eos_ids) == (n + 1, n + 2, n + 3, n, (n,))
    # tokenizer_config's unk_token "[UNK]" is in neither file: transformers appends it (50265 in glm-10b)
    assert tok.token_id("[UNK]") == n + 9 and tok.vocab_size == n + 10
    ids = tok.encode("Paris is the capital")
    assert tok.build_inputs(ids) == [n + 3, *ids, n]  # GLMGPT2Tokenizer: [CLS] X <|endoftext|>


@given(text=texts_with_specials)
@FEW
def test_gpt2_and_roberta_ids_equal_transformers(text, gpt2_folder, roberta_folder):
    for kind, folder in (("gpt2", gpt2_folder), ("roberta", roberta_folder)):
        ref, tok = _ref_and_tok(kind, folder)
        if kind == "roberta":  # no task masks in this vocabulary (test_task_masks_are_refused...)
            text = text.replace("[gMASK]", "").replace("[sMASK]", "")
        assert tok.encode_with_specials(text) == ref(text, add_special_tokens=False)["input_ids"], kind
        plain = _strip(text, tok)
        assert tok.encode(plain) == ref(plain, add_special_tokens=False)["input_ids"], kind
    # RobertaTokenizer wraps <s> X </s> itself; GLMGPT2Tokenizer's [CLS] X <|endoftext|> is glm's
    ref, tok = _ref_and_tok("roberta", roberta_folder)
    plain = _strip(text, tok)
    assert tok.build_inputs(tok.encode(plain)) == ref(plain)["input_ids"]


@given(text=texts_with_specials)
@FEW
def test_wordpiece_ids_equal_transformers(text, bert_folder):
    ref, tok = _ref_and_tok("bert", bert_folder)
    text = text.replace("[gMASK]", "").replace("[sMASK]", "")  # no task masks in this vocabulary (below)
    assert tok.encode_with_specials(text) == ref(text, add_special_tokens=False)["input_ids"]
    plain = _strip(text, tok)
    assert tok.build_inputs(tok.encode(plain)) == ref(plain)["input_ids"]  # [CLS] X [SEP]


@given(text=texts_with_specials)
@FEW
def test_tokenizer_json_ids_equal_transformers(text, glm4_json_folder):
    ref, tok = _ref_and_tok("json", glm4_json_folder)
    assert tok.encode_with_specials(text) == ref(text, add_special_tokens=False)["input_ids"]
    plain = _strip(text, tok)
    assert tok.encode(plain) == ref(plain, add_special_tokens=False)["input_ids"]
    # build_inputs adds what the file's post-processor adds: [gMASK] <sop> for chat-hf, nothing for 0414
    assert tok.build_inputs(tok.encode(plain)) == ref(plain)["input_ids"]


_CACHE: dict = {}


def _ref_and_tok(kind, folder):
    key = (kind, str(folder))
    if key not in _CACHE:
        _CACHE[key] = (_hf_json(folder) if kind == "json" else _hf(folder, kind), load(folder))
    return _CACHE[key]


def _strip(text: str, tok) -> str:
    for name in tok.special_tokens:
        text = text.replace(name, "")
    return text


# ---- round trips -----------------------------------------------------------------------------------

@given(text=texts)
@FEW
def test_byte_level_round_trips(text, gpt2_folder, roberta_folder, glm4_json_folder):
    for kind, folder in (("gpt2", gpt2_folder), ("roberta", roberta_folder), ("json", glm4_json_folder)):
        tok = _ref_and_tok(kind, folder)[1]
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode_with_specials(text + "[MASK]" + text)) == text + "[MASK]" + text


@given(text=texts)
@FEW
def test_wordpiece_round_trips_to_the_normalised_text(text, bert_folder):
    ref, tok = _ref_and_tok("bert", bert_folder)
    ids = tok.encode(text)
    # WordPiece keeps no spacing: the release decodes to the lower-cased, accent-stripped words rejoined
    assert tok.decode(ids) == ref.decode(ids)
    if "[UNK]" not in tok.decode(ids):  # "[UNK]" as text is three words
        assert tok.decode(tok.encode(tok.decode(ids))) == tok.decode(ids)


# ---- infilling and chat -----------------------------------------------------------------------------

def test_gpt2_infill_prompt(gpt2_folder):
    tok = load(gpt2_folder)
    n = tok.token_id("<|endoftext|>")
    ids = tok.infill_prompt(encode_blank_text(tok, "Paris is the [MASK] of France."))
    assert ids[0] == n + 3 and ids[-1] == n and n + 4 in ids  # [CLS] ... [MASK] ... <|endoftext|>
    ids = tok.infill_prompt(encode_blank_text(tok, "The capital of France is [gMASK]"))
    assert ids[0] == n + 3 and ids[-1] == n + 7  # ends in [gMASK]: no eos after it
    args = tokenizer_infill_args(tok)
    assert (args["sop_id"], args["eop_id"], args["gmask_id"], sorted(args["mask_ids"])) == (
        n + 1, n + 2, n + 7, [n + 4, n + 8])


@pytest.mark.parametrize("which", ["roberta", "bert"])
def test_task_masks_are_refused_where_the_release_has_none(which, roberta_folder, bert_folder):
    tok = load(roberta_folder if which == "roberta" else bert_folder)
    assert set(tok.mask_ids) == {"MASK"}
    ids = tok.infill_prompt(encode_blank_text(tok, "Paris is the [MASK] of France."))
    assert tok.mask_ids["MASK"] in ids and ids[0] == tok.cls_id
    with pytest.raises(TokenizerError, match=r"no \[gMASK\].*write the blank as \[MASK\]"):
        encode_blank_text(tok, "The capital of France is [gMASK]")


def test_tokenizer_json_chat_api_is_glm4s(glm4_json_folder):
    tok = load(glm4_json_folder)
    s = tok.special_tokens
    assert tok.eos_ids == (s["<|endoftext|>"], s["<|user|>"], s["<|observation|>"])
    assert (tok.pad_id, tok.sop_id, tok.eop_id) == (s["<|endoftext|>"], s["<sop>"], s["<eop>"])
    ids = tok.chat_ids(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}])
    assert ids[:3] == [s["[gMASK]"], s["<sop>"], s["<|system|>"]] and ids[-1] == s["<|assistant|>"]
    assert tok.decode(ids) == "[gMASK]<sop><|system|>\nBe brief.<|user|>\n你好<|assistant|>"


# ---- save round trips ----------------------------------------------------------------------------------

def test_save_then_load_round_trips(gpt2_folder, roberta_folder, bert_folder, glm4_json_folder, tmp_path):
    text = "Paris is the capital of France. 你好 👍\n\tdef f(): pass"
    for i, folder in enumerate((gpt2_folder, roberta_folder, bert_folder, glm4_json_folder)):
        tok = load(folder)
        tok.save(tmp_path / str(i))
        again = load(tmp_path / str(i))
        assert type(again) is type(tok)
        assert again.special_tokens == tok.special_tokens
        assert again.encode(text) == tok.encode(text)
        assert again.build_inputs([5]) == tok.build_inputs([5])
        assert (again.eos_ids, again.pad_id, again.mask_ids) == (tok.eos_ids, tok.pad_id, tok.mask_ids)


# ---- bad files -----------------------------------------------------------------------------------------

def _copy(src, dst, skip=()):
    dst.mkdir()
    for name in os.listdir(src):
        if name not in skip:
            (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_truncated_tokenizer_json(glm4_json_folder, tmp_path):
    folder = _copy(glm4_json_folder, tmp_path / "t")
    data = (folder / "tokenizer.json").read_bytes()
    (folder / "tokenizer.json").write_bytes(data[:len(data) // 2])
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not valid JSON .*re-download") as e:
        load(folder)
    assert str(folder / "tokenizer.json") in str(e.value)


def test_merges_without_vocab(gpt2_folder, tmp_path):
    folder = _copy(gpt2_folder, tmp_path / "m", skip=("vocab.json",))
    with pytest.raises(TokenizerError, match=r"merges\.txt: there is no vocab\.json beside it"):
        load(folder)
    folder = _copy(gpt2_folder, tmp_path / "v", skip=("merges.txt",))
    with pytest.raises(TokenizerError, match=r"vocab\.json: there is no merges\.txt beside it"):
        load(folder)


def test_damaged_bpe_files(gpt2_folder, tmp_path):
    folder = _copy(gpt2_folder, tmp_path / "d")
    with open(folder / "merges.txt", "a", encoding="utf-8") as f:
        f.write("only-one-token\n")
    with pytest.raises(TokenizerError, match=r"merges\.txt:\d+: expected two tokens"):
        load(folder)
    folder = _copy(gpt2_folder, tmp_path / "e")
    with open(folder / "merges.txt", "a", encoding="utf-8") as f:
        f.write("zzzq qqqz\n")  # tokens the vocabulary lacks
    with pytest.raises(TokenizerError, match=r"merges\.txt: does not fit vocab\.json"):
        load(folder)
    folder = _copy(gpt2_folder, tmp_path / "f")
    n = json.loads((folder / "vocab.json").read_text())["<|endoftext|>"]
    _write_json(folder / "added_tokens.json", {"<|startofpiece|>": n - 5})  # an id of a vocab token
    with pytest.raises(TokenizerError, match=r"added token '<\|startofpiece\|>' has id .* vocab\.json gives"):
        load(folder)


def test_empty_vocab_txt(bert_folder, tmp_path):
    folder = _copy(bert_folder, tmp_path / "b")
    (folder / "vocab.txt").write_text("")
    with pytest.raises(TokenizerError, match=r"vocab\.txt: empty"):
        load(folder)
    (folder / "vocab.txt").write_text("[PAD]\nhello\n")
    with pytest.raises(TokenizerError, match=r"vocab\.txt: no '\[UNK\]' line"):
        load(folder)


@pytest.mark.parametrize("which", ["gpt2", "roberta", "bert"])
def test_infill_runs_with_the_english_tokenizers(which, gpt2_folder, roberta_folder, bert_folder):
    tok = load({"gpt2": gpt2_folder, "roberta": roberta_folder, "bert": bert_folder}[which])
    model = glm.GLM(glm.preset("tiny-glm").replace(vocab_size=tok.vocab_size)).eval()
    model.init_weights(std=0.3, seed=0)
    res = infill_ids(model, tok.infill_prompt(encode_blank_text(tok, "the capital of [MASK] is paris")),
                     max_span_tokens=3, **tokenizer_infill_args(tok))
    assert len(res.spans) == 1 and 1 <= len(res.spans[0]) <= 3
    assert tok.decode(res.tokens).startswith("the capital of")


# ---- tokenizer_config.json against tokenizer.json ------------------------------------------------------

def test_added_tokens_decoder_must_agree_with_tokenizer_json(glm4_json_folder, tmp_path):
    folder = _copy(glm4_json_folder, tmp_path / "c")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    n = load(folder).vocab_size
    # a token the config adds at the next id is added, as transformers adds it, and saved with the file
    cfg["added_tokens_decoder"][str(n)] = {"content": "<|extra|>", "special": True}
    _write_json(folder / "tokenizer_config.json", cfg)
    tok = load(folder)
    assert tok.token_id("<|extra|>") == n and tok.encode_with_specials("a<|extra|>") == [*tok.encode("a"), n]
    tok.save(tmp_path / "saved")
    assert load(tmp_path / "saved").token_id("<|extra|>") == n
    # the same token at another id than tokenizer.json's is two releases' files mixed
    del cfg["added_tokens_decoder"][str(n)]
    entry = cfg["added_tokens_decoder"].pop(str(n - 1))
    cfg["added_tokens_decoder"][str(n + 5)] = entry
    _write_json(folder / "tokenizer_config.json", cfg)
    with pytest.raises(TokenizerError, match=r"has id \d+ in tokenizer\.json but \d+ in tokenizer_config\.json"):
        load(folder)


# ---- special-token strings inside ordinary text ---------------------------------------------------------

# As glm's own sources spell them (the tokenizer benchmark's text): special-token strings inside prose and code.
SPECIALS_IN_TEXT = ('a token ([MASK]) and one [MASK] (def f(): return "[gMASK]") such as <|endoftext|> or '
                    '<|user|>\n\t<sop>x')


def test_special_strings_in_text_both_ways(glm4_json_folder):
    """`encode` keeps special-token strings text (transformers with split_special_tokens=True);
    `encode_with_specials` gives their ids, as transformers' plain encode matches its added tokens."""
    tok, ref = load(glm4_json_folder), _hf_json(glm4_json_folder)
    plain = tok.encode(SPECIALS_IN_TEXT)
    assert plain == ref.encode(SPECIALS_IN_TEXT, add_special_tokens=False, split_special_tokens=True)
    assert tok.encode_with_specials(SPECIALS_IN_TEXT) == ref.encode(SPECIALS_IN_TEXT, add_special_tokens=False)
    assert tok.token_id("[MASK]") in tok.encode_with_specials(SPECIALS_IN_TEXT)
    assert tok.token_id("[MASK]") not in plain


def test_rank_file_with_special_strings_is_thudms_tiktoken(tmp_path):
    """The GLM-4 rank file against THUDM's tokenizer (tiktoken with GLM-4's pattern; its specials are
    added tokens, matched in text) and against transformers' TikTokenConverter for the same file."""
    tiktoken = pytest.importorskip("tiktoken")
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from glm.tokenizer.glm4 import format_ranks, train_ranks

    ranks = train_ranks(CORPUS, 400)
    (tmp_path / "tokenizer.model").write_bytes(format_ranks(ranks))
    tok = load(str(tmp_path))
    enc = tiktoken.Encoding("thudm", pat_str=PAT_STR, mergeable_ranks=ranks,
                            special_tokens={s: len(ranks) + i for i, s in enumerate(GLM4_SPECIALS)})
    conv = TikTokenConverter(vocab_file=str(tmp_path / "tokenizer.model"), pattern=PAT_STR,
                             extra_special_tokens=list(GLM4_SPECIALS)).converted()
    ref = transformers.PreTrainedTokenizerFast(tokenizer_object=conv)
    text = SPECIALS_IN_TEXT * 3
    assert tok.encode(text) == enc.encode_ordinary(text) == ref.encode(text, add_special_tokens=False,
                                                                       split_special_tokens=True)
    assert tok.encode_with_specials(text) == enc.encode(text, allowed_special="all") == ref.encode(
        text, add_special_tokens=False)


def test_benchmark_compares_like_with_like(glm4_json_folder, gpt2_folder, bench_script):
    """The tokenizer benchmark checks ids with the same special-token rule on both sides, so text that spells
    special tokens (as its text does) is equal where the tokenizers agree."""
    bench = bench_script("tokenize_speed")
    for folder, peer, rule in ((glm4_json_folder, _hf_json(glm4_json_folder), "exact"),
                               (gpt2_folder, _hf(gpt2_folder, "gpt2"), "exact")):
        case = bench.Case(str(folder), load(folder), peer, "transformers", True, rule)
        row = bench.measure(case, [SPECIALS_IN_TEXT], len(SPECIALS_IN_TEXT.encode()), 1)
        assert row["ids_equal"] and row["ids_equal_with_specials"] and row["round_trip"], row
