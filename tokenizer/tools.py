"""GLM-4 tool calling: the tool system prompt of glm-4-9b-chat, tools attached to a conversation, and the
model's reply parsed into text or a tool call.

The prompt is the text glm-4-9b-chat's released chat template renders for a message carrying ``tools``
(``tests/data/chat_templates/glm-4-9b-chat.jinja``), character for character, including what the
template's ``trim_blocks`` does to it. Parsing follows THUDM's ``glm_server.process_response``: the model
answers a call with ``name\\n{json}`` after ``<|assistant|>`` and stops at ``<|observation|>``.

    tools = load_tools("tools.json")
    ids = chat_prompt_ids(tok, [{"role": "user", "content": "北京天气？"}], tools)
    reply = parse_reply(tok.decode(new_ids, skip_special_tokens=True), tools)
    if isinstance(reply, ToolCall):
        messages += [reply.message(), {"role": "observation", "content": run(reply)}]
"""
from __future__ import annotations

import ast
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Protocol, Sequence, Union

from glm.errors import TokenizerError
from glm.files import read_json

# The assistant's self-introduction and heading that open the tool block (the released template, after
# THUDM fixed the name "GhatGLM"; the Python apply_chat_template before it said "GLM-4").
GLM4_TOOL_INTRO = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                   "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具")
GLM4_FUNCTION_NOTE = "在调用上述函数时，请使用 Json 格式表示调用的参数。"
# The fixed descriptions of the built-in tools, verbatim from the template (the one space that opens the
# simple_browser line " 如果用户提供了 URL" is in the release).
GLM4_BUILTIN_TOOLS = {
    "python": (
        "当你向 `python` 发送包含 Python 代码的消息时，该代码将会在一个有状态的 Jupyter notebook 环境中执行。\n"
        "`python` 返回代码执行的输出，或在执行 60 秒后返回超时。\n"
        "`/mnt/data` 将会持久化存储你的文件。在此会话中，`python` 无法访问互联网。不要使用 `python` 进行任何网络请求"
        "或者在线 API 调用，这些在线内容的访问将不会成功。"),
    "simple_browser": (
        "你可以使用 `simple_browser` 工具。该工具支持以下函数：\n"
        "`search(query: str, recency_days: int)`：使用搜索引擎进行查询并显示结果，可以使用 `recency_days` "
        "参数控制搜索内容的时效性。\n"
        "`mclick(ids: list[int])`：获取一系列指定 id 的页面内容。每次调用时，须选择3-10个页面。选择多个角度的页面，"
        "同时尽可能选择可信任的信息来源。考虑到部分页面是无法加载的，你也可以多打开一些可能有用的页面而不用担心内容过多。\n"
        "`open_url(url: str)`：打开指定的 URL。\n\n"
        "使用 `【{引用 id}†{引用文本}】` 来引用内容。\n\n"
        "操作步骤：1. 使用 `search` 来获得信息列表; 2. 使用 `mclick` 来获取指定 ID 页面的内容; "
        "3. 根据获得的内容进行回复。"
        "在回复中应当引用信息来源。\n"
        " 如果用户提供了 URL，也可以用 `open_url` 直接打开页面。\n"
        "如果初次搜索结果没有找到合适的信息，也可以再次使用 `search` 进行搜索。"),
    "cogview": (
        "如果用户的请求中包含了对图像的描述，你可以使用 `cogview` 来生成图像并展示给用户。你需要向 `cogview` "
        "发送图像描述，规则：\n"
        "- 发送给 `cogview` 的消息必须使用英语。用户的中文描述必须完全翻译为英语。\n"
        "- 应当尽可能详细地描述图像生成的需求，需求描述约 100 英文单词。\n"
        "- 保持用户原始描述的意图。不要虚构内容或者没见过的人物。\n"
        "- 如无特殊说明，所在地为中国，持有中国立场并遵循中国社会主义价值观。"),
}
TOOL_TYPES = ("function", *GLM4_BUILTIN_TOOLS)
# Tools whose call glm_server accepts even when the arguments are not JSON.
SPECIAL_TOOLS = ("cogview", "simple_browser")
_SEARCH = re.compile(r'search\("(.+?)"\s*,\s*recency_days\s*=\s*(\d+)\)')


class ChatTokenizer(Protocol):
    """What :func:`chat_prompt_ids` needs of a glm.tokenizer.Tokenizer (base.py imports this module, so
    it is described here rather than imported)."""
    tool_format: Optional[str]

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], tools: Any = None,
                            add_generation_prompt: bool = True, tokenize: bool = True) -> Any: ...


