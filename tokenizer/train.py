"""``train(...)``: a toy tokenizer with a family's special-token layout, for pretraining small models.

SentencePiece families learn a ``unigram``, ``bpe`` or ``char`` model from the text as written (newlines
included) with identity normalisation and no whitespace collapsing; with byte fallback (the default)
``decode(encode(s)) == s`` for any text. GLM-4 gets a byte-level BPE rank file. The returned tokenizer
has exactly ``vocab_size`` ids, specials included, or training is refused with the size that is possible.
"""
from __future__ import annotations

import io
import os
import re
import struct
from typing import Iterable, Iterator, Optional, Sequence

import sentencepiece as spm

from glm.files import FileKindError, ensure_regular

from .base import CONFIG_NAME, MODEL_TYPES, ModelType, Tokenizer, TokenizerError, canonical_family
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


BYTE_PIECES = 256
# SentencePiece silently drops a training sentence longer than max_sentence_length bytes; sentences are
# cut at SENTENCE_CHARS characters, each at most 4 bytes of UTF-8 or 7 after ChatGLM-6B's whitespace
# rewriting ("\t" -> "<|tab|>"), so none is dropped.
SENTENCE_CHARS = 4096
MAX_SENTENCE_BYTES = 8 * SENTENCE_CHARS


def _sentences(files: Sequence[str], family: str) -> Iterator[str]:
    """The corpus as SentencePiece training sentences, with every line break kept: a sentence ends after a
    run of blank lines (a paragraph, which is one document when glm reads a text file by blank lines, so
    the dummy-prefix space falls where ``encode`` puts it) or, inside a long paragraph, between lines,
    and a line longer than SENTENCE_CHARS is cut. ChatGLM-6B's are its lines (see _chatglm_lines)."""
    for path in files:
        # newline="": "\r\n" and "\r" stay in the text, as glm's data reader keeps them
        with open(path, encoding="utf-8-sig", newline="") as f:
            if family == "chatglm":
                yield from _chatglm_lines(f)
                continue
            run: list[str] = []
            size, after_blank = 0, False
            for line in f:
                blank = not line.strip()
                if run and ((after_blank and not blank) or size + len(line) > SENTENCE_CHARS):
                    yield "".join(run)
                    run, size = [], 0
                after_blank = blank
                while len(line) > SENTENCE_CHARS:
                    yield line[:SENTENCE_CHARS]
                    line = line[SENTENCE_CHARS:]
                run.append(line)
                size += len(line)
            if run:
                yield "".join(run)


def _chatglm_lines(lines: Iterable[str]) -> Iterator[str]:
    """ChatGLM-6B's training sentences: each non-empty line without its break, after the whitespace
    rewriting its model sees. A line break is the user-defined piece "<n>", which encodes as written
    without being learned, and unigram training on sentences holding "<n>" after a word learned almost
    no word pieces."""
    for line in lines:
        line = line.rstrip("\r\n")
        while line:
            yield chatglm_preprocess(line[:SENTENCE_CHARS])
            line = line[SENTENCE_CHARS:]


def _read_texts(files: Sequence[str]) -> Iterator[str]:
    for path in files:
        with open(path, encoding="utf-8-sig", newline="") as f:
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


