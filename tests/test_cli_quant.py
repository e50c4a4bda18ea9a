"""`glm quantize`, `--quantize` on the model commands and `glm bench`, and the quantize benchmark's aten layers,
on a tiny ChatGLM3-format model with a tiny trained tokenizer (subprocess-free: glm.cli.main in this process)."""
import importlib
import io
import json
import os
import random
import sys

import pytest
import torch
from conftest import snapshot

import glm
import glm.bench
from glm.cli import main
from glm.quant import is_quantized
from glm.tokenizer import load

WORDS = "the cat dog sat on a mat red blue green one two three 猫 狗 红 蓝 天 地 人 大 小 上 下".split()
BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> str:
    """A float ChatGLM3-format checkpoint (hidden 64, FFN 96: group 32 divides both) with its tokenizer."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("quant-cli")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(800)),
                      encoding="utf-8")
    assert main(["train-tokenizer", str(corpus), str(root / "tok"), "--vocab-size", "300", "--family",
                 "chatglm3"]) == 0
    tok = load(str(root / "tok"))
    model = glm.GLM(glm.preset("tiny-chatglm3").replace(vocab_size=tok.vocab_size)).eval()
    model.init_weights(std=0.3, seed=0)
    model.save_pretrained(str(root / "model"), format="hf")
    tok.save(str(root / "model"))
    return str(root / "model")


@pytest.fixture(scope="module")
def quantized(src, tmp_path_factory) -> dict:
    """``glm quantize`` of ``src``: (bits, group size) -> folder, in glm's format."""
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for bits, group in ((8, None), (4, 32)):
        dst = str(root / f"int{bits}-{group or 'row'}")
        argv = ["quantize", src, dst, "--bits", str(bits), "--quiet"] + (["--group-size", str(group)] if group else [])
        assert main(argv) == 0
        out[(bits, group)] = dst
    return out


@pytest.fixture
def loaded_models(monkeypatch) -> list:
    """Every model the CLI streams text from, recorded (glm.generate is the function, not the module)."""
    gen_mod = importlib.import_module("glm.generate")
    real, seen = gen_mod.stream_text, []

    def spy(model, tok, prompt_ids, **kw):
        seen.append(model)
        return real(model, tok, prompt_ids, **kw)

    monkeypatch.setattr(gen_mod, "stream_text", spy)
    return seen


