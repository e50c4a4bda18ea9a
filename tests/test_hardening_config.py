"""Hostile or damaged inputs to the config reader and the tokenizers: special files, quoted flags, sizes of 0,
unknown format versions, damaged rank files, lone surrogates in text, and train-tokenizer's output folder."""
import base64
import importlib.util
import json
import os
import random

import pytest
from conftest import reference_dir, time_limit

import glm
from glm.cli import main
from glm.config import ConfigError, GLMConfig
from glm.files import read_json
from glm.formats import native
from glm.tokenizer import TokenizerError, load, train

needs_tiktoken = pytest.mark.skipif(importlib.util.find_spec("tiktoken") is None,
                                    reason="the GLM-4 tokenizer needs the optional dependency tiktoken")




def release_config(folder: str, **changes) -> dict:
    with open(os.path.join(reference_dir(folder), "config.json")) as f:
        return {**json.load(f), **changes}


# ---------------------------------------------------------------------------------------------
# config.json: special files and size

def test_config_json_fifo_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / "config.json")
    with time_limit(5), pytest.raises(ConfigError, match=r"config.json: is a FIFO .*not a regular file"):
        GLMConfig.from_hf(str(tmp_path))


def test_config_json_linked_to_a_device_or_too_large_is_refused(tmp_path):
    # /dev/null, not /dev/zero: a regression then fails on the JSON instead of filling memory
    os.symlink("/dev/null", tmp_path / "config.json")
    with time_limit(5), pytest.raises(ConfigError, match="is a character device"):
        read_json(str(tmp_path / "config.json"))
    big = tmp_path / "big" / "config.json"
    big.parent.mkdir()
    with open(big, "wb") as f:  # sparse: no disk used, and the bound is checked before reading
        f.truncate(65 * 1024 * 1024)
    with pytest.raises(ConfigError, match="bytes, more than any real config.json"):
        GLMConfig.from_hf(str(big.parent))


def test_config_json_with_a_huge_integer_is_a_config_error(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": ' + "9" * 5000 + "}")
    with pytest.raises(ConfigError, match="not usable JSON"):
        read_json(str(tmp_path / "config.json"))


# ---------------------------------------------------------------------------------------------
# config.json: values that were read silently wrong

FLAGS = [("chatglm2-6b", k) for k in ("multi_query_attention", "add_bias_linear", "add_qkv_bias", "rmsnorm",
                                      "apply_residual_connection_post_layernorm", "post_layer_norm", "original_rope",
                                      "use_cache")] + \
        [("glm-4-9b-chat-hf", k) for k in ("attention_bias", "tie_word_embeddings", "use_cache")] + \
        [("chatglm-6b", "position_encoding_2d"), ("glm", "relative_encoding"), ("glm", "block_position_encoding")]


@pytest.mark.parametrize("folder,key", FLAGS)
@pytest.mark.parametrize("value", ["false", "true", 0, None])
def test_flags_must_be_json_booleans(folder, key, value):
    # "false" is a non-empty string, so Python's truthiness read it as true.
    with pytest.raises(ConfigError, match=rf"field '{key}' must be true or false, got {value!r}"):
        GLMConfig.from_hf(release_config(folder, **{key: value}))


@pytest.mark.parametrize("folder,key,value", [
    ("chatglm2-6b", "kv_channels", 0), ("chatglm2-6b", "kv_channels", -16), ("chatglm2-6b", "padded_vocab_size", 0),
    ("chatglm2-6b", "multi_query_group_num", 0), ("chatglm2-6b", "ffn_hidden_size", 0),
    ("chatglm2-6b", "seq_length", -1), ("chatglm-6b", "inner_hidden_size", 0), ("chatglm-6b", "inner_hidden_size", -4),
    ("glm-4-9b-chat-hf", "num_key_value_heads", 0), ("glm-4-9b-chat-hf", "head_dim", 0),
    ("glm-4-9b-0414", "intermediate_size", 0), ("glm", "max_sequence_length", 0), ("glm", "hidden_size", 0),
])
def test_sizes_of_zero_are_refused_not_replaced_by_defaults(folder, key, value):
    with pytest.raises(ConfigError, match=rf"field '{key}' must be a positive integer, got {value}"):
        GLMConfig.from_hf(release_config(folder, **{key: value}))


def test_absent_or_null_sizes_still_take_the_defaults():
    cfg = GLMConfig.from_hf(release_config("glm-4-9b-chat-hf", num_key_value_heads=None, head_dim=None))
    assert (cfg.num_kv_heads, cfg.head_dim) == (2, 128)
    hf = release_config("chatglm2-6b")
    del hf["kv_channels"]
    assert GLMConfig.from_hf(hf).head_dim == 64 // 4


