"""Weight-only INT8 / INT4 quantization (glm.quant): THUDM's packing and rounding, the error of a quantized
layer against its float one, whole quantized models (cached decode, generation, state dict round trips), and
the errors for bad input."""
import copy

import pytest
import torch
import torch.nn.functional as F

import glm
from glm import ptuning, quant
from glm.errors import CheckpointError, InputError
from glm.formats.ptuning_checkpoint import save_prefix
from glm.quant import QuantLinear, dequantize, pack_int4, quantize_weight, unpack_int4

TINY = ["tiny-glm", "tiny-chatglm", "tiny-chatglm2", "tiny-chatglm3", "tiny-glm4-chatglm", "tiny-glm-hf",
        "tiny-glm4-hf"]


def tiny_model(name: str = "tiny-glm4-chatglm", seed: int = 0) -> glm.GLM:
    torch.manual_seed(seed)
    m = glm.GLM(glm.preset(name))
    m.init_weights(std=0.1, seed=seed)  # larger than the default so that every layer moves the logits
    return m.eval()


def signed_nibble(v: int) -> int:
    return v - 16 if v >= 8 else v


# ----------------------------------------------------------------------------------------------
# Packing
def test_int4_packing_matches_hand_built_bytes():
    q = torch.tensor([[-7, 3, 0, -1, 7, -8]], dtype=torch.int8)
    packed = pack_int4(q)
    # Even column in the high nibble: (-7, 3) -> 0x93, (0, -1) -> 0x0F, (7, -8) -> 0x78.
    assert packed.view(torch.uint8).tolist() == [[0x93, 0x0F, 0x78]]
    assert torch.equal(unpack_int4(packed), q)


def test_int4_unpack_sign_extends_every_byte():
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.int8).reshape(16, 16)
    got = unpack_int4(every)
    for b in range(256):
        r, c = divmod(b, 16)
        assert got[r, 2 * c].item() == signed_nibble(b >> 4)
        assert got[r, 2 * c + 1].item() == signed_nibble(b & 0xF)
    assert torch.equal(pack_int4(got), every)


# ----------------------------------------------------------------------------------------------
# Quantizing and dequantizing
def test_quantize_weight_rounds_half_to_even_without_clamp():
    # Row max 127 -> scale exactly 1: the values show the rounding directly.
    w = torch.tensor([[127.0, 2.5, 3.5, -0.5, -1.5, 0.49, -127.0, 126.5]])
    q, s = quantize_weight(w, 8)
    assert s.shape == (1, 1) and s.item() == 1.0
    assert q.tolist() == [[127, 2, 4, 0, -2, 0, -127, 126]]
    # 4 bits: max -> 7, scale max/7.
    q4, s4 = quantize_weight(torch.tensor([[7.0, -7.0, 2.5, 3.5]]), 4)
    assert s4.item() == 1.0 and unpack_int4(q4).tolist() == [[7, -7, 2, 4]]


def test_quantize_weight_scales_per_row_and_per_group():
    torch.manual_seed(0)
    w = torch.randn(6, 64)
    q, s = quantize_weight(w, 8, 16)
    assert q.shape == (6, 64) and s.shape == (6, 4)
    assert torch.equal(s, w.view(6, 4, 16).abs().amax(-1) / 127)
    # Each group's largest magnitude lands on +-127 exactly.
    assert (q.view(6, 4, 16).abs().amax(-1) == 127).all()
    q4, s4 = quantize_weight(w, 4, 32)
    assert q4.shape == (6, 32) and s4.shape == (6, 2)
    assert (unpack_int4(q4).view(6, 2, 32).abs().amax(-1) == 7).all()
    # A zero row quantizes to zeros (no NaN cast to int8) and dequantizes to zeros.
    w[2] = 0
    q, s = quantize_weight(w, 8)
    assert (q[2] == 0).all() and s[2].item() == 0 and (dequantize(q, s, 8)[2] == 0).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_weight_follows_thudm_rounding_of_fp16_weights(bits):
    # ChatGLM-6B: scale = (max|W| / (2^(b-1)-1)).half(), q = round(W / scale) on the fp16 weight.
    torch.manual_seed(1)
    w = (torch.randn(8, 32) * 0.05).half()
    q, s = quantize_weight(w, bits, None, torch.float16)
    want_s = (w.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)).half()
    want_q = torch.round(w / want_s[:, None]).to(torch.int8)
    assert torch.equal(s[:, 0], want_s)
    assert torch.equal(unpack_int4(q) if bits == 4 else q, want_q)


