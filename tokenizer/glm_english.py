"""Original GLM's English tokenizers, as THUDM's ``tokenization_glm.py`` builds them on transformers'
GPT-2, RoBERTa and BERT tokenizers:

- ``GLMGPT2Tokenizer`` (glm-10b, glm-2b): GPT-2 byte-level BPE (vocab.json + merges.txt), GLM's blank and
  piece tokens from added_tokens.json after ``<|endoftext|>`` 50256; ``[CLS] X <|endoftext|>``.
- ``GLMRobertaTokenizer`` (glm-roberta-large): RoBERTa byte-level BPE, ``<|startofpiece|>``,
  ``<|endofpiece|>`` and ``[MASK]`` after the 50265 RoBERTa ids; ``<s> X </s>``; ``[MASK]`` only.
- ``GLMBertTokenizer`` (glm-large, glm-515m): BERT uncased WordPiece (vocab.txt), the two piece tokens
  after the vocabulary; ``[CLS] X [SEP]``; ``[MASK]`` only.

Text goes through the ``tokenizers`` library set up as transformers sets up GPT2Tokenizer / RobertaTokenizer /
BertTokenizer; the special-token table is the release's added_tokens.json and tokenizer_config.json.
"""
from __future__ import annotations

import json
from typing import ClassVar, Literal, Mapping, Optional, Sequence

from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer

from .base import CONFIG_NAME, TokenizerError, check_text
from .hf_json import RustBacked, parse_json
from .sentencepiece_families import GLMTokenizer

EnglishKind = Literal["gpt2", "roberta", "bert"]
# tokenizer_config.json's tokenizer_class -> kind. THUDM's GLMTokenizer.from_pretrained dispatches on
# the same names; the plain transformers classes are accepted for folders saved without GLM's code.
CLASS_KINDS: dict[str, EnglishKind] = {"GLMGPT2Tokenizer": "gpt2", "GPT2Tokenizer": "gpt2",
                                       "GLMRobertaTokenizer": "roberta", "RobertaTokenizer": "roberta",
                                       "GLMBertTokenizer": "bert", "BertTokenizer": "bert"}
# transformers' SPECIAL_TOKENS_ATTRIBUTES order: tokens named in tokenizer_config.json that neither file
# holds are appended in this order (glm-10b's unk_token "[UNK]" lands at 50265 this way).
SPECIAL_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
SOP, EOP = "<|startofpiece|>", "<|endofpiece|>"


def class_kind(cfg: Mapping[str, object]) -> Optional[EnglishKind]:
    """The English tokenizer a tokenizer_config.json names in ``tokenizer_class`` or ``auto_map``."""
    names = [cfg.get("tokenizer_class")]
    auto = cfg.get("auto_map")
    if isinstance(auto, dict):
        for v in auto.values():
            names += v if isinstance(v, list) else [v]
    for name in names:
        if isinstance(name, str):
            kind = CLASS_KINDS.get(name.rsplit(".", 1)[-1])
            if kind is not None:
                return kind
    return None