def check_tools(tools: object, where: str = "tools") -> list[dict]:
    """``tools`` as a list of tool dicts the GLM-4 prompt can describe: ``{"type": "function", "function":
    {"name": ..., ...}}`` or ``{"type": "python" | "simple_browser" | "cogview"}``; TokenizerError naming the
    first entry that is not. (The released template silently skips an entry of another type, which would
    leave the model unaware of a tool the caller meant to offer.)"""
    if not isinstance(tools, (list, tuple)):
        raise TokenizerError(f"{where} must be a list of tools, got {type(tools).__name__}")
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, Mapping) else None
        if kind not in TOOL_TYPES:
            raise TokenizerError(f"{where}[{i}] has type {kind!r}; GLM-4 describes tools of type "
                                 f"{', '.join(TOOL_TYPES)} (OpenAI style: {{\"type\": \"function\", \"function\": "
                                 f"{{\"name\": ..., \"description\": ..., \"parameters\": ...}}}})")
        if kind == "function":
            function = tool.get("function")
            if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
                raise TokenizerError(f"{where}[{i}] is a function tool without a 'function' object holding a "
                                     f"non-empty 'name'; write it as {{\"type\": \"function\", \"function\": "
                                     f"{{\"name\": ..., ...}}}}")
            try:
                json.dumps(function)
            except (TypeError, ValueError) as e:
                raise TokenizerError(f"{where}[{i}]: the function description must be JSON data (dicts, lists, "
                                     f"strings, numbers): {e}") from None
        out.append(dict(tool))
    return out


def glm4_tool_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """The text glm-4-9b-chat's template writes after ``<|system|>`` for a message with ``tools``.

    Each tool section starts with ONE newline before ``## name``: the template has two, but
    ``trim_blocks`` removes the one right after each ``{% if tool['type'] == ... %}`` tag. A function is
    ``tojson(indent=4)`` of its ``function`` object, i.e. ``json.dumps(..., ensure_ascii=False, indent=4)``
    (transformers' filter), in the dict's own key order."""
    text = "\n" + GLM4_TOOL_INTRO
    for tool in check_tools(tools):
        kind = tool["type"]
        if kind == "function":
            function = tool["function"]
            body = json.dumps(function, ensure_ascii=False, indent=4)
            text += f"\n## {function['name']}\n\n{body}\n{GLM4_FUNCTION_NOTE}"
        else:
            text += f"\n## {kind}\n\n{GLM4_BUILTIN_TOOLS[kind]}"
    return text


def attach_tools(messages: Sequence[Mapping[str, Any]], tools: Optional[Sequence[Mapping[str, Any]]]) -> list[dict]:
    """The conversation with ``tools`` on a system message, where GLM-4's and ChatGLM3's chat formats read
    them: on the first message when it is a system message without tools, else on a new system message
    with no content put first (THUDM glm_server's ``{"role": "system", "content": None, "tools": tools}``).
    No tools, or a conversation whose messages already carry tools: the messages unchanged. The tools
    are checked by the chat format that describes them."""
    msgs = [dict(m) for m in messages]
    if not tools or any(m.get("tools") is not None for m in msgs):
        return msgs
    tools = [dict(t) if isinstance(t, Mapping) else t for t in tools]
    if msgs and msgs[0].get("role") == "system" and msgs[0].get("tools") is None:
        msgs[0]["tools"] = tools
        return msgs
    return [{"role": "system", "content": "", "tools": tools}, *msgs]


def chat_prompt_ids(tok: ChatTokenizer, messages: Sequence[Mapping[str, Any]],
                    tools: Optional[Sequence[Mapping[str, Any]]] = None) -> list[int]:
    """The prompt ids for the assistant's next turn, with ``tools`` offered to the model: the release's
    chat template where the tokenizer's folder has one, glm's own chat format otherwise (``glm chat
    --tools``). Messages are ``{"role", "content"}`` plus ``"metadata"`` on an assistant tool call (its
    tool name) and ``observation`` turns for tool results. GLM-4 tools are checked here (see
    :func:`check_tools`) even where the release's template would skip a malformed one silently."""
    if tools and tok.tool_format == "glm4":
        tools = check_tools(tools)
    return tok.apply_chat_template(attach_tools(messages, tools), tools=tools or None)  # type: ignore[return-value]


@dataclass(frozen=True)
class ToolCall:
    """A call the model asked for: the tool's name and its arguments as a JSON object text (as THUDM's
    server reports it, ``ensure_ascii=False``). ``content``: the reply's text of the call where the chat
    format keeps that in the history instead of the JSON (ChatGLM3's code block)."""
    name: str
    arguments: str
    content: Optional[str] = None

    @property
    def args(self) -> Any:
        """The arguments parsed from JSON."""
        return json.loads(self.arguments)

    def message(self) -> dict:
        """The assistant turn that records this call in the history: ``<|assistant|>name\\n{arguments}``."""
        return {"role": "assistant", "metadata": self.name,
                "content": self.arguments if self.content is None else self.content}


def tool_names(tools: Optional[Sequence[Mapping[str, Any]]]) -> set[str]:
    """The names the model may call: each function tool's name."""
    return {t["function"]["name"] for t in check_tools(tools or [])
            if t["type"] == "function"}


