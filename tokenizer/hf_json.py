"""Tokenizers run by the Rust ``tokenizers`` library, the one the transformers releases were saved with:
the shared text path (`RustBacked`) and the GLM-4 releases that ship only a ``tokenizer.json``
(glm-4-9b-chat-hf, GLM-4-0414), which are GLM-4's vocabulary and chat format with another file."""
from __future__ import annotations

import functools
import json
from typing import Iterable, Mapping, Optional, Sequence

from tokenizers import AddedToken
from tokenizers import Tokenizer as RustTokenizer

from .base import CONFIG_NAME, Tokenizer, TokenizerError, check_text
from .glm4 import GLM4Tokenizer


class RustBacked(Tokenizer):
    """Text <-> ids through a `tokenizers.Tokenizer` (``self._rust``), one call into it per text or id
    sequence. Special tokens stay out of ``self._rust``'s text path (``encode_special_tokens``):
    `encode` treats "[gMASK]" in text as text; `encode_with_specials` runs a copy that matches them, as
    a transformers tokenizer matches its added tokens before the model sees the text."""

    _rust: RustTokenizer

    def encode(self, text: str) -> list[int]:
        # encode_batch_fast skips the character offsets that encode() tracks and glm never reads
        return self._rust.encode_batch_fast([check_text(text)], add_special_tokens=False)[0].ids

    @functools.cached_property
    def _rust_splitting(self) -> RustTokenizer:
        # The same tokenizer with its special tokens matched in text: one Rust call for text holding
        # them, with each added token's own lstrip/rstrip/single_word rules, as transformers applies them.
        rust = RustTokenizer.from_str(self._rust.to_str())
        rust.encode_special_tokens = False
        return rust

    def encode_with_specials(self, text: str, continuation: bool = False) -> list[int]:
        # Byte-level BPE and WordPiece have no word-start marker to drop, so a continuation encodes alike.
        return self._rust_splitting.encode_batch_fast([check_text(text)], add_special_tokens=False)[0].ids

    def _decode_text(self, ids: list[int]) -> str:
        # Byte-level decoders turn bytes that are not UTF-8 (a cut-off character) into U+FFFD, as the releases do.
        return self._rust.decode(ids, skip_special_tokens=False)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids -> text, the whole sequence through the Rust decoder in one call, as transformers decodes
        it (a WordPiece decoder puts spaces around a special token, a byte-level one does not); ids are
        checked as in `Tokenizer.decode`."""
        if type(ids) is list:
            # The common case costs two C passes (min, max) before the Rust call; anything else (a tensor, a
            # float, an id out of range, which the Rust decoder would skip silently) goes through the checks.
            try:
                if not ids or (min(ids) >= 0 and max(ids) < self.vocab_size):
                    return self._rust.decode(ids, skip_special_tokens=skip_special_tokens)
            except (TypeError, OverflowError):
                pass
        return self._rust.decode(self._checked_ids(ids), skip_special_tokens=skip_special_tokens)


def parse_json(data: bytes, source: str, what: str) -> object:
    """``data`` as JSON, or one TokenizerError naming ``source`` (``what`` says which file it should be)."""
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start}); it is not {what} "
                             f"(re-download it)") from None
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{source}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}; a truncated "
                             f"download?); re-download {what}") from None
    except (RecursionError, ValueError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0]
        raise TokenizerError(f"{source}: not usable JSON ({why}); re-download {what}") from None


def is_tokenizer_json(data: bytes) -> bool:
    """A serialized `tokenizers.Tokenizer`: a JSON object with a "model" and an "added_tokens" list (a
    GPT-2 vocab.json is an object of token -> id)."""
    head = data[:4096].lstrip()
    return head[:1] == b"{" and b'"model"' in data and b'"added_tokens"' in data


class TokenizerJSONTokenizer(RustBacked, GLM4Tokenizer):
    """GLM-4 from an HF ``tokenizer.json``: the same 151329 text ids and 14 specials as the tiktoken
    file, read with its own pre-tokenizer, and the prompt prefix that its post-processor adds."""

    model_file = "tokenizer.json"

    def __init__(self, data: bytes, source: str, config: Optional[Mapping[str, object]] = None,
                 overrides: Optional[Mapping[str, int]] = None):
        cfg = dict(config or {})
        self._release_keys = {k: cfg[k] for k in ("eos_token", "pad_token", "tokenizer_class") if k in cfg}
        spec = parse_json(data, source, "the release's tokenizer.json")
        if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
            raise TokenizerError(f"{source}: a tokenizer.json is a JSON object with a \"model\"; this is not one "
                                 f"(re-download the release's tokenizer.json)")
        try:
            rust = RustTokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # the Rust side raises a bare Exception with a serde message
            raise TokenizerError(f"{source}: the tokenizers library cannot read it ({str(e).splitlines()[0]}); "
                                 f"re-download the release's tokenizer.json") from None
        self._data = data
        self._rust = rust
        self._grown = False  # tokens added from tokenizer_config.json: save() then writes the grown file
        specials = {t.content: i for i, t in rust.get_added_tokens_decoder().items() if t.special}
        specials.update(self._config_specials(cfg, rust, source))
        for name, idx in (overrides or {}).items():
            if name in specials and specials[name] != idx:
                raise TokenizerError(f"{source}: {name!r} has id {specials[name]} in tokenizer.json but {idx} in "
                                     f"{CONFIG_NAME} / added_tokens.json; the two files come from different "
                                     f"releases (re-download them together)")
        missing = [s for s in ("<|endoftext|>", "[gMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                               "<|assistant|>", "<|observation|>") if s not in specials]
        if missing:
            raise TokenizerError(f"{source}: no special tokens {missing}, so it is not a GLM-4 tokenizer.json "
                                 f"(glm reads the tokenizer.json of glm-4-9b-chat-hf and GLM-4-0414)")
        # Added tokens are matched in the text unless told otherwise; encode() keeps them text.
        rust.encode_special_tokens = True
        self._prefix, self._suffix = _post_processor_wrap(rust)
        eos = ["<|endoftext|>", "<|user|>", "<|observation|>"]
        named = cfg.get("eos_token")
        if isinstance(named, str) and named in specials and named not in eos:
            eos.append(named)
        pad = cfg.get("pad_token")
        roles = {"pad": pad if isinstance(pad, str) and pad in specials else "<|endoftext|>", "bos": None,
                 "eos": tuple(eos), "sop": "<sop>", "eop": "<eop>", "cls": None}
        kind = spec["model"].get("type")
        self.model_type = {"BPE": "bpe", "Unigram": "unigram"}.get(kind) if isinstance(kind, str) else None
        self.byte_fallback = "ByteLevel" in json.dumps(spec.get("decoder")) or None
        n_text = rust.get_vocab_size(with_added_tokens=False)
        Tokenizer.__init__(self, specials, n_text, source, roles)

    def _config_specials(self, cfg: dict, rust: RustTokenizer, source: str) -> dict[str, int]:
        """tokenizer_config.json ``added_tokens_decoder``: entries tokenizer.json lacks are added, at the id
        the config gives (transformers does the same on load); an entry at another id is an error."""
        table: dict[str, int] = {}
        dec = cfg.get("added_tokens_decoder")
        if not isinstance(dec, dict):
            return table
        for key, tok in sorted(dec.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdecimal() else -1):
            if not (isinstance(tok, dict) and isinstance(tok.get("content"), str) and str(key).isdecimal()):
                raise TokenizerError(f"{CONFIG_NAME}: added_tokens_decoder entry {key!r} is {tok!r}; each entry is "
                                     f"\"<id>\": {{\"content\": \"<token>\", ...}} (re-download the release's file)")
            content, idx = tok["content"], int(key)
            have = rust.token_to_id(content)
            if have is None:
                size = rust.get_vocab_size(with_added_tokens=True)
                if idx != size:
                    raise TokenizerError(f"{source}: {CONFIG_NAME} puts {content!r} at id {idx}, but tokenizer.json "
                                         f"has no such token and its next free id is {size}; re-download the two "
                                         f"files together")
                rust.add_special_tokens([AddedToken(content, special=bool(tok.get("special", True)), normalized=False,
                                                    lstrip=bool(tok.get("lstrip")), rstrip=bool(tok.get("rstrip")),
                                                    single_word=bool(tok.get("single_word")))])
                have = idx
                self._grown = True
            if have != idx:
                raise TokenizerError(f"{source}: {content!r} has id {have} in tokenizer.json but {idx} in "
                                     f"{CONFIG_NAME}'s added_tokens_decoder; re-download the two files together")
            if tok.get("special", True):
                table[content] = idx
        return table

    def _config_extra(self) -> dict:
        # the release's keys that chose roles here, so a saved folder loads with the same ones
        return dict(self._release_keys)

    def _model_bytes(self) -> bytes:
        # The file as read; where tokenizer_config.json added tokens, the Rust tokenizer's serialisation,
        # so those tokens travel with it.
        return self._rust.to_str(pretty=True).encode() if self._grown else self._data

    def build_inputs(self, ids: Sequence[int]) -> list[int]:
        # What the file's post-processor adds: "[gMASK] <sop>" for glm-4-9b-chat-hf, nothing for a
        # GLM-4-0414 file converted without one.
        return [*self._prefix, *ids, *self._suffix]


def _post_processor_wrap(rust: RustTokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer's post-processor puts before and after one sequence, read by encoding a
    probe text with and without special tokens (any processor kind: template, BERT, RoBERTa, none)."""
    # encode_special_tokens does not change the post-processor; the probe holds no special strings.
    enc = rust.encode("a", add_special_tokens=True)
    body = [i for i, s in enumerate(enc.sequence_ids) if s is not None]
    if not body:
        return [], []
    return list(enc.ids[:body[0]]), list(enc.ids[body[-1] + 1:])


__all__ = ["RustBacked", "TokenizerJSONTokenizer", "is_tokenizer_json", "parse_json"]