class _EnglishTokenizer(RustBacked):
    family = "glm"
    kind: ClassVar[EnglishKind]
    tokenizer_class: ClassVar[str]
    # transformers' defaults for the class's special-token attributes, before tokenizer_config.json
    defaults: ClassVar[dict[str, Optional[str]]]
    # GLM's own tokens in the order original GLM appends them after the vocabulary, for a folder with no
    # added_tokens.json (THUDM/GLM data_utils/tokenization.py)
    appended: ClassVar[tuple[str, ...]]
    roles_in_chat = frozenset()

    def __init__(self, files: Mapping[str, bytes], source: str, config: Optional[Mapping[str, object]] = None,
                 added: Optional[Mapping[str, int]] = None):
        self._files = dict(files)
        cfg = dict(config or {})
        self._config = {k: cfg[k] for k in (*SPECIAL_ATTRIBUTES, "additional_special_tokens", "add_prefix_space",
                                            "do_lower_case", "tokenize_chinese_chars", "strip_accents") if k in cfg}
        vocab = self._read_vocab(source)
        self._rust = self._build(vocab, source, cfg)
        table = self._special_table(vocab, added or {}, cfg, source)
        _register(self._rust, table, len(vocab), source)
        roles = self._roles(cfg, table, source)
        self.model_type = "bpe" if self.kind != "bert" else None
        self.byte_fallback = self.kind != "bert"
        super().__init__(table, len(vocab), source, roles)

    # ---- per kind ------------------------------------------------------------------------------
    def _read_vocab(self, source: str) -> dict[str, int]:
        raise NotImplementedError

    def _build(self, vocab: dict[str, int], source: str, cfg: dict) -> RustTokenizer:
        raise NotImplementedError

    # ---- shared --------------------------------------------------------------------------------
    def _named(self, cfg: dict, key: str) -> Optional[str]:
        """A special-token attribute: tokenizer_config.json's string (or {"content": ...}), else the class default."""
        value = cfg.get(key, self.defaults.get(key))
        if isinstance(value, dict):
            value = value.get("content")
        return value if isinstance(value, str) else None

    def _special_table(self, vocab: dict[str, int], added: Mapping[str, int], cfg: dict,
                       source: str) -> dict[str, int]:
        n = len(vocab)
        if SOP in added:
            table = dict(added)
        else:  # no added_tokens.json: original GLM's layout after the vocabulary
            table = {name: vocab.get(name, n + i) for i, name in enumerate(self.appended)}
            table.update(added)
        owners = {i: t for t, i in vocab.items()}
        for name, idx in table.items():
            if (name in vocab and vocab[name] != idx) or owners.get(idx, name) != name:
                where = self._vocab_name()
                clash = (f"{where} gives it id {vocab[name]}" if name in vocab
                         else f"{where} gives {idx} to {owners[idx]!r}")
                raise TokenizerError(f"{source}: added token {name!r} has id {idx} but {clash}; added_tokens.json "
                                     f"and {where} come from different releases (re-download them together)")
        # The tokens transformers registers as special: the class's attributes as tokenizer_config.json
        # sets them, and additional_special_tokens; those in the vocabulary keep their id, the rest are
        # appended after the highest id (transformers' len(tokenizer)).
        extra = cfg.get("additional_special_tokens")
        names = [self._named(cfg, k) for k in SPECIAL_ATTRIBUTES]
        names += [t.get("content") if isinstance(t, dict) else t for t in (extra if isinstance(extra, list) else [])]
        for name in names:
            if isinstance(name, str) and name not in table:
                table[name] = vocab[name] if name in vocab else max([n - 1, *table.values()]) + 1
        return table

    def _roles(self, cfg: dict, table: dict[str, int], source: str) -> dict[str, object]:
        raise NotImplementedError

    def _vocab_name(self) -> str:
        return self.model_file

    def _require(self, table: dict[str, int], names: Sequence[str], source: str) -> None:
        missing = [n for n in names if n not in table]
        if missing:
            raise TokenizerError(f"{source}: no token {missing[0]!r} in {self._vocab_name()} or added_tokens.json; "
                                 f"the {self.tokenizer_class} layout needs {', '.join(names)} (re-download the "
                                 f"release's tokenizer files)")

    def _model_files(self) -> dict[str, bytes]:
        return dict(self._files)

    def _config_extra(self) -> dict:
        # the release's own keys, so the saved folder loads like the release (and in transformers)
        return {"tokenizer_class": self.tokenizer_class, **self._config}

    # Part A for infilling: [CLS] ids <end>, without <end> when the text ends in a mask, as for the
    # Chinese GLM tokenizer.
    infill_prompt = GLMTokenizer.infill_prompt


def _register(rust: RustTokenizer, table: Mapping[str, int], n: int, source: str) -> None:
    """The special tokens as added tokens of the Rust tokenizer, so that it decodes them as transformers
    does; encode keeps them text (Tokenizer.encode_with_specials splits them out)."""
    for name, idx in sorted(table.items(), key=lambda kv: kv[1]):
        rust.add_special_tokens([AddedToken(name, special=True, normalized=False)])
        if rust.token_to_id(name) != idx:
            raise TokenizerError(f"{source}: added token {name!r} has id {idx}, but the ids after the {n} of the "
                                 f"vocabulary must run on without gaps (the next free id is "
                                 f"{rust.token_to_id(name)}); fix added_tokens.json or re-download it")
    rust.encode_special_tokens = True


def _read_bpe_vocab(data: bytes, source: str) -> dict[str, int]:
    vocab = parse_json(data, source, "the release's vocab.json")
    if not isinstance(vocab, dict) or not vocab:
        raise TokenizerError(f"{source}: expected a non-empty JSON object of token -> id; re-download the release's "
                             f"vocab.json")
    bad = next(((t, i) for t, i in vocab.items() if isinstance(i, bool) or not isinstance(i, int) or i < 0), None)
    if bad is not None:
        raise TokenizerError(f"{source}: token {bad[0]!r} has id {bad[1]!r}; ids are non-negative integers "
                             f"(re-download the release's vocab.json)")
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise TokenizerError(f"{source}: ids are not 0..{len(vocab) - 1}, each once; the file is damaged "
                             f"(re-download the release's vocab.json)")
    return vocab


