"""``load(path)``: find the tokenizer file in a checkpoint folder and decide which family it is.

Signals, strongest first: an explicit ``family=``; the ``glm_tokenizer_family`` key our save() writes;
the file's format (a tiktoken rank file is GLM-4; a SentencePiece model holding a ``[gMASK]`` piece is
ChatGLM-6B's ice_text layout); the release's file name and ``tokenizer_class``/``auto_map`` names; for a
plain SentencePiece ``tokenizer.model`` (ChatGLM2 and ChatGLM3 ship the same one), whether the folder
configures ChatGLM3's role tokens.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from .base import CONFIG_NAME, FAMILY_KEY, Tokenizer, TokenizerError, canonical_family
from .glm4 import GLM4Tokenizer, is_rank_file
from .sentencepiece_families import (CHATGLM3_ROLES, ChatGLM2Tokenizer, ChatGLM3Tokenizer, ChatGLM6BTokenizer,
                                     GLMTokenizer, load_sentencepiece)

# Files looked for in a folder, in this order.
MODEL_FILES = ("ice_text.model", "cog-pretrain.model", "tokenizer.model")
CLASSES = {"glm": GLMTokenizer, "chatglm": ChatGLM6BTokenizer, "chatglm2": ChatGLM2Tokenizer,
           "chatglm3": ChatGLM3Tokenizer, "glm4": GLM4Tokenizer}


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e}); fix or delete it") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object; fix or delete it")
    return data


def _class_names(cfg: dict) -> str:
    """The release's tokenizer class names (tokenizer_class and auto_map entries), as one string to search."""
    names = [str(cfg.get("tokenizer_class", ""))]
    auto = cfg.get("auto_map", {})
    if isinstance(auto, dict):
        names += [str(v) for v in auto.values()]
    return " ".join(names)


def _added_tokens(folder: str, cfg: dict) -> dict[str, int]:
    """A release's own special-token ids: tokenizer_config.json ``added_tokens_decoder`` or added_tokens.json,
    or the table our save() writes."""
    table: dict[str, int] = {}
    dec = cfg.get("added_tokens_decoder")
    if isinstance(dec, dict):
        for idx, tok in dec.items():
            if isinstance(tok, dict) and "content" in tok and str(idx).isdigit():
                table[tok["content"]] = int(idx)
    extra = _read_json(os.path.join(folder, "added_tokens.json"))
    table.update({k: v for k, v in extra.items() if isinstance(v, int)})
    if cfg.get(FAMILY_KEY) and isinstance(cfg.get("special_tokens"), dict):
        table.update({k: v for k, v in cfg["special_tokens"].items() if isinstance(v, int)})
    return table


def _configures_chatglm3(folder: str, cfg: dict) -> bool:
    text = json.dumps(cfg, ensure_ascii=False)
    if any(r in text for r in CHATGLM3_ROLES) or "chatglm3" in text.lower():
        return True
    if "chatglm3" in json.dumps(_read_json(os.path.join(folder, "config.json"))).lower():
        return True
    if "chatglm3" in os.path.basename(os.path.normpath(folder)).lower():  # e.g. a folder named chatglm3-6b
        return True
    code = os.path.join(folder, "tokenization_chatglm.py")
    if os.path.exists(code):
        with open(code, encoding="utf-8", errors="replace") as f:
            return "<|observation|>" in f.read()
    return False


def detect_family(file: str, data: bytes, cfg: dict) -> str:
    folder = os.path.dirname(os.path.abspath(file))
    if is_rank_file(data[:4096]):
        return "glm4"
    classes = _class_names(cfg)
    if "GLMChineseTokenizer" in classes or "ChineseSPTokenizer" in classes or os.path.basename(file) == "cog-pretrain.model":
        return "glm"
    sp = load_sentencepiece(data, file)
    if os.path.basename(file) == "ice_text.model" or sp.piece_to_id("[gMASK]") != sp.unk_id():
        return "chatglm"
    return "chatglm3" if _configures_chatglm3(folder, cfg) else "chatglm2"


# ChatGLM-6B's SPTokenizer default: the first release numbered its text ids after 20000 image tokens.
CHATGLM_IMAGE_TOKENS = 20000


