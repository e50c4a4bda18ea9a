"""Presets: the released shapes (GLM_SPEC section 1), and tiny ones for tests.

A preset is a `GLMConfig` of a registered family, so this module comes after glm.formats.
"""
from __future__ import annotations

import copy

from .config import GLMConfig
from .errors import ConfigError
from .formats.chatglm6b import RESIDUAL_ALPHA as CHATGLM6B_RESIDUAL_ALPHA

_GLM_SPECIALS_ZH = {"<|endoftext|>": 50000, "[SEP]": 50001, "[CLS]": 50002, "[MASK]": 50003,
                    "<|startofpiece|>": 50006, "<|endofpiece|>": 50007, "[sMASK]": 50008, "[gMASK]": 50009}
_CHATGLM6B_SPECIALS = {"[MASK]": 130000, "[gMASK]": 130001, "[sMASK]": 130002, "<sop>": 130004,
                       "<eop>": 130005}
_CHATGLM2_SPECIALS = {"[MASK]": 64789, "[gMASK]": 64790, "[sMASK]": 64791, "sop": 64792, "eop": 64793}
_CHATGLM3_SPECIALS = {**_CHATGLM2_SPECIALS, "<|system|>": 64794, "<|user|>": 64795,
                      "<|assistant|>": 64796, "<|observation|>": 64797}
_GLM4_SPECIALS = {"<|endoftext|>": 151329, "[MASK]": 151330, "[gMASK]": 151331, "[sMASK]": 151332,
                  "<sop>": 151333, "<eop>": 151334, "<|system|>": 151335, "<|user|>": 151336,
                  "<|assistant|>": 151337, "<|observation|>": 151338}


def _glm_original(vocab: int, H: int, L: int, n: int, specials: dict[str, int]) -> GLMConfig:
    return GLMConfig(family="glm", vocab_size=vocab, hidden_size=H, num_layers=L, num_heads=n,
                     num_kv_heads=n, head_dim=H // n, ffn_hidden_size=4 * H, max_positions=1025,
                     position_encoding="learned_2d", norm="layernorm", norm_eps=1e-5, mlp="gelu",
                     qkv_bias=True, out_bias=True, mlp_bias=True, tie_word_embeddings=True,
                     pad_token_id=specials.get("<|endoftext|>"), special_tokens=dict(specials))


def _chatglm2_like(family: str, L: int, seq: int, vocab: int, eps: float, base: float,
                   specials: dict[str, int], eos: tuple[int, ...], pad: int) -> GLMConfig:
    return GLMConfig(family=family, vocab_size=vocab, hidden_size=4096, num_layers=L, num_heads=32,
                     num_kv_heads=2, head_dim=128, ffn_hidden_size=13696, max_positions=seq,
                     position_encoding="rope", rotary_fraction=0.5, rope_base=base, norm="rmsnorm",
                     norm_eps=eps, mlp="swiglu", qkv_bias=True, tie_word_embeddings=False,
                     pad_token_id=pad, eos_token_ids=eos, special_tokens=dict(specials))


def _presets() -> dict[str, GLMConfig]:
    glm4_eos = (151329, 151336, 151338)
    p = {
        "glm-large-chinese": _glm_original(50048, 1024, 24, 16, _GLM_SPECIALS_ZH),
        "glm-10b-chinese": _glm_original(50048, 4096, 48, 64, _GLM_SPECIALS_ZH),
        # glm-10b (English, GPT-2 BPE): command-token ids after 50257 are unconfirmed; eos is 50256.
        "glm-10b": _glm_original(50304, 4096, 48, 64, {"<|endoftext|>": 50256}),
        "chatglm-6b": GLMConfig(
            family="chatglm", vocab_size=130528, hidden_size=4096, num_layers=28, num_heads=32,
            num_kv_heads=32, head_dim=128, ffn_hidden_size=16384, max_positions=2048,
            position_encoding="rope_2d", rope_inv_freq_dtype="float16", norm="layernorm", norm_eps=1e-5,
            mlp="gelu_tanh", residual_alpha=CHATGLM6B_RESIDUAL_ALPHA, qkv_bias=True, out_bias=True,
            mlp_bias=True, tie_word_embeddings=True, pad_token_id=3, bos_token_id=130004,
            eos_token_ids=(130005,), special_tokens=dict(_CHATGLM6B_SPECIALS)),
        "chatglm2-6b": _chatglm2_like("chatglm2", 28, 32768, 65024, 1e-5, 10000.0,
                                      _CHATGLM2_SPECIALS, (2,), 0),
        "chatglm3-6b": _chatglm2_like("chatglm3", 28, 8192, 65024, 1e-5, 10000.0,
                                      _CHATGLM3_SPECIALS, (2, 64795, 64797), 0),
        "glm-4-9b": _chatglm2_like("glm4-chatglm", 40, 131072, 151552, 1.5625e-07, 5e6,
                                   _GLM4_SPECIALS, glm4_eos, 151329),
    }
    p["glm-4-9b-chat"] = p["glm-4-9b"].replace()
    p["glm-4-9b-chat-hf"] = p["glm-4-9b"].replace(family="glm-hf", rope_inv_freq_dtype="bfloat16")
    # GLM-4-9B-0414's rope_theta 10000, 32768 positions and eps 1e-5 are unconfirmed (GLM_SPEC §6).
    p["glm-4-9b-0414"] = p["glm-4-9b"].replace(family="glm4-hf", sandwich_norm=True, rope_base=10000.0,
                                              rope_inv_freq_dtype="bfloat16",
                                              max_positions=32768, norm_eps=1e-5)
    # Tiny presets, the shapes of ../shared/reference/*/tiny: vocab 160, hidden 64, 4 heads, 2 layers.
    tiny = dict(vocab_size=160, hidden_size=64, num_layers=2, num_heads=4, head_dim=16, max_positions=64)
    p["tiny-glm"] = p["glm-large-chinese"].replace(**{**tiny, "max_positions": 65}, num_kv_heads=4,
                                                   ffn_hidden_size=256, special_tokens={}, pad_token_id=0)
    p["tiny-chatglm"] = p["chatglm-6b"].replace(**tiny, num_kv_heads=4, ffn_hidden_size=256, special_tokens={},
                                                pad_token_id=3, bos_token_id=156, eos_token_ids=(157,))
    for fam, base in (("chatglm2", "chatglm2-6b"), ("chatglm3", "chatglm3-6b"), ("glm4-chatglm", "glm-4-9b"),
                      ("glm-hf", "glm-4-9b-chat-hf"), ("glm4-hf", "glm-4-9b-0414")):
        # Tiny models are built and trained in fp32: no release-dtype rounding of RoPE frequencies.
        p[f"tiny-{fam}"] = p[base].replace(**tiny, num_kv_heads=2, ffn_hidden_size=96, special_tokens={},
                                           pad_token_id=0, eos_token_ids=(2,), rope_inv_freq_dtype=None)
    for name, cfg in p.items():
        cfg.name = name
    return p


PRESETS: dict[str, GLMConfig] = _presets()


def preset(name: str) -> GLMConfig:
    """A copy of a named preset (see `PRESETS`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
