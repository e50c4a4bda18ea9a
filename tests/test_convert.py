"""The weight converter (`glm.hub`, `glm convert`): bit-exact round trips, cross-format output that
transformers loads, dtype rules, and bad input that fails cleanly without leaving anything behind.

Bit-exact means: same tensor names, shapes, dtypes and bytes. The release fixtures are compared with
what glm writes after a release -> glm -> release round trip (the fixtures' .bin files come back as
safetensors, so the comparison is per tensor, not per file).
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import tempfile

import pytest
import torch
from conftest import FIXTURE_FAMILIES, copy_fixture, edit_json, reference_dir, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import glm
import glm.checkpoint
from glm.checkpoint import CheckpointError, CheckpointReader, is_glm_format
from glm.cli import main
from glm.errors import FormatError, KeyMismatchError
from glm.hub import CARRIED_FILES, convert_checkpoint, save_pretrained
from glm.parity import load_cases, run_parity

SHARD = "50KB"  # every tiny fixture (~100-500 KB) comes out in several shards
EXPECTED_FAMILY = {"glm": "glm", "chatglm-6b": "chatglm", "chatglm2-6b": "chatglm2", "chatglm3-6b": "chatglm3",
                   "glm-4-9b-chatglm": "glm4-chatglm", "glm-4-9b-chat-hf": "glm-hf", "glm-4-9b-0414": "glm4-hf"}
FAMILIES = ["glm", "chatglm", "chatglm2", "chatglm3", "glm4-chatglm", "glm-hf", "glm4-hf"]


# ---------------------------------------------------------------------------------------------
# Helpers

def read_all(folder) -> dict[str, torch.Tensor]:
    with CheckpointReader(os.fspath(folder)) as r:
        return {k: r.get(k) for k in r.keys()}


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str = "") -> None:
    assert sorted(a) == sorted(b), f"{what}: names differ: {sorted(set(a) ^ set(b))}"
    for k in a:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype, f"{what}: {k}: dtype {x.dtype} != {y.dtype}"
        assert x.shape == y.shape, f"{what}: {k}: shape {tuple(x.shape)} != {tuple(y.shape)}"
        assert torch.equal(raw_bytes(x), raw_bytes(y)), f"{what}: {k}: bytes differ"


def assert_bit_exact(dir_a, dir_b) -> None:
    assert_same_tensors(read_all(dir_a), read_all(dir_b), f"{dir_a} vs {dir_b}")


def check_sharded_output(folder) -> None:
    """Several shards, and an index that lists existing files, maps every stored tensor exactly once
    to the file that holds it, and has total_size = the sum of the tensor bytes. Read with
    safetensors itself, not glm's reader."""
    from safetensors import safe_open

    folder = os.fspath(folder)
    shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    assert len(shards) > 1, f"{folder}: expected a multi-shard output, got {shards}"
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        index = json.load(f)
    wm = index["weight_map"]
    for fn in set(wm.values()):
        assert os.path.isfile(os.path.join(folder, fn)), f"index lists missing file {fn}"
    assert set(wm.values()) == set(shards), "shard files not referenced by the index"
    where: dict[str, str] = {}
    total = 0
    for fn in shards:
        with safe_open(os.path.join(folder, fn), framework="pt") as f:
            for name in f.keys():
                assert name not in where, f"{name} stored in both {where[name]} and {fn}"
                where[name] = fn
                t = f.get_tensor(name)
                total += t.numel() * t.element_size()
    assert where == wm
    assert index["metadata"]["total_size"] == total


def assert_nothing_written(dst) -> None:
    """Neither DST nor any DST.tmp-* / DST.old-* sibling exists."""
    dst = os.fspath(dst)
    parent, base = os.path.split(dst)
    assert not os.path.exists(dst), f"{dst} was created"
    leftovers = [n for n in os.listdir(parent) if n.startswith(base + ".")]
    assert not leftovers, f"left behind: {leftovers}"


def load_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def forward_case(name: str) -> tuple[dict, dict]:
    meta, tensors = load_cases(reference_dir(name))
    case = next(c for c in meta["cases"] if c["kind"] == "forward")
    resolve = lambda d: {k: tensors[v] if isinstance(v, str) else v for k, v in d.items()}  # noqa: E731
    return resolve(case["inputs"]), resolve(case["outputs"])


def assert_parity(folder, name: str) -> None:
    results = run_parity(glm.from_pretrained(folder), cases=reference_dir(name))
    assert len(results) >= 2
    for r in results:
        assert r.passed, f"{folder} against {name}: {r.line()}"


# ---------------------------------------------------------------------------------------------
# Release -> glm -> release is bit-exact for every fixture, and the converted folders keep parity

