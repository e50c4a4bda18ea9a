"""What every family's tokenizer shares: the error type, the special-token table, decoding around
specials, splitting text on literal special-token strings, chat-message normalisation and atomic saves.

A family subclass supplies only how text becomes ids (`encode`, `_decode_text`), its model file, its
prompt wrapping (`build_inputs`) and its chat format (`_chat`).
"""
from __future__ import annotations

import json
import operator
import os
import re
from typing import Any, Iterable, Literal, Mapping, Optional, Sequence, Union, get_args

from glm import formats
from glm.errors import TokenizerError
from glm.files import atomic_write

from .chat_template import TEMPLATE_DIR, TEMPLATE_FILE, render, template_for
from .tools import attach_tools

FAMILIES = ("glm", "chatglm", "chatglm2", "chatglm3", "glm4")
CONFIG_NAME = "tokenizer_config.json"
FAMILY_KEY = "glm_tokenizer_family"
ModelType = Literal["unigram", "bpe", "char"]
MODEL_TYPES: tuple[str, ...] = get_args(ModelType)


def model_family_aliases() -> dict[str, str]:
    """The model family names (glm.formats, `glm convert --family`) that are not tokenizer family names,
    each -> the tokenizer family of its release (GLM-4-9B in the chatglm format and transformers' Glm/Glm4
    all use GLM-4's vocabulary)."""
    return {f.family: f.tokenizer_family for f in formats.FORMATS.values() if f.family not in FAMILIES}


FAMILY_NAMES = FAMILIES + tuple(model_family_aliases())  # every name `family=` accepts


def canonical_family(name: object, where: str) -> str:
    """The tokenizer family a family name means (a model family name is mapped to its release's
    tokenizer); ``where`` names the argument or file the name came from, for the error."""
    if isinstance(name, str):
        if name in FAMILIES:
            return name
        aliases = model_family_aliases()
        if name in aliases:
            return aliases[name]
    by_tokenizer: dict[str, list[str]] = {}
    for model_family, tokenizer_family in model_family_aliases().items():
        by_tokenizer.setdefault(tokenizer_family, []).append(model_family)
    meanings = "; ".join(f"{', '.join(names)}, meaning {t}" for t, names in by_tokenizer.items())
    raise TokenizerError(f"unknown tokenizer family {name!r} (from {where}); expected one of {', '.join(FAMILIES)} "
                         f"or a model family name ({meanings})")


def check_text(text: object, what: str = "the text") -> str:
    """``text`` when it is a str that encodes as UTF-8; TokenizerError naming the first character that does
    not (a lone surrogate, which bytes decoded with errors="surrogateescape" leave behind): each backend
    would otherwise fail in its own way or silently encode U+FFFD."""
    if not isinstance(text, str):
        raise TokenizerError(f"{what} must be a str, got {type(text).__name__}")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise TokenizerError(f"{what} holds a lone surrogate U+{ord(text[e.start]):04X} at character {e.start} "
                                 f"(invalid UTF-8 decoded with surrogateescape?); pass valid Unicode text") from None
    return text


Message = Mapping[str, object]