def chatglm_num_image_tokens(folder: str, cfg: dict, pieces: int) -> int:
    """ChatGLM-6B's id offset: ``num_image_tokens`` from tokenizer_config.json; where the key is absent,
    20000 (the reference code's default) when the folder's config.json ``vocab_size`` has room for the
    ``pieces`` of ice_text.model after 20000 image ids, else 0.

    The config's vocab_size counts embedding rows, which the releases pad past the last id (130344
    pieces: 150528 rows in the first release, offset 20000; 130528 rows in the current one, offset 0),
    so the offset is the one the row count allows, never the row count minus the pieces itself."""
    if "num_image_tokens" in cfg:
        value = cfg["num_image_tokens"]
        if isinstance(value, bool) or not isinstance(value, int):
            raise TokenizerError(f"{os.path.join(folder, CONFIG_NAME)}: num_image_tokens is {value!r}; set it to "
                                 f"an integer (20000 for the first ChatGLM-6B release, 0 for the current one)")
        return value
    model_cfg = _read_json(os.path.join(folder, "config.json"))
    # A release config.json has vocab_size at the top; glm's own format nests its fields in "config".
    nested = model_cfg.get("config")
    rows = model_cfg.get("vocab_size", nested.get("vocab_size") if isinstance(nested, dict) else None)
    if isinstance(rows, int) and not isinstance(rows, bool) and rows - pieces >= CHATGLM_IMAGE_TOKENS:
        return CHATGLM_IMAGE_TOKENS
    return 0


def load(path: str, family: Optional[str] = None) -> Tokenizer:
    """Load the tokenizer of a checkpoint folder or of one tokenizer file, picking its family (or use
    ``family=`` one of glm, chatglm, chatglm2, chatglm3, glm4, or a model family name: glm4-chatglm,
    glm-hf and glm4-hf mean glm4)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise TokenizerError(f"{path} does not exist; pass a checkpoint folder or a tokenizer file "
                             f"({', '.join(MODEL_FILES)})")
    folder = os.path.dirname(os.path.abspath(path)) if os.path.isfile(path) else path
    cfg = _read_json(os.path.join(folder, CONFIG_NAME))
    origin = "family=" if family is not None else os.path.join(folder, CONFIG_NAME)
    family = family if family is not None else cfg.get(FAMILY_KEY)
    if family is not None:
        family = canonical_family(family, origin)
    if os.path.isfile(path):
        file = path
    else:
        # a known family looks only for its own file, so family="chatglm2" never picks up an ice_text.model
        names = [CLASSES[family].model_file] if family is not None else list(MODEL_FILES)
        if isinstance(cfg.get("model_file"), str):
            names.insert(0, cfg["model_file"])
        file = next((os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))), "")
        if not file:
            extra = ""
            if os.path.exists(os.path.join(folder, "merges.txt")):
                extra = " (GLM-10B's GPT-2 vocab.json/merges.txt is not supported)"
            elif os.path.exists(os.path.join(folder, "tokenizer.json")):
                extra = (" (a tokenizer.json alone, as in glm-4-9b-chat-hf / GLM-4-0414, is not read: use the "
                         "tiktoken tokenizer.model of THUDM/glm-4-9b-chat, the same vocabulary per GLM_SPEC §5.5)")
            raise TokenizerError(f"{folder}: no tokenizer file; looked for {', '.join(dict.fromkeys(names))}{extra}. "
                                 f"Copy the release's tokenizer file into the folder or pass its path")
    with open(file, "rb") as f:
        data = f.read()
    family = family or detect_family(file, data, cfg)
    if family == "chatglm":
        sp = load_sentencepiece(data, file)
        offset = chatglm_num_image_tokens(folder, cfg, sp.get_piece_size())
        return ChatGLM6BTokenizer(data, file, num_image_tokens=offset,
                                  remove_space=bool(cfg.get("remove_space", False)),
                                  do_lower_case=bool(cfg.get("do_lower_case", False)), sp=sp)
    return CLASSES[family](data, file, overrides=_added_tokens(folder, cfg))