@pytest.mark.parametrize("folder,changes,match", [
    ("glm", dict(hidden_size=66), r"'hidden_size' \(66\) must be a multiple of 'num_attention_heads' \(4\)"),
    ("chatglm-6b", dict(hidden_size=66), r"'hidden_size' \(66\) must be a multiple"),
    ("chatglm2-6b", dict(multi_query_group_num=3), r"'multi_query_group_num' \(3\) must divide"),
    ("glm-4-9b-chat-hf", dict(num_key_value_heads=3), r"'num_key_value_heads' \(3\) must divide"),
    ("glm-4-9b-chatglm", dict(rope_ratio=0), "'rope_ratio' must be positive"),
])
def test_head_splits_are_checked_in_the_files_terms(folder, changes, match):
    with pytest.raises(ConfigError, match=match):
        GLMConfig.from_hf(release_config(folder, **changes))


def test_config_fields_that_would_silently_disable_a_part_are_refused():
    cfg = glm.preset("tiny-chatglm")
    for alpha in (0.0, -1.0, False):  # 0 or false multiplied every residual by zero
        with pytest.raises(ConfigError, match="residual_alpha"):
            cfg.replace(residual_alpha=alpha)
    with pytest.raises(ConfigError, match="rotates 0 dims"):  # RoPE rotating nothing: no positions at all
        glm.preset("tiny-chatglm2").replace(rotary_fraction=0.01)


def test_glm_format_version_must_be_one_this_glm_reads():
    check = native.check_glm_format_version
    assert check(1, "x/config.json") == 1 and native.GLM_FORMAT_VERSIONS == (1,)
    for bad in (2, 0, "1", True, None, 1.0):
        with pytest.raises(ConfigError, match=r"x/config.json: glm_format_version is .* reads only version\(s\) 1"):
            check(bad, "x/config.json")


# ---------------------------------------------------------------------------------------------
# tokenizers

WORDS = "the quick brown fox jumps over a lazy dog while the model reads tokens".split() + \
    list("你好世界我们的模型")
VOCAB = {"glm": 330, "chatglm": 420, "chatglm2": 330, "chatglm3": 330, "glm4": 300}
FAMILIES = ["glm", "chatglm", "chatglm2", "chatglm3", pytest.param("glm4", marks=needs_tiktoken)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    r = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    word = lambda: r.choice(WORDS) + (r.choice(WORDS) if r.random() < 0.3 else "")  # noqa: E731
    lines = (" ".join(word() for _ in range(8)) for _ in range(300))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("tok")
    cache: dict = {}

    def get(family: str):
        if family not in cache:
            cache[family] = train([corpus], str(root / family), VOCAB[family], family)
        return cache[family]
    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_lone_surrogates_are_a_tokenizer_error_with_the_position(trained, family):
    tok = trained(family)
    text = "hello\udcffworld"  # what bytes b"hello\xffworld" decoded with errors="surrogateescape" give
    where = r"U\+DCFF at character 5 \(invalid UTF-8 decoded with surrogateescape\?\); pass valid Unicode text"
    for call in (tok.encode, tok.encode_with_specials, tok.encode_continuation):
        with pytest.raises(TokenizerError, match=where):
            call(text)
    with pytest.raises(TokenizerError, match=r"U\+DCFF at character 12"):  # counted in the whole text
        tok.encode_with_specials("[gMASK]" + text)
    if tok.roles_in_chat:
        with pytest.raises(TokenizerError, match=r"message 0's content holds a lone surrogate U\+DCFF at character 5"):
            tok.chat_ids(text)
        with pytest.raises(TokenizerError, match=r"message 2's content holds a lone surrogate U\+D800 at character 0"):
            tok.chat_ids("\ud800", history=[("q", "a")])
    assert tok.decode(tok.encode("hello world")) .strip() == "hello world"  # valid text is unchanged


def test_encode_refuses_what_is_not_text_and_decode_what_is_not_an_id(trained):
    tok = trained("chatglm2")
    with pytest.raises(TokenizerError, match="the text must be a str, got list"):
        tok.encode(["a", "b"])  # SentencePiece would return a list of lists
    with pytest.raises(TokenizerError, match="decode: ids must be integers"):
        tok.decode([5, 2.7])  # int() would truncate to 2
    with pytest.raises(TokenizerError, match="message 0's metadata must be a str"):
        trained("chatglm3").chat_ids(messages=[{"role": "user", "content": "hi", "metadata": {"a": 1}}])


@pytest.mark.parametrize("name", ["tokenizer.model", "tokenizer_config.json", "tokenization_chatglm.py",
                                  "added_tokens.json", "config.json"])
def test_a_fifo_in_a_tokenizer_folder_is_refused_not_waited_on(trained, tmp_path, name):
    tok = trained("chatglm2")
    tok.save(str(tmp_path))
    if name == "tokenizer_config.json":
        (tmp_path / name).unlink()
    else:
        # a folder without our config, so load() goes through detection (reads config.json and the code)
        (tmp_path / "tokenizer_config.json").unlink()
        if (tmp_path / name).exists():
            (tmp_path / name).unlink()
    os.mkfifo(tmp_path / name)
    with time_limit(5), pytest.raises(TokenizerError, match=rf"{name}: is a FIFO \(named pipe\), not a regular file"):
        load(str(tmp_path))


def test_a_fifo_or_device_passed_as_the_tokenizer_file_is_refused(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    os.symlink("/dev/null", tmp_path / "tokenizer.model")
    with time_limit(5):
        with pytest.raises(TokenizerError, match="pipe: is a FIFO"):
            load(str(tmp_path / "pipe"))
        with pytest.raises(TokenizerError, match="tokenizer.model: is a character device"):
            load(str(tmp_path))


def test_tokenizer_config_values_are_checked(trained, tmp_path):
    trained("chatglm").save(str(tmp_path))
    cfg_path = tmp_path / "tokenizer_config.json"
    saved = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**saved, "remove_space": "false"}))
    with pytest.raises(TokenizerError, match="remove_space is 'false'; set it to true or false"):
        load(str(tmp_path))
    cfg_path.write_text(json.dumps({**saved, "model_file": "../../etc/passwd"}))
    with pytest.raises(TokenizerError, match="model_file is '../../etc/passwd'; it must be the name of a file"):
        load(str(tmp_path))
    cfg_path.write_text(json.dumps({**saved, "num_image_tokens": 0, "x": int("9" * 4000)}).replace(
        '"x": ' + "9" * 4000, '"x": ' + "9" * 5000))
    with pytest.raises(TokenizerError, match="not usable JSON"):
        load(str(tmp_path))


