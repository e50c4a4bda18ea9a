"""``load(path)``: find the tokenizer file in a checkpoint folder and decide which family it is.

Signals, strongest first: an explicit ``family=``; the ``glm_tokenizer_family`` key our save() writes;
the file's format (a tiktoken rank file is GLM-4; a SentencePiece model holding a ``[gMASK]`` piece is
ChatGLM-6B's ice_text layout); the release's file name and ``tokenizer_class``/``auto_map`` names; for a
plain SentencePiece ``tokenizer.model`` (ChatGLM2 and ChatGLM3 ship the same one), whether the folder
configures ChatGLM3's role tokens. Files the ``tokenizers`` library reads (tokenizer.json, vocab.json +
merges.txt, vocab.txt) are told apart by name, then by content, and by ``tokenizer_class`` between
GPT-2 and RoBERTa vocabularies.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from glm.files import JSON_LIMIT, FileKindError, read_bounded

from .base import CONFIG_NAME, FAMILY_KEY, MODEL_TYPES, ModelType, Tokenizer, TokenizerError, canonical_family
from .glm4 import GLM4Tokenizer, is_rank_file
from .glm_english import EnglishKind, bpe_vocab_kind, class_kind, read_english
from .hf_json import TokenizerJSONTokenizer, is_tokenizer_json
from .sentencepiece_families import (
    CHATGLM3_ROLES,
    ChatGLM2Tokenizer,
    ChatGLM3Tokenizer,
    ChatGLM6BTokenizer,
    GLMTokenizer,
    load_sentencepiece,
)

# Files looked for in a folder, in this order: a tokenizer.json is read only where no tokenizer.model is
# beside it (glm-4-9b-chat-hf, GLM-4-0414), vocab.json is GLM-10B's GPT-2 BPE (with merges.txt) or
# glm-roberta-large's, vocab.txt the WordPiece vocabulary of glm-large / glm-515m.
MODEL_FILES = ("ice_text.model", "cog-pretrain.model", "tokenizer.model", "tokenizer.json", "vocab.json", "vocab.txt")
# The files of each family, for load(family=...): original GLM's English releases are the glm family
# with another vocabulary, GLM-4's transformers releases the glm4 family with another file.
FAMILY_FILES = {"glm": ("cog-pretrain.model", "vocab.json", "vocab.txt"), "glm4": ("tokenizer.model", "tokenizer.json")}
ENGLISH_FILES: dict[EnglishKind, str] = {"gpt2": "vocab.json", "roberta": "vocab.json", "bert": "vocab.txt"}
CLASSES = {"glm": GLMTokenizer, "chatglm": ChatGLM6BTokenizer, "chatglm2": ChatGLM2Tokenizer,
           "chatglm3": ChatGLM3Tokenizer, "glm4": GLM4Tokenizer}
# The releases' model files are 1-3 MB; past this a file is not a tokenizer model.
MODEL_FILE_LIMIT = 256 * 1024 * 1024


def read_file(path: str, limit: int = JSON_LIMIT) -> bytes:
    """The bytes of a tokenizer folder's file: a regular file only (a FIFO would block open() forever),
    of bounded size."""
    try:
        return read_bounded(path, limit, what=os.path.basename(path))
    except FileKindError as e:
        raise TokenizerError(str(e)) from None
    except OSError as e:
        raise TokenizerError(f"{path}: cannot be read ({e.strerror})") from None


def _read_json(path: str) -> dict:
    if not os.path.lexists(path):
        return {}
    raw = read_file(path)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e}); fix or delete it") from None
    except (RecursionError, ValueError) as e:
        # json raises a plain ValueError for an integer of more than 4300 digits.
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0]
        raise TokenizerError(f"{path}: not usable JSON ({why}); fix or delete it") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object; fix or delete it")
    return data


def _flag(cfg: dict, key: str, where: str) -> bool:
    # Python reads the string "false" as true; tokenizer_config.json writes JSON true/false.
    value = cfg.get(key)
    if value is None:  # absent or null: the release's default
        return False
    if not isinstance(value, bool):
        raise TokenizerError(f"{where}: {key} is {value!r}; set it to true or false")
    return value


def _token_ids(table: object) -> dict[str, int]:
    """The entries of an added-token table that are token ids (non-negative integers, not true/false)."""
    if not isinstance(table, dict):
        return {}
    return {k: v for k, v in table.items() if isinstance(v, int) and not isinstance(v, bool) and v >= 0}


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
            if isinstance(tok, dict) and isinstance(tok.get("content"), str) and idx.isdecimal():
                table[tok["content"]] = int(idx)
    table.update(_token_ids(_read_json(os.path.join(folder, "added_tokens.json"))))
    if cfg.get(FAMILY_KEY):
        table.update(_token_ids(cfg.get("special_tokens")))
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
    if os.path.lexists(code):
        return b"<|observation|>" in read_file(code)
    return False


def detect_family(file: str, data: bytes, cfg: dict) -> str:
    folder = os.path.dirname(os.path.abspath(file))
    if is_rank_file(data[:4096]):
        return "glm4"
    classes = _class_names(cfg)
    if ("GLMChineseTokenizer" in classes or "ChineseSPTokenizer" in classes
            or os.path.basename(file) == "cog-pretrain.model"):
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
    glm-hf and glm4-hf mean glm4). A GLM-4 tokenizer.json is the glm4 family, original GLM's English
    vocab.json + merges.txt / vocab.txt the glm family."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise TokenizerError(f"{path} does not exist; pass a checkpoint folder or a tokenizer file "
                             f"({', '.join(MODEL_FILES)})")
    # Anything but a folder is taken as the tokenizer file itself, so a FIFO or device passed here is
    # refused by name rather than searched as a folder.
    is_file = not os.path.isdir(path)
    folder = os.path.dirname(os.path.abspath(path)) if is_file else path
    cfg = _read_json(os.path.join(folder, CONFIG_NAME))
    origin = "family=" if family is not None else os.path.join(folder, CONFIG_NAME)
    family = family if family is not None else cfg.get(FAMILY_KEY)
    if family is not None:
        family = canonical_family(family, origin)
    if is_file:
        file = path
    else:
        # a known family looks only for its own file, so family="chatglm2" never picks up an ice_text.model
        if family is not None:
            names = list(FAMILY_FILES.get(family, (CLASSES[family].model_file,)))
        else:
            names = list(MODEL_FILES)
        kind = class_kind(cfg)
        if kind is not None and ENGLISH_FILES[kind] in names:  # tokenizer_class decides between a folder's files
            names.insert(0, ENGLISH_FILES[kind])
        if cfg.get("model_file") is not None:
            name = cfg["model_file"]
            # save() writes the bare file name; a path would read a file from outside the folder.
            if not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", ".."):
                raise TokenizerError(f"{os.path.join(folder, CONFIG_NAME)}: model_file is {name!r}; it must be the "
                                     f"name of a file in the folder, such as {', '.join(MODEL_FILES)}")
            names.insert(0, name)
        # lexists, not isfile: a FIFO or a dangling link at a tokenizer file's name is refused by name below
        file = next((os.path.join(folder, n) for n in names if os.path.lexists(os.path.join(folder, n))), "")
        if not file:
            if os.path.lexists(os.path.join(folder, "merges.txt")) and "vocab.json" in names:
                raise TokenizerError(f"{os.path.join(folder, 'merges.txt')}: there is no vocab.json beside it, and a "
                                     f"GPT-2 BPE tokenizer needs both; copy the release's vocab.json into the folder")
            raise TokenizerError(f"{folder}: no tokenizer file; looked for {', '.join(dict.fromkeys(names))}. "
                                 f"Copy the release's tokenizer file into the folder or pass its path")
    if os.path.basename(file) == "merges.txt":  # a GPT-2 BPE is named by either of its two files
        file = os.path.join(folder, "vocab.json")
    data = read_file(file, MODEL_FILE_LIMIT)
    where = os.path.join(folder, CONFIG_NAME)
    rust = _rust_backed(file, data, folder, cfg, family)
    if rust is not None:
        tok: Tokenizer = rust
    else:
        family = family or detect_family(file, data, cfg)
        if family == "chatglm":
            sp = load_sentencepiece(data, file)
            offset = chatglm_num_image_tokens(folder, cfg, sp.get_piece_size())
            tok = ChatGLM6BTokenizer(data, file, num_image_tokens=offset,
                                     remove_space=_flag(cfg, "remove_space", where),
                                     do_lower_case=_flag(cfg, "do_lower_case", where), sp=sp)
        else:
            tok = CLASSES[family](data, file, overrides=_added_tokens(folder, cfg))
    if cfg.get(FAMILY_KEY) and cfg.get("model_type") is not None and tok.model_type is None:
        tok.model_type = _model_type(cfg["model_type"], where)
    return tok


def _rust_backed(file: str, data: bytes, folder: str, cfg: dict, family: Optional[str]) -> Optional[Tokenizer]:
    """The tokenizer of a file the ``tokenizers`` library reads (tokenizer.json, vocab.json + merges.txt,
    vocab.txt), or None for a SentencePiece / tiktoken file. The file's name decides, then its content
    (a tokenizer.json saved under another name)."""
    name = os.path.basename(file)
    kind: Optional[EnglishKind] = None
    if name == "vocab.txt":
        kind = "bert"
    elif name == "vocab.json":
        kind = class_kind(cfg) if class_kind(cfg) in ("gpt2", "roberta") else bpe_vocab_kind(data)
    elif name != "tokenizer.json" and not is_tokenizer_json(data):
        return None
    wanted = "glm4" if kind is None else "glm"
    if family is not None and family != wanted:
        raise TokenizerError(f"{file} is a {wanted} tokenizer file, but family={family!r} was asked for (from "
                             f"the argument or {os.path.join(folder, CONFIG_NAME)}); pass family={wanted!r} or "
                             f"the folder of the {family} release")
    if kind is None:
        return TokenizerJSONTokenizer(data, file, cfg, _added_tokens(folder, cfg))
    files = {name: data}
    if kind != "bert":
        merges = os.path.join(folder, "merges.txt")
        if not os.path.lexists(merges):
            raise TokenizerError(f"{file}: there is no merges.txt beside it, and a GPT-2 BPE tokenizer needs both; "
                                 f"copy the release's merges.txt into the folder")
        files["merges.txt"] = read_file(merges, MODEL_FILE_LIMIT)
    return read_english(files, kind, file, cfg, _added_tokens(folder, cfg))


def _model_type(value: object, where: str) -> ModelType:
    """The ``model_type`` glm.tokenizer.train records (unigram, bpe, char)."""
    if value not in MODEL_TYPES:
        raise TokenizerError(f"{where}: model_type is {value!r}; set it to one of {', '.join(MODEL_TYPES)} (or "
                             f"delete the key)")
    return value  # type: ignore[return-value]
