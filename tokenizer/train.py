"""``train(...)``: a toy tokenizer with a family's special-token layout, for pretraining small models.

SentencePiece families are trained with byte fallback, identity normalisation and no whitespace
collapsing, so ``decode(encode(s)) == s`` for any text; GLM-4 gets a byte-level BPE rank file. The
returned tokenizer has exactly ``vocab_size`` ids, specials included.
"""
from __future__ import annotations

import io
import os
import re
import struct
from typing import Iterator, Sequence

import sentencepiece as spm

from glm.files import FileKindError, ensure_regular

from .base import CONFIG_NAME, Tokenizer, TokenizerError, canonical_family
from .glm4 import GLM4_SPECIALS, CorpusTooSmall, GLM4Tokenizer, format_ranks, optional_import, train_ranks
from .load import MODEL_FILES, load
from .sentencepiece_families import (
    CHATGLM2_SPECIALS,
    CHATGLM3_ROLES,
    CHATGLM_SPECIALS,
    GLM_COMMAND_TOKENS,
    ChatGLM2Tokenizer,
    ChatGLM3Tokenizer,
    ChatGLM6BTokenizer,
    GLMTokenizer,
    chatglm_preprocess,
    chatglm_whitespace_pieces,
)

# ids each family adds on top of what the tokenizer model learns
APPENDED = {"glm": len(GLM_COMMAND_TOKENS), "chatglm": len(CHATGLM_SPECIALS), "chatglm2": len(CHATGLM2_SPECIALS),
            "chatglm3": len(CHATGLM2_SPECIALS) + len(CHATGLM3_ROLES), "glm4": len(GLM4_SPECIALS)}
_SP_CONTROL = 3  # SentencePiece ModelProto.SentencePiece.Type.CONTROL


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def append_control_pieces(model: bytes, pieces: Sequence[str]) -> bytes:
    """Append CONTROL pieces at the end of a serialized SentencePiece ModelProto.

    Protobuf parsers concatenate the entries of a repeated field wherever they appear, so appending
    ``pieces`` entries (field 1) to the serialized bytes gives them the next ids, as in ice_text.model
    where the specials follow the text pieces. CONTROL pieces never come out of encoding plain text.
    """
    out = bytearray(model)
    for p in pieces:
        raw = p.encode("utf-8")
        msg = (b"\x0a" + _varint(len(raw)) + raw            # piece (field 1, bytes)
               + b"\x15" + struct.pack("<f", 0.0)            # score (field 2, float)
               + b"\x18" + _varint(_SP_CONTROL))             # type (field 3, enum)
        out += b"\x0a" + _varint(len(msg)) + msg
    return bytes(out)


def _lines(files: Sequence[str], family: str) -> Iterator[str]:
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if line:
                    # ChatGLM-6B's model sees text after its whitespace rewriting, so train on that.
                    yield chatglm_preprocess(line) if family == "chatglm" else line


def _read_texts(files: Sequence[str]) -> Iterator[str]:
    for path in files:
        with open(path, encoding="utf-8") as f:
            yield f.read()


# What Tokenizer.save writes into a folder: one of the model files, its config, and their temp files.
SAVED_FILES = (*MODEL_FILES, CONFIG_NAME)


def _saved_files(out_dir: str) -> list[str]:
    """The entries of ``out_dir`` that a tokenizer save wrote (folders never count)."""
    ours = []
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if name.split(".tmp-", 1)[0] in SAVED_FILES and (os.path.islink(path) or not os.path.isdir(path)):
            ours.append(name)
    return sorted(ours)


def check_out_dir(out_dir: str, overwrite: bool) -> list[str]:
    """Refuse an ``out_dir`` that holds files, unless ``overwrite`` and every file is one a tokenizer save
    writes; returns those files (replaced or removed once the new tokenizer is saved)."""
    if not os.path.lexists(out_dir):
        return []
    if not os.path.isdir(out_dir):
        raise TokenizerError(f"train: {out_dir} exists and is not a folder; pass a new folder for the tokenizer")
    names = sorted(os.listdir(out_dir))
    if not names:
        return []
    if not overwrite:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise TokenizerError(f"train: {out_dir} already holds files ({shown}); pass overwrite=True (--overwrite) to "
                             f"replace a tokenizer saved there, or choose a new folder")
    ours = _saved_files(out_dir)
    other = [n for n in names if n not in ours]
    if other:
        raise TokenizerError(f"train: {out_dir} holds files a tokenizer save did not write ({', '.join(other)}); "
                             f"--overwrite replaces only {', '.join(SAVED_FILES)}: move the others away or choose "
                             f"a new folder")
    return ours