def parse_reply(text: str, tools: Optional[Sequence[Mapping[str, Any]]] = None,
                tool_format: str = "glm4") -> Union[str, ToolCall]:
    """The model's reply (the text after ``<|assistant|>``, specials left out) as a ToolCall or as text
    (stripped). ``tool_format`` is the tokenizer's (``"chatglm3"``: :func:`parse_chatglm3_reply`).

    GLM-4, by THUDM glm_server's ``process_response``: a call is ``name`` on the first line and a
    second line starting with ``{``; the name must be a declared function tool or ``cogview`` /
    ``simple_browser``; the rest must be JSON, except for those two, whose raw text is accepted
    (``simple_browser``'s ``search("q", recency_days=N)`` becomes ``{"query", "recency_days"}``, cogview's
    text becomes ``{"prompt": text}``). Anything else is text."""
    if not isinstance(text, str):
        raise TokenizerError(f"parse_reply: the reply must be a str, got {type(text).__name__}")
    if tool_format == "chatglm3":
        return parse_chatglm3_reply(text, tools)
    if tool_format != "glm4":
        raise TokenizerError(f"parse_reply: tool_format must be 'glm4' or 'chatglm3', got {tool_format!r}")
    out = text.strip()
    lines = out.split("\n")
    if len(lines) < 2 or not lines[1].startswith("{"):
        return out
    name = lines[0].strip()
    if name not in tool_names(tools) and name not in SPECIAL_TOOLS:
        return out
    raw = "\n".join(lines[1:]).strip()
    try:
        parsed: Any = json.loads(raw)
    except (json.JSONDecodeError, RecursionError, ValueError):
        if name not in SPECIAL_TOOLS:
            return out
        parsed = None
    # glm_server re-serialises a JSON object and keeps any other argument text as a JSON string
    arguments = json.dumps(parsed if isinstance(parsed, dict) else raw, ensure_ascii=False)
    if name == "simple_browser":
        match = _SEARCH.match(raw)
        if match:
            arguments = json.dumps({"query": match.group(1), "recency_days": int(match.group(2))}, ensure_ascii=False)
    elif name == "cogview":
        arguments = json.dumps({"prompt": raw}, ensure_ascii=False)
    return ToolCall(name, arguments)


def chatglm3_tool_names(tools: Optional[Sequence[Mapping[str, Any]]]) -> set[str]:
    """The names ChatGLM3 may call: each tool's ``name`` (THUDM's demo layout, ``{"name", "description",
    "parameters"}``), or its ``function``'s name for an OpenAI-style entry."""
    names = set()
    for tool in tools or []:
        if isinstance(tool, Mapping):
            function = tool.get("function")
            name = tool.get("name", function.get("name") if isinstance(function, Mapping) else None)
            if isinstance(name, str) and name:
                names.add(name)
    return names


def _tool_call_arguments(code: str) -> Optional[dict]:
    """The keyword arguments of ``tool_call(a=1, b="x")``, each a Python literal, or None for any other
    text. ChatGLM3's reference ``eval``s this line; it is parsed here, so that a reply can never run code."""
    try:
        tree = ast.parse(code.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        return None
    call = tree.body
    if (not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.func.id != "tool_call"
            or call.args or any(k.arg is None for k in call.keywords)):
        return None
    try:
        arguments = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        json.dumps(arguments)
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return None
    return arguments


def parse_chatglm3_reply(text: str, tools: Optional[Sequence[Mapping[str, Any]]] = None) -> Union[str, ToolCall]:
    """A ChatGLM3 reply as a ToolCall or as text, by the release's ``process_response``: the first line is
    the turn's metadata (empty for a plain reply, whose text follows); a call names a declared tool there
    and follows it with a code block whose inner line is ``tool_call(name=value, ...)``, e.g.
    ``get_weather\n```python\ntool_call(city="Paris")\n```. The reference ``eval``s that line with
    ``tool_call(**kwargs)`` returning the keywords; here it is parsed, and only keyword arguments with
    literal values (strings, numbers, lists, dicts, True/False/None) make a call. The call keeps the code
    block as the history's content, as the reference does. Anything else is the reply's text, stripped."""
    metadata, newline, content = text.partition("\n")
    name = metadata.strip()
    if not newline or not name:
        return (content if newline else text).strip()
    if name not in chatglm3_tool_names(tools):
        return text.strip()
    # The lines between the fences (the reference drops the first and the last line of the content).
    arguments = _tool_call_arguments("\n".join(content.strip().split("\n")[1:-1]))
    if arguments is None:
        return text.strip()
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False), content=content)


def load_tools(path: str) -> list[dict]:
    """The tools of a JSON file (``glm chat --tools tools.json``): a list of tool objects, or an object
    ``{"tools": [...]}``. Each chat format checks the entries it describes (GLM-4: :func:`check_tools`;
    ChatGLM3: any JSON objects, appended to the system text)."""
    path = os.fspath(path)
    data = read_json(path, TokenizerError, missing="pass a JSON file holding a list of tools", fix="fix the tools file")
    if isinstance(data, dict) and "tools" in data:
        data = data["tools"]
    if not isinstance(data, list) or not all(isinstance(t, dict) for t in data):
        raise TokenizerError(f"{path}: expected a JSON list of tool objects (or {{\"tools\": [...]}}); fix the "
                             f"tools file")
    return data
