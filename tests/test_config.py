import json

import pytest
import torch

import glm
from glm.config import FAMILIES, ConfigError, GLMConfig, detect_family

from conftest import FIXTURE_FAMILIES, reference_dir

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
    assert detect_family(hf) == family


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