@pytest.mark.parametrize("name", FIXTURE_FAMILIES)
def test_fixture_round_trip_is_bit_exact(name, tmp_path):
    src = reference_dir(name)
    g, h = tmp_path / "glm-format", tmp_path / "release"
    s1 = convert_checkpoint(src, g, to="glm", shard_size=SHARD)
    s2 = convert_checkpoint(g, h, to="hf", shard_size=SHARD)

    assert_bit_exact(src, h)
    check_sharded_output(g)
    check_sharded_output(h)
    # Same release format: the release's own config.json comes back unchanged (dtype kept).
    assert load_json(h / "config.json") == load_json(os.path.join(src, "config.json"))

    # The glm-format folder: versioned config, the release config carried along, and exactly the
    # state dict that from_pretrained builds from the release (dtypes as stored).
    gc = load_json(g / "config.json")
    assert gc["glm_format_version"] == 1
    assert gc["hf_config"] == load_json(os.path.join(src, "config.json"))
    assert gc["config"] == glm.GLMConfig.from_hf(src).to_dict()
    assert gc["config"]["family"] == EXPECTED_FAMILY[name]
    assert_same_tensors(read_all(g), glm.from_pretrained(src, dtype=None).state_dict(), "glm format")

    assert (s1.format, s1.family) == ("glm", EXPECTED_FAMILY[name])
    assert s1.files == sorted(f for f in os.listdir(g) if f.endswith(".safetensors"))
    assert s2.tensors == len(read_all(src))
    assert s2.bytes == load_json(h / "model.safetensors.index.json")["metadata"]["total_size"]
    assert sorted(os.listdir(tmp_path)) == ["glm-format", "release"]  # no tmp / old leftovers

    for folder in (g, h):
        assert_parity(folder, name)


@pytest.mark.parametrize("name", ["chatglm-6b", "glm-4-9b-0414"])
def test_glm_format_to_glm_format_is_identity(name, tmp_path):
    g1, g2 = tmp_path / "g1", tmp_path / "g2"
    convert_checkpoint(reference_dir(name), g1, to="glm", shard_size=SHARD)
    convert_checkpoint(g1, g2, to="glm")  # one shard this time
    assert_bit_exact(g1, g2)
    carried = sorted(set(os.listdir(reference_dir(name))) & set(CARRIED_FILES))  # tokenizer etc.
    assert sorted(os.listdir(g2)) == sorted(["config.json", "model.safetensors", "glm_checksums.json", *carried])
    assert load_json(g1 / "config.json") == load_json(g2 / "config.json")


# ---------------------------------------------------------------------------------------------
# from_pretrained reads glm's own format

@pytest.mark.parametrize("name", ["glm", "chatglm-6b", "glm-4-9b-chatglm", "glm-4-9b-0414"])
def test_from_pretrained_reads_glm_format(name, tmp_path):
    src = reference_dir(name)
    g = tmp_path / "g"
    convert_checkpoint(src, g, to="glm", shard_size=SHARD)
    assert "glm_format_version" in load_json(g / "config.json")
    assert is_glm_format(str(g)) and not is_glm_format(src)
    a, b = glm.from_pretrained(src, dtype=None), glm.from_pretrained(g, dtype=None)
    assert b.config == a.config
    assert_same_tensors(a.state_dict(), b.state_dict(), "from_pretrained")
    # And in float32 (the default), it runs the same computation.
    inputs, _ = forward_case(name)
    kw = dict(prefix_len=inputs.get("prefix_len"), pad_left=inputs.get("pad_left"))
    with torch.no_grad():
        la = glm.from_pretrained(src)(inputs["input_ids"], inputs.get("position_ids"), **kw)
        lb = glm.from_pretrained(g)(inputs["input_ids"], inputs.get("position_ids"), **kw)
    assert torch.equal(la, lb)


# ---------------------------------------------------------------------------------------------
# Random tiny configs of every family: model -> release -> glm -> release is bit-exact and the
#    release folder loads back as the same model

CHATGLM2_LIKE = ("chatglm2", "chatglm3", "glm4-chatglm")
# Fields that define the computation; token ids and special-token names are release metadata whose
# release schemas differ per family.
ARCH_FIELDS = [f.name for f in dataclasses.fields(glm.GLMConfig)
               if f.name not in ("name", "special_tokens", "pad_token_id", "bos_token_id", "eos_token_ids")]


@st.composite
def tiny_configs(draw, family: str) -> glm.GLMConfig:
    base = glm.preset(f"tiny-{family}")
    common = dict(num_layers=draw(st.integers(1, 2)), vocab_size=draw(st.integers(32, 96)))
    heads = draw(st.sampled_from([1, 2, 4]))
    if family in ("glm", "chatglm"):
        # MHA, head_dim = hidden / heads, as both release configs imply; 2D RoPE needs head_dim % 4 == 0.
        hd = draw(st.sampled_from([8, 16]))
        h = heads * hd
        if family == "glm":
            return base.replace(**common, num_heads=heads, num_kv_heads=heads, head_dim=hd, hidden_size=h,
                                ffn_hidden_size=4 * h, max_positions=draw(st.integers(17, 65)))
        return base.replace(**common, num_heads=heads, num_kv_heads=heads, head_dim=hd, hidden_size=h,
                            ffn_hidden_size=draw(st.sampled_from([32, 64, 96])),
                            norm_eps=draw(st.sampled_from([1e-5, 1e-6])))
    common.update(num_heads=heads, num_kv_heads=draw(st.sampled_from([g for g in (1, 2, 4) if heads % g == 0])),
                  hidden_size=draw(st.sampled_from([32, 48, 64])), ffn_hidden_size=draw(st.sampled_from([32, 64, 96])),
                  qkv_bias=draw(st.booleans()))
    if family in CHATGLM2_LIKE:
        # rotary_fraction 0.5 must rotate an even number of dims: head_dim % 4 == 0. One bias flag
        # (add_bias_linear) covers the output and MLP projections.
        bias = draw(st.booleans())
        return base.replace(**common, head_dim=draw(st.sampled_from([8, 16, 32])), out_bias=bias, mlp_bias=bias,
                            rope_base=draw(st.sampled_from([10000.0, 5e6])) if family == "glm4-chatglm" else 10000.0)
    return base.replace(**common, head_dim=draw(st.sampled_from([8, 16, 32])),
                        rotary_fraction=draw(st.sampled_from([0.25, 0.5, 1.0])),
                        rope_base=draw(st.sampled_from([10000.0, 5e6])),
                        norm_eps=draw(st.sampled_from([1e-5, 1.5625e-7])),
                        tie_word_embeddings=draw(st.booleans()),
                        # Saved in float32, transformers' Glm does not round its RoPE frequencies.
                        rope_inv_freq_dtype=None)