def _read_merges(data: bytes, source: str) -> list[tuple[str, str]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start}); re-download the release's "
                             f"merges.txt") from None
    merges = []
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise TokenizerError(f"{source}:{lineno}: expected two tokens separated by one space, got {line[:60]!r}; "
                                 f"re-download the release's merges.txt")
        merges.append((parts[0], parts[1]))
    return merges


class GLMGPT2Tokenizer(_EnglishTokenizer):
    kind = "gpt2"
    tokenizer_class = "GLMGPT2Tokenizer"
    model_file = "vocab.json"
    defaults = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    # GPT2BPETokenizer with add_block_symbols and add_task_mask ([UNUSED] is its [UNK] slot)
    appended = (SOP, EOP, "[CLS]", "[MASK]", "[SEP]", "[UNUSED]", "[gMASK]", "[sMASK]")

    def _read_vocab(self, source: str) -> dict[str, int]:
        self._merges = _read_merges(self._files["merges.txt"], source.replace("vocab.json", "merges.txt"))
        return _read_bpe_vocab(self._files["vocab.json"], source)

    def _build(self, vocab: dict[str, int], source: str, cfg: dict) -> RustTokenizer:
        try:
            # transformers' GPT2Tokenizer / RobertaTokenizer model and pre-tokenizer
            rust = RustTokenizer(models.BPE(vocab, self._merges, dropout=None, continuing_subword_prefix="",
                                            end_of_word_suffix="", fuse_unk=False))
        except Exception as e:  # the Rust side raises a bare Exception naming the bad merge
            raise TokenizerError(f"{source.replace('vocab.json', 'merges.txt')}: does not fit vocab.json "
                                 f"({str(e).splitlines()[0]}); re-download the two files together") from None
        add_prefix_space = cfg.get("add_prefix_space", False)
        if not isinstance(add_prefix_space, bool):
            raise TokenizerError(f"{CONFIG_NAME}: add_prefix_space is {add_prefix_space!r}; set it to true or false")
        rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
        rust.decoder = decoders.ByteLevel()
        return rust

    def _roles(self, cfg: dict, table: dict[str, int], source: str) -> dict[str, object]:
        eos = self._named(cfg, "eos_token")
        cls = self._named(cfg, "cls_token") or "[CLS]"
        self._require(table, [SOP, EOP, cls, eos or "<|endoftext|>"], source)
        self._ends = (table[cls], table[eos or "<|endoftext|>"])
        return {"pad": self._named(cfg, "pad_token") or eos, "bos": None, "eos": (eos,), "sop": SOP, "eop": EOP,
                "cls": cls}

    def build_inputs(self, ids: Sequence[int]) -> list[int]:
        # GLMGPT2Tokenizer.build_inputs_with_special_tokens: [CLS] + ids + [eos]
        return [self._ends[0], *ids, self._ends[1]]

    def _vocab_name(self) -> str:
        return "vocab.json"


class _MaskOnly(_EnglishTokenizer):
    """GLMRobertaTokenizer and GLMBertTokenizer: ``mask_token_ids = [mask_token_id]``, and gMASK/sMASK
    raise, since those releases were trained with [MASK] blanks only."""

    def __init__(self, files: Mapping[str, bytes], source: str, config: Optional[Mapping[str, object]] = None,
                 added: Optional[Mapping[str, int]] = None):
        super().__init__(files, source, config, added)
        self._mask = self._named(dict(config or {}), "mask_token") or "[MASK]"
        self._require(self.special_tokens, [self._mask], source)

    @property
    def mask_ids(self) -> dict[str, int]:
        return {"MASK": self.special_tokens[self._mask]}

    def encode_with_specials(self, text: str, continuation: bool = False) -> list[int]:
        # glm infill reaches the tokenizer here with a blank's literal text: "[gMASK]" would otherwise
        # become the plain text "[", "gm", "##ask", "]" and infilling would find no blank.
        check_text(text)
        for mask in ("[gMASK]", "[sMASK]"):
            if mask in text and mask not in self.special_tokens:
                raise TokenizerError(f"the {self.tokenizer_class} vocabulary has no {mask} ({self.source}): this "
                                     f"release was trained with [MASK] blanks only; write the blank as [MASK]")
        return super().encode_with_specials(text, continuation)


class GLMRobertaTokenizer(_MaskOnly, GLMGPT2Tokenizer):
    kind = "roberta"
    tokenizer_class = "GLMRobertaTokenizer"
    defaults = {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>",
                "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>"}
    appended = (SOP, EOP, "[MASK]")

    def _roles(self, cfg: dict, table: dict[str, int], source: str) -> dict[str, object]:
        cls, sep = self._named(cfg, "cls_token"), self._named(cfg, "sep_token")
        eos = self._named(cfg, "eos_token")
        self._require(table, [SOP, EOP, cls, sep, eos], source)  # type: ignore[list-item]
        self._ends = (table[cls], table[sep])  # type: ignore[index]
        return {"pad": self._named(cfg, "pad_token"), "bos": None, "eos": (eos,), "sop": SOP, "eop": EOP,
                "cls": cls}



