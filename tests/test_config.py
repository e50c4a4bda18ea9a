import json

import pytest
import torch
from conftest import FIXTURE_FAMILIES, reference_dir

import glm
from glm import formats
from glm.config import FAMILIES, ConfigError, GLMConfig

# Published sizes (GLM_SPEC section 1): parameters in billions, with the tolerance of the quoted figure.
RELEASED = {"glm-large-chinese": 0.36, "glm-10b": 9.9, "chatglm-6b": 6.17, "chatglm2-6b": 6.24,
            "chatglm3-6b": 6.24, "glm-4-9b": 9.40, "glm-4-9b-chat-hf": 9.40, "glm-4-9b-0414": 9.40}


@pytest.mark.parametrize("name", list(glm.PRESETS))
def test_num_parameters_matches_module(name):
    cfg = glm.preset(name)
    with torch.device("meta"):
        model = glm.GLM(cfg)
    assert cfg.num_parameters == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,billions", RELEASED.items())
def test_release_sizes(name, billions):
    assert glm.preset(name).num_parameters / 1e9 == pytest.approx(billions, rel=0.02)


def test_every_family_has_presets():
    assert {c.family for c in glm.PRESETS.values()} == set(FAMILIES)


@pytest.mark.parametrize("folder", FIXTURE_FAMILIES)
def test_tiny_presets_mirror_fixture_configs(folder):
    """The tiny presets are the fixtures' architecture: every field that shapes the computation agrees."""
    cfg = GLMConfig.from_hf(reference_dir(folder))
    p = glm.preset(f"tiny-{cfg.family}")
    for f in ("family", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "ffn_hidden_size", "position_encoding", "rotary_dim", "norm", "mlp", "residual_alpha",
              "sandwich_norm", "qkv_bias", "out_bias", "mlp_bias", "tie_word_embeddings", "max_positions"):
        assert getattr(cfg, f) == getattr(p, f), f


def test_glm4_chatglm_rope_ratio_scales_base():
    cfg = GLMConfig.from_hf(reference_dir("glm-4-9b-chatglm"))
    assert cfg.rope_base == 10000.0 * 500


def _chatglm2_format_json(name: str, rope_ratio: float) -> dict:
    with open(f"{reference_dir('chatglm2-6b')}/config.json") as f:
        hf = json.load(f)
    return {**hf, "_name_or_path": name, "rope_ratio": rope_ratio}


def test_rope_ratio_divides_chatglm2_positions_but_scales_chatglm3_base():
    # ChatGLM2-6B-32k interpolates (positions / rope_ratio, base 10000); ChatGLM3-32k and GLM-4
    # multiply the base by the same key.
    c2 = GLMConfig.from_hf(_chatglm2_format_json("THUDM/chatglm2-6b-32k", 16.0))
    assert (c2.family, c2.rope_base, c2.rope_position_scale) == ("chatglm2", 10000.0, 16.0)
    c3 = GLMConfig.from_hf(_chatglm2_format_json("THUDM/chatglm3-6b-32k", 50.0))
    assert (c3.family, c3.rope_base, c3.rope_position_scale) == ("chatglm3", 500000.0, 1.0)


def test_rope_position_scale_is_positional_interpolation():
    # With scale s, position s*p must rotate exactly like position p without scaling.
    cfg = glm.preset("tiny-chatglm2")
    plain, scaled = glm.GLM(cfg), glm.GLM(cfg.replace(rope_position_scale=4.0))
    scaled.load_state_dict(plain.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(9).expand(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(scaled(ids, pos * 4), plain(ids, pos), rtol=0, atol=1e-5)
        assert not torch.allclose(scaled(ids, pos), plain(ids, pos), atol=1e-3)


def test_glm_hf_missing_keys_take_transformers_defaults():
    with open(f"{reference_dir('glm-4-9b-chat-hf')}/config.json") as f:
        hf = json.load(f)
    for key in ("num_key_value_heads", "head_dim"):
        hf.pop(key, None)
    cfg = GLMConfig.from_hf(hf)
    assert (cfg.num_kv_heads, cfg.head_dim) == (2, 128)  # transformers' GlmConfig defaults


@pytest.mark.parametrize("name", ["tiny-chatglm", "tiny-glm4-hf"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_casting_the_model_keeps_rope_frequencies_fp32(name, dtype):
    # model.to(bf16) must not round inv_freq (it would move every angle); the frequencies are the
    # config's, rounded only where rope_inv_freq_dtype says the reference rounds them.
    model = glm.GLM(glm.preset(name))
    before = model.rotary.inv_freq.clone()
    model.to(dtype)
    assert model.rotary.inv_freq.dtype == torch.float32
    assert torch.equal(model.rotary.inv_freq, before)
    assert model.embed.weight.dtype == dtype


def test_chatglm6b_alpha_ignores_num_layers():
    cfg = GLMConfig.from_hf(reference_dir("chatglm-6b"))
    assert cfg.num_layers == 2 and cfg.residual_alpha == pytest.approx(56 ** 0.5)


@pytest.mark.parametrize("hf,family", [
    ({"model_type": "chatglm", "_name_or_path": "THUDM/chatglm2-6b", "padded_vocab_size": 65024}, "chatglm2"),
    ({"model_type": "chatglm", "_name_or_path": "THUDM/chatglm3-6b-32k", "padded_vocab_size": 65024}, "chatglm3"),
    ({"model_type": "chatglm", "padded_vocab_size": 151552, "layernorm_epsilon": 1.5625e-07}, "glm4-chatglm"),
    ({"model_type": "chatglm", "vocab_size": 130528, "position_encoding_2d": True}, "chatglm"),
    ({"model_type": "glm", "num_layers": 48, "block_position_encoding": True}, "glm"),
    ({"model_type": "glm", "num_hidden_layers": 40}, "glm-hf"),
    ({"model_type": "glm4"}, "glm4-hf"),
])
def test_detect_family(hf, family):
    assert formats.detect(hf).family == family


def test_to_dict_round_trip():
    for cfg in glm.PRESETS.values():
        assert GLMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_from_dict_rejects_unknown_field():
    d = glm.preset("tiny-glm").to_dict()
    d["hiddden_size"] = 3
    with pytest.raises(ConfigError, match="hiddden_size"):
        GLMConfig.from_dict(d)


def test_preset_returns_a_copy():
    a = glm.preset("chatglm3-6b")
    a.special_tokens["[MASK]"] = -1
    assert glm.preset("chatglm3-6b").special_tokens["[MASK]"] == 64789


def test_default_rope_position_scale_is_left_out_of_saved_configs():
    # Folders glm writes stay readable by versions from before the field existed.
    assert "rope_position_scale" not in glm.preset("tiny-chatglm2").to_dict()
    d = glm.preset("tiny-chatglm2").replace(rope_position_scale=16.0).to_dict()
    assert d["rope_position_scale"] == 16.0 and GLMConfig.from_dict(d).rope_position_scale == 16.0
