"""A release folder's Jinja chat template, found and rendered as transformers' ``apply_chat_template`` does.

Where the template comes from (transformers ``from_pretrained``): ``chat_template`` in
tokenizer_config.json (a string, or a list of ``{"name", "template"}``), overridden by the files
``chat_template.jinja`` (the default) and ``additional_chat_templates/<name>.jinja`` that newer releases
ship. Which one renders (``get_chat_template``): with several, ``tool_use`` when tools are passed, else
``default``.

How it renders (transformers 5.x ``utils/chat_template_utils.py``): a sandboxed, immutable Jinja
environment with ``trim_blocks`` and ``lstrip_blocks`` and the ``loopcontrols`` extension; ``tojson`` is
``json.dumps`` with ``ensure_ascii=False`` (not Jinja's HTML-escaping one); globals ``raise_exception``,
``strftime_now``, a ``dict`` constructor and a ``namespace`` that refuses ``_`` names; message keys whose
value is None are dropped; the template sees ``messages``, ``tools``, ``documents``,
``add_generation_prompt`` and the seven named special tokens (``bos_token`` ... ``mask_token``).
transformers' ``{% generation %}`` tag (assistant-token masks) is accepted and renders its body.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping, Optional, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from glm.errors import TokenizerError
from glm.files import JSON_LIMIT, FileKindError, read_bounded

CONFIG_NAME = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"
# transformers' SPECIAL_TOKENS_ATTRIBUTES: the names a template sees as variables
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass(frozen=True)
class ChatTemplates:
    """A folder's chat templates by name (a single template is ``default``), the file each came from, and
    the special-token strings the template sees as variables."""
    templates: dict[str, str]
    files: dict[str, str]
    variables: dict[str, str] = field(default_factory=dict)
    in_config: bool = False  # read from tokenizer_config.json's chat_template rather than .jinja files

    def select(self, name: Optional[str] = None, tools: Optional[Sequence] = None) -> tuple[str, str]:
        """(template text, the file it came from), chosen as transformers' ``get_chat_template`` does."""
        if name is not None:
            if name not in self.templates:
                raise TokenizerError(f"no chat template named {name!r} in {self._where()}; the folder has "
                                     f"{', '.join(sorted(self.templates))}")
        elif len(self.templates) == 1 and "default" in self.templates:
            name = "default"
        elif tools is not None and "tool_use" in self.templates:
            name = "tool_use"
        elif "default" in self.templates:
            name = "default"
        else:
            raise TokenizerError(f"{self._where()} has several chat templates and none named 'default'; pass "
                                 f"chat_template= one of {', '.join(sorted(self.templates))}")
        return self.templates[name], self.files[name]

    def _where(self) -> str:
        return ", ".join(sorted(set(self.files.values())))

    def saved_form(self) -> tuple[dict[str, str], dict[str, object]]:
        """What a saved folder needs to render as this one: (file path relative to the folder -> text,
        tokenizer_config.json keys), in the layout the templates were read from, so that the folder
        still loads the same in transformers."""
        config: dict[str, object] = dict(self.variables)
        if self.in_config:
            if set(self.templates) == {"default"}:
                config["chat_template"] = self.templates["default"]
            else:
                config["chat_template"] = [{"name": n, "template": t} for n, t in self.templates.items()]
            return {}, config
        files = {TEMPLATE_FILE if name == "default" else os.path.join(TEMPLATE_DIR, name + ".jinja"): text
                 for name, text in self.templates.items()}
        return files, config


def _read_text(path: str) -> str:
    try:
        return read_bounded(path, JSON_LIMIT, what=os.path.basename(path)).decode("utf-8")
    except FileKindError as e:
        raise TokenizerError(str(e)) from None
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not UTF-8 text ({e}); restore the file from the release") from None
    except OSError as e:
        raise TokenizerError(f"{path}: cannot be read ({e.strerror})") from None


def _read_config(path: str) -> dict:
    if not os.path.lexists(path):
        return {}
    try:
        data = json.loads(_read_text(path))
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({str(e).split(';')[0] or 'nested too deeply'}); fix or "
                             f"delete it") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object; fix or delete it")
    return data