class Tokenizer:
    """One GLM release's tokenizer. Ids below the text-vocabulary size come from the model file; the
    special tokens are a name -> id table whose layout each family defines (GLM_SPEC §5)."""

    family: str = ""
    model_file: str = ""  # the release's file name, used by save()
    # Special-token names that are ordinary words ("sop", "eop" in ChatGLM2/3): encode_with_specials must
    # not turn the "sop" inside "desktop" into the sop token, so these are reachable via token_id() only.
    unsplittable: frozenset = frozenset()
    roles_in_chat: frozenset = frozenset()
    # How the chat format describes tools on a system message ("glm4": the glm-4-9b-chat tool prompt;
    # "chatglm3": the JSON appended to the system text); None: the format has no tools.
    tool_format: Optional[str] = None
    # The model file's kind, "unigram", "bpe" or "char" (glm.tokenizer.train records it in
    # tokenizer_config.json; None for a SentencePiece release file, whose trainer settings glm does not
    # read), and whether it has the 256 byte pieces that encode characters it lacks (read from the file).
    model_type: Optional[ModelType] = None
    byte_fallback: Optional[bool] = None

    def __init__(self, special_tokens: Mapping[str, int], n_text: int, source: str,
                 roles: Mapping[str, object], overrides: Optional[Mapping[str, int]] = None):
        table = dict(special_tokens)
        for name, idx in (overrides or {}).items():
            if name in table:  # a release's own added-token table is the truth where it exists
                table[name] = int(idx)
        ids = list(table.values())
        if len(set(ids)) != len(ids):
            dup = sorted(n for n in table if ids.count(table[n]) > 1)
            raise TokenizerError(f"{source}: special tokens {dup} share an id; fix the added-token table in "
                                 f"{CONFIG_NAME} / added_tokens.json or re-save the tokenizer")
        self.special_tokens: dict[str, int] = table
        self.source = source
        self._n_text = n_text
        self._roles = dict(roles)
        self._id_to_special = {v: k for k, v in table.items()}
        names = sorted((n for n in table if n not in self.unsplittable), key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    # ---- what a family provides -------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Plain text -> ids; special-token strings in the text are treated as text."""
        raise NotImplementedError

    def _decode_text(self, ids: list[int]) -> str:
        raise NotImplementedError

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of ``text`` as it tokenises in the middle of a longer text, right after other tokens
        (no word-start marker on its first piece). Byte-level BPE has none to drop."""
        return self.encode(text)

    def build_inputs(self, ids: Sequence[int]) -> list[int]:
        """The release's ``build_inputs_with_special_tokens`` for one sequence."""
        raise NotImplementedError

    def infill_prompt(self, ids: Sequence[int]) -> list[int]:
        """The Part A a text with blanks (``ids``, masks included) is infilled from: the ids as they are,
        unless the release wraps such a text (see GLMTokenizer)."""
        return list(ids)

    def _chat(self, messages: list[dict]) -> list[int]:
        raise NotImplementedError

    def _model_bytes(self) -> bytes:
        raise NotImplementedError

    def _model_files(self) -> dict[str, bytes]:
        """File name -> bytes of everything save() writes besides tokenizer_config.json (a GPT-2 BPE
        tokenizer is two files, vocab.json and merges.txt)."""
        return {self.model_file: self._model_bytes()}

    def _config_extra(self) -> dict:
        return {}

    # ---- shared API ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer can produce, specials included (embedding tables may be padded larger)."""
        return max(self._n_text, max(self.special_tokens.values(), default=-1) + 1)

    def _role(self, role: str) -> Optional[int]:
        name = self._roles.get(role)
        return None if name is None else self.special_tokens[name]  # type: ignore[index]

    @property
    def pad_id(self) -> int:
        return self._role("pad")  # type: ignore[return-value]

    @property
    def bos_id(self) -> Optional[int]:
        return self._role("bos")

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return tuple(self.special_tokens[n] for n in self._roles["eos"])  # type: ignore[union-attr]

    @property
    def sop_id(self) -> int:
        return self._role("sop")  # type: ignore[return-value]

    @property
    def eop_id(self) -> int:
        return self._role("eop")  # type: ignore[return-value]

    @property
    def cls_id(self) -> Optional[int]:
        return self._role("cls")

    @property
    def mask_ids(self) -> dict[str, int]:
        return {k: self.special_tokens[f"[{k}]"] for k in ("MASK", "sMASK", "gMASK") if f"[{k}]" in self.special_tokens}

    def token_id(self, name: str) -> int:
        """Id of a special token by its string, e.g. ``token_id("[gMASK]")``."""
        try:
            return self.special_tokens[name]
        except KeyError:
            raise TokenizerError(f"{name!r} is not a special token of this {self.family} tokenizer ({self.source}); "
                                 f"known: {', '.join(sorted(self.special_tokens))}") from None

    def encode_with_specials(self, text: str, continuation: bool = False) -> list[int]:
        """Text that may contain special-token strings literally ("[gMASK]", "<|user|>"): each one becomes
        its id and the text between them is encoded on its own, as a Hugging Face tokenizer does with
        its added tokens. ``continuation``: the text continues a word already tokenised (its first run
        is encoded by :meth:`encode_continuation`)."""
        check_text(text)  # positions in errors count from the start of the whole text
        if self._split_re is None:
            return self.encode_continuation(text) if continuation else self.encode(text)
        out: list[int] = []
        for i, part in enumerate(self._split_re.split(text)):
            if i % 2:
                out.append(self.special_tokens[part])
            elif part:
                out.extend(self.encode_continuation(part) if continuation and i == 0 else self.encode(part))
        return out

    def _checked_ids(self, ids: Iterable[int]) -> list[int]:
        """``ids`` as a list of ints, each a valid id of this tokenizer; TokenizerError otherwise. The
        checks run in C (map, min, max): no Python work per id unless an id is bad."""
        if hasattr(ids, "tolist") and not isinstance(ids, list):
            ids = ids.tolist()  # a tensor or array: one conversion instead of one 0-d object per element
        ids = list(ids)
        try:
            # operator.index takes ints, numpy ints and integer 0-d tensors; int() would truncate 2.7 to 2
            ids = list(map(operator.index, ids))
        except TypeError:
            raise TokenizerError(f"decode: ids must be integers, got {ids[:5]!r}") from None
        size = self.vocab_size
        if ids and (min(ids) < 0 or max(ids) >= size):
            bad = [i for i in ids if not 0 <= i < size]
            raise TokenizerError(f"ids {bad[:5]} are outside this {self.family} tokenizer's vocabulary "
                                 f"(0..{size - 1}, {self.source}); were they made by another tokenizer?")
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids -> text. Runs of text ids are decoded together; a special token becomes its string
        (or nothing with ``skip_special_tokens``)."""
        ids = self._checked_ids(ids)
        if not ids:
            return ""
        if self._id_to_special.keys().isdisjoint(ids):
            return self._decode_text(ids)
        pieces: list[str] = []
        run: list[int] = []
        for i in ids:
            name = self._id_to_special.get(i)
            if name is None:
                run.append(i)
                continue
            if run:
                pieces.append(self._decode_text(run))
                run = []
            if not skip_special_tokens:
                pieces.append(name)
        if run:
            pieces.append(self._decode_text(run))
        return "".join(pieces)

    def chat_ids(self, query: Optional[str] = None, history: Sequence = (), system: Optional[str] = None, *,
                 messages: Optional[Sequence[Message]] = None) -> list[int]:
        """The release's chat prompt, ready for generation.

        Either ``query`` with ``history`` (``[(query, response), ...]`` or message dicts) and an optional
        ``system`` text, or ``messages=[{"role": ..., "content": ...}, ...]`` ending with the turn to answer.
        """
        if not self.roles_in_chat:
            raise TokenizerError(f"the {self.family} family has no chat format; build prompts with build_inputs()")
        return self._chat(_conversation(query, history, system, messages, self.family, self.roles_in_chat))

    def apply_chat_template(self, messages: Sequence[Message], tools: Optional[Sequence[Mapping[str, Any]]] = None,
                            add_generation_prompt: bool = True, tokenize: bool = True, *,
                            chat_template: Optional[str] = None, **kwargs: Any) -> Union[list[int], str]:
        """The conversation as the release's chat template renders it (the text, or its ids with
        ``tokenize``), the way transformers' ``apply_chat_template`` does.

        Where the tokenizer's folder has a Jinja template (tokenizer_config.json ``chat_template``,
        ``chat_template.jinja``), it is rendered as transformers renders it (see glm.tokenizer.chat_template)
        and tokenized as transformers tokenizes it: no added prefix, each special-token string in the text
        becomes its id. ``tools`` reach the template as its ``tools`` variable, exactly as in transformers
        (glm-4-9b-chat's template reads tools only from a message's own ``"tools"`` key: see
        glm.tokenizer.tools.chat_prompt_ids). ``chat_template`` is a template name or a Jinja text;
        ``kwargs`` are further template variables.

        Without a template, glm's own chat format of the family (:meth:`chat_ids`) is the prompt, with
        ``tools`` put on the system message; ``tokenize=False`` gives that prompt decoded."""
        templates = template_for(os.path.dirname(os.path.abspath(self.source)))
        text: Optional[str] = None
        if chat_template is not None and (templates is None or chat_template not in templates.templates):
            text, where = chat_template, "the chat_template argument"
        elif templates is not None:
            text, where = templates.select(chat_template, tools)
        if text is not None:
            variables = templates.variables if templates is not None else {}
            rendered = render(text, messages, where=where, tools=tools, add_generation_prompt=add_generation_prompt,
                              variables=variables, **kwargs)
            return self.encode_with_specials(rendered) if tokenize else rendered
        if tools and self.tool_format is None:
            raise TokenizerError(f"the {self.family} chat format has no tools ({self.source} has no chat template "
                                 f"either); call without tools")
        ids = self.chat_ids(messages=attach_tools(messages, tools))
        if not add_generation_prompt:
            assistant = self.special_tokens.get("<|assistant|>")
            if assistant is None or ids[-1] != assistant:
                raise TokenizerError(f"the {self.family} chat format always ends with the prompt for the reply; "
                                     f"call with add_generation_prompt=True")
            ids = ids[:-1]
        return ids if tokenize else self.decode(ids)

    def save(self, folder: str) -> None:
        """Write the model files, the chat templates of the folder this tokenizer was read from (as
        they were found: tokenizer_config.json's ``chat_template`` or ``.jinja`` files) and
        tokenizer_config.json into ``folder`` (created if missing); each file goes to a temp file
        beside it, is fsynced and renamed into place."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        config = {FAMILY_KEY: self.family, "model_file": self.model_file,
                  "special_tokens": dict(sorted(self.special_tokens.items(), key=lambda kv: kv[1])),
                  **self._config_extra()}
        config.update({k: v for k, v in (("model_type", self.model_type), ("byte_fallback", self.byte_fallback))
                       if v is not None})
        files = self._model_files()
        templates = template_for(os.path.dirname(os.path.abspath(self.source)))
        if templates is not None:
            template_files, template_config = templates.saved_form()
            files.update({name: text.encode() for name, text in template_files.items()})
            # the template's special-token variables, where the family's own keys do not already set them
            config.update({k: v for k, v in template_config.items() if k not in config})
        # A template file already in the folder would win over the one saved here (transformers reads
        # the files first), so the saved tokenizer would render another template.
        stale = [os.path.join(folder, p) for p in (TEMPLATE_FILE, TEMPLATE_DIR)
                 if os.path.lexists(os.path.join(folder, p)) and not any(n.split(os.sep)[0] == p for n in files)]
        if stale:
            raise TokenizerError(f"{stale[0]}: a chat template that is not this tokenizer's would override the saved "
                                 f"one; remove it or save into another folder")
        # Every other file before tokenizer_config.json: a crash between the renames leaves a config that
        # names only complete files, never one pointing at a half-written model file.
        for name, data in files.items():
            path = os.path.join(folder, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write(path, data)
        atomic_write(os.path.join(folder, CONFIG_NAME),
                     (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode())

    def __repr__(self) -> str:
        kind = "".join(f" {k}={v}" for k, v in (("model_type", self.model_type), ("byte_fallback", self.byte_fallback))
                       if v is not None)
        return f"<{type(self).__name__} family={self.family} vocab_size={self.vocab_size}{kind} source={self.source}>"


def _conversation(query: Optional[str], history: Sequence, system: Optional[str],
                  messages: Optional[Sequence[Message]], family: str, roles: frozenset) -> list[dict]:
    """Normalise the two chat call forms into a list of message dicts, validating roles and contents."""
    if messages is not None:
        if query is not None or history or system is not None:
            raise TokenizerError("chat_ids: pass either messages=[...] or query/history/system, not both")
        # A key whose value is None counts as absent, as in transformers' apply_chat_template (an OpenAI
        # style message has content None next to its tool calls).
        msgs = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
        for m in msgs:
            if "tools" in m and "content" not in m:
                m["content"] = ""  # a system message that only carries tools
    else:
        if not isinstance(query, str):
            raise TokenizerError("chat_ids: query must be a string (or pass messages=[{'role': ..., 'content': ...}])")
        msgs = [] if system is None else [{"role": "system", "content": system}]
        for item in history:
            if isinstance(item, Mapping):
                msgs.append(dict(item))
            elif isinstance(item, (tuple, list)) and len(item) == 2:
                msgs += [{"role": "user", "content": item[0]}, {"role": "assistant", "content": item[1]}]
            else:
                raise TokenizerError(f"chat_ids: history entries must be (query, response) pairs or message dicts, "
                                     f"got {item!r}")
        msgs.append({"role": "user", "content": query})
    if not msgs:
        raise TokenizerError("chat_ids: no messages given")
    for i, m in enumerate(msgs):
        if m.get("role") not in roles:
            raise TokenizerError(f"chat_ids: message {i} has role {m.get('role')!r}; the {family} chat format "
                                 f"knows {', '.join(sorted(roles))}")
        if not isinstance(m.get("content"), str):
            raise TokenizerError(f"chat_ids: message {i} needs a string 'content', got {m.get('content')!r}")
        check_text(m["content"], f"chat_ids: message {i}'s content")
        if "metadata" in m:
            check_text(m["metadata"], f"chat_ids: message {i}'s metadata")
    return msgs


def rounds(messages: list[dict], family: str) -> tuple[list[tuple[str, str]], str]:
    """ChatGLM-6B/2 prompts are rounds of (query, response): user/assistant pairs, then the new query."""
    pairs = []
    body, last = messages[:-1], messages[-1]
    if last["role"] != "user" or len(body) % 2:
        raise TokenizerError(f"chat_ids: the {family} format needs user/assistant pairs followed by one user "
                             f"message; got roles {[m['role'] for m in messages]}")
    for q, r in zip(body[0::2], body[1::2]):
        if (q["role"], r["role"]) != ("user", "assistant"):
            raise TokenizerError(f"chat_ids: the {family} format needs alternating user/assistant messages; got "
                                 f"roles {[m['role'] for m in messages]}")
        pairs.append((q["content"], r["content"]))
    return pairs, last["content"]
