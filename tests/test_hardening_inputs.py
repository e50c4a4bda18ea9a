"""Bad generation inputs, options and devices: each one InputError (one line from the CLI), never
garbage with exit 0 or a traceback from deep inside torch; glm chat survives bad lines and long
histories."""
import importlib
import io
import os
import random
import sys

import pytest
import torch
from conftest import reference_dir

import glm
from glm.cli import main
from glm.errors import InputError
from glm.generate import SamplingConfig, StaticDecoder, generate, infill_ids, left_pad, stream_text
from glm.parity import run_parity

MISSING = "/nonexistent/glm-checkpoint"  # options are checked before the model is loaded


def _tiny(name="tiny-chatglm3", **overrides):
    model = glm.GLM(glm.preset(name).replace(**overrides)).eval()
    model.init_weights(std=0.3, seed=0)
    return model


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


# ---------------------------------------------------------------------------------------------
# Numeric options: type and range up front, in the API and the CLI

BAD_SAMPLING = [
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", -0.5), ("temperature", True),
    ("temperature", "1"), ("repetition_penalty", float("nan")), ("repetition_penalty", float("inf")),
    ("repetition_penalty", 0.0), ("top_p", float("nan")), ("top_p", 1.5), ("top_k", 2.5), ("top_k", True),
    ("top_k", -1), ("max_new_tokens", 0), ("max_new_tokens", 2.5), ("max_new_tokens", True), ("seed", 1.5),
    ("seed", 2 ** 64), ("seed", "7"), ("eos_token_ids", [True]), ("eos_token_ids", [-1]),
    ("eos_token_ids", [10 ** 6]),
]


@pytest.mark.parametrize("name,value", BAD_SAMPLING, ids=[f"{n}={v!r}" for n, v in BAD_SAMPLING])
def test_sampling_arguments_out_of_range_are_refused(name, value):
    """NaN penalties and temperatures sampled garbage without an error; floats, bools and strings
    were truncated or failed inside torch. Each is one InputError naming the argument."""
    model = _tiny()
    kw = dict(max_new_tokens=2, temperature=1.0)
    kw[name] = value
    with pytest.raises(InputError, match=name):
        generate(model, torch.tensor([[1, 2, 3]]), **kw)


def test_sampling_config_checks_types_and_unknown_names():
    model = _tiny()
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(InputError, match=r"unknown argument\(s\) temprature"):
        generate(model, ids, max_new_tokens=2, temprature=1.0)
    with pytest.raises(InputError, match="sampling must be a SamplingConfig"):
        generate(model, ids, sampling={"max_new_tokens": 2})
    for name in ("cuda_graphs", "static", "compile"):  # bool("no") is True
        with pytest.raises(InputError, match=f"{name} must be True or False"):
            generate(model, ids, max_new_tokens=2, **{name: "no"})
    # The caller's config is left as it was; a valid one still works.
    cfg = SamplingConfig(max_new_tokens=2, top_k=None)
    assert generate(model, ids, sampling=cfg).shape == (1, 2) and cfg.top_k is None


def test_a_tiny_temperature_samples_the_argmax_instead_of_failing():
    # logits / 1e-40 overflowed to inf, and inf - inf gave NaN probabilities (a RuntimeError).
    model = _tiny()
    ids = torch.tensor([[1, 2, 3]])
    greedy = generate(model, ids, max_new_tokens=4, eos_token_ids=())
    assert torch.equal(generate(model, ids, max_new_tokens=4, eos_token_ids=(), temperature=1e-40, seed=0), greedy)


@pytest.mark.parametrize("option,value", [("--repetition-penalty", "nan"), ("--temperature", "nan"),
                                          ("--temperature", "inf"), ("--top-p", "nan"), ("--max-new-tokens", "0")])
@pytest.mark.parametrize("command", ["generate", "infill", "chat"])
def test_cli_numeric_options_are_checked_before_loading(command, option, value, capsys):
    text = {"generate": ["--prompt", "hi"], "infill": ["--text", "a [MASK]"], "chat": []}[command]
    assert main([command, MISSING, *text, option, value]) == 2
    name = option if option == "--max-new-tokens" else option[2:].replace("-", "_")
    _one_line_error(capsys, f"{name} must be", value)