def _token_string(value: object) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken ``{"content": ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def read_chat_templates(folder: str) -> Optional[ChatTemplates]:
    """The chat templates of a release folder, or None where it has none."""
    config_path = os.path.join(folder, CONFIG_NAME)
    cfg = _read_config(config_path)
    templates: dict[str, str] = {}
    files: dict[str, str] = {}
    raw = cfg.get("chat_template")
    where = f"{config_path}: chat_template"
    if isinstance(raw, str):
        templates["default"], files["default"] = raw, where
    elif isinstance(raw, (list, dict)):
        entries = raw.items() if isinstance(raw, dict) else (
            (e.get("name"), e.get("template")) if isinstance(e, Mapping) else (None, None) for e in raw)
        for name, text in entries:
            if not isinstance(name, str) or not isinstance(text, str):
                raise TokenizerError(f"{where} must be a string or a list of {{\"name\": ..., \"template\": ...}} "
                                     f"with string values; fix it or save the template again")
            templates[name], files[name] = text, f"{where}[{name!r}]"
    elif raw is not None:
        raise TokenizerError(f"{where} is a {type(raw).__name__}; it must be a Jinja string or a list of named "
                             f"templates")
    # Template files take priority over tokenizer_config.json, as in transformers' from_pretrained.
    from_files: dict[str, str] = {}
    path = os.path.join(folder, TEMPLATE_FILE)
    if os.path.lexists(path):
        from_files["default"] = path
    extra = os.path.join(folder, TEMPLATE_DIR)
    if os.path.isdir(extra):
        for name in sorted(os.listdir(extra)):
            if name.endswith(".jinja"):
                from_files[name[:-len(".jinja")]] = os.path.join(extra, name)
    in_config = not from_files
    if from_files:
        templates, files = {}, {}
        for name, path in from_files.items():
            templates[name], files[name] = _read_text(path), path
    if not templates:
        return None
    variables = {k: s for k in SPECIAL_TOKEN_KEYS if (s := _token_string(cfg.get(k))) is not None}
    return ChatTemplates(templates, files, variables, in_config)


# ---- the rendering environment ------------------------------------------------------------------------

class _GenerationTag(jinja2.ext.Extension):
    """transformers' ``{% generation %}...{% endgeneration %}`` (it marks assistant tokens for a training
    mask); glm needs only the text, so the tag renders its body."""
    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Optional[int] = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """``dict(...)`` and ``dict.fromkeys(...)`` without exposing the dict type's attributes."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing attribute names that start with ``_`` (a way out of the sandbox)."""

    def __init__(*args: Any, **kwargs: Any):  # noqa: N805 - Jinja's own signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template cannot set the namespace attribute {name!r}")


@lru_cache(maxsize=32)
def _compile(text: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(text)


def _plain(value: Any) -> Any:
    """JSON-like data rebuilt from plain types (as transformers' ``_plain_template_data``), so the sandbox
    never sees an object with methods of its own; anything else becomes ``"<TypeName>"``."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def render(template: str, messages: Sequence[Mapping[str, Any]], *, where: str,
           tools: Optional[Sequence[Mapping[str, Any]]] = None, add_generation_prompt: bool = True,
           variables: Optional[Mapping[str, Any]] = None, **kwargs: Any) -> str:
    """The template rendered for ``messages`` as transformers renders it; ``where`` names the template's
    file for the error a template that fails to compile or render raises. ``kwargs`` reach the template
    as variables and win over the special-token ``variables``, as in transformers."""
    msgs = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TokenizerError(f"apply_chat_template: message {i} must be a dict with 'role' and 'content', "
                                 f"got {m!r}")
        msgs.append(_plain({k: v for k, v in m.items() if v is not None}))
    if tools is not None:
        bad = [t for t in tools if not isinstance(t, Mapping)]
        if bad:
            raise TokenizerError(f"apply_chat_template: tools must be JSON-schema dicts, got {bad[0]!r}")
    context = {**(variables or {}), **kwargs}
    try:
        compiled = _compile(template)
        return compiled.render(messages=msgs, tools=_plain(tools), documents=_plain(context.pop("documents", None)),
                               add_generation_prompt=add_generation_prompt, **_plain(context))
    except jinja2.exceptions.TemplateError as e:
        line = f" (line {e.lineno})" if isinstance(e, jinja2.exceptions.TemplateSyntaxError) else ""
        raise TokenizerError(f"{where}: the chat template failed to render{line}: {type(e).__name__}: {e}; fix "
                             f"the template or the messages it was given") from None
    except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as e:
        raise TokenizerError(f"{where}: the chat template failed to render: {type(e).__name__}: {e}; fix the "
                             f"template or the messages it was given") from None


def template_for(folder: str) -> Optional[ChatTemplates]:
    """The folder's templates, read once per folder state (path + file modification times)."""
    stamps = tuple(_stamp(os.path.join(folder, n)) for n in (CONFIG_NAME, TEMPLATE_FILE, TEMPLATE_DIR))
    return _cached_templates(os.path.abspath(folder), stamps)


def _stamp(path: str) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


@lru_cache(maxsize=64)
def _cached_templates(folder: str, stamps: tuple) -> Optional[ChatTemplates]:
    return read_chat_templates(folder)