def thudm_extract(packed: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """THUDM's extract_weight_to_half written out one element at a time: the (sign-extended) integer in the
    scale's dtype times its row's scale, rounded to that dtype."""
    out_f = packed.shape[0]
    cols = packed.shape[1] * (2 if bits == 4 else 1)
    w = torch.empty(out_f, cols, dtype=scale.dtype)
    for i in range(out_f):
        for j in range(cols):
            if bits == 4:
                b = int(packed[i, j // 2].item()) & 0xFF
                v = signed_nibble(b >> 4) if j % 2 == 0 else signed_nibble(b & 0xF)
            else:
                v = int(packed[i, j].item())
            w[i, j] = torch.tensor(v, dtype=scale.dtype) * scale[i]
    return w


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_dequantize_is_bit_exact_with_thudm_extract(bits, scale_dtype):
    torch.manual_seed(2)
    w = torch.randn(5, 12).to(scale_dtype)
    q, s = quantize_weight(w, bits, None, scale_dtype)
    got = dequantize(q, s, bits)
    assert got.dtype == scale_dtype
    assert torch.equal(got, thudm_extract(q, s[:, 0], bits))
    # THUDM's weight_scale is [out]: the same result.
    assert torch.equal(dequantize(q, s[:, 0], bits), got)


# ----------------------------------------------------------------------------------------------
# One layer
@pytest.mark.parametrize("bits,group", [(8, None), (8, 32), (4, None), (4, 32), (4, 64)])
@pytest.mark.parametrize("rows", [1, 3, 20])
def test_quant_linear_error_within_half_a_step_per_input(bits, group, rows):
    torch.manual_seed(3)
    lin = torch.nn.Linear(128, 48, bias=True)
    x = torch.randn(rows, 128)
    ql = QuantLinear.from_linear(lin, bits, group)
    with torch.no_grad():
        y, yq = lin(x), ql(x)
        # Against the dequantize-then-matmul reference: fp32 rounding only (the same products, another order).
        ref = F.linear(x, dequantize(ql.qweight, ql.scales, bits, group), lin.bias)
        fp32 = 8 * torch.finfo(torch.float32).eps * (x.abs() @ ql.weight.abs().T + lin.bias.abs())
        assert ((yq - ref).abs() <= fp32).all()
        # Against the float layer: each weight moves by at most half a step, scale/2, so the output by at
        # most sum_j |x_j| * scale(o, j) / 2.
        step = ql.scales.repeat_interleave(128 // ql.scales.shape[1], dim=1)  # [out, in]
        bound = x.abs() @ (step / 2).T + fp32
        err = (yq - y).abs()
        assert (err <= bound).all()
        assert err.max() > 0  # the bound is exercised, not vacuous


def test_quant_linear_keeps_scales_through_dtype_casts():
    torch.manual_seed(4)
    ql = QuantLinear.from_linear(torch.nn.Linear(64, 32), 4, 32)
    scales = ql.scales.clone()
    ql.to(torch.bfloat16)
    assert ql.scales.dtype == torch.float32 and torch.equal(ql.scales, scales)
    assert ql.compute_dtype == torch.bfloat16 and ql.bias.dtype == torch.bfloat16
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert ql(x).dtype == torch.bfloat16 and ql.weight.dtype == torch.bfloat16


def test_quantized_weights_take_less_memory():
    model = tiny_model()
    base = {name: mod.weight.numel() * mod.weight.element_size()
            for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and "layers" in name}
    for bits, group, lo, hi in [(8, None, 3.5, 4.0), (4, 32, 6.0, 8.0)]:
        q = quant.quantize(copy.deepcopy(model), bits, group)
        mods = quant.quantized_modules(q)
        assert set(mods) == set(base)
        ratio = sum(base.values()) / sum(m.qweight.nbytes + m.scales.nbytes for m in mods.values())
        assert lo <= ratio <= hi, (bits, group, ratio)
        assert not any(n.startswith(f"{m}.") for n, _ in q.named_parameters() for m in mods if "bias" not in n)


# ----------------------------------------------------------------------------------------------
# Whole models
def dequantized_copy(qmodel: glm.GLM, float_model: glm.GLM) -> glm.GLM:
    """``float_model`` with every quantized layer's weight replaced by its dequantized value."""
    out = copy.deepcopy(float_model)
    with torch.no_grad():
        for name, mod in quant.quantized_modules(qmodel).items():
            out.get_submodule(name).weight.copy_(mod.weight)
    return out


@pytest.mark.parametrize("name", TINY)
def test_quantized_models_of_every_family(name):
    model = tiny_model(name)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids)
        for bits, group, rel_max in [(8, None, 0.04), (4, 32, 0.4)]:
            q = quant.quantize(copy.deepcopy(model), bits, group)
            assert q.quantization == {"bits": bits, "group_size": group, "embeddings": False, "lm_head": False}
            got = q(ids)
            # Against the model with the dequantized weights: only fp32 summation order differs.
            deq = dequantized_copy(q, model)(ids)
            torch.testing.assert_close(got, deq, rtol=1e-4, atol=1e-4)
            rel = ((got - ref).norm() / ref.norm()).item()
            assert 0 < rel < rel_max, (bits, group, rel)


def test_quantized_model_decodes_with_kv_cache_and_generates():
    model = quant.quantize(tiny_model("tiny-chatglm3"), 4, 32)
    ids = torch.randint(0, 160, (1, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, 16)
        steps = [model(ids[:, :5], cache=cache)[:, -1]]
        for t in range(5, 8):
            steps.append(model(ids[:, t:t + 1], cache=cache)[:, -1])
    torch.testing.assert_close(torch.stack(steps[1:], 1), full[:, 5:8], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(steps[0], full[:, 4], rtol=1e-4, atol=1e-4)
    out = glm.generate(model, ids, max_new_tokens=4, eos_token_ids=())
    assert out.shape == (1, 4)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32)])
def test_quantized_static_step_generates_the_eager_tokens(bits, group):
    # The static decode step is what a CUDA graph replays; on the CPU it runs eagerly through the same code,
    # with the quantized kernels at one row per sequence.
    model = quant.quantize(tiny_model("tiny-glm4-chatglm"), bits, group, embeddings=True)
    ids = torch.randint(1, 160, (2, 6), generator=torch.Generator().manual_seed(9))
    pad = torch.tensor([0, 2])
    ids[1, :2] = 0
    eager = glm.generate(model, ids, pad_left=pad, max_new_tokens=6, static=False, eos_token_ids=())
    static = glm.generate(model, ids, pad_left=pad, max_new_tokens=6, static=True, eos_token_ids=())
    assert torch.equal(static, eager)


@pytest.mark.parametrize("name", ["tiny-chatglm", "tiny-glm4-chatglm"])  # tied and untied output head
def test_quantized_embeddings_and_head(name):
    model = tiny_model(name)
    ids = torch.randint(0, 160, (2, 6), generator=torch.Generator().manual_seed(6))
    q = quant.quantize(copy.deepcopy(model), 8, None, embeddings=True, lm_head=True)
    assert isinstance(q.embed, quant.QuantEmbedding)
    assert isinstance(q.lm_head, QuantLinear) == (model.lm_head is not None)
    assert q.quantization["lm_head"] == (model.lm_head is not None)
    with torch.no_grad():
        ref, got = model(ids), q(ids)
        assert torch.equal(q.embed(ids), q.embed.weight[ids])
    assert ((got - ref).norm() / ref.norm()).item() < 0.03


@pytest.mark.parametrize("name", ["tiny-chatglm", "tiny-glm4-chatglm"])  # tied and untied output head
def test_a_quantized_embedding_is_never_dequantized_whole(name, monkeypatch, tmp_path):
    # Its `weight` builds the whole float table; forward, decode with a P-tuning prefix, generation and
    # saving the prefix only need the model's dtype and device, and the rows they look up.
    model = quant.quantize(tiny_model(name), 4, 32, embeddings=True)
    ptuning.apply(model, ptuning.PrefixConfig(pre_seq_len=3)).eval()

    def whole_table(self):
        raise AssertionError("the quantized embedding table was dequantized whole")

    monkeypatch.setattr(quant.QuantEmbedding, "weight", property(whole_table))
    ids = torch.randint(0, 160, (1, 6), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        cache = model.new_cache(1, 12)
        model(ids[:, :5], cache=cache)
        model(ids[:, 5:], cache=cache)
    assert glm.generate(model, ids, max_new_tokens=3, eos_token_ids=()).shape == (1, 3)
    if model.config.family in ("chatglm", "glm4-chatglm"):
        save_prefix(model, tmp_path / "prefix")


@pytest.mark.parametrize("bits,group,scale_dtype", [(8, None, torch.float16), (4, 32, torch.float32)])
def test_quantized_state_dict_round_trip_is_exact(bits, group, scale_dtype):
    q = quant.quantize(tiny_model(seed=0), bits, group, scale_dtype=scale_dtype)
    sd = {k: v.clone() for k, v in quant.quantized_state_dict(q).items()}
    ids = torch.randint(0, 160, (1, 7), generator=torch.Generator().manual_seed(7))
    # Into a model quantized from other weights, and into one built on the meta device.
    other = quant.quantize(tiny_model(seed=1), bits, group)
    with torch.device("meta"):
        meta = glm.GLM(glm.preset("tiny-glm4-chatglm"))
    quant.quantize(meta, bits, group, scale_dtype=scale_dtype)
    for target in (other, meta):
        quant.load_quantized_state_dict(target, sd)
        target.reset_buffers("cpu")
        for k, v in target.state_dict().items():
            assert v.dtype == sd[k].dtype and torch.equal(v, sd[k]), k
        with torch.no_grad():
            assert torch.equal(target(ids), q(ids))


# ----------------------------------------------------------------------------------------------
# Bad input: one clear error each, and nothing changed
def test_bad_schemes_are_refused_before_anything_changes():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for kwargs, match in [(dict(bits=3), "bits must be 8 or 4"), (dict(bits=True), "bits must be 8 or 4"),
                          (dict(bits=8, group_size=0), "positive number"),
                          (dict(bits=8, group_size=48), "does not divide the 64 input features of layers.0"),
                          (dict(bits=4, group_size=3), "even for 4 bits"),
                          (dict(bits=8, group_size=64), "does not divide the 96 input features of layers.0.mlp.w_out"),
                          (dict(bits=8, scale_dtype=torch.int8), "scale_dtype")]:
        with pytest.raises(InputError, match=match):
            quant.quantize(model, **kwargs)
    assert not quant.is_quantized(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_quantizing_twice_or_with_lora_is_refused():
    model = quant.quantize(tiny_model(), 8)
    with pytest.raises(InputError, match="already quantized"):
        quant.quantize(model, 4, 32)
    lora_model = glm.lora.apply(tiny_model(), glm.lora.LoraConfig(r=2))
    with pytest.raises(InputError, match="LoRA"):
        quant.quantize(lora_model, 8)


def test_load_refuses_missing_or_misshaped_scales():
    q = quant.quantize(tiny_model(), 4, 32)
    sd = quant.quantized_state_dict(q)
    target = quant.quantize(tiny_model(seed=1), 4, 32)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    missing = {k: v for k, v in sd.items() if k != "layers.1.attn.out.scales"}
    with pytest.raises(CheckpointError, match="missing .*layers.1.attn.out.scales"):
        quant.load_quantized_state_dict(target, missing)
    misshaped = {**sd, "layers.0.mlp.w_in.scales": sd["layers.0.mlp.w_in.scales"][:, :1]}
    with pytest.raises(CheckpointError, match="layers.0.mlp.w_in.scales has shape"):
        quant.load_quantized_state_dict(target, misshaped)
    wrong_dtype = {**sd, "layers.0.attn.qkv.qweight": sd["layers.0.attn.qkv.qweight"].float()}
    with pytest.raises(CheckpointError, match="int8"):
        quant.load_quantized_state_dict(target, wrong_dtype)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    with pytest.raises(InputError, match="needs a quantized model"):
        quant.load_quantized_state_dict(tiny_model(), sd)


def test_pack_and_dequantize_refuse_bad_shapes():
    with pytest.raises(InputError, match="even number of columns"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(InputError, match="do not fit"):
        dequantize(torch.zeros(2, 8, dtype=torch.int8), torch.ones(2, 3), 8, 4)
    with pytest.raises(InputError, match="float"):
        quantize_weight(torch.zeros(2, 8, dtype=torch.int8), 8)
