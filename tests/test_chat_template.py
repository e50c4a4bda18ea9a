"""Chat templates rendered as the releases render them, and GLM-4 tool calling (glm.tokenizer.chat_template,
glm.tokenizer.tools, Tokenizer.apply_chat_template).

The released templates are kept verbatim in tests/data/chat_templates (SOURCES.md says where each came
from). Toy tokenizers trained here carry them in their tokenizer_config.json, as a release folder does;
transformers (the test extra) renders the same conversations with its own renderer and tokenizes them with
a fast tokenizer converted from the same files, and both must agree with glm to the character and the id.
"""
import importlib.util
import json
import os
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glm.tokenizer import TokenizerError, load, train
from glm.tokenizer.chat_template import read_chat_templates, render
from glm.tokenizer.tools import (
    GLM4_BUILTIN_TOOLS,
    ToolCall,
    attach_tools,
    chat_prompt_ids,
    check_tools,
    glm4_tool_prompt,
    load_tools,
    parse_reply,
)

sys.path.insert(0, os.path.dirname(__file__))
from test_tokenizer import corpus_text  # noqa: E402  (the same synthetic corpus as the tokenizer tests)

TEMPLATES = os.path.join(os.path.dirname(__file__), "data", "chat_templates")
HAS_TIKTOKEN = importlib.util.find_spec("tiktoken") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_tiktoken = pytest.mark.skipif(not HAS_TIKTOKEN,
                                    reason="the GLM-4 tokenizer needs tiktoken (pip install tiktoken)")
needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers (the test extra) is the reference")
SPECIALS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
            "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
            "<|end_of_video|>", "sop", "eop")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "查询城市天气",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市"}},
                   "required": ["city"]}}}


def template_text(name: str) -> str:
    with open(os.path.join(TEMPLATES, name), encoding="utf-8") as f:
        return f.read()


