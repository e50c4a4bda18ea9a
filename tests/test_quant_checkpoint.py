"""Quantized checkpoints (glm.hub, glm.formats.quantized): glm's own format (the quantized state dict as it is, the
scheme in config.json), THUDM's quantization_bit releases (built here from the golden fixtures by an implementation
of THUDM's quantize and int4 packing written out in this file), quantizing as the weights stream in (on load and
folder to folder), and the errors for what cannot be read or written.

Bit-exact means the same tensor names, dtypes and bytes; logits are compared at the fixtures' 1e-4 in fp32."""
from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from conftest import edit_json, reference_dir, snapshot
from safetensors.torch import load_file, save_file

import glm
from glm import lora, parity, ptuning, quant
from glm.checkpoint import CheckpointReader
from glm.errors import CheckpointError, ConfigError, FormatError, InputError, KeyMismatchError
from glm.formats import peft, ptuning_checkpoint, quantized
from glm.hub import convert_checkpoint, quantize_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

THUDM_FIXTURES = ["chatglm-6b", "chatglm2-6b", "chatglm3-6b", "glm-4-9b-chatglm"]
# The four projections THUDM's quantize() replaces, by their release names.
PROJECTION = re.compile(r"\.(query_key_value|dense|dense_h_to_4h|dense_4h_to_h)\.weight$")
V1_EMBEDDING = "transformer.word_embeddings.weight"


# ---------------------------------------------------------------------------------------------
# Helpers
def read_all(folder) -> dict[str, torch.Tensor]:
    with CheckpointReader(os.fspath(folder)) as r:
        return {k: r.get(k) for k in r.keys()}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str = "") -> None:
    assert sorted(a) == sorted(b), f"{what}: names differ: {sorted(set(a) ^ set(b))}"
    for k in a:
        x, y = a[k], b[k]
        assert (x.dtype, x.shape) == (y.dtype, y.shape), f"{what}: {k}: {x.dtype} {x.shape} != {y.dtype} {y.shape}"
        assert torch.equal(x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8)), \
            f"{what}: {k}: bytes differ"


def assert_same_model(a: glm.GLM, b: glm.GLM) -> None:
    """Same quantization record, every state-dict tensor bit for bit, and the same compute dtype per layer."""
    assert getattr(a, "quantization", None) == getattr(b, "quantization", None)
    assert_same_tensors(a.state_dict(), b.state_dict(), "models")
    qa, qb = quant.quantized_modules(a), quant.quantized_modules(b)
    assert {k: m.compute_dtype for k, m in qa.items()} == {k: m.compute_dtype for k, m in qb.items()}


def tiny_model(name: str, seed: int = 0) -> glm.GLM:
    m = glm.GLM(glm.preset(name))
    m.init_weights(std=0.1, seed=seed)
    return m.eval()


def load_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def assert_nothing_written(dst) -> None:
    dst = os.fspath(dst)
    parent, base = os.path.split(dst)
    assert not os.path.exists(dst), f"{dst} was created"
    assert not [n for n in os.listdir(parent) if n.startswith(base + ".")], "temporary folders left behind"


def case_inputs(name: str) -> dict:
    """The first forward case of a fixture, as GLM.forward arguments."""
    meta, tensors = parity.load_cases(reference_dir(name))
    case = next(c for c in meta["cases"] if c["kind"] == "forward")
    inputs = {k: tensors[v] if isinstance(v, str) else v for k, v in case["inputs"].items()}
    pad_left = inputs.get("pad_left")
    if pad_left is None and "attention_mask" in inputs:
        pad_left = (inputs["attention_mask"] == 0).long().cumprod(dim=1).sum(dim=1)
    return dict(input_ids=inputs["input_ids"], position_ids=inputs.get("position_ids"),
                prefix_len=inputs.get("prefix_len"), pad_left=pad_left)


def logits(model: glm.GLM, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).float()


# ---------------------------------------------------------------------------------------------
# THUDM's quantization, written out: quantization.py's QuantizedLinear and compress_int4_weight

