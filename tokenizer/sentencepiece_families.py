"""The SentencePiece-based families: GLM (original, ``cog-pretrain.model``), ChatGLM-6B (``ice_text.model``),
ChatGLM2-6B and ChatGLM3-6B (``tokenizer.model``). Layouts and chat formats: GLM_SPEC §5.1-5.4."""
from __future__ import annotations

import json
from typing import Mapping, Optional, Sequence

import sentencepiece as spm

from .base import Tokenizer, TokenizerError, check_text, rounds


def load_sentencepiece(data: bytes, source: str) -> spm.SentencePieceProcessor:
    try:
        return spm.SentencePieceProcessor(model_proto=data)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError with a C++ message
        raise TokenizerError(f"{source}: not a readable SentencePiece model ({e}); re-download it, or re-train "
                             f"it with glm.tokenizer.train") from None


class _SentencePieceTokenizer(Tokenizer):
    def __init__(self, data: bytes, source: str, special_tokens: Mapping[str, int], n_text: int,
                 roles: Mapping[str, object], overrides: Optional[Mapping[str, int]] = None,
                 sp: Optional[spm.SentencePieceProcessor] = None):
        self._data = data
        self.sp = sp if sp is not None else load_sentencepiece(data, source)
        self.byte_fallback = self.sp.is_byte(self.sp.piece_to_id("<0x00>"))
        super().__init__(special_tokens, n_text, source, roles, overrides)

    def _model_bytes(self) -> bytes:
        return self._data

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(check_text(text))

    def encode_continuation(self, text: str) -> list[int]:
        # SentencePiece always adds its dummy-prefix "▁": drop a lone "▁" piece, or swap a "▁xyz" first
        # piece for "xyz" when that is a piece of its own, which is how the text tokenises mid-word.
        ids = self.sp.encode(check_text(text))
        if not ids or text[:1].isspace():
            return ids
        first = self.sp.id_to_piece(ids[0])
        if first == "▁":
            return ids[1:]
        if first.startswith("▁") and self.sp.piece_to_id(first[1:]) != self.sp.unk_id():
            return [self.sp.piece_to_id(first[1:]), *ids[1:]]
        return ids

    def _decode_text(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


# ---------------------------------------------------------------------------------------------
# GLM (original): command tokens appended after the text pieces (THUDM/GLM ChineseSPTokenizer with
# fix_command_token; the two unused slots are where that code skips ids).

GLM_COMMAND_TOKENS = ("<|endoftext|>", "[SEP]", "[CLS]", "[MASK]", "[UNUSED1]", "[UNUSED2]",
                      "<|startofpiece|>", "<|endofpiece|>", "[sMASK]", "[gMASK]")


class GLMTokenizer(_SentencePieceTokenizer):
    family = "glm"
    model_file = "cog-pretrain.model"

    def __init__(self, data: bytes, source: str, overrides: Optional[Mapping[str, int]] = None):
        sp = load_sentencepiece(data, source)
        n = sp.get_piece_size()
        specials = {name: n + i for i, name in enumerate(GLM_COMMAND_TOKENS)}
        roles = {"pad": "<|endoftext|>", "bos": None, "eos": ("<|endoftext|>",), "sop": "<|startofpiece|>",
                 "eop": "<|endofpiece|>", "cls": "[CLS]"}
        super().__init__(data, source, specials, n, roles, overrides, sp)

    def build_inputs(self, ids: Sequence[int]) -> list[int]:
        # HF GLMChineseTokenizer.build_inputs_with_special_tokens: [CLS] text <|endoftext|>; generation
        # then appends <|startofpiece|> (build_inputs_for_generation).
        return [self.special_tokens["[CLS]"], *ids, self.special_tokens["<|endoftext|>"]]

    def infill_prompt(self, ids: Sequence[int]) -> list[int]:
        # Original GLM's Part A is [CLS] text <|endoftext|>, as its tokenizer builds generation inputs and
        # as glm.data lays out training samples; THUDM's generate_samples.py leaves the eos off a text that
        # ends in a mask (the blank runs to the end of the document).
        ends_in_mask = bool(ids) and ids[-1] in self.mask_ids.values()
        wrapped = self.build_inputs(ids)
        return wrapped[:-1] if ends_in_mask else wrapped


# ---------------------------------------------------------------------------------------------
# ChatGLM-6B: whitespace is rewritten into dedicated pieces before SentencePiece, and the specials
# are pieces of ice_text.model itself (looked up by piece, shifted by num_image_tokens).

CHATGLM_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
MAX_BLANK = 80
NEWLINE, TAB = "<n>", "<|tab|>"


def blank(k: int) -> str:
    return f"<|blank_{k}|>"


def chatglm_whitespace_pieces() -> list[str]:
    return [NEWLINE, TAB] + [blank(k) for k in range(2, MAX_BLANK + 1)]


def chatglm_preprocess(text: str) -> str:
    """``\\n`` -> ``<n>``, ``\\t`` -> ``<|tab|>``, runs of 2..80 spaces -> ``<|blank_k|>`` (longest first,
    so 85 spaces are ``<|blank_80|>`` + ``<|blank_5|>``)."""
    text = text.replace("\n", NEWLINE).replace("\t", TAB)
    for k in range(MAX_BLANK, 1, -1):
        text = text.replace(" " * k, blank(k))
    return text


def chatglm_postprocess(text: str) -> str:
    text = text.replace(NEWLINE, "\n").replace(TAB, "\t")
    for k in range(2, MAX_BLANK + 1):
        text = text.replace(blank(k), " " * k)
    return text


class ChatGLM6BTokenizer(_SentencePieceTokenizer):
    family = "chatglm"
    model_file = "ice_text.model"
    roles_in_chat = frozenset({"user", "assistant"})

    def __init__(self, data: bytes, source: str, num_image_tokens: int = 0, remove_space: bool = False,
                 do_lower_case: bool = False, sp: Optional[spm.SentencePieceProcessor] = None):
        sp = sp if sp is not None else load_sentencepiece(data, source)
        missing = [p for p in (*CHATGLM_SPECIALS, "<pad>", NEWLINE) if sp.piece_to_id(p) == sp.unk_id()]
        if missing:
            raise TokenizerError(f"{source} has no pieces {missing}, so it is not a ChatGLM-6B ice_text.model; "
                                 f"load it with family=... of its own release, or train a toy one with "
                                 f"glm.tokenizer.train(..., family='chatglm')")
        if num_image_tokens < 0:
            raise TokenizerError(f"{source}: num_image_tokens is {num_image_tokens}; it must be >= 0")
        # Ids below the offset were image tokens in the first release (code default 20000); the current
        # release's tokenizer_config.json sets 0, so ids are piece ids. load() reads it from the folder.
        self.num_image_tokens = num_image_tokens
        self.remove_space = remove_space
        self.do_lower_case = do_lower_case
        specials = {p: sp.piece_to_id(p) + num_image_tokens for p in (*CHATGLM_SPECIALS, "<pad>")}
        roles = {"pad": "<pad>", "bos": "<sop>", "eos": ("<eop>",), "sop": "<sop>", "eop": "<eop>", "cls": None}
        super().__init__(data, source, specials, num_image_tokens + sp.get_piece_size(), roles, None, sp)
        # "Without dummy prefix" is encoded as "<n>" + text with the ids of "<n>" (and the dummy-prefix
        # piece before it) dropped; the release drops exactly two, which is this prefix in its model.
        self._no_prefix = self.sp.encode(NEWLINE)

    def encode(self, text: str, add_dummy_prefix: bool = True) -> list[int]:
        """The release's HF ``tokenize``: optional space collapsing / lower-casing, whitespace pieces, then
        SentencePiece with its dummy prefix (``"你好"`` -> ``[5, 74874]`` in the release)."""
        check_text(text)
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        text = chatglm_preprocess(text)
        if add_dummy_prefix:
            ids = self.sp.encode(text)
        else:
            ids = self.sp.encode(NEWLINE + text)
            k = len(self._no_prefix)
            if ids[:k] != self._no_prefix:  # cannot happen while <n> is a user-defined piece
                raise TokenizerError(f"{self.source}: '<n>' did not encode as its own piece; the model is not "
                                     f"ChatGLM-6B's layout")
            ids = ids[k:]
        return [i + self.num_image_tokens for i in ids]

    def encode_continuation(self, text: str) -> list[int]:
        return self.encode(text, add_dummy_prefix=text[:1].isspace())

    def _decode_text(self, ids: list[int]) -> str:
        # The release silently drops image-token ids (below the offset) when decoding text.
        ids = [i - self.num_image_tokens for i in ids if i >= self.num_image_tokens]
        return chatglm_postprocess(self.sp.decode(ids))

    def build_inputs(self, ids: Sequence[int]) -> list[int]:
        return [*ids, self.special_tokens["[gMASK]"], self.special_tokens["<sop>"]]

    def _chat(self, messages: list[dict]) -> list[int]:
        history, query = rounds(messages, self.family)
        if not history:
            prompt = query
        else:  # 0-based rounds, single newlines (ChatGLM-6B chat/stream_chat)
            prompt = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
            prompt += f"[Round {len(history)}]\n问：{query}\n答："
        return self.build_inputs(self.encode(prompt))

    def _config_extra(self) -> dict:
        return {"num_image_tokens": self.num_image_tokens, "remove_space": self.remove_space,
                "do_lower_case": self.do_lower_case}


# ---------------------------------------------------------------------------------------------
# ChatGLM2/3: five specials appended after the SentencePiece pieces; ChatGLM3 adds four role tokens.

CHATGLM2_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
CHATGLM3_ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


class ChatGLM2Tokenizer(_SentencePieceTokenizer):
    family = "chatglm2"
    model_file = "tokenizer.model"
    unsplittable = frozenset({"sop", "eop"})
    roles_in_chat = frozenset({"user", "assistant"})
    appended: tuple[str, ...] = CHATGLM2_SPECIALS

    def __init__(self, data: bytes, source: str, overrides: Optional[Mapping[str, int]] = None):
        sp = load_sentencepiece(data, source)
        if min(sp.unk_id(), sp.bos_id(), sp.eos_id()) < 0:
            raise TokenizerError(f"{source}: the SentencePiece model lacks <unk>/<s>/</s> (ids {sp.unk_id()}, "
                                 f"{sp.bos_id()}, {sp.eos_id()}); {self.family} needs pad=unk, bos and eos pieces")
        n = sp.get_piece_size()
        meta = {sp.id_to_piece(i): i for i in (sp.unk_id(), sp.bos_id(), sp.eos_id())}
        specials = {**meta, **{name: n + i for i, name in enumerate(self.appended)}}
        roles = {"pad": sp.id_to_piece(sp.unk_id()), "bos": sp.id_to_piece(sp.bos_id()),
                 "eos": self._eos_names(sp.id_to_piece(sp.eos_id())), "sop": "sop", "eop": "eop", "cls": None}
        super().__init__(data, source, specials, n, roles, overrides, sp)

    def _eos_names(self, eos: str) -> tuple[str, ...]:
        return (eos,)

    def build_inputs(self, ids: Sequence[int]) -> list[int]:
        return [self.special_tokens["[gMASK]"], self.special_tokens["sop"], *ids]

    def _chat(self, messages: list[dict]) -> list[int]:
        history, query = rounds(messages, self.family)
        # 1-based rounds, blank lines between the parts (ChatGLM2 build_prompt)
        prompt = "".join(f"[Round {i}]\n\n问：{q}\n\n答：{r}\n\n" for i, (q, r) in enumerate(history, 1))
        prompt += f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："
        return self.build_inputs(self.encode(prompt))


class ChatGLM3Tokenizer(ChatGLM2Tokenizer):
    family = "chatglm3"
    roles_in_chat = frozenset({"system", "user", "assistant", "observation"})
    tool_format = "chatglm3"
    appended = CHATGLM2_SPECIALS + CHATGLM3_ROLES

    def _eos_names(self, eos: str) -> tuple[str, ...]:
        # generation stops at </s>, <|user|> or <|observation|> (the release's generation config)
        return (eos, "<|user|>", "<|observation|>")

    def _chat(self, messages: list[dict]) -> list[int]:
        # build_chat_input: per message [<|role|>] + encode(metadata + "\n") + encode(content), the two
        # encodes separate (each gets its own dummy prefix); then <|assistant|>; wrapped by build_inputs.
        ids: list[int] = []
        for m in messages:
            content = m["content"]
            if m["role"] == "system" and "tools" in m:
                try:
                    tools = json.dumps(m["tools"], indent=4, ensure_ascii=False)
                except (TypeError, ValueError) as e:
                    raise TokenizerError(f"chat_ids: the system message's tools must be JSON data (lists, dicts, "
                                         f"strings, numbers): {e}") from None
                content = content + "\n" + tools
            ids.append(self.special_tokens[f"<|{m['role']}|>"])
            ids += self.encode(f"{m.get('metadata', '')}\n")
            ids += self.encode(content)
        ids.append(self.special_tokens["<|assistant|>"])
        return self.build_inputs(ids)
