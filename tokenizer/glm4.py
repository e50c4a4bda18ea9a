"""GLM-4 (glm-4-9b, -chat, and the HF-native Glm/Glm4 releases): byte-level BPE in tiktoken's rank-file
format, run through the optional dependency ``tiktoken`` (GLM_SPEC §5.5). Also a small byte-level BPE
trainer that writes such a rank file, for toy pretraining."""
from __future__ import annotations

import base64
import binascii
from collections import Counter
from typing import Any, Iterable, Mapping, Optional, Sequence

from glm.errors import CorpusTooSmall

from .base import Tokenizer, TokenizerError, check_text
from .tools import glm4_tool_prompt

# The cl100k-style pre-tokenisation regex of the release.
PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
GLM4_SPECIALS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                 "<|begin_of_video|>", "<|end_of_video|>")


def optional_import(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError:
        raise TokenizerError(f"the GLM-4 tokenizer needs the optional package {name!r}: pip install tiktoken "
                             f"(it brings 'regex' too)") from None


def is_rank_file(head: bytes) -> bool:
    """A tiktoken rank file starts with a text line ``<base64> <rank>``; a SentencePiece model is binary."""
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    parts = line.split(b" ")
    return (len(parts) == 2 and parts[1].isdigit() and len(parts[0]) > 0
            and all(c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=" for c in parts[0]))


def parse_ranks(data: bytes, source: str) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            tok, rank = line.split()
            token, value = base64.b64decode(tok, validate=True), int(rank)
        except (ValueError, binascii.Error):
            raise TokenizerError(f"{source}:{lineno}: expected '<base64 token> <rank>', got {line[:60]!r}; the file "
                                 f"is not a GLM-4 tokenizer.model (re-download it)") from None
        if token in ranks:
            raise TokenizerError(f"{source}:{lineno}: token {token!r} already has rank {ranks[token]}; a token appears "
                                 f"once in a rank file (re-download it)")
        ranks[token] = value
    if not ranks:
        raise TokenizerError(f"{source}: empty rank file; re-download the GLM-4 tokenizer.model")
    values = sorted(ranks.values())
    if values != list(range(len(values))):
        raise TokenizerError(f"{source}: ranks are not 0..{len(values) - 1} without gaps or repeats; the file is "
                             f"damaged (re-download it)")
    # tiktoken's byte-pair merge ends on single bytes wherever no merge applies and looks each one up,
    # panicking on a byte without a rank; every byte needs one so that any text encodes.
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        shown = ", ".join(f"0x{b:02x}" for b in missing[:8]) + (", ..." if len(missing) > 8 else "")
        raise TokenizerError(f"{source}: the rank file has no token for {len(missing)} of the 256 single bytes "
                             f"({shown}); a byte-level BPE rank file needs all of them (re-download the GLM-4 "
                             f"tokenizer.model)")
    return ranks


def format_ranks(ranks: Mapping[bytes, int]) -> bytes:
    return b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))


class GLM4Tokenizer(Tokenizer):
    family = "glm4"
    model_file = "tokenizer.model"
    roles_in_chat = frozenset({"system", "user", "assistant", "observation"})
    tool_format = "glm4"
    model_type = "bpe"
    byte_fallback = True  # byte-level: every text is its UTF-8 bytes

    def __init__(self, data: bytes, source: str, overrides: Optional[Mapping[str, int]] = None):
        tiktoken = optional_import("tiktoken")
        ranks = parse_ranks(data, source)
        n = len(ranks)
        self._data = data
        # Specials stay out of tiktoken: encode() must treat "<|user|>" in text as text, and decode
        # handles them by id (base class).
        self.enc = tiktoken.Encoding(name=f"glm4:{source}", pat_str=PAT_STR, mergeable_ranks=ranks,
                                     special_tokens={})
        specials = {name: n + i for i, name in enumerate(GLM4_SPECIALS)}
        roles = {"pad": "<|endoftext|>", "bos": None, "eos": ("<|endoftext|>", "<|user|>", "<|observation|>"),
                 "sop": "<sop>", "eop": "<eop>", "cls": None}
        super().__init__(specials, n, source, roles, overrides)

    def _model_bytes(self) -> bytes:
        return self._data

    def encode(self, text: str) -> list[int]:
        # tiktoken would silently encode a lone surrogate as U+FFFD
        return self.enc.encode_ordinary(check_text(text))

    def _decode_text(self, ids: list[int]) -> str:
        # Like the release, bytes that do not form UTF-8 (a cut-off multi-byte character) become U+FFFD.
        return self.enc.decode_bytes(ids).decode("utf-8", errors="replace")

    def build_inputs(self, ids: Sequence[int]) -> list[int]:
        # the HF fast tokenizer's post-processor "[gMASK]:0 <sop>:0 $A:0"
        return [self.special_tokens["[gMASK]"], self.special_tokens["<sop>"], *ids]

    def _chat(self, messages: list[dict]) -> list[int]:
        # glm-4-9b-chat template: [gMASK]<sop>, then per message its tools block (a message with "tools":
        # <|system|> + the tool prompt) and <|role|>{metadata}\n{content}, then the generation prompt
        # <|assistant|> with no newline. The template is rendered to text and tokenized with the specials
        # split out; every piece of text here runs from one special token to the next, so each is one
        # encode() call.
        ids = [self.special_tokens["[gMASK]"], self.special_tokens["<sop>"]]
        for i, m in enumerate(messages):
            if "tools" in m:
                try:
                    prompt = glm4_tool_prompt(m["tools"])
                except TokenizerError as e:
                    raise TokenizerError(f"chat_ids: message {i}'s {e}") from None
                ids.append(self.special_tokens["<|system|>"])
                ids += self.encode(prompt)
            if not m["content"]:
                # The release writes a message only `{% if item['content'] %}` (its apply_chat_template:
                # `if item["content"]:`), so an empty message adds nothing, role token and metadata included.
                continue
            ids.append(self.special_tokens[f"<|{m['role']}|>"])
            ids += self.encode(f"{m.get('metadata', '')}\n{m['content']}")
        ids.append(self.special_tokens["<|assistant|>"])
        return ids


def train_ranks(texts: Iterable[str], n_ranks: int) -> dict[bytes, int]:
    """Byte-level BPE on the release's pre-tokenisation: the 256 bytes (rank = byte value), then the most
    frequent adjacent pair merged, repeatedly, until ``n_ranks`` tokens exist. Pair counts are updated
    only for the words a merge touches; meant for toy corpora (a few MB)."""
    regex = optional_import("regex")
    if n_ranks < 256:
        raise TokenizerError(f"a GLM-4 rank file needs at least the 256 single bytes; asked for {n_ranks} ranks")
    pat = regex.compile(PAT_STR)
    counts: Counter = Counter()
    for text in texts:
        counts.update(pat.findall(text))
    words = [[bytes([b]) for b in w.encode("utf-8")] for w in counts]
    freq = list(counts.values())
    pairs: Counter = Counter()
    where: dict[tuple[bytes, bytes], set[int]] = {}
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pairs[pair] += freq[i]
            where.setdefault(pair, set()).add(i)
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < n_ranks:
        if not pairs:
            raise CorpusTooSmall(len(ranks), n_ranks)
        # most frequent; ties go to the lexicographically largest pair so training is deterministic
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merged = best[0] + best[1]
        ranks.setdefault(merged, len(ranks))
        for i in where.pop(best):
            w = words[i]
            for pair in zip(w, w[1:]):
                pairs[pair] -= freq[i]
                if pairs[pair] <= 0:
                    del pairs[pair]
            words[i] = w = _merge(w, best, merged)
            for pair in zip(w, w[1:]):
                pairs[pair] += freq[i]
                where.setdefault(pair, set()).add(i)
    return ranks


def _merge(word: list[bytes], pair: tuple[bytes, bytes], merged: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out