def thudm_quantize(w: torch.Tensor, bits: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(the integers [out, in] in [-qmax, qmax], weight_scale [out]): the scale is max|W| over the row divided by
    2^(bits-1) - 1 in the weight's dtype, then cast (ChatGLM-6B: .half(); ChatGLM2: kept); torch.round is half to
    even. THUDM's code does not clamp, but in bf16 a row's max|W| / scale can round to 127.5 and then to 128, which
    its int8 cast wraps to -128 (the glm-4 fixture has such rows); like glm.quant, these files clamp to qmax."""
    qmax = 2 ** (bits - 1) - 1
    scale = (w.abs().max(dim=-1).values / qmax).to(scale_dtype)
    return torch.round(w / scale[:, None]).clamp(-qmax, qmax).to(torch.int8), scale


def thudm_pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """The stored weight: int8 as it is, or two values a byte with input column 2j in the high nibble."""
    if bits == 8:
        return q
    wide = q.to(torch.int16)
    byte = ((wide[:, 0::2] << 4) | (wide[:, 1::2] & 0xF)) & 0xFF
    return byte.to(torch.uint8).view(torch.int8)


def thudm_folders(name: str, bits: int, tmp_path, embeddings: bool = False, head: bool = True) -> tuple[str, str]:
    """(a release folder in THUDM's quantized layout built from fixture ``name``, the same release in float with
    every quantized weight replaced by its dequantized value ``q * scale`` computed exactly in fp32, as THUDM's CPU
    kernels extract it (extract_int4_weight_to_float); its GPU extract_weight_to_half is that value rounded once
    to the scale's dtype, which fp32 logits cannot match to 1e-4 for fp16 scales). ``embeddings``: ChatGLM-6B's
    quantization_embeddings; ``head``: whether the file stores the lm_head that shares them."""
    src = reference_dir(name)
    raw = load_json(os.path.join(src, "config.json"))
    v1 = "padded_vocab_size" not in raw
    tensors = read_all(src)
    quantized, dequantized = {}, {}
    for key, w in tensors.items():
        if PROJECTION.search(key) or (embeddings and key == V1_EMBEDDING):
            q, scale = thudm_quantize(w, bits, torch.float16 if v1 else w.dtype)
            quantized[key], quantized[key + "_scale"] = thudm_pack(q, bits), scale
            dequantized[key] = q.float() * scale.float()[:, None]
        elif not (embeddings and key == "lm_head.weight"):
            quantized[key] = dequantized[key] = w
    if embeddings:
        if head:
            quantized["lm_head.weight"] = quantized[V1_EMBEDDING].clone()
            quantized["lm_head.weight_scale"] = quantized[V1_EMBEDDING + "_scale"].clone()
        dequantized["lm_head.weight"] = dequantized[V1_EMBEDDING].clone()
    folders = []
    for kind, sd, extra in (("int", quantized, {"quantization_bit": bits}), ("float", dequantized, {})):
        folder = tmp_path / f"{name}-{bits}-{kind}"
        folder.mkdir()
        if v1 and kind == "int":
            extra["quantization_embeddings"] = embeddings
            torch.save(sd, folder / "pytorch_model.bin")  # ChatGLM-6B-int4 ships one .bin
        else:
            save_file({k: v.contiguous() for k, v in sd.items()}, folder / "model.safetensors", {"format": "pt"})
        (folder / "config.json").write_text(json.dumps({**raw, **extra}, indent=2))
        folders.append(str(folder))
    return folders[0], folders[1]


def thudm_scale_dtype(name: str) -> torch.dtype:
    """The scale dtype THUDM's code stores for a fixture: fp16 for ChatGLM-6B, else the weights' dtype."""
    raw = load_json(os.path.join(reference_dir(name), "config.json"))
    return torch.float16 if "padded_vocab_size" not in raw else getattr(torch, raw["torch_dtype"])


# ---------------------------------------------------------------------------------------------
# glm's own format

@pytest.mark.parametrize("name,bits,group,embeddings,lm_head,scale_dtype", [
    ("tiny-glm", 8, None, False, False, torch.float32),
    ("tiny-chatglm", 4, 32, True, False, torch.float16),
    ("tiny-chatglm2", 8, 16, False, True, torch.bfloat16),
    ("tiny-chatglm3", 4, None, True, True, torch.float16),
    ("tiny-glm4-chatglm", 4, 32, False, False, torch.float32),
    ("tiny-glm-hf", 8, None, True, True, torch.float32),
    ("tiny-glm4-hf", 4, 32, False, True, torch.float16),
])
def test_glm_format_round_trip_is_bit_exact(name, bits, group, embeddings, lm_head, scale_dtype, tmp_path):
    model = quant.quantize(tiny_model(name), bits, group, embeddings=embeddings, lm_head=lm_head,
                           scale_dtype=scale_dtype)
    model.save_pretrained(tmp_path / "q", shard_size="20KB")
    record = load_json(tmp_path / "q" / "config.json")["quantization"]
    assert record == model.quantization == {"bits": bits, "group_size": group, "embeddings": embeddings,
                                            "lm_head": lm_head and model.lm_head is not None}
    # The file holds the quantized state dict as it is.
    assert_same_tensors(read_all(tmp_path / "q"), model.state_dict(), "written")
    back = glm.from_pretrained(tmp_path / "q")
    assert_same_model(back, model)
    ids = torch.randint(0, 160, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
    # glm -> glm conversion keeps every tensor.
    convert_checkpoint(tmp_path / "q", tmp_path / "q2")
    assert_same_tensors(read_all(tmp_path / "q2"), read_all(tmp_path / "q"), "converted")
    assert load_json(tmp_path / "q2" / "config.json") == load_json(tmp_path / "q" / "config.json")


def test_dtype_applies_to_float_tensors_only(tmp_path):
    model = quant.quantize(tiny_model("tiny-chatglm3"), 4, 32, scale_dtype=torch.float16)
    model.save_pretrained(tmp_path / "q")
    half = glm.from_pretrained(tmp_path / "q", dtype=torch.bfloat16)
    for k, v in model.state_dict().items():
        got = half.state_dict()[k]
        if k.endswith(quant.QUANTIZED_TENSORS):
            assert got.dtype == v.dtype and torch.equal(got, v), k
        else:
            assert got.dtype == torch.bfloat16 and torch.equal(got, v.to(torch.bfloat16)), k
    assert {m.compute_dtype for m in quant.quantized_modules(half).values()} == {torch.bfloat16}
    # Converting to a dtype casts the float tensors and copies integers and scales unchanged, with no
    # lossy-cast refusal for them.
    convert_checkpoint(tmp_path / "q", tmp_path / "h", dtype=torch.float32)
    stored = read_all(tmp_path / "h")
    assert stored["layers.0.attn.qkv.scales"].dtype == torch.float16
    assert stored["layers.0.attn.qkv.qweight"].dtype == torch.int8
    assert stored["final_norm.weight"].dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# THUDM's quantization_bit releases

@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", THUDM_FIXTURES)
def test_thudm_release_loads_and_round_trips(name, bits, tmp_path):
    qdir, fdir = thudm_folders(name, bits, tmp_path)
    inputs = case_inputs(name)
    qmodel = glm.from_pretrained(qdir)
    assert qmodel.quantization == {"bits": bits, "group_size": None, "embeddings": False, "lm_head": False}
    torch.testing.assert_close(logits(qmodel, inputs), logits(glm.from_pretrained(fdir), inputs),
                               rtol=0, atol=1e-4)
    # Every row transform of the release's table commutes with per-row quantization: the release's integers,
    # reordered by the table, are glm's quantization of the float model the table loads.
    stored = glm.from_pretrained(qdir, dtype=None)
    ours = quant.quantize(glm.from_pretrained(reference_dir(name), dtype=None), bits,
                          scale_dtype=thudm_scale_dtype(name))
    assert_same_model(stored, ours)
    # glm -> THUDM's layout again: the same tensors, and config.json keys for THUDM's code to build them from.
    stored.save_pretrained(tmp_path / "hf", format="hf")
    assert_same_tensors(read_all(tmp_path / "hf"), read_all(qdir), "hf -> glm -> hf")
    written, release = load_json(tmp_path / "hf" / "config.json"), load_json(os.path.join(qdir, "config.json"))
    assert {k: v for k, v in written.items() if k.startswith("quantization")} == \
        {k: v for k, v in release.items() if k.startswith("quantization")}
    # Through glm's format, folder to folder: the release's own config.json comes back.
    convert_checkpoint(qdir, tmp_path / "g", to="glm")
    convert_checkpoint(tmp_path / "g", tmp_path / "hf2", to="hf")
    assert_same_tensors(read_all(tmp_path / "hf2"), read_all(qdir), "hf -> glm folder -> hf")
    assert load_json(tmp_path / "hf2" / "config.json") == release


@pytest.mark.parametrize("head", [True, False])
def test_chatglm6b_quantized_embeddings_share_the_head(head, tmp_path):
    qdir, fdir = thudm_folders("chatglm-6b", 4, tmp_path, embeddings=True, head=head)
    inputs = case_inputs("chatglm-6b")
    qmodel = glm.from_pretrained(qdir)
    assert isinstance(qmodel.embed, quant.QuantEmbedding) and qmodel.lm_head is None
    assert qmodel.quantization["embeddings"]
    torch.testing.assert_close(logits(qmodel, inputs), logits(glm.from_pretrained(fdir), inputs),
                               rtol=0, atol=1e-4)
    # Written back with both the embedding and the lm_head that shares it, whichever the file had.
    glm.from_pretrained(qdir, dtype=None).save_pretrained(tmp_path / "hf", format="hf")
    written = read_all(tmp_path / "hf")
    if head:
        full = read_all(qdir)
    else:
        (tmp_path / "with-head").mkdir()
        full = read_all(thudm_folders("chatglm-6b", 4, tmp_path / "with-head", embeddings=True, head=True)[0])
    assert_same_tensors(written, full, "quantized embeddings")
    assert load_json(tmp_path / "hf" / "config.json")["quantization_embeddings"] is True


def test_quantization_bit_0_is_a_float_release(tmp_path):
    # ChatGLM2-6B's own config.json says quantization_bit 0: a float model, and the key comes back as it was.
    src = tmp_path / "src"
    shutil.copytree(reference_dir("chatglm2-6b"), src)
    edit_json(src / "config.json", lambda d: d.update(quantization_bit=0))
    assert not quant.is_quantized(glm.from_pretrained(src))
    convert_checkpoint(src, tmp_path / "g")
    convert_checkpoint(tmp_path / "g", tmp_path / "hf", to="hf")
    assert load_json(tmp_path / "hf" / "config.json") == load_json(src / "config.json")


def test_quantized_chatglm2_model_saves_thudm_layout_in_its_dtype(tmp_path):
    # A float release quantized in glm (scales in the model's dtype, as ChatGLM2's layout keeps them) writes a
    # folder that loads back as the same model.
    model = quant.quantize(glm.from_pretrained(reference_dir("chatglm3-6b"), dtype=None), 4,
                           scale_dtype=torch.float16)
    model.save_pretrained(tmp_path / "hf", format="hf")
    cfg = load_json(tmp_path / "hf" / "config.json")
    assert cfg["quantization_bit"] == 4 and cfg["torch_dtype"] == "float16"
    assert read_all(tmp_path / "hf")["transformer.encoder.layers.0.mlp.dense_4h_to_h.weight_scale"].dtype == \
        torch.float16
    assert_same_model(glm.from_pretrained(tmp_path / "hf", dtype=None), model)


# ---------------------------------------------------------------------------------------------
# Quantizing as the weights stream in

@pytest.mark.parametrize("name,dtype,bits,group,embeddings,lm_head", [
    ("chatglm-6b", torch.float32, 4, 16, True, False),
    ("glm-4-9b-chatglm", None, 8, None, False, True),
    ("glm-4-9b-0414", torch.float32, 4, 32, True, True),
    ("glm", None, 8, 32, False, False),
])
def test_quantize_on_load_equals_quantize_after_load(name, dtype, bits, group, embeddings, lm_head, monkeypatch):
    # Blocks of a few rows, as a real model's weights are quantized (glm.quantize quantizes a weight whole).
    monkeypatch.setattr(quantized, "BLOCK_BYTES", 1000)
    src = reference_dir(name)
    streamed = glm.from_pretrained(src, dtype=dtype, quantize=f"int{bits}", group_size=group,
                                   quantize_embeddings=embeddings, quantize_lm_head=lm_head)
    after = quant.quantize(glm.from_pretrained(src, dtype=dtype), bits, group, embeddings=embeddings,
                           lm_head=lm_head)
    assert_same_model(streamed, after)
    inputs = case_inputs(name)
    assert torch.equal(logits(streamed, inputs), logits(after, inputs))


def test_quantize_checkpoint_output_loads_as_quantize_on_load(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(reference_dir("chatglm2-6b"), src)
    (src / "tokenizer_config.json").write_text("{}")
    summary = quantize_checkpoint(src, tmp_path / "q", 4, 32, embeddings=True, shard_size="30KB")
    assert summary.format == "glm" and len(summary.files) > 1
    assert (tmp_path / "q" / "tokenizer_config.json").read_text() == "{}"
    expected = glm.from_pretrained(src, dtype=None, quantize="int4", group_size=32, quantize_embeddings=True)
    assert_same_model(glm.from_pretrained(tmp_path / "q", dtype=None), expected)
    # In THUDM's layout: scales stored in the weights' dtype (fp16 here), as ChatGLM2's quantization.py does.
    quantize_checkpoint(src, tmp_path / "hf", 8, format="hf")
    assert load_json(tmp_path / "hf" / "config.json")["quantization_bit"] == 8
    expected = glm.from_pretrained(src, dtype=None, quantize="int8", scale_dtype=torch.float16)
    assert_same_model(glm.from_pretrained(tmp_path / "hf", dtype=None), expected)


# ---------------------------------------------------------------------------------------------
# Bad input: one error each, nothing written

def test_unknown_quantization_bit(tmp_path):
    qdir, _ = thudm_folders("chatglm3-6b", 8, tmp_path)
    edit_json(os.path.join(qdir, "config.json"), lambda d: d.update(quantization_bit=3))
    with pytest.raises(ConfigError, match=r"'quantization_bit' is 3; .*4 or 8"):
        convert_checkpoint(qdir, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")
    with pytest.raises(ConfigError, match="quantization_bit"):
        glm.from_pretrained(qdir)


def test_missing_or_misshaped_scales(tmp_path):
    qdir, _ = thudm_folders("glm-4-9b-chatglm", 4, tmp_path)
    path = os.path.join(qdir, "model.safetensors")
    good = load_file(path)
    key = "transformer.encoder.layers.1.self_attention.query_key_value.weight_scale"
    for broken, error, match in [
        ({k: v for k, v in good.items() if k != key}, KeyMismatchError, "missing 1 tensor.*weight_scale"),
        ({**good, key: good[key][:-1]}, CheckpointError, "does not fit the shape"),
        ({**good, key: good[key][:, None]}, CheckpointError, "does not fit the shape"),
        ({**good, key: good[key].to(torch.int32)}, CheckpointError, "scales"),
        ({**good, key[:-len("_scale")]: good[key[:-len("_scale")]].float()}, CheckpointError, "int8"),
    ]:
        save_file(broken, path, {"format": "pt"})
        with pytest.raises(error, match=match):
            convert_checkpoint(qdir, tmp_path / "out")
        assert_nothing_written(tmp_path / "out")


def test_group_size_that_does_not_divide(tmp_path):
    quant.quantize(tiny_model("tiny-chatglm3"), 4, 32).save_pretrained(tmp_path / "q")
    edit_json(tmp_path / "q" / "config.json", lambda d: d["quantization"].update(group_size=48))
    with pytest.raises(ConfigError, match="group_size 48 does not divide"):
        convert_checkpoint(tmp_path / "q", tmp_path / "out")
    assert_nothing_written(tmp_path / "out")
    src = reference_dir("chatglm3-6b")
    with pytest.raises(InputError, match="group_size 48 does not divide"):
        glm.from_pretrained(src, quantize="int4", group_size=48)
    with pytest.raises(InputError, match="group_size 48 does not divide"):
        quantize_checkpoint(src, tmp_path / "out", 4, 48)
    assert_nothing_written(tmp_path / "out")


def test_bad_quantization_records_and_arguments(tmp_path):
    quant.quantize(tiny_model("tiny-glm"), 8).save_pretrained(tmp_path / "q")
    for record, match in [({"bits": 3}, "bits is 3"), ({"bits": 8, "group_size": 0}, "group_size is 0"),
                          ({"bits": 8, "lm_head": True}, "tied"), ({"bits": 8, "scales": "x"}, "does not know"),
                          ({"bits": 8, "embeddings": "yes"}, "true or false")]:
        edit_json(tmp_path / "q" / "config.json", lambda d: d.update(quantization=record))
        with pytest.raises(ConfigError, match=match):
            glm.from_pretrained(tmp_path / "q")
    src = reference_dir("chatglm3-6b")
    for kwargs, match in [(dict(quantize="int3"), "quantize= must be one of 'int8', 'int4'"),
                          (dict(group_size=32), "apply only with quantize="),
                          (dict(quantize="int8", scale_dtype=torch.int8), "scale_dtype")]:
        with pytest.raises(ValueError, match=match):
            glm.from_pretrained(src, **kwargs)


def test_quantize_of_a_quantized_checkpoint_is_refused(tmp_path):
    qdir, _ = thudm_folders("chatglm2-6b", 4, tmp_path)
    with pytest.raises(InputError, match=re.escape(qdir) + r" is a quantized checkpoint already \(int4, per-row"):
        glm.from_pretrained(qdir, quantize="int8")
    with pytest.raises(InputError, match="quantized checkpoint already"):
        quantize_checkpoint(qdir, tmp_path / "out", 8)
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("make,match", [
    (lambda: quant.quantize(tiny_model("tiny-chatglm3"), 4, 32), "one scale per output row"),
    (lambda: quant.quantize(tiny_model("tiny-glm-hf"), 8), "glm-hf release format has no quantized layout"),
    (lambda: quant.quantize(tiny_model("tiny-glm4-hf"), 8), "save the quantized model in glm format"),
    (lambda: quant.quantize(tiny_model("tiny-glm"), 8), "save the quantized model in glm format"),
    (lambda: quant.quantize(tiny_model("tiny-chatglm3"), 8, lm_head=True), "untied lm_head is quantized"),
    (lambda: quant.quantize(tiny_model("tiny-chatglm2"), 8, embeddings=True), "only the four projections"),
    (lambda: quant.quantize(tiny_model("tiny-chatglm"), 8), r"fp16|float16.*scale_dtype=torch.float16"),
    (lambda: quant.quantize(tiny_model("tiny-chatglm3"), 8, scale_dtype=torch.bfloat16),
     "scale_dtype=torch.float32, or write the float tensors in the scales' dtype"),
])
def test_what_thudm_layout_cannot_hold_is_refused(make, match, tmp_path):
    model = make()
    before = snapshot(tmp_path)
    with pytest.raises(FormatError, match=match):
        model.save_pretrained(tmp_path / "out", format="hf")
    assert_nothing_written(tmp_path / "out")
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# Adapters load onto a base quantized as asked

def test_prefix_folder_passes_quantize_to_its_base(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(reference_dir("chatglm3-6b"), base)
    model = glm.from_pretrained(base)
    ptuning.apply(model, ptuning.PrefixConfig(pre_seq_len=4))
    ptuning_checkpoint.save_prefix(model, tmp_path / "prefix", base_model_name_or_path=str(base))
    loaded = glm.from_pretrained(tmp_path / "prefix", quantize="int8")
    assert loaded.quantization["bits"] == 8 and loaded.prefix_encoder is not None


def test_lora_folder_passes_quantize_to_its_base(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(reference_dir("chatglm3-6b"), base)
    model = glm.from_pretrained(base)
    lora.apply(model, lora.LoraConfig(r=4), seed=0)
    peft.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base))
    loaded = glm.from_pretrained(tmp_path / "adapter", quantize="int4", group_size=32)
    assert loaded.quantization["bits"] == 4 and lora.has_lora(loaded)
    # The base under the adapters is the quantized base, bit for bit.
    plain = glm.from_pretrained(base, quantize="int4", group_size=32)
    assert torch.equal(loaded.layers[1].attn.qkv.qweight, plain.layers[1].attn.qkv.qweight)
