"""The user-facing commands end to end on tiny models with tiny trained tokenizers."""
import importlib
import io
import json
import os
import random
import sys

import pytest

import glm
from glm.cli import main
from glm.tokenizer import load

WORDS = "the cat dog sat on a mat red blue green one two three 猫 狗 红 蓝 天 地 人 大 小 上 下".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    extra = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7))) for _ in range(300)]
    words = WORDS + extra + [chr(0x4E00 + i) for i in range(0, 120, 3)]
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(1500)),
                    encoding="utf-8")
    return str(path)


PRESET = {"glm": "tiny-glm", "chatglm": "tiny-chatglm", "chatglm3": "tiny-chatglm3"}


@pytest.fixture(scope="module", params=list(PRESET))
def checkpoint(request, corpus, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"ckpt-{family}")
    tok_dir = root / "tok"
    assert main(["train-tokenizer", corpus, str(tok_dir), "--vocab-size", "480", "--family", family]) == 0
    tok = load(str(tok_dir))
    assert tok.vocab_size == 480
    model = glm.GLM(glm.preset(PRESET[family]).replace(vocab_size=tok.vocab_size)).eval()
    model.init_weights(std=0.3, seed=0)
    model.save_pretrained(str(root / "model"), format="hf")
    tok.save(str(root / "model"))
    return family, str(root / "model")


def test_generate_streams_text(checkpoint, capsys, monkeypatch):
    """The CLI wraps the prompt the release's way (tok.build_inputs) and prints exactly what the library
    generates for it. The ids reaching stream_text are recorded, so a dropped or wrong wrapping fails
    for every family, not only where it happens to change the sampled text."""
    gen_mod = importlib.import_module("glm.generate")  # glm.generate is the function, not the module
    real = gen_mod.stream_text
    fed = []

    def spy(model, tok, prompt_ids, **kw):
        fed.append(list(prompt_ids))
        return real(model, tok, prompt_ids, **kw)

    monkeypatch.setattr(gen_mod, "stream_text", spy)
    family, d = checkpoint
    assert main(["generate", d, "--prompt", "the cat", "--max-new-tokens", "5", "--temperature", "2.0",
                 "--seed", "1"]) == 0
    out = capsys.readouterr().out
    tok, model = load(d), glm.from_pretrained(d)
    plain = tok.encode("the cat")
    wrapped = tok.build_inputs(plain)
    assert wrapped != plain  # every family's release wraps a prompt (else the check below proves nothing)
    assert fed == [wrapped]
    want = "".join(real(model, tok, wrapped, max_new_tokens=5, temperature=2.0, seed=1))
    assert out == want + "\n"


def test_generate_is_seeded(checkpoint, capsys):
    _, d = checkpoint
    args = ["generate", d, "--prompt", "the dog", "--max-new-tokens", "6", "--temperature", "1.0", "--seed", "3"]
    main(args)
    a = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == a