@pytest.mark.parametrize("atol", ["inf", "nan", "0", "-1"])
def test_parity_atol_must_be_finite_and_positive(atol, capsys):
    # inf passed every case whatever the logits.
    assert main(["parity", reference_dir("chatglm3-6b"), "--atol", atol]) == 2
    _one_line_error(capsys, "atol must be a finite number > 0")


# ---------------------------------------------------------------------------------------------
# Text that is not UTF-8, devices that cannot run

@pytest.mark.parametrize("command,flag", [("generate", "--prompt"), ("infill", "--text"), ("chat", "--system")])
def test_cli_text_that_is_not_utf8_is_one_line(command, flag, capsys):
    # Python decodes argv with surrogateescape: the byte 0xff arrives as the lone surrogate U+DCFF.
    args = [command, MISSING, flag, "the \udcff cat"]
    if command == "infill":
        args = [command, MISSING, "--text", "the \udcff [MASK]"]
    assert main(args) == 2
    _one_line_error(capsys, f"{flag} is not valid UTF-8 text")


@pytest.mark.parametrize("device", ["meta", "lazy", "meta:0"])
@pytest.mark.parametrize("command", ["generate", "parity"])
def test_cli_devices_that_cannot_run(command, device, capsys):
    args = ["generate", MISSING, "--prompt", "hi"] if command == "generate" else ["parity", reference_dir("glm")]
    assert main([*args, "--device", device]) == 2
    _one_line_error(capsys, f"--device {device} ", "cannot run")


def test_a_model_on_the_meta_device_is_refused():
    with torch.device("meta"):
        model = glm.GLM(glm.preset("tiny-chatglm3"))
    with pytest.raises(InputError, match="meta device"):
        model(torch.tensor([[1, 2, 3]], device="meta"))
    with pytest.raises(InputError, match="meta device"):
        generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=2)
    with torch.device("meta"):
        glm_model = glm.GLM(glm.preset("tiny-glm"))
    with pytest.raises(InputError, match="meta device"):
        infill_ids(glm_model, [5, 3], mask_ids=[3], sop_id=4, eop_id=6, max_span_tokens=2)


# ---------------------------------------------------------------------------------------------
# Tensors of the wrong kind, caches of another model

@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int8, torch.float32, torch.bool])
def test_ids_of_other_dtypes_name_int64_or_int32(dtype):
    model = _tiny()
    ids = torch.tensor([[1, 0, 1]]).to(dtype)
    for call in (lambda: model(ids), lambda: generate(model, ids, max_new_tokens=2)):
        with pytest.raises(InputError, match=rf"input_ids .*int64 or int32, got {dtype}"):
            call()
    assert generate(model, ids.long().int(), max_new_tokens=2, repetition_penalty=1.2).shape[0] == 1


def test_wrongly_typed_structure_arguments():
    model = _tiny()
    ids = torch.tensor([[1, 2, 3]])
    cases = [dict(pad_left=True), dict(pad_left=torch.tensor([True])), dict(prefix_len=torch.tensor([1.5])),
             dict(position_ids=torch.tensor([[0.0, 0.5, 1.0]])), dict(position_ids=[[0, 1, 2]])]
    for kw in cases:
        name = next(iter(kw))
        with pytest.raises(InputError, match=name):
            model(ids, **kw)
        with pytest.raises(InputError, match=name):
            generate(model, ids, max_new_tokens=2, **kw)
    with pytest.raises(InputError, match="input_ids must be a torch tensor"):
        generate(model, [[1, 2, 3]], max_new_tokens=2)
    with pytest.raises(InputError, match=r"input_ids must be \[batch, seq\]"):
        model(torch.tensor([1, 2, 3]))