def with_template(folder: str, template, **extra) -> None:
    """Put ``template`` into the folder's tokenizer_config.json, as a release folder carries it."""
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg.pop("chat_template", None)
    if template is not None:
        cfg["chat_template"] = template
    cfg.update(extra)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("chat_corpus") / "corpus.txt"
    path.write_text(corpus_text(lines=600), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def glm4(tmp_path_factory, corpus):
    """(tokenizer with glm-4-9b-chat's template, the same without one, the folder with the template)."""
    if not HAS_TIKTOKEN:
        pytest.skip("tiktoken is not installed")
    root = tmp_path_factory.mktemp("chat_glm4")
    bare = train([corpus], str(root / "bare"), 400, "glm4")
    folder = str(root / "templated")
    bare.save(folder)
    with_template(folder, template_text("glm-4-9b-chat.jinja"), eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    return load(folder), bare, folder


@pytest.fixture(scope="module")
def glm4_hf(glm4):
    """transformers' fast tokenizer for the same rank file and template (its own tiktoken converter)."""
    if not HAS_TRANSFORMERS:
        pytest.skip("transformers is not installed")
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from glm.tokenizer.glm4 import GLM4_SPECIALS, PAT_STR
    tok, _, folder = glm4
    fast = TikTokenConverter(vocab_file=os.path.join(folder, "tokenizer.model"), pattern=PAT_STR,
                             extra_special_tokens=list(GLM4_SPECIALS)).converted()
    hf = PreTrainedTokenizerFast(tokenizer_object=fast, chat_template=template_text("glm-4-9b-chat.jinja"),
                                 eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    assert [hf.convert_tokens_to_ids(s) for s in GLM4_SPECIALS] == [tok.token_id(s) for s in GLM4_SPECIALS]
    return hf


@pytest.fixture(scope="module")
def chatglm3(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("chat_chatglm3")
    bare = train([corpus], str(root / "bare"), 600, "chatglm3")
    folder = str(root / "templated")
    bare.save(folder)
    with_template(folder, template_text("chatglm3-6b.jinja"))
    return load(folder), bare, folder


def hf_render(template: str, messages, add_generation_prompt=True, **kwargs) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template
    chat = [{k: v for k, v in m.items() if v is not None} for m in messages]  # apply_chat_template's normalising
    rendered, _ = render_jinja_template([chat], chat_template=template, add_generation_prompt=add_generation_prompt,
                                        **kwargs)
    return rendered[0]


# ---- random conversations ---------------------------------------------------------------------------------

# Mixed scripts, emoji, combining marks, CJK punctuation, whitespace runs and template syntax as data.
ALPHABET = st.sampled_from(list("abcxyz XYZ019_-.,:;!?'\"{}[]()<>|/\\#*`~\t\n\r  你好世界中文，。、！？：；「」【】"
                                "😀👍🏽é\u0301ñ\u200b{%}")
                           + ["{{ x }}", "{% if %}", "\n\n", "    ", "def f():\n    return 1"])
TEXT = st.lists(ALPHABET, max_size=12).map("".join).filter(lambda s: not any(t in s for t in SPECIALS))
NAME = st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True).filter(lambda s: s not in ("sop", "eop"))


@st.composite
def function_tool(draw) -> dict:
    params = draw(st.dictionaries(NAME, st.fixed_dictionaries({"type": st.sampled_from(["string", "integer"]),
                                                               "description": TEXT}), max_size=3))
    fn = {"name": draw(NAME), "description": draw(TEXT)}
    if draw(st.booleans()):
        fn["parameters"] = {"type": "object", "properties": params, "required": sorted(params)[:1]}
    return {"type": "function", "function": fn}


TOOLS = st.lists(st.one_of(function_tool(), st.sampled_from([{"type": k} for k in GLM4_BUILTIN_TOOLS])), max_size=4)


@st.composite
def message(draw) -> dict:
    role = draw(st.sampled_from(["system", "user", "assistant", "observation"]))
    m: dict = {"role": role, "content": draw(st.one_of(st.just(""), TEXT))}
    if role == "assistant" and draw(st.booleans()):
        m["metadata"] = draw(st.one_of(st.just(""), NAME))
    if role == "system" and draw(st.integers(0, 2)) == 0:
        m["tools"] = draw(TOOLS)
        if draw(st.booleans()):
            m["content"] = None  # glm_server's tools-only system message
    return m


CONVERSATIONS = st.lists(message(), min_size=1, max_size=6)


@needs_tiktoken
@needs_transformers
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(messages=CONVERSATIONS, add_generation_prompt=st.booleans())
def test_glm4_template_equals_transformers_and_chat_ids(glm4, glm4_hf, messages, add_generation_prompt):
    tok, bare, _ = glm4
    template = template_text("glm-4-9b-chat.jinja")
    text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert text == hf_render(template, messages, add_generation_prompt)
    ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ids == glm4_hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                              tokenize=True, return_dict=False)
    # glm's own GLM-4 chat format (no template in the folder) builds the same ids, tools included
    assert bare.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == ids
    if add_generation_prompt:
        assert bare.chat_ids(messages=messages) == ids


@needs_transformers
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(st.builds(lambda r, c: {"role": r, "content": c},
                                   st.sampled_from(["system", "user", "assistant", "observation"]), TEXT),
                         min_size=1, max_size=5),
       add_generation_prompt=st.booleans())
def test_chatglm3_template_renders_as_transformers(chatglm3, messages, add_generation_prompt):
    tok, _, _ = chatglm3
    text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert text == hf_render(template_text("chatglm3-6b.jinja"), messages, add_generation_prompt)
    assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == \
        tok.encode_with_specials(text)


def test_chatglm3_template_is_not_build_chat_input(chatglm3):
    """ChatGLM3's released template writes the text "sop" and a space on each side of every newline;
    build_chat_input (glm's chat_ids) writes the sop token and no spaces. They never agree."""
    tok, bare, _ = chatglm3
    msgs = [{"role": "user", "content": "你好"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == "[gMASK]sop<|user|> \n 你好<|assistant|>"
    ids = tok.apply_chat_template(msgs)
    assert ids[:2] == [tok.token_id("[gMASK]"), *tok.encode("sop")[:1]] and tok.token_id("sop") not in ids
    assert ids != bare.apply_chat_template(msgs) == bare.chat_ids(messages=msgs)


# ---- the GLM-4 tool prompt against the released template --------------------------------------------------

@needs_transformers
@pytest.mark.parametrize("tools", [[WEATHER], [{"type": "python"}], [{"type": "simple_browser"}],
                                   [{"type": "cogview"}], [WEATHER, {"type": "python"}, {"type": "cogview"}], []])
def test_tool_prompt_is_the_release_render(tools):
    rendered = hf_render(template_text("glm-4-9b-chat.jinja"), [{"role": "system", "content": "", "tools": tools}],
                         add_generation_prompt=False)
    assert rendered == "[gMASK]<sop><|system|>" + glm4_tool_prompt(tools)


def test_tool_prompt_layout():
    text = glm4_tool_prompt([WEATHER])
    # trim_blocks leaves ONE newline between the heading and "## name" (the template source has two)
    assert text.startswith("\n你是一个名为 ChatGLM 的人工智能助手。")
    assert "# 可用工具\n## get_weather\n\n{\n    \"name\"" in text
    assert "查询城市天气" in text and text.endswith("\n在调用上述函数时，请使用 Json 格式表示调用的参数。")
    # every fixed text is the template's own
    template = template_text("glm-4-9b-chat.jinja")
    assert all(body in template for body in GLM4_BUILTIN_TOOLS.values())


@needs_tiktoken
def test_chat_ids_with_tools(glm4):
    tok, bare, _ = glm4
    msgs = [{"role": "system", "content": "你是助手", "tools": [WEATHER]}, {"role": "user", "content": "北京天气？"},
            {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'},
            {"role": "observation", "content": '{"temp": 20}'}]
    t, enc = bare.token_id, bare.encode
    assert bare.chat_ids(messages=msgs) == [
        t("[gMASK]"), t("<sop>"), t("<|system|>"), *enc(glm4_tool_prompt([WEATHER])), t("<|system|>"),
        *enc("\n你是助手"), t("<|user|>"), *enc("\n北京天气？"), t("<|assistant|>"),
        *enc('get_weather\n{"city": "北京"}'), t("<|observation|>"), *enc('\n{"temp": 20}'), t("<|assistant|>")]
    assert tok.apply_chat_template(msgs) == bare.chat_ids(messages=msgs)
    with pytest.raises(TokenizerError, match=r"message 0's tools\[0\] has type 'retrieval'; GLM-4 describes"):
        bare.chat_ids(messages=[{"role": "system", "content": "", "tools": [{"type": "retrieval"}]}])
    with pytest.raises(TokenizerError, match=r"tools\[0\] is a function tool without a 'function' object"):
        bare.chat_ids(messages=[{"role": "system", "content": "", "tools": [{"type": "function", "name": "f"}]}])


@needs_tiktoken
def test_chat_prompt_ids_puts_tools_where_the_release_reads_them(glm4):
    tok, bare, _ = glm4
    msgs = [{"role": "user", "content": "北京天气？"}]
    expected = bare.chat_ids(messages=[{"role": "system", "content": "", "tools": [WEATHER]}, *msgs])
    assert chat_prompt_ids(tok, msgs, [WEATHER]) == chat_prompt_ids(bare, msgs, [WEATHER]) == expected
    # the template itself ignores tools= (it reads a message's "tools"), as transformers renders it
    assert tok.apply_chat_template(msgs, tools=[WEATHER]) == tok.apply_chat_template(msgs)
    sys_first = attach_tools([{"role": "system", "content": "be brief"}, *msgs], [WEATHER])
    assert sys_first[0] == {"role": "system", "content": "be brief", "tools": [WEATHER]} and len(sys_first) == 2
    with pytest.raises(TokenizerError, match=r"tools\[0\] has type None"):
        chat_prompt_ids(tok, msgs, [{"name": "f"}])  # the template would drop it without a word


def test_chatglm3_tools_and_formats_without_tools(chatglm3, corpus, tmp_path):
    _, bare, _ = chatglm3
    tools = [{"name": "get_weather", "description": "天气", "parameters": {}}]
    msgs = [{"role": "user", "content": "hi"}]
    assert chat_prompt_ids(bare, msgs, tools) == bare.chat_ids(
        messages=[{"role": "system", "content": "", "tools": tools}, *msgs])
    tok2 = train([corpus], str(tmp_path / "c2"), 600, "chatglm2")
    with pytest.raises(TokenizerError, match="the chatglm2 chat format has no tools"):
        tok2.apply_chat_template(msgs, tools=tools)
    assert tok2.apply_chat_template(msgs) == tok2.chat_ids(messages=msgs)
    with pytest.raises(TokenizerError, match="add_generation_prompt=True"):
        tok2.apply_chat_template(msgs, add_generation_prompt=False)


# ---- parsing the model's reply ----------------------------------------------------------------------------

def test_parse_reply():
    tools = [WEATHER]
    call = parse_reply('get_weather\n{"city": "北京"}', tools)
    assert call == ToolCall("get_weather", '{"city": "北京"}') and call.args == {"city": "北京"}
    assert call.message() == {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'}
    # leading newline and surrounding space, multi-line JSON: re-serialised as glm_server does
    assert parse_reply('\n get_weather \n{\n  "city":"上海"\n}\n', tools) == ToolCall("get_weather", '{"city": "上海"}')
    # invalid JSON for a declared function: text
    assert parse_reply('get_weather\n{"city": 北京', tools) == 'get_weather\n{"city": 北京'
    # an undeclared name: text
    assert parse_reply('get_time\n{"zone": "UTC"}', tools) == 'get_time\n{"zone": "UTC"}'
    # plain text, and a second line that is not JSON
    assert parse_reply("  北京今天晴。\n", tools) == "北京今天晴。"
    assert parse_reply("get_weather\nsunny", tools) == "get_weather\nsunny"
    # built-in tools that glm_server accepts without JSON
    assert parse_reply('cogview\n{a cat', None) == ToolCall("cogview", '{"prompt": "{a cat"}')
    browse = parse_reply('simple_browser\n{"query": "x"}', [])
    assert browse == ToolCall("simple_browser", '{"query": "x"}')
    # a JSON value that is not an object is kept as its text
    assert parse_reply('get_weather\n{"a": 1} trailing', tools) == 'get_weather\n{"a": 1} trailing'
    with pytest.raises(TokenizerError, match="must be a str"):
        parse_reply(None, tools)  # type: ignore[arg-type]


def test_parse_chatglm3_reply():
    # ChatGLM3's tools are THUDM's demo layout (a bare name), or OpenAI style
    tools = [{"name": "track", "description": "stock price", "parameters": {"type": "object"}}, WEATHER]
    block = '```python\ntool_call(symbol="10111", days=[1, 2], exact=True)\n```'
    call = parse_reply("track\n" + block, tools, "chatglm3")
    assert call == ToolCall("track", '{"symbol": "10111", "days": [1, 2], "exact": true}', content=block)
    # the history keeps the code block, as the release's process_response does
    assert call.message() == {"role": "assistant", "metadata": "track", "content": block}
    weather = parse_reply('get_weather\n```python\ntool_call(city="北京")\n```\n', tools, "chatglm3")
    assert weather.args == {"city": "北京"}
    # a plain reply: empty metadata line, then the text
    assert parse_reply("\n 北京今天晴。\n", tools, "chatglm3") == "北京今天晴。"
    assert parse_reply("no newline", tools, "chatglm3") == "no newline"
    # not calls: an undeclared name, positional or non-literal arguments, another function, no code block
    for reply in ('get_time\n```python\ntool_call(zone="UTC")\n```',
                  'track\n```python\ntool_call("10111")\n```',
                  'track\n```python\ntool_call(symbol=__import__("os").getcwd())\n```',
                  'track\n```python\nprint(symbol="1")\n```',
                  'track\n```python\ntool_call(**{"a": 1})\n```',
                  'track\ntool_call(symbol="1")'):
        assert parse_reply(reply, tools, "chatglm3") == reply.strip(), reply
    with pytest.raises(TokenizerError, match="tool_format"):
        parse_reply("x", tools, "chatglm2")


# ---- where templates come from, and errors ----------------------------------------------------------------

@needs_tiktoken
def test_template_sources(glm4, tmp_path):
    _, bare, _ = glm4
    folder = str(tmp_path / "t")
    bare.save(folder)
    msgs = [{"role": "user", "content": "hi"}]
    with_template(folder, [{"name": "default", "template": "D{{ messages[0].content }}"},
                           {"name": "tool_use", "template": "T{{ tools | length }}{{ eos_token }}"}],
                  eos_token={"content": "<|endoftext|>", "special": True})
    tok = load(folder)
    assert tok.apply_chat_template(msgs, tokenize=False) == "Dhi"
    assert tok.apply_chat_template(msgs, tools=[WEATHER], tokenize=False) == "T1<|endoftext|>"
    assert tok.apply_chat_template(msgs, tokenize=False, chat_template="tool_use", tools=[]) == "T0<|endoftext|>"
    assert tok.apply_chat_template(msgs, tokenize=False, eos_token="X", chat_template="tool_use", tools=[]) == "T0X"
    assert tok.apply_chat_template(msgs, tokenize=False, chat_template="{{ 'own' }}") == "own"
    # chat_template.jinja wins over tokenizer_config.json, as in transformers' from_pretrained
    with open(os.path.join(folder, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write("{% for m in messages %}<|{{ m.role }}|>{{ m.content | upper }}{% endfor %}")
    assert tok.apply_chat_template(msgs) == [tok.token_id("<|user|>"), *tok.encode("HI")]
    assert read_chat_templates(folder).files == {"default": os.path.join(folder, "chat_template.jinja")}
    # no template at all: glm's own chat format, decoded for tokenize=False
    assert bare.apply_chat_template(msgs, tokenize=False) == bare.decode(bare.chat_ids(messages=msgs))


def test_transformers_environment():
    """The globals and filters transformers gives a template."""
    out = render("{{ x | tojson }}|{{ y | tojson(indent=2) }}|{{ dict(a=1) | tojson }}|{% for i in range(5) %}"
                 "{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}|{% set ns = namespace(n=0) %}"
                 "{% set ns.n = 3 %}{{ ns.n }}|{{ strftime_now('%Y') | length }}|{% generation %}g{% endgeneration %}",
                 [], where="t", x="中<>&", y=[1])
    assert out == '"中<>&"|[\n  1\n]|{"a": 1}|01|3|4|g'


@pytest.mark.parametrize("template,match", [
    ("{% if messages %}", r"line 1\): TemplateSyntaxError"),
    ("{{ raise_exception('only user and assistant roles') }}", "TemplateError: only user and assistant roles"),
    ("{{ messages[0].content.__class__.__mro__ }}", "SecurityError: access to attribute"),
    ("{{ messages[0].content + 1 }}", "TypeError"),
])
def test_template_that_fails_to_render(chatglm3, tmp_path, template, match):
    _, bare, _ = chatglm3
    folder = str(tmp_path / "bad")
    bare.save(folder)
    with_template(folder, template)
    tok = load(folder)
    where = os.path.join(folder, "tokenizer_config.json")
    with pytest.raises(TokenizerError, match=rf"^{__import__('re').escape(where)}: chat_template: the chat template "
                                             rf"failed to render.*({match})") as e:
        tok.apply_chat_template([{"role": "user", "content": "hi"}], x=object())
    assert "\n" not in str(e.value).split(": ", 1)[0]


def test_bad_template_entries(chatglm3, tmp_path):
    _, bare, _ = chatglm3
    folder = str(tmp_path / "bad")
    bare.save(folder)
    with_template(folder, 3)
    with pytest.raises(TokenizerError, match="chat_template is a int; it must be a Jinja string"):
        load(folder).apply_chat_template([{"role": "user", "content": "hi"}])
    with_template(folder, [{"name": "x", "template": "a"}, {"name": "y", "template": "b"}])
    with pytest.raises(TokenizerError, match="none named 'default'; pass chat_template= one of x, y"):
        load(folder).apply_chat_template([{"role": "user", "content": "hi"}])


def test_load_tools(tmp_path):
    path = tmp_path / "tools.json"
    path.write_text(json.dumps({"tools": [WEATHER]}), encoding="utf-8")
    assert load_tools(str(path)) == [WEATHER]
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(TokenizerError, match="tools.json: expected a JSON list of tool objects"):
        load_tools(str(path))
    path.write_text("[{", encoding="utf-8")
    with pytest.raises(TokenizerError, match="tools.json: not valid JSON"):
        load_tools(str(path))
    with pytest.raises(TokenizerError, match="no such file"):
        load_tools(str(tmp_path / "missing.json"))
    with pytest.raises(TokenizerError, match="tools must be a list"):
        check_tools({"type": "python"})


@needs_tiktoken
@pytest.mark.parametrize("layout", ["config", "config-list", "files"])
def test_save_keeps_the_chat_template(glm4, tmp_path, layout):
    """A folder's templates travel with save(), in the layout they were read from, so the saved folder
    renders the same text and ids."""
    _, bare, _ = glm4
    src = str(tmp_path / "src")
    bare.save(src)
    release, tool_use = template_text("glm-4-9b-chat.jinja"), "T{{ tools | length }}{{ eos_token }}"
    if layout == "config":
        with_template(src, release, eos_token="<|endoftext|>")
    elif layout == "config-list":
        with_template(src, [{"name": "default", "template": release}, {"name": "tool_use", "template": tool_use}],
                      eos_token="<|endoftext|>")
    else:
        with_template(src, None, eos_token="<|endoftext|>")
        os.makedirs(os.path.join(src, "additional_chat_templates"))
        for name, text in (("chat_template.jinja", release), ("additional_chat_templates/tool_use.jinja", tool_use)):
            with open(os.path.join(src, name), "w", encoding="utf-8") as f:
                f.write(text)
    tok = load(src)
    saved = str(tmp_path / "saved")
    tok.save(saved)
    again = load(saved)
    msgs = [{"role": "system", "content": "", "tools": [WEATHER]}, {"role": "user", "content": "北京天气？"},
            {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'},
            {"role": "observation", "content": '{"temp": 20}'}]
    for tools in (None, [WEATHER]):
        text = tok.apply_chat_template(msgs, tools=tools, tokenize=False)
        assert again.apply_chat_template(msgs, tools=tools, tokenize=False) == text
        assert again.apply_chat_template(msgs, tools=tools) == tok.apply_chat_template(msgs, tools=tools)
    assert text.startswith("[gMASK]<sop>") if layout == "config" else text == "T1<|endoftext|>"
    assert os.path.exists(os.path.join(saved, "chat_template.jinja")) == (layout == "files")
    # A template file already in the target folder would override a template saved in tokenizer_config.json;
    # one saved as a file replaces it.
    other = tmp_path / "other"
    other.mkdir()
    (other / "chat_template.jinja").write_text("{{ 'stale' }}", encoding="utf-8")
    if layout == "files":
        tok.save(str(other))
        assert load(str(other)).apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(msgs,
                                                                                                     tokenize=False)
    else:
        with pytest.raises(TokenizerError, match="chat_template.jinja: a chat template"):
            tok.save(str(other))
    again.save(saved)  # saving again over its own files is fine