def train(corpus_files: Sequence[str], out_dir: str, vocab_size: Optional[int], family: str, *,
          model_type: Optional[ModelType] = None, byte_fallback: bool = True, input_sentence_size: int = 1_000_000,
          num_threads: int = 2, overwrite: bool = False) -> Tokenizer:
    """Train a tokenizer on UTF-8 text files with ``family``'s special-token layout, save it to ``out_dir``
    (model file + tokenizer_config.json) and return it loaded from there. ``family`` may also be a model
    family name (glm4-chatglm, glm-hf, glm4-hf: the GLM-4 tokenizer).

    ``model_type``: ``"unigram"`` (the default for the SentencePiece families), ``"bpe"`` or ``"char"`` (one
    id per distinct character of the corpus, no dummy-prefix space); GLM-4 is always byte-level ``"bpe"``.
    ``byte_fallback``: 256 byte pieces encode any character the model lacks (off: such characters become
    ``<unk>``); GLM-4 is byte-level and cannot turn it off.

    The tokenizer has exactly ``vocab_size`` ids, specials included, or training is refused with the size
    the corpus allows. A char model's size is set by the corpus: ``vocab_size=None`` takes it, an int must
    equal it.

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
    model_type = _check_model(family, model_type, byte_fallback)
    if family == "glm4":
        optional_import("tiktoken")  # fail before training, not after
    if vocab_size is None and model_type != "char":
        raise TokenizerError(f"train: a {model_type} model needs vocab_size (--vocab-size), the total number of ids "
                             f"with the special tokens; only a char model takes its size from the corpus")
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)):
        raise TokenizerError(f"train: vocab_size must be an int, got {vocab_size!r}")
    specials = APPENDED[family]
    if model_type != "char":
        _check_floor(vocab_size, family, byte_fallback)  # type: ignore[arg-type]
    try:
        if family == "glm4":
            tok: Tokenizer = GLM4Tokenizer(format_ranks(train_ranks(_read_texts(files), vocab_size - specials)),
                                           out_dir)
        else:
            learned = None if vocab_size is None else vocab_size - specials
            tok = _train_sentencepiece(files, out_dir, learned, family, model_type, byte_fallback,
                                       input_sentence_size, num_threads)
    except UnicodeDecodeError as e:
        raise TokenizerError(f"train: a corpus file is not UTF-8 text ({e}); convert it first") from None
    except CorpusTooSmall as e:
        raise TokenizerError(f"train: vocab_size {vocab_size} is too large for {family} on {files}: byte-level BPE "
                             f"finds only {e.available} tokens in this text, plus {specials} special ids, so use "
                             f"vocab_size <= {e.available + specials} or add text") from None
    if vocab_size is not None and tok.vocab_size != vocab_size:
        if model_type == "char":
            raise _char_size_error(tok.vocab_size, vocab_size, family, byte_fallback, files)
        # SentencePiece's hard vocabulary limit and the BPE trainer refuse this before it can happen
        raise TokenizerError(f"train: {family} {model_type} training on {files} gave {tok.vocab_size} ids, not "
                             f"vocab_size {vocab_size}; use vocab_size {tok.vocab_size}")
    tok.model_type = model_type  # type: ignore[assignment]
    tok.save(out_dir)
    # Another family's model file or a crashed save's temp file from the tokenizer replaced here would
    # otherwise stay beside the new one.
    for name in previous:
        if name not in (tok.model_file, CONFIG_NAME):
            os.remove(os.path.join(out_dir, name))
    return load(out_dir)


def _check_model(family: str, model_type: object, byte_fallback: object) -> str:
    """``model_type`` (None: the family's default) checked against the family, or TokenizerError."""
    if model_type is not None and model_type not in MODEL_TYPES:
        raise TokenizerError(f"train: model_type {model_type!r} is unknown; use one of {', '.join(MODEL_TYPES)}")
    if not isinstance(byte_fallback, bool):
        raise TokenizerError(f"train: byte_fallback must be True or False, got {byte_fallback!r}")
    if family != "glm4":
        return model_type or "unigram"
    if model_type not in (None, "bpe"):
        raise TokenizerError(f"train: the glm4 tokenizer is byte-level BPE (a tiktoken rank file), so it cannot be "
                             f"a {model_type} model; leave model_type out (--model-type) or use 'bpe'")
    if not byte_fallback:
        raise TokenizerError("train: the glm4 tokenizer is byte-level BPE: every text is made of its 256 byte "
                             "tokens, so there is no byte fallback to turn off; drop byte_fallback=False "
                             "(--no-byte-fallback)")
    return "bpe"


def _reserved(family: str) -> int:
    """SentencePiece pieces before any learned one: <unk> <s> </s>, and for ChatGLM-6B <pad> and its 81
    whitespace pieces."""
    return 3 + (1 + len(chatglm_whitespace_pieces()) if family == "chatglm" else 0)


def _check_floor(vocab_size: int, family: str, byte_fallback: bool) -> None:
    """Refuse, before training, a size below what the family holds before it learns anything."""
    specials = APPENDED[family]
    # GLM-4's BPE starts from the 256 bytes and needs nothing per character; SentencePiece needs its
    # reserved pieces, the byte pieces, and one piece per distinct character of the corpus.
    floor = BYTE_PIECES if family == "glm4" else _reserved(family) + (BYTE_PIECES if byte_fallback else 0)
    if vocab_size - specials > floor:
        return
    if family == "glm4":
        need, least = f"{specials} special ids and {floor} byte tokens", f"more than {floor + specials}"
    else:
        base = f"{floor} base pieces" if byte_fallback else f"{floor} reserved pieces"
        need = f"{specials} special ids, {base} and one piece per distinct character of the corpus"
        least = f"at least {floor + specials} plus the corpus's number of distinct characters"
    raise TokenizerError(f"train: vocab_size {vocab_size} is too small for {family}: it needs {need}, so use "
                         f"{least} (a few hundred more for useful merges)")


def _char_size_error(n: int, vocab_size: int, family: str, byte_fallback: bool,
                     files: Sequence[str]) -> TokenizerError:
    specials, reserved = APPENDED[family], _reserved(family)
    n_bytes = BYTE_PIECES if byte_fallback else 0
    chars = n - specials - reserved - n_bytes
    parts = f"{chars} characters + {reserved} reserved pieces"
    parts += f" + {n_bytes} byte pieces" if byte_fallback else ""
    return TokenizerError(f"train: a char model of {family} on {list(files)} has exactly {n} ids ({parts} + "
                          f"{specials} special ids), not {vocab_size}; use vocab_size {n} (--vocab-size {n}), or "
                          f"None (leave --vocab-size out) to take the size the corpus gives")


def _train_sentencepiece(files: Sequence[str], out_dir: str, learned: Optional[int], family: str, model_type: str,
                         byte_fallback: bool, input_sentence_size: int, num_threads: int) -> Tokenizer:
    buf = io.BytesIO()
    chatglm = family == "chatglm"
    char = model_type == "char"
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(files, family), model_writer=buf, model_type=model_type,
            # a char model keeps every character however many there are (the size check follows)
            vocab_size=(1 << 20) if char else learned,
            character_coverage=1.0, byte_fallback=byte_fallback,
            # exact round trips: no NFKC, keep runs of spaces, whitespace-only pieces allowed
            normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            # a char model maps one character to one id, so no "▁" is put before the text
            add_dummy_prefix=not char,
            # "\n" is always a piece, so line breaks survive without byte fallback even when the corpus has
            # none; ChatGLM-6B writes them as its "<n>" piece.
            required_chars="" if chatglm else "\n",
            # a character without a piece (no byte fallback) decodes as U+FFFD, as undecodable bytes do
            unk_surface="\ufffd",
            max_sentence_length=MAX_SENTENCE_BYTES,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3 if chatglm else -1, pad_piece="<pad>",
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


def _sentencepiece_error(message: str, learned: Optional[int], family: str, files: Sequence[str]) -> TokenizerError:
    """SentencePiece's failure, as advice in terms of ``vocab_size`` (its own text names trainer flags
    that glm does not have). Its two size checks say which way to move and how far."""
    specials = APPENDED[family]
    if learned is None:
        return TokenizerError(f"train: SentencePiece could not train a char model for {family} on {list(files)}: "
                              f"{message}")
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
