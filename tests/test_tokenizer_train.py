"""glm.tokenizer.train's model types and options: char models with one id per character, sizes honoured
exactly or refused with the size that is possible, byte fallback on and off, line breaks kept from the
corpus file to the ids, the record in tokenizer_config.json, and `glm train-tokenizer`'s flags.

Corpora are a few hundred lines written here; each training takes well under a second.
"""
import importlib.util
import json
import os
import random
import re
import string

import pytest

import glm.tokenizer
from glm.cli import main
from glm.tokenizer import MODEL_TYPES, TokenizerError, load, train
from glm.tokenizer.train import SENTENCE_CHARS, _sentences

needs_tiktoken = pytest.mark.skipif(importlib.util.find_spec("tiktoken") is None,
                                    reason="tiktoken is not installed (the GLM-4 tokenizer needs it)")
SPECIALS = {"glm": 10, "chatglm2": 5, "chatglm3": 9}  # ids each family appends (docs/tokenizers.md)
# The character set of a small play: 52 letters, space, newline and 11 punctuation marks.
CHARS = string.ascii_letters + " \n.,;:!?'-&$3"


def play_text(seed: int = 0, lines: int = 600) -> str:
    """Verse-like text using every character of CHARS: lines, blank lines between speeches, runs of spaces."""
    r = random.Random(seed)
    words = ["".join(r.choice(string.ascii_lowercase) for _ in range(r.randint(1, 7))) for _ in range(200)]
    out = [CHARS]  # every character at least once
    for _ in range(lines):
        line = " ".join(r.choice(words) for _ in range(r.randint(2, 9)))
        out.append(r.choice(string.ascii_uppercase) + line + r.choice(".,;:!?") + r.choice(["", " '-&$3", "  x"]))
        if r.random() < 0.2:
            out.append("")
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def play(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("play") / "play.txt"
    path.write_text(play_text(), encoding="utf-8")
    assert set(path.read_text(encoding="utf-8")) == set(CHARS) and len(set(CHARS)) == 65
    return str(path)


def byte_pieces(tok) -> int:
    return sum(tok.sp.is_byte(i) for i in range(tok.sp.get_piece_size()))


# ---------------------------------------------------------------------------------------------
# char models

@pytest.mark.parametrize("family", list(SPECIALS))
def test_char_model_maps_one_character_to_one_id(play, tmp_path, family):
    tok = train([play], str(tmp_path / "t"), None, family, model_type="char", byte_fallback=False)
    # exactly the ids it needs: 65 characters, <unk> <s> </s>, the family's specials
    assert tok.vocab_size == 65 + 3 + SPECIALS[family] and byte_pieces(tok) == 0
    ids = {c: tok.encode(c) for c in CHARS}
    assert all(len(i) == 1 for i in ids.values()), ids
    assert len({i[0] for i in ids.values()}) == 65  # one id per character, none shared
    assert all(tok.decode(i) == c for c, i in ids.items())
    text = open(play, encoding="utf-8").read()
    assert tok.encode(text) == [ids[c][0] for c in text]  # no dummy-prefix "▁" before the text
    assert tok.decode(tok.encode(text)) == text
    for s in ("a\nb  c", " leading", "\n\nx\n", "trailing  "):
        assert tok.decode(tok.encode(s)) == s and len(tok.encode(s)) == len(s)


def test_char_model_size_is_the_corpus_s_or_refused(play, tmp_path):
    n = train([play], str(tmp_path / "free"), None, "chatglm3", model_type="char").vocab_size
    assert n == 65 + 3 + 256 + 9  # byte fallback stays on by default
    tok = train([play], str(tmp_path / "exact"), n, "chatglm3", model_type="char")
    assert tok.vocab_size == n and tok.encode("Hi!\n") == load(str(tmp_path / "free")).encode("Hi!\n")
    for wrong in (n + 1, n - 1, 400):
        with pytest.raises(TokenizerError, match=rf"has exactly {n} ids \(65 characters \+ 3 reserved pieces \+ "
                                                 rf"256 byte pieces \+ 9 special ids\), not {wrong}; use "
                                                 rf"vocab_size {n} \(--vocab-size {n}\)"):
            train([play], str(tmp_path / "bad"), wrong, "chatglm3", model_type="char")
        assert not (tmp_path / "bad").exists()  # refused before anything is written


# ---------------------------------------------------------------------------------------------
# bpe / unigram sizes and byte fallback

@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
@pytest.mark.parametrize("byte_fallback", [True, False])
def test_sizes_are_exact(play, tmp_path, model_type, byte_fallback):
    size = 420 if byte_fallback else 160  # without the 256 byte pieces far fewer ids are possible
    tok = train([play], str(tmp_path / "t"), size, "glm", model_type=model_type, byte_fallback=byte_fallback)
    assert tok.vocab_size == size and byte_pieces(tok) == (256 if byte_fallback else 0)
    with pytest.raises(TokenizerError, match=r"too large for glm .*use vocab_size <= (\d+)") as e:
        train([play], str(tmp_path / "big"), 20000, "glm", model_type=model_type, byte_fallback=byte_fallback)
    most = int(re.search(r"<= (\d+)", str(e.value)).group(1))
    assert train([play], str(tmp_path / "most"), most, "glm", model_type=model_type,
                 byte_fallback=byte_fallback).vocab_size == most


def test_too_small_without_byte_fallback_counts_no_byte_pieces(play, tmp_path):
    with pytest.raises(TokenizerError, match="too small for glm: it needs 10 special ids, 3 reserved pieces and one "
                                             "piece per distinct character"):
        train([play], str(tmp_path / "t"), 13, "glm", byte_fallback=False)
    with pytest.raises(TokenizerError, match=r"use vocab_size >= 78 "):  # 65 characters + 3 + 10
        train([play], str(tmp_path / "t"), 70, "glm", byte_fallback=False)
    assert train([play], str(tmp_path / "t"), 78, "glm", byte_fallback=False).vocab_size == 78


@pytest.mark.parametrize("family", ["glm", "chatglm3"])
def test_byte_fallback_on_and_off(play, tmp_path, family):
    on = train([play], str(tmp_path / "on"), 420, family)
    off = train([play], str(tmp_path / "off"), 160, family, byte_fallback=False)
    assert (on.byte_fallback, off.byte_fallback) == (True, False)
    unseen = "né 🙂 中"
    assert on.decode(on.encode(unseen)) == unseen
    # Without byte fallback a character with no piece is <unk> (id 0); a run of them is one <unk>.
    assert off.encode("é🙂") == [off.sp.piece_to_id("▁"), 0]  # the dummy-prefix space, then one <unk>
    shown = off.decode(off.encode("aéb"))
    # glm decodes <unk> as U+FFFD; in chatglm2/3 it is also the pad token, shown by its name
    assert shown == ("a\ufffdb" if family == "glm" else "a<unk>b")


# ---------------------------------------------------------------------------------------------
# line breaks: file -> training sentences -> ids

def test_training_sentences_keep_the_text_as_written(tmp_path):
    path = tmp_path / "c.txt"
    long_line = "x" * (SENTENCE_CHARS + 10) + "\n"
    text = "one\ntwo  three\n\n\nfour\r\nfive\n" + long_line + "\n   \nsix"
    path.write_bytes(("\ufeff" + text).encode("utf-8"))  # a byte-order mark is not text
    sentences = list(_sentences([str(path)], "glm"))
    assert "".join(sentences) == text
    assert sentences[0] == "one\ntwo  three\n\n\n"  # a paragraph ends after its blank lines
    assert all(len(s) <= SENTENCE_CHARS for s in sentences)
    assert sentences[-1] == "six"
    # ChatGLM-6B trains line by line on its rewritten whitespace ("\n" is its "<n>" piece, never learned)
    assert list(_sentences([str(path)], "chatglm"))[:3] == ["one", "two<|blank_2|>three", "four"]


@pytest.mark.parametrize("family", ["glm", "chatglm3"])
@pytest.mark.parametrize("model_type", [None, "bpe"])
def test_newlines_round_trip_as_learned_pieces(play, tmp_path, family, model_type):
    """What glm's trainer relies on: a tokenizer trained with its defaults on text with line breaks
    encodes them with learned pieces (never byte pieces) and gives the text back exactly."""
    tok = train([play], str(tmp_path / "t"), 420, family, model_type=model_type)
    for s in ("a\nb", "a\n\nb  c\n", "Verse one,\n  verse two.\n\nNext speech\n"):
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert not any(tok.sp.is_byte(i) for i in ids), [tok.sp.id_to_piece(i) for i in ids]


def test_newline_is_a_piece_even_when_the_corpus_has_none(tmp_path):
    path = tmp_path / "one_line.txt"
    path.write_text("the cat sat on the mat " * 50, encoding="utf-8")
    tok = train([str(path)], str(tmp_path / "t"), None, "chatglm3", model_type="char", byte_fallback=False)
    assert tok.vocab_size == len(set("the cat sat on the mat\n")) + 3 + 9
    assert tok.decode(tok.encode("cat\nmat")) == "cat\nmat"


# ---------------------------------------------------------------------------------------------
# the record in tokenizer_config.json

def test_folder_records_model_type_and_byte_fallback(play, tmp_path):
    out = str(tmp_path / "t")
    train([play], out, None, "glm", model_type="char", byte_fallback=False)
    with open(os.path.join(out, "tokenizer_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    assert (cfg["model_type"], cfg["byte_fallback"]) == ("char", False)
    tok = load(out)
    assert (tok.model_type, tok.byte_fallback) == ("char", False)
    assert "model_type=char byte_fallback=False" in repr(tok)
    tok.save(str(tmp_path / "copy"))  # a checkpoint's copy of the tokenizer keeps it
    assert load(str(tmp_path / "copy")).model_type == "char"
    cfg["model_type"] = "wordpiece"
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    with pytest.raises(TokenizerError, match="model_type is 'wordpiece'; set it to one of unigram, bpe, char"):
        load(out)
    assert load(str(tmp_path / "copy")).model_type == "char"
    assert train([play], str(tmp_path / "u"), 420, "chatglm2").model_type == "unigram"  # the default


# ---------------------------------------------------------------------------------------------
# refused options

def test_bad_options_are_refused_before_training(play, tmp_path):
    out = tmp_path / "t"
    with pytest.raises(TokenizerError, match="model_type 'word' is unknown; use one of unigram, bpe, char"):
        train([play], str(out), 420, "glm", model_type="word")
    with pytest.raises(TokenizerError, match=r"a bpe model needs vocab_size \(--vocab-size\)"):
        train([play], str(out), None, "glm", model_type="bpe")
    with pytest.raises(TokenizerError, match="byte_fallback must be True or False"):
        train([play], str(out), 420, "glm", byte_fallback="no")
    for kind in ("char", "unigram"):
        with pytest.raises(TokenizerError, match=f"glm4 tokenizer is byte-level BPE .* cannot be a {kind} model"):
            train([play], str(out), 300, "glm4", model_type=kind)
    with pytest.raises(TokenizerError, match=r"no byte fallback to turn off; drop byte_fallback=False"):
        train([play], str(out), 300, "glm4", byte_fallback=False)
    assert not out.exists()


@needs_tiktoken
def test_glm4_records_byte_level_bpe(play, tmp_path):
    tok = train([play], str(tmp_path / "g"), 300, "glm4", model_type="bpe")
    assert (tok.model_type, tok.byte_fallback, tok.vocab_size) == ("bpe", True, 300)
    assert tok.decode(tok.encode("a\r\nb\n\nc")) == "a\r\nb\n\nc"


# ---------------------------------------------------------------------------------------------
# glm train-tokenizer

def test_cli_flags_reach_train(play, tmp_path, monkeypatch):
    seen = {}

    def spy(files, out, vocab_size, family, **kw):
        seen.update(files=files, vocab_size=vocab_size, family=family, **kw)
        return "tok"
    monkeypatch.setattr(glm.tokenizer, "train", spy)
    assert main(["train-tokenizer", play, str(tmp_path / "t"), "--family", "glm", "--model-type", "char",
                 "--no-byte-fallback"]) == 0
    assert seen == {"files": [play], "vocab_size": None, "family": "glm", "model_type": "char",
                    "byte_fallback": False, "overwrite": False}
    assert main(["train-tokenizer", play, str(tmp_path / "t"), "--family", "chatglm3", "--vocab-size", "400"]) == 0
    assert (seen["model_type"], seen["byte_fallback"], seen["vocab_size"]) == (None, True, 400)
    assert main(["train-tokenizer", play, str(tmp_path / "t"), "--family", "glm", "--model-type", "bpe",
                 "--byte-fallback"]) == 0
    assert (seen["model_type"], seen["byte_fallback"]) == ("bpe", True)
    assert set(MODEL_TYPES) == {"char", "bpe", "unigram"}


def test_cli_trains_and_refuses(play, tmp_path, capsys):
    out = str(tmp_path / "t")
    assert main(["train-tokenizer", play, out, "--family", "chatglm3", "--model-type", "char",
                 "--no-byte-fallback"]) == 0
    assert "model_type=char byte_fallback=False" in capsys.readouterr().out
    assert load(out).vocab_size == 65 + 3 + 9
    assert main(["train-tokenizer", play, str(tmp_path / "u"), "--family", "chatglm3", "--model-type", "char",
                 "--vocab-size", "400"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has exactly 333 ids" in err and "--vocab-size 333" in err
    assert main(["train-tokenizer", play, str(tmp_path / "u"), "--family", "glm"]) == 2
    assert "needs vocab_size (--vocab-size)" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "u")