def generated(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def one_line_error(capsys, argv: list[str], command: str) -> str:
    """Runs ``argv``, which must fail with the CLI's user-error status and a single line on stderr."""
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith(f"glm {command}: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------------------------
# glm quantize

def test_quantize_writes_a_quantized_folder_that_generates(src, quantized, capsys, loaded_models):
    dst = quantized[(4, 32)]
    model = glm.from_pretrained(dst)
    assert model.quantization == {"bits": 4, "group_size": 32, "embeddings": False, "lm_head": False}
    want = glm.quantize(glm.from_pretrained(src), 4, 32)
    for name, t in want.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name  # the folder holds glm.quantize's integers exactly
    out = generated(capsys, ["generate", dst, "--prompt", "the cat", "--max-new-tokens", "6"])
    assert is_quantized(loaded_models[-1]) and loaded_models[-1].quantization["bits"] == 4
    tok = load(dst)
    ids = tok.build_inputs(tok.encode_with_specials("the cat"))
    assert out == "".join(glm.stream_text(want, tok, ids, max_new_tokens=6)) + "\n"


def test_quantize_prints_one_summary_line(src, tmp_path, capsys):
    capsys.readouterr()
    assert main(["quantize", src, str(tmp_path / "q8"), "--bits", "8", "--quiet"]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and line.startswith(f"wrote {tmp_path / 'q8'} (glm, chatglm3, int8, per-row scales)")
    for part in ("MB ->", "tensors in 1 shard(s)", "peak RSS"):
        assert part in line, line
    smaller = float(line.split("x smaller")[0].rsplit("(", 1)[1])
    sizes = [sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))
             for d in (src, tmp_path / "q8")]
    assert smaller == pytest.approx(sizes[0] / sizes[1], abs=0.006) and smaller > 1.5


def test_quantize_hf_format_loads_like_glm_format(src, quantized, tmp_path, capsys):
    # THUDM's own -int8 layout for the ChatGLM families (per-row scales): the same model as glm's format.
    dst = str(tmp_path / "hf-int8")
    assert main(["quantize", src, dst, "--bits", "8", "--format", "hf", "--quiet"]) == 0
    config = json.loads(open(os.path.join(dst, "config.json")).read())
    assert config.get("quantization_bit") == 8
    a, b = glm.from_pretrained(dst), glm.from_pretrained(quantized[(8, None)])
    ids = torch.tensor([[5, 9, 17, 3]])
    torch.testing.assert_close(a(ids), b(ids), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# --quantize while loading

@pytest.mark.parametrize("scheme", [("int8", None), ("int4", 32)])
def test_generate_quantize_flag_matches_the_prequantized_folder(src, quantized, scheme, capsys, loaded_models):
    name, group = scheme
    bits = 8 if name == "int8" else 4
    flags = ["--quantize", name] + (["--group-size", str(group)] if group else [])
    args = ["--prompt", "the dog", "--max-new-tokens", "8"]
    on_the_fly = generated(capsys, ["generate", src, *args, *flags])
    assert loaded_models[-1].quantization == {"bits": bits, "group_size": group, "embeddings": False,
                                              "lm_head": False}
    assert on_the_fly == generated(capsys, ["generate", quantized[(bits, group)], *args])


def test_chat_quantize_flag(src, capsys, loaded_models, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("the cat\n"))
    capsys.readouterr()
    assert main(["chat", src, "--quantize", "int8", "--max-new-tokens", "4"]) == 0
    assert "glm> " in capsys.readouterr().out
    assert len(loaded_models) == 1 and loaded_models[0].quantization["bits"] == 8


# ---------------------------------------------------------------------------------------------
# Errors: one line, exit 2, nothing written

@pytest.mark.parametrize("flags, says", [
    (["--bits", "3"], "bits must be 8 or 4"),
    (["--bits", "4", "--group-size", "48"], "group_size 48 does not divide the 64 input features"),
    (["--bits", "4", "--group-size", "5"], "group_size must be even for 4 bits"),
    (["--bits", "8", "--group-size", "0"], "group_size must be a positive number"),
])
def test_quantize_refuses_a_bad_scheme_and_writes_nothing(src, tmp_path, capsys, flags, says):
    dst = tmp_path / "out"
    before = snapshot(src)
    err = one_line_error(capsys, ["quantize", src, str(dst), *flags, "--quiet"], "quantize")
    assert says in err
    assert not dst.exists() and os.listdir(tmp_path) == [] and snapshot(src) == before


def test_quantize_refuses_a_quantized_folder(quantized, tmp_path, capsys):
    dst = tmp_path / "again"
    err = one_line_error(capsys, ["quantize", quantized[(8, None)], str(dst), "--bits", "4", "--quiet"], "quantize")
    assert "quantized checkpoint already" in err and not dst.exists()


def test_quantize_does_not_replace_a_folder_without_overwrite(src, quantized, tmp_path, capsys):
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    err = one_line_error(capsys, ["quantize", src, str(dst), "--bits", "8", "--quiet"], "quantize")
    assert str(dst) in err and snapshot(dst) == {"notes.txt": b"mine"}


@pytest.mark.parametrize("flags, says", [
    (["--group-size", "32"], "--group-size 32 needs --quantize"),
    (["--quantize", "int4", "--group-size", "48"], "group_size 48 does not divide"),
    (["--quantize", "int4", "--group-size", "7"], "group_size must be even for 4 bits"),
])
def test_generate_refuses_bad_quantize_flags(src, capsys, loaded_models, flags, says):
    err = one_line_error(capsys, ["generate", src, "--prompt", "the cat", *flags], "generate")
    assert says in err and loaded_models == []


def test_generate_quantize_on_a_quantized_folder_is_refused(quantized, capsys, loaded_models):
    err = one_line_error(capsys, ["generate", quantized[(4, 32)], "--prompt", "x", "--quantize", "int8"], "generate")
    assert "quantized checkpoint already" in err and loaded_models == []


def test_quantize_choices_are_argparse_errors(src, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", src, "--prompt", "x", "--quantize", "int3"])
    assert e.value.code == 2 and "invalid choice: 'int3'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# glm bench

@pytest.fixture
def bench_argv(monkeypatch) -> dict:
    """The command line `glm bench` would run (the fake run fails, so no record is read)."""
    seen = {}

    class Failed:
        returncode = 1

    def fake_run(argv, cwd):
        seen["argv"] = argv
        return Failed()

    monkeypatch.setattr(glm.bench.subprocess, "run", fake_run)
    return seen


def test_bench_decode_passes_quantize_to_the_script(bench_argv, tmp_path, capsys):
    assert main(["bench", "decode", "--quantize", "int4", "--group-size", "32", "--out", str(tmp_path)]) == 2
    argv = bench_argv["argv"]
    assert argv[1].endswith(os.path.join("benchmarks", "decode.py"))
    assert argv[argv.index("--quantize") + 1] == "int4" and argv[argv.index("--group-size") + 1] == "32"
    assert main(["bench", "decode", "--out", str(tmp_path)]) == 2
    assert "--quantize" not in bench_argv["argv"]


def test_bench_decode_quantize_measures_a_quantized_model_into_its_own_record(tmp_path):
    assert main(["bench", "decode", "--quick", "--quantize", "int4", "--group-size", "32", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "decode_cpu_int4.json").read_text())
    assert record["quantization"] == {"bits": 4, "group_size": 32, "embeddings": False, "lm_head": False}
    assert not (tmp_path / "decode_cpu.json").exists()  # the full-precision record is not replaced


@pytest.mark.parametrize("argv, says", [
    (["bench", "attention", "--quantize", "int8"], "--quantize applies to the decode suite, not attention"),
    (["bench", "quantize", "--quantize", "int8"], "it measures every scheme itself"),
    (["bench", "decode", "--group-size", "32"], "--group-size 32 needs --quantize"),
    (["bench", "quantize", "--device", "cuda"], "the quantize benchmark measures glm's CPU kernels"),
])
def test_bench_quantize_flag_errors(bench_argv, capsys, argv, says):
    assert says in one_line_error(capsys, argv, "bench")
    assert "argv" not in bench_argv  # refused before anything ran


def test_bench_knows_the_quantize_suite():
    assert "quantize" in glm.bench.SUITES and "quantize" in glm.bench.QUICK and "quantize" in glm.bench.JUDGES_GOALS
    assert "| quantize |" in glm.bench.README_HEAD


# ---------------------------------------------------------------------------------------------
# benchmarks/quantize.py: PyTorch's weight-only ops on glm's integers

@pytest.fixture
def quant_bench(bench_script):
    return bench_script("quantize")


def tiny_variants(quant_bench, bits: int, group):
    """A tiny float model, glm's quantized model over its tensors, and the aten model over that one's integers."""
    fp32 = glm.GLM(glm.preset("tiny-glm-hf")).eval()
    fp32.init_weights(std=0.3, seed=0)
    quantized = glm.quantize(quant_bench.sharing_copy(fp32), bits, group)
    wrap = quant_bench.AtenInt8Linear if bits == 8 else quant_bench.AtenInt4Linear
    return fp32, quantized, quant_bench.aten_model(fp32, quantized, wrap)


@pytest.mark.parametrize("bits, group", [(8, None), (4, 32)])
def test_aten_layers_hold_glms_weights(quant_bench, bits, group):
    fp32, quantized, aten = tiny_variants(quant_bench, bits, group)
    assert not is_quantized(fp32) and isinstance(fp32.layers[0].attn.qkv, torch.nn.Linear)  # left as it was
    assert aten.layers[0].mlp.w_in.__class__.__name__.startswith("Aten")
    assert quant_bench.check_same_weights(aten, dict(quant_bench.quantized_layers(quantized))) == 8  # 4 x 2 blocks
    ids = torch.tensor([[3, 7, 11, 19, 23]])
    with torch.no_grad():  # one row per call: the decode path of both (glm's kernel, aten's op)
        want = torch.stack([quantized(ids[:, :k + 1])[0, -1] for k in range(ids.shape[1])])
        got = torch.stack([aten(ids[:, :k + 1])[0, -1] for k in range(ids.shape[1])])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # same weights, another summation order


def test_a_wrong_int4_conversion_is_caught(quant_bench):
    _, quantized, aten = tiny_variants(quant_bench, 4, 32)
    layer = aten.layers[1].mlp.w_in
    # gpt-fast's asymmetric zero point (min + 8 * scale) in place of 0: weights move by a whole offset.
    layer.scales_and_zeros[..., 1] = layer.scales_and_zeros[..., 0]
    with pytest.raises(AssertionError, match="layers.1.mlp.w_in: aten's op does not hold glm's weights"):
        quant_bench.check_same_weights(aten, dict(quant_bench.quantized_layers(quantized)))


def test_step_bytes_counts_one_embedding_row(quant_bench):
    model = glm.GLM(glm.preset("tiny-glm-hf")).eval()
    cfg = model.config
    everything = quant_bench.model_bytes(model)
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * 10 * cfg.head_dim * 4
    assert quant_bench.step_bytes(model, 10) == everything - (cfg.vocab_size - 1) * cfg.hidden_size * 4 + kv


def test_quantize_benchmark_smoke_record(quant_bench, tmp_path):
    quant_bench.main(["--small", "--new-tokens", "3", "--repeats", "1", "--smoke", "--no-load", "--quiet-wait", "0",
                      "--reruns", "0", "--demo", str(tmp_path / "no-demo"), "--out", str(tmp_path)])
    record = json.loads((tmp_path / "quantize_cpu.json").read_text())
    assert record["benchmark"] == "quantize" and record["git_sha"] and record["torch"] and record["device"]
    (shape,) = record["decode"]
    assert set(shape["variants"]) == {"fp32", "hf", "int8", "aten_int8", "int4_g32", "aten_int4_g32", "int4_row"}
    assert all(v["tokens_per_s"] > 0 and v["step_bytes"] > 0 for v in shape["variants"].values())
    assert shape["variants"]["aten_int8"]["weights_checked_layers"] == 8
    assert all("neighbour_cores" in v and v["reruns"] == 0 for v in shape["variants"].values())
    assert "does not exist" in record["quality"]["skipped"] and record["load"] is None
    assert record["goals"] and all(g["met"] is None for g in record["goals"])  # a smoke run judges nothing
    assert record["ceiling"]["value"] > 0 and all(r["ratio"] > 0 for r in record["summary"])
    assert (tmp_path / "quantize_cpu.png").exists()