def test_infill_keeps_the_text_around_the_blank(checkpoint, capsys):
    family, d = checkpoint
    if family == "chatglm3":
        assert main(["infill", d, "--text", "the [MASK] sat"]) == 2
        assert "2D positions" in capsys.readouterr().err
        return
    assert main(["infill", d, "--text", "the [MASK] sat on a mat", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("the") and out.endswith("sat on a mat") and "[MASK]" not in out


def test_chat_from_a_pipe_keeps_history_and_resets(checkpoint, capsys, monkeypatch):
    family, d = checkpoint
    if family == "glm":
        pytest.skip("original GLM has no chat format")
    monkeypatch.setattr(sys, "stdin", io.StringIO("the cat\nred dog\n/reset\nblue\n"))
    calls = []
    tok_cls = type(load(d))
    real = tok_cls.chat_ids

    def spy(self, query=None, history=(), system=None, **kw):
        calls.append((query, list(history)))
        return real(self, query, history=history, system=system, **kw)

    monkeypatch.setattr(tok_cls, "chat_ids", spy)
    assert main(["chat", d, "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("glm> ") == 3 and "(history cleared)" in out
    assert [q for q, _ in calls] == ["the cat", "red dog", "blue"]
    assert len(calls[1][1]) == 1 and calls[1][1][0][0] == "the cat"
    assert calls[2][1] == []


def test_cuda_graphs_flag(checkpoint, capsys):
    """--no-cuda-graphs generates as the default does on CPU; --cuda-graphs on CPU is a one-line error."""
    _, d = checkpoint
    args = ["generate", d, "--prompt", "the cat", "--max-new-tokens", "4"]
    assert main(args) == 0
    default = capsys.readouterr().out
    assert main(args + ["--no-cuda-graphs"]) == 0
    assert capsys.readouterr().out == default
    assert main(args + ["--cuda-graphs"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA device" in err


def test_missing_tokenizer_is_a_clear_error(tmp_path, capsys):
    model = glm.GLM(glm.preset("tiny-chatglm3"))
    model.save_pretrained(str(tmp_path / "m"), format="hf")
    assert main(["generate", str(tmp_path / "m"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenizer" in err.lower()


def test_train_tokenizer_bad_corpus(tmp_path, capsys):
    assert main(["train-tokenizer", str(tmp_path / "nope.txt"), str(tmp_path / "t"), "--vocab-size", "100",
                 "--family", "chatglm2"]) == 2
    assert "nope.txt" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# glm bench: each suite's smoke run writes a record with the peer ratio and the device ceiling


@pytest.mark.parametrize("suite", ["attention", "decode", "train", "convert"])
def test_bench_quick_writes_summary_and_ceiling(suite, tmp_path, capsys):
    from glm import kernels

    if suite == "attention" and not kernels.available():
        pytest.skip(f"glm.kernels not built: {kernels.load_error()}")
    assert main(["bench", suite, "--quick", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / f"{suite}_cpu.json").read_text())
    assert record["benchmark"] == suite and record["torch"] and record["git_sha"] and record["device"]
    assert record["summary"] and all(r["ours"] > 0 and r["peer"] > 0 and r["ratio"] > 0 for r in record["summary"])
    assert record["ceiling"]["value"] > 0 and record["ceiling"]["unit"] in ("GB/s", "TFLOP/s")
    assert (tmp_path / f"{suite}_cpu.png").exists()
    table = capsys.readouterr().out
    assert "device ceiling" in table and record["summary"][0]["case"] in table


def test_bench_errors_are_one_line(tmp_path, capsys):
    assert main(["bench", "convert", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "convert benchmark" in capsys.readouterr().err
    # Arguments after -- reach the script; a bad one fails the run with the script's status.
    assert main(["bench", "train", "--out", str(tmp_path), "--", "--no-such-flag"]) == 2
    assert "exited with status 2" in capsys.readouterr().err


def test_bench_report_collects_the_records(tmp_path, capsys):
    results = tmp_path / "results"
    assert main(["bench", "train", "--quick", "--out", str(results)]) == 0
    assert main(["bench", "report", "--out", str(results)]) == 0
    page = (tmp_path / "README.md").read_text()
    assert "## CPU" in page and "### train" in page and "![train on cpu](results/train_cpu.png)" in page
    assert "No GPU records yet" in page


@pytest.fixture
def attention_bench(bench_script):
    return bench_script("attention")


def test_bench_attention_flex_smoke(tmp_path, capsys):
    # Issue 9's glm vs FlexAttention vs SDPA section at a tiny size on CPU (Flex eager, forward only).
    from glm import kernels

    if not kernels.available():
        pytest.skip(f"glm.kernels not built: {kernels.load_error()}")
    assert main(["bench", "attention", "--quick", "--out", str(tmp_path), "--", "--flex", "--seqs", "64",
                 "--dtypes", "bfloat16", "--batch", "1", "--heads", "2", "--dim", "32"]) == 0
    record = json.loads((tmp_path / "attention_cpu.json").read_text())
    assert "FlexAttention" in record["comparison"] and "NOT measured" in record["reference"]["what"]
    rows = {(r["mask"], r["pass"]): r for r in record["results"]}
    assert set(rows) == {(m, p) for m in ("prefix", "causal") for p in ("fwd", "fwd+bwd")}
    for r in rows.values():
        assert set(r["ms"]) == ({"glm", "flex", "sdpa"} if r["pass"] == "fwd" else {"glm", "sdpa"})
        assert all(e < record["guard"]["max_rel_error"] for e in r["rel_error"].values()) and not r["refused"]
        assert r["glm/sdpa"] == pytest.approx(r["ms"]["sdpa"] / r["ms"]["glm"])
    assert "backward on CPU" in record["skipped"]["flex"][0]  # said why, not silently dropped
    cases = [s["case"] for s in record["summary"]]
    assert "bfloat16 T=64 prefix fwd vs flex" in cases and "bfloat16 T=64 prefix fwd+bwd vs sdpa" in cases
    assert {g["goal"] for g in record["goals"]} >= {"fwd T=64: glm/flex >= 1.0", "fwd T=64: glm/sdpa >= 1.5"}
    assert record["ceiling"]["value"] > 0 and (tmp_path / "attention_cpu.png").exists()
    assert "device ceiling" in capsys.readouterr().out


def test_bench_attention_refuses_a_wrong_kernel(attention_bench):
    import torch
    from torch.nn.attention.flex_attention import create_mask

    T, prefix = 48, 24
    mask_mod = attention_bench.flex_block_mask(T, prefix, "cpu").mask_mod
    assert torch.equal(create_mask(mask_mod, 1, 1, T, T, "cpu")[0, 0], attention_bench.prefix_mask(T, prefix, "cpu"))

    def ignores_prefix(q, k, v, prefix_len):  # fast and wrong: plain causal attention
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    rows, _ = attention_bench.bench_flex("cpu", [torch.bfloat16], [T], B=1, H=2, D=16, repeats=1, ours=ignores_prefix)
    for r in rows:
        if r["mask"] == "prefix":
            assert "glm" in r["refused"] and "glm" not in r["ms"] and r["glm/sdpa"] is None
        else:
            assert "glm" in r["ms"] and not r["refused"]
    assert all(g["met"] is None for g in attention_bench.goals(rows))


def test_tokenizer_larger_than_the_model_is_refused_up_front(checkpoint, tmp_path, capsys):
    family, d = checkpoint
    small = glm.GLM(glm.preset(PRESET[family]).replace(vocab_size=400))
    small.save_pretrained(str(tmp_path / "small"), format="hf")
    assert main(["generate", str(tmp_path / "small"), "--tokenizer", d, "--prompt", "the cat"]) == 2
    captured = capsys.readouterr()
    assert "the tokenizer has 480 ids but the model" in captured.err and captured.out == ""


def test_bench_quick_does_not_replace_the_published_records(monkeypatch):
    import glm.bench

    seen = {}

    class Done:
        returncode = 1

    def fake_run(argv, cwd):
        seen["out"] = argv[argv.index("--out") + 1]
        return Done()

    monkeypatch.setattr(glm.bench.subprocess, "run", fake_run)
    with pytest.raises(glm.bench.BenchError):
        glm.bench.run_suite("decode", quick=True)
    results = os.path.join(glm.bench.benchmarks_dir(), "results")
    assert seen["out"] == os.path.join(results, "quick")
    with pytest.raises(glm.bench.BenchError):
        glm.bench.run_suite("decode")
    assert seen["out"] == os.path.join(results, "local")  # only --publish replaces the committed records


def test_default_max_new_tokens_fits_the_model(checkpoint, capsys):
    # 128 by default, cut to what the position table holds (tiny GLMs have 64-65 positions); an
    # explicit value is checked, not cut.
    family, d = checkpoint
    if family in ("glm", "chatglm"):
        assert main(["infill", d, "--text", "the cat [MASK] on the mat"]) == 0
        assert main(["generate", d, "--prompt", "the cat"]) == 0
        capsys.readouterr()
        assert main(["infill", d, "--text", "the cat [MASK] on the mat", "--max-new-tokens", "128"]) == 2
        assert "outside the model's" in capsys.readouterr().err
    else:
        assert main(["generate", d, "--prompt", "the cat"]) == 0


def test_a_prompt_of_two_dashes(checkpoint, capsys):
    # Python 3.11's argparse parses --prompt=-- as [] (a TypeError deep inside the tokenizer); the
    # CLI takes it as the text "--".
    family, d = checkpoint
    assert main(["generate", d, "--prompt=--", "--max-new-tokens", "2"]) == 0
    assert "Traceback" not in capsys.readouterr().err