def _rank_file(ranks: dict) -> str:
    return "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items())


@needs_tiktoken
def test_rank_file_missing_byte_tokens_is_refused_on_load(tmp_path):
    ranks = {bytes([b]): i for i, b in enumerate(b for b in range(256) if b not in (0x41, 0xff))}
    ranks[b"th"] = len(ranks)
    (tmp_path / "tokenizer.model").write_text(_rank_file(ranks))
    # tiktoken panicked (pyo3 PanicException, not an Exception) on the first "A" it met
    with pytest.raises(TokenizerError, match=r"tokenizer.model: the rank file has no token for 2 of the 256 single "
                                             r"bytes \(0x41, 0xff\)"):
        load(str(tmp_path))


@needs_tiktoken
def test_rank_file_with_a_token_twice_names_the_line(tmp_path):
    lines = _rank_file({bytes([b]): b for b in range(256)}) + f"{base64.b64encode(b'a').decode()} 256\n"
    (tmp_path / "tokenizer.model").write_text(lines)
    with pytest.raises(TokenizerError, match=r"tokenizer.model:257: token b'a' already has rank 97"):
        load(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# train-tokenizer's output folder

def test_train_refuses_a_folder_that_holds_files(corpus, tmp_path):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TokenizerError, match=r"already holds files \(notes.txt\); pass overwrite=True"):
        train([corpus], str(out), 330, "chatglm2")
    assert main(["train-tokenizer", corpus, str(out), "--vocab-size", "330", "--family", "chatglm2"]) == 2
    # --overwrite replaces only what a tokenizer save writes: the user's file stops it, and nothing changes
    with pytest.raises(TokenizerError, match=r"holds files a tokenizer save did not write \(notes.txt\)"):
        train([corpus], str(out), 330, "chatglm2", overwrite=True)
    assert os.listdir(out) == ["notes.txt"]
    train([corpus], str(tmp_path / "new"), 330, "glm")  # a new folder is fine, and so is an empty one
    (tmp_path / "empty").mkdir()
    train([corpus], str(tmp_path / "empty"), 330, "glm")


def test_train_overwrite_replaces_a_saved_tokenizer(corpus, tmp_path):
    out = str(tmp_path / "tok")
    assert main(["train-tokenizer", corpus, out, "--vocab-size", "420", "--family", "chatglm"]) == 0
    assert main(["train-tokenizer", corpus, out, "--vocab-size", "330", "--family", "chatglm2"]) == 2
    open(os.path.join(out, "tokenizer.model.tmp-x1"), "wb").close()  # a crashed save's temp file
    assert main(["train-tokenizer", corpus, out, "--vocab-size", "330", "--family", "chatglm2", "--overwrite"]) == 0
    # the other family's model file and the temp file went with the tokenizer they belonged to
    assert sorted(os.listdir(out)) == ["tokenizer.model", "tokenizer_config.json"]
    assert load(out).family == "chatglm2" and load(out).vocab_size == 330


def test_train_corpus_that_is_a_fifo_is_refused(tmp_path):
    os.mkfifo(tmp_path / "corpus.txt")
    with time_limit(5), pytest.raises(TokenizerError, match="corpus.txt: is a FIFO"):
        train([str(tmp_path / "corpus.txt")], str(tmp_path / "out"), 330, "chatglm2")
    assert not (tmp_path / "out").exists()


def test_chatglm3_tools_that_are_not_json_are_a_tokenizer_error(trained):
    with pytest.raises(TokenizerError, match="tools must be JSON data"):
        trained("chatglm3").chat_ids(messages=[{"role": "system", "content": "s", "tools": [object()]},
                                               {"role": "user", "content": "hi"}])