def test_a_kv_cache_from_another_model_is_named():
    model = _tiny()
    ids = torch.tensor([[1, 2, 3]])
    for other in (_tiny(num_layers=1), _tiny(num_kv_heads=4), _tiny(head_dim=8)):
        cache = other.new_cache(1, 8)
        with pytest.raises(InputError, match="the KV cache was made for another model"):
            model(ids, cache=cache)
        with pytest.raises(InputError, match="the KV cache was made for another model"):
            StaticDecoder(model, cache)
    with pytest.raises(InputError, match="cache must be a glm KVCache"):
        model(ids, cache={"k": None})
    # Same tensor shapes, but a sequence of a model with 2D positions (GLM's block positions).
    two_d = _tiny("tiny-glm")
    if (two_d.config.num_layers, two_d.config.num_kv_heads, two_d.config.head_dim) == \
            (model.config.num_layers, model.config.num_kv_heads, model.config.head_dim):
        cache = two_d.new_cache(1, 8)
        two_d(ids, cache=cache)
        with pytest.raises(InputError, match="position stream"):
            model(torch.tensor([[4]]), cache=cache)
    cache = model.new_cache(1, 8)
    model(ids, cache=cache)
    dec = StaticDecoder(model, cache)
    with pytest.raises(InputError, match="tokens must be an int64 or int32 tensor"):
        dec.step(torch.tensor([1.7]), torch.tensor([[3]]))


def test_infill_ids_must_be_ints_in_the_vocabulary():
    model = _tiny("tiny-glm")
    kw = dict(mask_ids=[3], sop_id=4, eop_id=6, max_span_tokens=2)
    with pytest.raises(InputError, match="tokens must be token ids"):
        infill_ids(model, [5.5, 3], **kw)  # int(5.5) was taken as 5
    with pytest.raises(InputError, match="tokens must be a list of token ids"):
        infill_ids(model, "the [MASK]", **kw)
    with pytest.raises(InputError, match="max_span_tokens must be >= 1, an integer"):
        infill_ids(model, [5, 3], **{**kw, "max_span_tokens": 2.5})
    with pytest.raises(InputError, match="mask_ids must be a list"):
        infill_ids(model, [5, 3], **{**kw, "mask_ids": 3})
    # A 1-D id tensor is a list of ids.
    a = infill_ids(model, torch.tensor([5, 3]), **kw)
    assert a == infill_ids(model, [5, 3], **kw)


def test_stream_text_names_max_new_tokens_for_2d_families():
    model = _tiny("tiny-glm")
    tok = type("Tok", (), dict(eos_ids=(1,), sop_id=4, eop_id=6, cls_id=None, mask_ids={"MASK": 3}))()
    with pytest.raises(InputError, match="max_new_tokens must be >= 1"):
        list(stream_text(model, tok, [5, 3], max_new_tokens=0))
    with pytest.raises(InputError, match="prompt_ids must be token ids"):
        list(stream_text(model, tok, [5, 3.5], max_new_tokens=2))


def test_repetition_penalty_with_left_padding_equals_rows_alone():
    """The pads of a left-padded row were penalised as tokens of the row: with pad_id a token the row
    would pick, the batch picked something else than the row alone."""
    model = _tiny()
    prompts = [[4, 8, 15, 16, 23, 42], [7, 9]]
    kw = dict(max_new_tokens=4, eos_token_ids=(), repetition_penalty=50.0)
    alone = [generate(model, torch.tensor([p]), **kw)[0] for p in prompts]
    ids, pad = left_pad(prompts, pad_id=int(alone[1][0]))
    batched = generate(model, ids, pad_left=pad, **kw)
    for i in range(len(prompts)):
        assert torch.equal(batched[i], alone[i]), i


# ---------------------------------------------------------------------------------------------
# glm chat: bad lines and histories that outgrow the positions

@pytest.fixture(scope="module")
def short_chat_model(tmp_path_factory):
    """A ChatGLM3 checkpoint with only 48 positions and a trained tokenizer."""
    from glm.tokenizer import load

    root = tmp_path_factory.mktemp("short-chat")
    rng = random.Random(0)
    words = "the cat dog sat on a mat red blue green one two three".split() + [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 6))) for _ in range(200)]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) for _ in range(800)))
    assert main(["train-tokenizer", str(corpus), str(root / "tok"), "--vocab-size", "300",
                 "--family", "chatglm3"]) == 0
    tok = load(str(root / "tok"))
    model = _tiny(vocab_size=tok.vocab_size, max_positions=48)
    model.save_pretrained(str(root / "model"), format="hf")
    tok.save(str(root / "model"))
    return str(root / "model")