def random_inputs(cfg: glm.GLMConfig, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (2, min(12, cfg.max_positions)), generator=gen)


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_models_round_trip(family, data):
    cfg = data.draw(tiny_configs(family), label="config")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    model = glm.GLM(cfg)
    model.init_weights(std=0.5, seed=seed)
    model.eval()
    with tempfile.TemporaryDirectory() as d:
        hf, g, hf2, g_direct, hf3 = (os.path.join(d, n) for n in ("hf", "g", "hf2", "g-direct", "hf3"))
        save_pretrained(model, hf, format="hf", shard_size="8KB")
        convert_checkpoint(hf, g, to="glm", shard_size="8KB")
        convert_checkpoint(g, hf2, to="hf")
        assert_bit_exact(hf, hf2)
        assert load_json(os.path.join(hf, "config.json")) == load_json(os.path.join(hf2, "config.json"))
        # Saving in glm format and exporting gives the same release folder as saving it directly.
        save_pretrained(model, g_direct, format="glm")
        assert_same_tensors(read_all(g_direct), model.state_dict(), "glm format save")
        convert_checkpoint(g_direct, hf3, to="hf")
        assert_bit_exact(hf, hf3)

        loaded = glm.from_pretrained(hf)
        assert loaded.config.family == family
        assert {f: getattr(loaded.config, f) for f in ARCH_FIELDS} == {f: getattr(cfg, f) for f in ARCH_FIELDS}
        ids = random_inputs(cfg, seed)
        with torch.no_grad():
            want = model(ids)
            for m in (loaded, glm.from_pretrained(g)):
                got = m(ids)
                assert (got - want).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------------
# glm -> transformers' Glm / Glm4: loads in transformers with the same logits

# (family, tied head, qkv bias, rotary fraction): a wrong RoPE row order only shows against transformers.
TRANSFORMERS_CASES = [("glm-hf", False, True, 0.5), ("glm-hf", True, False, 0.25), ("glm4-hf", False, True, 1.0),
                      ("glm4-hf", True, False, 0.25)]