def train(corpus_files: Sequence[str], out_dir: str, vocab_size: int, family: str, *, model_type: str = "unigram",
          input_sentence_size: int = 1_000_000, num_threads: int = 2, overwrite: bool = False) -> Tokenizer:
    """Train a tokenizer on UTF-8 text files with ``family``'s special-token layout, save it to ``out_dir``
    (model file + tokenizer_config.json) and return it loaded from there. ``family`` may also be a model
    family name (glm4-chatglm, glm-hf, glm4-hf: the GLM-4 tokenizer).

    ``out_dir`` must be new or empty; with ``overwrite`` it may hold a saved tokenizer (its model file,
    tokenizer_config.json and their temp files, nothing else), which the new one replaces."""
    family = canonical_family(family, "train(family=...)")
    if isinstance(corpus_files, (str, os.PathLike)):
        corpus_files = [corpus_files]
    files = [os.fspath(p) for p in corpus_files]
    if not files:
        raise TokenizerError("train: corpus_files is empty; pass at least one UTF-8 text file")
    for p in files:
        try:
            # a FIFO or device would block or never end; only regular files are read
            if ensure_regular(p, "corpus").st_size == 0:
                raise TokenizerError(f"train: corpus file {p} is missing or empty")
        except FileNotFoundError:
            raise TokenizerError(f"train: corpus file {p} is missing or empty") from None
        except FileKindError as e:
            raise TokenizerError(f"train: {e}") from None
    out_dir = os.fspath(out_dir)
    previous = check_out_dir(out_dir, overwrite)
    if family == "glm4":
        optional_import("tiktoken")  # fail before training, not after
    if not isinstance(vocab_size, int):
        raise TokenizerError(f"train: vocab_size must be an int, got {vocab_size!r}")
    specials = APPENDED[family]
    learned = vocab_size - specials
    # SentencePiece reserves <unk> <s> </s> (+ <pad> and the 81 whitespace pieces for ChatGLM-6B) and
    # 256 byte pieces, and then needs one piece per distinct character of the corpus; GLM-4's BPE starts
    # from the 256 bytes and needs nothing per character.
    floor = 256 if family == "glm4" else 259 + (82 if family == "chatglm" else 0)
    if learned <= floor:
        if family == "glm4":
            need, least = f"{specials} special ids and {floor} byte tokens", f"more than {floor + specials}"
        else:
            need = f"{specials} special ids, {floor} base pieces and one piece per distinct character of the corpus"
            least = f"at least {floor + specials} plus the corpus's number of distinct characters"
        raise TokenizerError(f"train: vocab_size {vocab_size} is too small for {family}: it needs {need}, so use "
                             f"{least} (a few hundred more for useful merges)")
    try:
        if family == "glm4":
            tok: Tokenizer = GLM4Tokenizer(format_ranks(train_ranks(_read_texts(files), learned)), out_dir)
        else:
            tok = _train_sentencepiece(files, out_dir, learned, family, model_type, input_sentence_size, num_threads)
    except UnicodeDecodeError as e:
        raise TokenizerError(f"train: a corpus file is not UTF-8 text ({e}); convert it first") from None
    except CorpusTooSmall as e:
        raise TokenizerError(f"train: vocab_size {vocab_size} is too large for {family} on {files}: byte-level BPE "
                             f"finds only {e.available} tokens in this text, plus {specials} special ids, so use "
                             f"vocab_size <= {e.available + specials} or add text") from None
    tok.save(out_dir)
    # Another family's model file or a crashed save's temp file from the tokenizer replaced here would
    # otherwise stay beside the new one.
    for name in previous:
        if name not in (tok.model_file, CONFIG_NAME):
            os.remove(os.path.join(out_dir, name))
    return load(out_dir)


def _train_sentencepiece(files: Sequence[str], out_dir: str, learned: int, family: str, model_type: str,
                         input_sentence_size: int, num_threads: int) -> Tokenizer:
    buf = io.BytesIO()
    chatglm = family == "chatglm"
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(files, family), model_writer=buf, vocab_size=learned, model_type=model_type,
            character_coverage=1.0, byte_fallback=True,
            # exact round trips: no NFKC, keep runs of spaces, whitespace-only pieces allowed
            normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3 if chatglm else -1, pad_piece="<pad>",
            user_defined_symbols=chatglm_whitespace_pieces() if chatglm else [],
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True, num_threads=num_threads,
            minloglevel=2)
    except RuntimeError as e:
        raise _sentencepiece_error(str(e), learned, family, files) from None
    model = buf.getvalue()
    if chatglm:
        return ChatGLM6BTokenizer(append_control_pieces(model, CHATGLM_SPECIALS), out_dir)
    cls = {"glm": GLMTokenizer, "chatglm2": ChatGLM2Tokenizer, "chatglm3": ChatGLM3Tokenizer}[family]
    return cls(model, out_dir)


def _sentencepiece_error(message: str, learned: int, family: str, files: Sequence[str]) -> TokenizerError:
    """SentencePiece's failure, as advice in terms of ``vocab_size`` (its own text names trainer flags
    that glm does not have). Its two size checks say which way to move and how far."""
    specials = APPENDED[family]
    vocab_size = learned + specials
    # trainer_interface.cc: "Vocabulary size is smaller than required_chars. {vocab} vs {chars + reserved}."
    small = re.search(r"smaller than required_chars\D*(\d+) vs (\d+)", message)
    if small:
        need = int(small.group(2)) + specials
        return TokenizerError(f"train: vocab_size {vocab_size} is too small for {family} on {list(files)}: the "
                              f"corpus's distinct characters and the reserved pieces need {small.group(2)} pieces "
                              f"before any merges, plus {specials} special ids, so use vocab_size >= {need} "
                              f"(a few hundred more for useful merges)")
    # "Vocabulary size too high ({vocab}). Please set it to a value <= {max}."
    large = re.search(r"too high\D*\d+\D*<= (\d+)", message)
    if large:
        most = int(large.group(1)) + specials
        return TokenizerError(f"train: vocab_size {vocab_size} is too large for {family} on {list(files)}: "
                              f"SentencePiece finds only {large.group(1)} pieces in this text, plus {specials} "
                              f"special ids, so use vocab_size <= {most} or add text")
    return TokenizerError(f"train: SentencePiece could not train {learned} pieces (vocab_size {vocab_size} less "
                          f"{specials} special ids) for {family} on {list(files)}: {message}")