def _chat(monkeypatch, folder, data: bytes, *args):
    """Run glm chat on ``data`` as its stdin bytes; returns the prompts given to stream_text."""
    gen_mod = importlib.import_module("glm.generate")
    real, prompts = gen_mod.stream_text, []

    def spy(model, tok, prompt_ids, **kw):
        prompts.append((list(prompt_ids), kw["max_new_tokens"]))
        return real(model, tok, prompt_ids, **kw)

    monkeypatch.setattr(gen_mod, "stream_text", spy)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    assert main(["chat", folder, *args]) == 0
    return prompts


def test_chat_skips_a_line_that_is_not_utf8(short_chat_model, monkeypatch, capsys):
    prompts = _chat(monkeypatch, short_chat_model, b"the cat\n\xff\xfe dog\nred\n", "--max-new-tokens", "2")
    out, err = capsys.readouterr()
    assert "line 2 is not valid UTF-8 text; skipped it" in err and "Traceback" not in err
    assert out.count("glm> ") == 2 and len(prompts) == 2


def test_chat_drops_the_oldest_turns_when_the_history_outgrows_the_positions(short_chat_model, monkeypatch,
                                                                              capsys):
    # A ChatGLM3 turn takes ~20 of the 48 positions: the history holds one turn beside the new message.
    prompts = _chat(monkeypatch, short_chat_model, b"red\n" * 6, "--max-new-tokens", "6")
    out, err = capsys.readouterr()
    assert out.count("glm> ") == 6, "every message got a reply"
    assert "oldest turn" in err and "outgrew the model's 48 positions" in err and "Traceback" not in err
    assert all(len(ids) + n <= 48 for ids, n in prompts)
    assert len(prompts[-1][0]) > len(prompts[0][0])  # some history was kept

    # A message that does not fit even alone: one line, and the session goes on.
    long = b" ".join([b"the cat sat on a mat"] * 12) + b"\n"
    prompts = _chat(monkeypatch, short_chat_model, long + b"red\n", "--max-new-tokens", "6")
    out, err = capsys.readouterr()
    assert "the message does not fit" in err and "48 positions" in err
    assert out.count("glm> ") == 1 and len(prompts) == 1


def test_parity_cases_file_that_is_a_fifo_or_malformed(tmp_path):
    """A FIFO at cases.json blocked open() forever; cases that are not objects or tensors that do not
    fit each other failed inside the harness."""
    import json
    import shutil

    from glm.checkpoint import CheckpointError
    from glm.files import FileKindError

    src = reference_dir("chatglm3-6b")
    model = _tiny()  # the fixture's shapes; its weights do not matter for these errors
    shutil.copy(os.path.join(src, "cases.safetensors"), tmp_path / "cases.safetensors")
    os.mkfifo(tmp_path / "cases.json")
    with pytest.raises(FileKindError, match="FIFO"):
        run_parity(model, cases=str(tmp_path / "cases.json"))
    os.remove(tmp_path / "cases.json")
    (tmp_path / "cases.json").write_text(json.dumps({"cases": [1, 2]}))
    with pytest.raises(CheckpointError, match="'cases' list of objects"):
        run_parity(model, cases=str(tmp_path / "cases.json"))
    with open(os.path.join(src, "cases.json")) as f:
        meta = json.load(f)
    case = next(c for c in meta["cases"] if c["kind"] == "decode")
    case["outputs"]["tokens"] = case["inputs"]["input_ids"]  # a reference of another shape than the steps
    case["inputs"]["steps"] = 50
    (tmp_path / "cases.json").write_text(json.dumps({"cases": [case]}))
    with pytest.raises(CheckpointError, match="case 'decode': the case's tensors do not fit together"):
        run_parity(model, cases=str(tmp_path / "cases.json"))