@pytest.mark.transformers
@pytest.mark.parametrize("family,tie,qkv_bias,fraction", TRANSFORMERS_CASES)
def test_glm_to_transformers_logits(family, tie, qkv_bias, fraction, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = glm.preset(f"tiny-{family}").replace(hidden_size=48, num_heads=4, num_kv_heads=2, head_dim=16,
                                               tie_word_embeddings=tie, qkv_bias=qkv_bias, rotary_fraction=fraction,
                                               rope_base=5e6 if family == "glm-hf" else 10000.0,
                                               rope_inv_freq_dtype=None)
    model = glm.GLM(cfg)
    model.init_weights(std=0.5, seed=7)
    model.eval()
    out = tmp_path / "hf"
    save_pretrained(model, out, format="hf", shard_size="20KB")
    check_sharded_output(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(hf).__name__ == ("GlmForCausalLM" if family == "glm-hf" else "Glm4ForCausalLM")
    ids = torch.randint(0, cfg.vocab_size, (3, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids)
        got = hf(input_ids=ids).logits
    assert want.abs().max() > 1  # O(1) logits: a 1e-4 bound means something
    assert (got - want).abs().max().item() <= 1e-4


# ---------------------------------------------------------------------------------------------
# Cross-format: GLM-4-9B in the chatglm format <-> transformers' Glm

def test_glm4_chatglm_to_glm_hf_layout(tmp_path):
    src = reference_dir("glm-4-9b-chatglm")
    out = tmp_path / "hf"
    s = convert_checkpoint(src, out, to="hf", family="glm-hf", shard_size=SHARD)
    assert s.family == "glm-hf"
    c = load_json(out / "config.json")
    assert c["model_type"] == "glm" and c["architectures"] == ["GlmForCausalLM"]
    assert c["rope_parameters"]["rope_theta"] == 5e6  # 10000 * rope_ratio 500
    assert c["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert c["dtype"] == "bfloat16"
    assert (c["num_key_value_heads"], c["head_dim"], c["attention_bias"]) == (2, 16, True)
    check_sharded_output(out)

    a, b = read_all(src), read_all(out)
    assert all(t.dtype == torch.bfloat16 for t in b.values())
    q, kv = 4 * 16, 2 * 16
    for i in range(2):
        for kind in ("weight", "bias"):
            fused = a[f"transformer.encoder.layers.{i}.self_attention.query_key_value.{kind}"]
            parts = [b[f"model.layers.{i}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            assert [p.shape[0] for p in parts] == [q, kv, kv]
            assert torch.equal(torch.cat(parts), fused)  # chatglm and Glm both interleave RoPE pairs
        pairs = {"self_attention.dense.weight": "self_attn.o_proj.weight",
                 "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
                 "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
                 "input_layernorm.weight": "input_layernorm.weight",
                 "post_attention_layernorm.weight": "post_attention_layernorm.weight"}
        for x, y in pairs.items():
            assert torch.equal(a[f"transformer.encoder.layers.{i}.{x}"], b[f"model.layers.{i}.{y}"])
    assert torch.equal(a["transformer.output_layer.weight"], b["lm_head.weight"])
    assert torch.equal(a["transformer.embedding.word_embeddings.weight"], b["model.embed_tokens.weight"])
    assert torch.equal(a["transformer.encoder.final_layernorm.weight"], b["model.norm.weight"])
    assert "transformer.rotary_pos_emb.inv_freq" in a and not any("inv_freq" in k for k in b)
    assert len(b) == len(a) - 1 + 2 * 2 * 2  # inv_freq dropped; each fused weight and bias -> 3


def test_glm4_chatglm_to_glm_hf_fp32_keeps_parity(tmp_path):
    """With fp32 output there is no RoPE rounding to reproduce: glm must still pass the chatglm
    fixture's cases on the converted folder."""
    out = tmp_path / "hf"
    convert_checkpoint(reference_dir("glm-4-9b-chatglm"), out, to="hf", family="glm-hf", dtype="fp32")
    assert load_json(out / "config.json")["dtype"] == "float32"
    assert all(t.dtype == torch.float32 for t in read_all(out).values())
    assert glm.from_pretrained(out).config.rope_inv_freq_dtype is None
    assert_parity(out, "glm-4-9b-chatglm")


@pytest.mark.transformers
@pytest.mark.parametrize("dtype", ["fp32", None])
def test_glm4_chatglm_to_glm_hf_in_transformers(dtype, tmp_path):
    """transformers' GlmForCausalLM on the converted GLM-4 reproduces the chatglm-format fixture's
    logits. Note (transformers 5.24, CPU): its RoPE inv_freq buffer stays float32 even for a bf16
    checkpoint (loaded in float32 or bfloat16), so the bf16 output matches the fixture as well; glm
    itself models a bf16 Glm checkpoint with bf16-rounded frequencies (rope_inv_freq_dtype)."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    convert_checkpoint(reference_dir("glm-4-9b-chatglm"), out, to="hf", family="glm-hf", dtype=dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    inputs, outputs = forward_case("glm-4-9b-chatglm")
    with torch.no_grad():
        logits = hf(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    position_ids=inputs["position_ids"]).logits
    cmp = outputs["compare_mask"]
    assert cmp.any()
    assert (logits - outputs["logits"])[cmp].abs().max().item() <= 1e-4


def test_glm_hf_back_to_chatglm_format(tmp_path):
    src = reference_dir("glm-4-9b-chatglm")
    hf, back = tmp_path / "hf", tmp_path / "back"
    convert_checkpoint(src, hf, to="hf", family="glm-hf", shard_size=SHARD)
    s = convert_checkpoint(hf, back, to="hf", family="glm4-chatglm", shard_size=SHARD)
    assert s.family == "glm4-chatglm"
    c = load_json(back / "config.json")
    assert c["rope_ratio"] == 500 and c["model_type"] == "chatglm"
    assert glm.GLMConfig.from_hf(str(back)).rope_base == 5e6
    assert glm.GLMConfig.from_hf(str(back)).family == "glm4-chatglm"
    # Both hops are pure re-layouts in bf16: the original tensors come back bit for bit.
    assert_bit_exact(src, back)
    assert_parity(back, "glm-4-9b-chatglm")


def test_glm4_chatglm_output_is_recognised_as_glm4(tmp_path):
    """The chatglm-format schemas are identical: a small-vocab GLM-4 with eps 1e-5 must still read back
    as glm4-chatglm (and ChatGLM2 as chatglm2), not as the default chatglm3."""
    back = tmp_path / "back"
    convert_checkpoint(reference_dir("glm-4-9b-chat-hf"), back, to="hf", family="glm4-chatglm")
    assert glm.GLMConfig.from_hf(str(back)).family == "glm4-chatglm"
    c2 = tmp_path / "c2"
    convert_checkpoint(reference_dir("chatglm3-6b"), c2, to="hf", family="chatglm2")
    assert glm.GLMConfig.from_hf(str(c2)).family == "chatglm2"


def test_glm_hf_fixture_to_chatglm_format_keeps_rope_base(tmp_path):
    out = tmp_path / "chatglm"
    convert_checkpoint(reference_dir("glm-4-9b-chat-hf"), out, to="hf", family="glm4-chatglm")
    c = load_json(out / "config.json")
    assert c["rope_ratio"] == 1.0  # that fixture's rope_theta is 10000
    assert glm.GLMConfig.from_hf(str(out)).rope_base == 10000.0


@pytest.mark.parametrize("name,family", [("chatglm-6b", "glm-hf"), ("glm", "glm4-hf"),
                                         ("glm-4-9b-0414", "glm4-chatglm"), ("chatglm3-6b", "chatglm")])
def test_incompatible_family_is_format_error(name, family, tmp_path):
    src_family = EXPECTED_FAMILY[name]
    dst = tmp_path / "out"
    with pytest.raises(FormatError) as e:
        convert_checkpoint(reference_dir(name), dst, to="hf", family=family)
    msg = str(e.value)
    assert src_family in msg and family in msg and "'glm' format" in msg
    assert_nothing_written(dst)


# ---------------------------------------------------------------------------------------------
# dtype

@pytest.mark.parametrize("name,dtype", [("glm", "bf16"), ("glm", "fp16"), ("chatglm3-6b", "bf16"),
                                        ("glm-4-9b-0414", "fp16")])
def test_lossy_cast_needs_allow_lossy(name, dtype, tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(ValueError, match="--allow-lossy"):
        convert_checkpoint(reference_dir(name), dst, to="glm", dtype=dtype)
    assert_nothing_written(dst)
    with pytest.raises(ValueError, match="--allow-lossy"):
        convert_checkpoint(reference_dir(name), dst, to="hf", dtype=dtype)
    assert_nothing_written(dst)


@pytest.mark.parametrize("to", ["glm", "hf"])
def test_lossy_cast_with_allow_lossy(to, tmp_path):
    src = reference_dir("glm")  # float32 .bin
    dst = tmp_path / "out"
    convert_checkpoint(src, dst, to=to, dtype="bf16", allow_lossy=True, shard_size=SHARD)
    out = read_all(dst)
    assert out and all(t.dtype == torch.bfloat16 for t in out.values())
    if to == "hf":
        assert load_json(dst / "config.json")["torch_dtype"] == "bfloat16"
        ref = read_all(src)
        assert sorted(out) == sorted(ref)
        for k in ref:
            assert torch.equal(out[k], ref[k].to(torch.bfloat16)), k
    else:
        assert glm.from_pretrained(dst, dtype=None).embed.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["chatglm-6b", "chatglm3-6b", "glm-4-9b-0414"])
def test_upcast_to_fp32_needs_no_flag(name, tmp_path):
    src, dst = reference_dir(name), tmp_path / "out"
    convert_checkpoint(src, dst, to="hf", dtype="fp32", shard_size=SHARD)
    ref, out = read_all(src), read_all(dst)
    assert {t.dtype for t in ref.values()} != {torch.float32}
    assert sorted(out) == sorted(ref)
    for k in ref:
        assert out[k].dtype == torch.float32, k
        if k == "transformer.rotary_pos_emb.inv_freq":
            # ChatGLM2/3's buffer, which their forward never reads: glm regenerates it as that code
            # builds it in float32, so it is no longer fp16-rounded. (ChatGLM-6B's is always fp16-rounded.)
            torch.testing.assert_close(out[k], ref[k].float(), rtol=1e-3, atol=0)
        else:
            assert torch.equal(out[k], ref[k].float()), k
    cfg = load_json(dst / "config.json")
    assert cfg.get("torch_dtype", cfg.get("dtype")) == "float32"


def test_same_dtype_is_not_lossy(tmp_path):
    convert_checkpoint(reference_dir("chatglm3-6b"), tmp_path / "out", to="glm", dtype="fp16")
    assert all(t.dtype == torch.float16 for t in read_all(tmp_path / "out").values())


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error and nothing left behind

def test_truncated_safetensors_shard(tmp_path):
    src = copy_fixture("glm-4-9b-chatglm", tmp_path)
    p = os.path.join(src, "model-00002-of-00002.safetensors")
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 100)
    dst = tmp_path / "out"
    with pytest.raises(CheckpointError, match="truncated") as e:
        convert_checkpoint(src, dst, to="glm")
    assert "model-00002-of-00002.safetensors" in str(e.value)
    assert_nothing_written(dst)


def test_truncated_bin_shard(tmp_path):
    src = copy_fixture("chatglm2-6b", tmp_path)
    p = os.path.join(src, "pytorch_model-00002-of-00002.bin")
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)
    dst = tmp_path / "out"
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00002.bin"):
        convert_checkpoint(src, dst, to="hf")
    assert_nothing_written(dst)


def test_missing_shard_listed_in_index(tmp_path):
    src = copy_fixture("glm-4-9b-0414", tmp_path)
    os.remove(os.path.join(src, "model-00003-of-00004.safetensors"))
    dst = tmp_path / "out"
    with pytest.raises(CheckpointError, match="model-00003-of-00004.safetensors"):
        convert_checkpoint(src, dst, to="glm")
    assert_nothing_written(dst)


def test_missing_and_unexpected_keys_both_listed(tmp_path):
    from safetensors.torch import load_file, save_file

    src = copy_fixture("chatglm3-6b", tmp_path)
    p = os.path.join(src, "model.safetensors")
    sd = load_file(p)
    sd["transformer.extra.weight"] = sd.pop("transformer.encoder.final_layernorm.weight")
    save_file(sd, p, metadata={"format": "pt"})
    dst = tmp_path / "out"
    with pytest.raises(KeyMismatchError) as e:
        convert_checkpoint(src, dst, to="glm")
    msg = str(e.value)
    assert "missing 1" in msg and "transformer.encoder.final_layernorm.weight" in msg
    assert "unexpected 1" in msg and "transformer.extra.weight" in msg
    assert_nothing_written(dst)


def test_glm_format_with_missing_key(tmp_path):
    from safetensors.torch import load_file, save_file

    g = tmp_path / "g"
    convert_checkpoint(reference_dir("chatglm3-6b"), g, to="glm")
    sd = load_file(str(g / "model.safetensors"))
    del sd["final_norm.weight"]
    save_file(sd, str(g / "model.safetensors"), metadata={"format": "pt"})
    dst = tmp_path / "out"
    with pytest.raises(KeyMismatchError, match="final_norm.weight"):
        convert_checkpoint(g, dst, to="hf")
    assert_nothing_written(dst)


@pytest.mark.parametrize("field,value,to,tensor", [
    ("ffn_hidden_size", 80, "glm", "mlp.dense_h_to_4h.weight (192, 64)"),
    ("hidden_size", 32, "hf", "word_embeddings.weight (160, 64)"),
    ("kv_channels", 8, "glm", "(64, 64)"),  # also breaks the fused-QKV reshape
])
def test_shape_mismatch_with_config(field, value, to, tensor, tmp_path, capsys):
    src = copy_fixture("chatglm3-6b", tmp_path)
    edit_json(os.path.join(src, "config.json"), lambda c: c.update({field: value}))
    dst = tmp_path / "out"
    with pytest.raises(CheckpointError, match="shape") as e:
        convert_checkpoint(src, dst, to=to)
    assert tensor in str(e.value) and "config.json" in str(e.value)
    assert_nothing_written(dst)
    assert main(["convert", src, str(dst), "--to", to, "--quiet"]) == 2  # a user error, not a traceback
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert_nothing_written(dst)


def test_index_names_wrong_shard(tmp_path):
    src = copy_fixture("glm-4-9b-chatglm", tmp_path)
    edit_json(os.path.join(src, "model.safetensors.index.json"), lambda c: c["weight_map"].update(
        {"transformer.output_layer.weight": "model-00001-of-00002.safetensors"}))
    dst = tmp_path / "out"
    with pytest.raises(CheckpointError, match="index"):
        convert_checkpoint(src, dst, to="glm")
    assert_nothing_written(dst)


@pytest.mark.parametrize("dtype", ["int8", "float64", "fp8", torch.int8, torch.float64])
def test_unsupported_dtype(dtype, tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(ValueError, match="not supported"):
        convert_checkpoint(reference_dir("chatglm3-6b"), dst, to="glm", dtype=dtype)
    assert_nothing_written(dst)


@pytest.mark.parametrize("size", ["0", "-5MB", "lots"])
def test_bad_shard_size(size, tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(ValueError, match="shard size"):
        convert_checkpoint(reference_dir("chatglm3-6b"), dst, to="glm", shard_size=size)
    assert_nothing_written(dst)


def test_existing_destination_needs_overwrite(tmp_path):
    src = reference_dir("chatglm3-6b")
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_checkpoint(src, dst, to="glm")
    # A folder glm did not write is never replaced, not even with --overwrite.
    with pytest.raises(FileExistsError, match="not written by glm"):
        convert_checkpoint(src, dst, to="glm", overwrite=True)
    assert snapshot(dst) == {"precious.txt": b"keep me"}
    assert sorted(os.listdir(tmp_path)) == ["out"]

    fresh, again = tmp_path / "fresh", tmp_path / "again"
    convert_checkpoint(src, fresh, to="glm", shard_size=SHARD)
    convert_checkpoint(src, again, to="glm")  # one shard
    convert_checkpoint(src, again, to="glm", overwrite=True, shard_size=SHARD)  # glm's own output: replaced
    check_sharded_output(again)
    assert snapshot(again) == snapshot(fresh)
    assert sorted(os.listdir(tmp_path)) == ["again", "fresh", "out"]


def test_missing_destination_parents_are_created(tmp_path):
    dst = tmp_path / "no" / "such" / "out"
    convert_checkpoint(reference_dir("chatglm3-6b"), dst, to="glm")
    assert is_glm_format(str(dst)) and sorted(os.listdir(tmp_path / "no" / "such")) == ["out"]


def _previous_output(tmp_path):
    dst = tmp_path / "out"
    convert_checkpoint(reference_dir("chatglm-6b"), dst, to="glm", shard_size=SHARD)
    (dst / "generation_config.json").write_text("previous run")  # a file glm writes: --overwrite may replace it
    return dst, snapshot(dst)


def test_write_failure_after_first_shard_keeps_previous_output(tmp_path, monkeypatch):
    dst, before = _previous_output(tmp_path)
    real = glm.checkpoint._write_safetensors_stream
    calls = []

    def failing(path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(glm.checkpoint, "_write_safetensors_stream", failing)
    with pytest.raises(OSError, match="No space left"):
        convert_checkpoint(reference_dir("glm-4-9b-0414"), dst, to="glm", shard_size=SHARD, overwrite=True)
    assert len(calls) == 2 and ".tmp-" in calls[0]  # it got past one shard, writing beside DST
    assert snapshot(dst) == before
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_fsync_failure_mid_way_via_cli(tmp_path, monkeypatch, capsys):
    dst, before = _previous_output(tmp_path)
    real = os.fsync
    calls = []

    def failing(fd):
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)

    monkeypatch.setattr(os, "fsync", failing)
    rc = main(["convert", reference_dir("glm-4-9b-chat-hf"), str(dst), "--shard-size", SHARD, "--overwrite", "--quiet"])
    monkeypatch.undo()
    assert rc == 2 and len(calls) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Input/output error" in err and "Traceback" not in err
    assert snapshot(dst) == before
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_failure_in_fresh_destination_leaves_nothing(tmp_path, monkeypatch):
    def failing(path, data):  # the small files (config.json, index) are written after the shards
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(glm.checkpoint, "atomic_write", failing)
    dst = tmp_path / "out"
    with pytest.raises(OSError):
        convert_checkpoint(reference_dir("glm-4-9b-chatglm"), dst, to="hf", shard_size=SHARD)
    assert_nothing_written(dst)


def test_tied_chatglm2_model_saves_loadably_or_refuses(tmp_path):
    """The chatglm2 format has no tie flag: a tied model must either refuse or write a folder that
    loads back with the same output weights."""
    model = glm.GLM(glm.preset("tiny-chatglm3").replace(tie_word_embeddings=True))
    model.init_weights(std=0.5, seed=1)
    out = tmp_path / "hf"
    try:
        save_pretrained(model, out, format="hf")
    except FormatError:
        assert_nothing_written(out)
        return
    loaded = glm.from_pretrained(out)
    assert torch.equal(loaded.output_weight, model.output_weight)
    ids = random_inputs(model.config, 0)
    with torch.no_grad():
        assert (loaded(ids) - model.eval()(ids)).abs().max().item() <= 1e-5
    g, back = tmp_path / "g", tmp_path / "back"
    convert_checkpoint(out, g, to="glm")
    convert_checkpoint(g, back, to="hf")
    assert_bit_exact(out, back)


def test_failed_final_rename_restores_previous_output(tmp_path, monkeypatch):
    """The old DST is moved aside before the new folder is renamed in; if that rename fails, the old
    DST must be put back."""
    dst, before = _previous_output(tmp_path)
    real = os.rename
    calls = []

    def failing(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # 1: old DST -> DST.old-*/x, 2: DST.tmp-* -> DST
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(a, b)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError):
        convert_checkpoint(reference_dir("chatglm3-6b"), dst, to="glm", overwrite=True)
    monkeypatch.undo()
    assert snapshot(dst) == before
    assert sorted(os.listdir(tmp_path)) == ["out"]


# ---------------------------------------------------------------------------------------------
# The command line

def test_cli_convert(tmp_path, capsys):
    src, dst = reference_dir("glm-4-9b-chatglm"), tmp_path / "out"
    assert main(["convert", src, str(dst), "--to", "glm", "--shard-size", "50KB", "--quiet"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1 and "tensors" in lines[0] and "peak RSS" in lines[0] and str(dst) in lines[0]
    assert captured.err == ""  # --quiet: no progress bar
    n = len(glm.from_pretrained(src).state_dict())
    assert f"{n} tensors" in lines[0]
    check_sharded_output(dst)
    assert is_glm_format(str(dst))

    back = tmp_path / "back"
    assert main(["convert", str(dst), str(back), "--to", "hf", "--quiet"]) == 0
    assert_bit_exact(src, back)


def test_cli_progress_bar(tmp_path, capsys):
    assert main(["convert", reference_dir("chatglm3-6b"), str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "peak RSS" in captured.out and "convert -> out" in captured.err


@pytest.mark.parametrize("case", ["missing-src", "exists", "format", "lossy", "truncated"])
def test_cli_errors_are_one_line(case, tmp_path, capsys):
    src, dst = reference_dir("chatglm-6b"), tmp_path / "out"
    args = ["convert", src, str(dst), "--quiet"]
    expect = {"missing-src": "config.json", "exists": "--overwrite", "format": "glm-hf",
              "lossy": "--allow-lossy", "truncated": "truncated"}[case]
    if case == "missing-src":
        args[1] = str(tmp_path / "nowhere")
    elif case == "exists":
        dst.mkdir()
        (dst / "notes.txt").write_text("an empty folder may be used; this one is not empty")
    elif case == "format":
        args += ["--to", "hf", "--family", "glm-hf"]
    elif case == "lossy":
        args += ["--dtype", "bf16"]
    elif case == "truncated":
        args[1] = copy_fixture("chatglm3-6b", tmp_path)
        p = os.path.join(args[1], "model.safetensors")
        with open(p, "r+b") as f:
            f.truncate(os.path.getsize(p) - 10)
    assert main(args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("glm convert: error:") and err.count("\n") == 0 and expect in err
    assert "Traceback" not in err and captured.out == ""
    if case != "exists":
        assert_nothing_written(dst)


def test_cli_rejects_unknown_dtype_and_family(tmp_path, capsys):
    for extra in (["--dtype", "int8"], ["--family", "llama"], ["--to", "gguf"]):
        with pytest.raises(SystemExit) as e:
            main(["convert", reference_dir("chatglm3-6b"), str(tmp_path / "out"), *extra])
        assert e.value.code == 2
        assert "invalid choice" in capsys.readouterr().err
    assert_nothing_written(tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# Layout details of the chatglm2 format that round trips through glm alone cannot see

def _mha_chatglm2(tmp_path):
    cfg = glm.preset("tiny-chatglm2").replace(num_kv_heads=4)  # as many KV heads as query heads
    model = glm.GLM(cfg)
    model.init_weights(seed=3)
    folder = tmp_path / "mha"
    save_pretrained(model, folder, format="hf")
    ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)
    return folder, ids, want


def test_chatglm2_writer_always_declares_multi_query(tmp_path):
    # With multi_query_attention false the reference reads the fused QKV rows per head ([n, 3d]);
    # glm writes [q | k | v] blocks, so the flag must say true even for plain multi-head attention.
    folder, _, _ = _mha_chatglm2(tmp_path)
    hf = load_json(folder / "config.json")
    assert hf["multi_query_attention"] is True and hf["multi_query_group_num"] == 4


def test_chatglm2_without_multi_query_reads_per_head_rows(tmp_path):
    from glm.formats.layout import blocks_to_per_head_qkv

    folder, ids, want = _mha_chatglm2(tmp_path)
    edit_json(folder / "config.json", lambda c: c.update(multi_query_attention=False))
    tensors = read_all(folder)
    for name in [k for k in tensors if "query_key_value" in k]:
        tensors[name] = blocks_to_per_head_qkv(tensors[name], 4, 16).contiguous()
    from safetensors.torch import save_file
    for f in os.listdir(folder):
        if f.endswith(".safetensors") or f.endswith(".index.json") or f == "glm_checksums.json":
            os.remove(folder / f)  # hand-made weights: glm's checksum record no longer describes them
    save_file(tensors, str(folder / "model.safetensors"))
    with torch.no_grad():
        got = glm.from_pretrained(folder)(ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # and written back in the same (per-head) form, bit for bit
    out = tmp_path / "again"
    convert_checkpoint(folder, out, to="hf")
    assert load_json(out / "config.json")["multi_query_attention"] is False
    assert_same_tensors(read_all(out), tensors, "per-head round trip")


@pytest.mark.parametrize("name", ["chatglm-6b", "chatglm2-6b"])
def test_unused_rope_buffers_are_optional(name, tmp_path):
    # The references never read the stored inv_freq buffers, so a file without them is complete.
    src = tmp_path / "src"
    convert_checkpoint(reference_dir(name), src, to="hf", shard_size="10GB")
    tensors = {k: v for k, v in read_all(src).items() if "inv_freq" not in k}
    from safetensors.torch import save_file
    os.remove(src / "model.safetensors")
    os.remove(src / "glm_checksums.json")  # hand-made weights: glm's checksum record no longer describes them
    save_file(tensors, str(src / "model.safetensors"))
    assert_parity(src, name)


def test_chatglm2_rope_ratio_round_trips_as_position_scale(tmp_path):
    model = glm.GLM(glm.preset("tiny-chatglm2").replace(rope_position_scale=16.0))
    save_pretrained(model, tmp_path / "c2", format="hf")
    assert load_json(tmp_path / "c2" / "config.json")["rope_ratio"] == 16.0
    back = glm.from_pretrained(tmp_path / "c2")
    assert (back.config.rope_position_scale, back.config.rope_base) == (16.0, 10000.0)
    with pytest.raises(FormatError, match="rope_position_scale"):
        save_pretrained(model, tmp_path / "hf", format="hf", family="glm-hf")


def test_convert_carries_the_tokenizer(tmp_path):
    src = copy_fixture("chatglm3-6b", tmp_path)
    with open(os.path.join(src, "tokenizer.model"), "wb") as f:
        f.write(b"not really a sentencepiece model")
    convert_checkpoint(src, tmp_path / "g", to="glm")
    convert_checkpoint(tmp_path / "g", tmp_path / "h", to="hf")
    for out in ("g", "h"):
        with open(tmp_path / out / "tokenizer.model", "rb") as f:
            assert f.read() == b"not really a sentencepiece model"


def test_convert_refuses_to_write_over_its_source(tmp_path):
    src = copy_fixture("chatglm3-6b", tmp_path)
    before = snapshot(src)
    with pytest.raises(ValueError, match="is the source folder or holds it"):
        convert_checkpoint(src, src, to="glm", overwrite=True)
    with pytest.raises(ValueError, match="is the source folder or holds it"):  # its parent: src inside dst
        convert_checkpoint(src, tmp_path, to="glm", overwrite=True)
    assert snapshot(src) == before


def test_ctrl_c_mid_conversion_keeps_previous_output_and_no_temp(tmp_path, monkeypatch, capsys):
    # KeyboardInterrupt is not an Exception: the cleanup must catch BaseException.
    dst, before = _previous_output(tmp_path)
    real = glm.checkpoint._write_safetensors_stream
    calls = []

    def interrupted(path, entries, tensors, *args, **kwargs):
        calls.append(path)
        if len(calls) > 1:
            next(iter(tensors))  # part of the shard is under way
            raise KeyboardInterrupt
        return real(path, entries, tensors, *args, **kwargs)

    monkeypatch.setattr(glm.checkpoint, "_write_safetensors_stream", interrupted)
    rc = main(["convert", reference_dir("glm-4-9b-0414"), str(dst), "--shard-size", SHARD, "--overwrite", "--quiet"])
    assert rc == 130 and len(calls) == 2
    assert "interrupted" in capsys.readouterr().err
    assert snapshot(dst) == before
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("fixture", ["chatglm2-6b", "glm-4-9b-chat-hf"])
def test_conversion_stays_off_torch_dynamo(fixture, tmp_path):
    """The shape checks run every table on meta tensors; torch implements some meta ops (cat, arange,
    normal_) in Python and imports torch._dynamo on their first call, about 2 s of every conversion."""
    import subprocess
    import sys

    src = reference_dir(fixture)
    script = ("import sys; from glm.hub import convert_checkpoint\n"
              f"convert_checkpoint({src!r}, {str(tmp_path / 'out')!r}, to='glm')\n"
              f"convert_checkpoint({str(tmp_path / 'out')!r}, {str(tmp_path / 'back')!r}, to='hf')\n"
              "print('torch._dynamo' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False", "a conversion imported torch._dynamo (a Python meta kernel ran)"
