"""`glm chat --tools`: the tools reach the prompt, a reply that is a tool call is shown as one, and the next
line goes back to the model as the tool's result (an observation turn)."""
import importlib
import io
import json
import sys

import pytest
from conftest import char_model_folder

import glm
from glm.cli import main
from glm.tokenizer import load
from glm.tokenizer import train as train_tokenizer
from glm.tokenizer.tools import chat_prompt_ids

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "天气 of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def glm4_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    corpus = root / "corpus.txt"
    corpus.write_text("the weather in paris is sunny. 北京 天气 晴. get_weather city {\"city\": \"x\"}\n" * 200,
                      encoding="utf-8")
    tok = train_tokenizer([str(corpus)], str(root / "tok"), 300, "glm4")
    cfg = glm.preset("tiny-glm4-chatglm")
    # Room for the tool prompt (the release's system text and the tool's JSON).
    model = glm.GLM(cfg.replace(vocab_size=max(tok.vocab_size, cfg.vocab_size), max_positions=2048))
    model.init_weights(seed=0)
    folder = str(root / "model")
    model.save_pretrained(folder)
    tok.save(folder)
    tools = root / "tools.json"
    tools.write_text(json.dumps(TOOLS, ensure_ascii=False), encoding="utf-8")
    return folder, str(tools)


def scripted_chat(monkeypatch, capsys, folder: str, tools: str, replies: list[str], lines: str):
    """`glm chat FOLDER --tools TOOLS` with ``lines`` typed and the model answering ``replies`` in turn:
    (exit code, the prompt ids of each turn, stdout, stderr)."""
    gen = importlib.import_module("glm.generate")
    prompts = []
    answers = iter(replies)

    def fake_stream(model, tok, ids, **kw):
        prompts.append(list(ids))
        yield next(answers)

    monkeypatch.setattr(gen, "stream_text", fake_stream)
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    rc = main(["chat", folder, "--tools", tools, "--max-new-tokens", "4"])
    out, err = capsys.readouterr()
    return rc, prompts, out, err


def test_a_tool_call_is_shown_and_the_next_line_is_its_result(glm4_folder, capsys, monkeypatch):
    folder, tools = glm4_folder
    rc, prompts, out, err = scripted_chat(monkeypatch, capsys, folder, tools,
                                          ['get_weather\n{"city": "Paris"}', "It is sunny."],
                                          "weather in Paris?\n{\"sky\": \"sunny\"}\n")
    assert rc == 0, err
    assert "(tool call: get_weather" in out and out.count("glm> ") == 2, err
    tok = load(folder)
    first = [{"role": "user", "content": "weather in Paris?"}]
    assert prompts[0] == chat_prompt_ids(tok, first, TOOLS)
    # The second prompt holds the call as an assistant turn with the tool's name, then the observation.
    second = first + [{"role": "assistant", "metadata": "get_weather", "content": '{"city": "Paris"}'},
                      {"role": "observation", "content": '{"sky": "sunny"}'}]
    assert prompts[1] == chat_prompt_ids(tok, second, TOOLS)
    assert "get_weather" in tok.decode(prompts[0])  # the tool prompt is in the model's input


def test_tools_on_a_format_without_tool_calling_is_one_error(tmp_path, capsys):
    folder, _ = char_model_folder(tmp_path, "a b c d e f g\n" * 50)
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS), encoding="utf-8")
    assert main(["chat", folder, "--tools", str(tools)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tools" in err


def test_a_bad_tools_file_is_one_error_naming_it(glm4_folder, tmp_path, capsys):
    folder, _ = glm4_folder
    bad = tmp_path / "tools.json"
    bad.write_text("[{\"type\": \"function\"", encoding="utf-8")
    assert main(["chat", folder, "--tools", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tools.json" in err


CHATGLM3_TOOLS = [{"name": "track", "description": "stock price",
                   "parameters": {"type": "object", "properties": {"symbol": {"type": "string"}}}}]


def test_chatglm3_tool_calls_keep_the_release_s_history(tmp_path, capsys, monkeypatch):
    # ChatGLM3 calls a tool with a code block; the history keeps the block and the next line is the result.
    text = json.dumps(CHATGLM3_TOOLS, indent=4) + " stock price of 10111? tool_call(symbol=\"10111\") `\n" * 3
    folder, tok = char_model_folder(tmp_path, text, family="chatglm3", max_positions=1024)
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(CHATGLM3_TOOLS), encoding="utf-8")
    block = '```python\ntool_call(symbol="10111")\n```'
    rc, prompts, out, err = scripted_chat(monkeypatch, capsys, folder, str(tools), ["track\n" + block, "\n 12.5"],
                                          "price of 10111?\n{\"price\": 12.5}\n")
    assert rc == 0, err
    assert '(tool call: track {"symbol": "10111"}' in out, out
    first = [{"role": "user", "content": "price of 10111?"}]
    assert prompts[0] == chat_prompt_ids(tok, first, CHATGLM3_TOOLS)
    second = first + [{"role": "assistant", "metadata": "track", "content": block},
                      {"role": "observation", "content": '{"price": 12.5}'}]
    assert prompts[1] == chat_prompt_ids(tok, second, CHATGLM3_TOOLS)