class GLMBertTokenizer(_MaskOnly):
    kind = "bert"
    tokenizer_class = "GLMBertTokenizer"
    model_file = "vocab.txt"
    defaults = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                "mask_token": "[MASK]"}
    appended = (SOP, EOP)  # BertWordPieceTokenizer with add_block_symbols; no task masks

    def _read_vocab(self, source: str) -> dict[str, int]:
        try:
            text = self._files["vocab.txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start}); re-download the "
                                 f"release's vocab.txt") from None
        # transformers' load_vocab: one token per line, the line number is the id (a repeated line keeps
        # its last id, as there)
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        vocab = {line.rstrip("\r"): i for i, line in enumerate(lines)}
        if not vocab or not any(vocab):
            raise TokenizerError(f"{source}: empty; a WordPiece vocab.txt holds one token per line (re-download the "
                                 f"release's vocab.txt)")
        if len(vocab) != len(lines):
            dup = next(t for i, t in enumerate(lines) if vocab[t.rstrip("\r")] != i)
            raise TokenizerError(f"{source}: token {dup!r} appears on more than one line; re-download the "
                                 f"release's vocab.txt")
        return vocab

    def _build(self, vocab: dict[str, int], source: str, cfg: dict) -> RustTokenizer:
        unk = self._named(cfg, "unk_token")
        if unk not in vocab:
            raise TokenizerError(f"{source}: no {unk!r} line; WordPiece needs its unknown token in vocab.txt "
                                 f"(re-download the release's vocab.txt)")
        flags = {}
        for key, default in (("do_lower_case", True), ("tokenize_chinese_chars", True), ("strip_accents", None)):
            value = cfg.get(key, default)
            if value is not None and not isinstance(value, bool):
                raise TokenizerError(f"{CONFIG_NAME}: {key} is {value!r}; set it to true or false")
            flags[key] = value
        # transformers' BertTokenizer pipeline; strip_accents None follows lowercase
        rust = RustTokenizer(models.WordPiece(vocab, unk_token=unk))
        rust.normalizer = normalizers.BertNormalizer(clean_text=True,
                                                     handle_chinese_chars=flags["tokenize_chinese_chars"],
                                                     strip_accents=flags["strip_accents"],
                                                     lowercase=flags["do_lower_case"])
        rust.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        rust.decoder = decoders.WordPiece(prefix="##")
        return rust

    def _roles(self, cfg: dict, table: dict[str, int], source: str) -> dict[str, object]:
        cls, sep = self._named(cfg, "cls_token"), self._named(cfg, "sep_token")
        # The release's eos is unset in the files glm knows; [SEP] ends build_inputs, so it ends a text.
        eos = self._named(cfg, "eos_token") or sep
        self._require(table, [SOP, EOP, cls, sep, eos], source)  # type: ignore[list-item]
        self._ends = (table[cls], table[sep])  # type: ignore[index]
        return {"pad": self._named(cfg, "pad_token"), "bos": None, "eos": (eos,), "sop": SOP, "eop": EOP,
                "cls": cls}

    def build_inputs(self, ids: Sequence[int]) -> list[int]:
        # BertTokenizer's [CLS] + ids + [SEP] (GLMBertTokenizer does not override it)
        return [self._ends[0], *ids, self._ends[1]]

    def _vocab_name(self) -> str:
        return "vocab.txt"


def read_english(folder_files: Mapping[str, bytes], kind: EnglishKind, source: str,
                 config: Optional[Mapping[str, object]], added: Mapping[str, int]) -> _EnglishTokenizer:
    cls = {"gpt2": GLMGPT2Tokenizer, "roberta": GLMRobertaTokenizer, "bert": GLMBertTokenizer}[kind]
    return cls(folder_files, source, config, added)


def bpe_vocab_kind(data: bytes) -> EnglishKind:
    """GPT-2 or RoBERTa for a vocab.json without a tokenizer_class: RoBERTa's vocabulary holds ``<s>`` and
    ``</s>`` where GPT-2's holds ``<|endoftext|>``."""
    try:
        vocab = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return "gpt2"  # the GPT-2 reader names the file and the problem
    return "roberta" if isinstance(vocab, dict) and "<s>" in vocab and "<|endoftext|>" not in vocab else "gpt2"


__all__ = ["GLMGPT2Tokenizer", "GLMRobertaTokenizer", "GLMBertTokenizer", "class_kind", "read_english",
           "bpe_vocab_kind", "CLASS_KINDS", "EnglishKind"]
