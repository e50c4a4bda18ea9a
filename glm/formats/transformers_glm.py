"""transformers' own GLM-4 classes: GlmForCausalLM (glm-4-9b-chat-hf) and Glm4ForCausalLM (GLM-4-9B-0414,
Glm with sandwich RMSNorms). Separate q/k/v projections, interleaved partial RoPE, fused gate-up MLP."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ..config import GLMConfig
from ..errors import ConfigError
from . import hf_fields as hf_
from .chatglm2 import FAMILIES as CHATGLM2_FAMILIES
from .layout import (
    DTYPE_NAMES,
    Mapping,
    biases,
    cat_rows,
    half_to_interleaved,
    interleaved_to_half,
    layer_renames,
    qkv_split,
    rename,
)
from .registry import Format, register


def _rope_params(hf: dict[str, Any]) -> tuple[float, float]:
    # transformers >= 5 nests these in rope_parameters; older configs keep them at the top level.
    rp = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rp, dict):
        raise ConfigError(f"field 'rope_parameters' must be an object such as {{\"rope_theta\": 10000.0}}, "
                          f"got {rp!r}; fix it in config.json")
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type not in ("default", None):
        raise ConfigError(f"rope_parameters.rope_type={rope_type!r} is not supported; only 'default'")
    theta = hf_.as_float("rope_theta", rp.get("rope_theta", hf.get("rope_theta", 10000.0)))
    frac = hf_.as_float("partial_rotary_factor",
                        rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5)))
    return theta, frac


def separate_qkv_mapping(cfg: GLMConfig, glm_name: str, hf_names: tuple[str, str, str]) -> Mapping:
    """q_proj/k_proj/v_proj -> one fused glm projection (and back); q and k rows interleaved -> half-split."""
    n, g, d, r = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rotary_dim
    split = qkv_split(cfg)

    def to_glm(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor]:
        return (cat_rows((interleaved_to_half(q, n, d, r), interleaved_to_half(k, g, d, r), v)),)

    def to_hf(t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = t.split(split)
        return half_to_interleaved(q, n, d, r), half_to_interleaved(k, g, d, r), v.clone()

    return Mapping((glm_name,), hf_names, to_glm, to_hf)


class TransformersGlmFormat(Format):
    """transformers' Glm (``sandwich_norm=False``) or Glm4 (``sandwich_norm=True``)."""

    tokenizer_family = "glm4"
    flags = ("attention_bias", "tie_word_embeddings", "use_cache")
    # GLM-4-9B's chatglm-format release and ChatGLM2/3 compute what Glm computes, in another layout.
    converts_from = CHATGLM2_FAMILIES + ("glm-hf", "glm4-hf")

    def __init__(self, family: str, description: str, model_type: str, architecture: str, recognised_by: str,
                 sandwich_norm: bool):
        self.family, self.description, self.recognised_by = family, description, recognised_by
        self.model_type, self.architecture, self.sandwich_norm = model_type, architecture, sandwich_norm

    def matches(self, hf: dict[str, Any]) -> bool:
        if hf.get("model_type") != self.model_type:
            return False
        if self.model_type != "glm":
            return True
        # THUDM's original GLM says model_type "glm" too; transformers' schema has num_hidden_layers.
        return "num_hidden_layers" in hf or any(a.startswith("Glm") for a in hf_.architectures(hf))

    def config_from_hf(self, hf: dict[str, Any]) -> GLMConfig:
        H, n = hf_.heads(hf)
        theta, frac = _rope_params(hf)
        stored = hf.get("dtype", hf.get("torch_dtype"))
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act={act!r} is not supported for {self.family}; the releases use 'silu'")
        return GLMConfig(
            family=self.family, vocab_size=hf_.int_field(hf, "vocab_size", positive=True), hidden_size=H,
            num_layers=hf_.int_field(hf, "num_hidden_layers", positive=True), num_heads=n,
            # Absent keys take transformers' GlmConfig/Glm4Config defaults (2 KV heads, head_dim 128),
            # as transformers itself would read the file.
            num_kv_heads=hf_.kv_groups(hf, "num_key_value_heads", n, 2), head_dim=hf_.size_field(hf, "head_dim", 128),
            ffn_hidden_size=hf_.int_field(hf, "intermediate_size", positive=True),
            max_positions=hf_.int_field(hf, "max_position_embeddings", positive=True),
            position_encoding="rope", rotary_fraction=frac, rope_base=theta,
            # A half-precision file loads with its RoPE frequencies rounded, as the fixtures' reference
            # (cast to that dtype) had them; see GLMConfig.rope_inv_freq_dtype.
            rope_inv_freq_dtype=stored if stored in ("float16", "bfloat16") else None, norm="rmsnorm",
            norm_eps=hf_.float_field(hf, "rms_norm_eps", 1.5625e-07), mlp="swiglu",
            sandwich_norm=self.sandwich_norm, qkv_bias=hf_.bool_field(hf, "attention_bias", True),
            out_bias=False, mlp_bias=False, tie_word_embeddings=hf_.bool_field(hf, "tie_word_embeddings", False),
            pad_token_id=hf_.optional_id(hf, "pad_token_id"), bos_token_id=hf_.optional_id(hf, "bos_token_id"),
            eos_token_ids=hf_.eos_list(hf.get("eos_token_id")), name=hf_.name_or_path(hf),
        )

    def config_to_hf(self, cfg: GLMConfig, dtype: torch.dtype) -> dict[str, Any]:
        self.require(cfg, position_encoding="rope", norm="rmsnorm", mlp="swiglu", residual_alpha=None,
                     sandwich_norm=self.sandwich_norm, out_bias=False, mlp_bias=False, rope_position_scale=1.0)
        return {"architectures": [self.architecture], "model_type": self.model_type,
                "attention_bias": cfg.qkv_bias, "attention_dropout": 0.0, "bos_token_id": cfg.bos_token_id,
                "dtype": DTYPE_NAMES[dtype], "eos_token_id": list(cfg.eos_token_ids), "head_dim": cfg.head_dim,
                "hidden_act": "silu", "hidden_size": cfg.hidden_size, "initializer_range": 0.02,
                "intermediate_size": cfg.ffn_hidden_size, "max_position_embeddings": cfg.max_positions,
                "num_attention_heads": cfg.num_heads, "num_hidden_layers": cfg.num_layers,
                "num_key_value_heads": cfg.num_kv_heads, "pad_token_id": cfg.pad_token_id,
                "rms_norm_eps": cfg.norm_eps,
                "rope_parameters": {"partial_rotary_factor": cfg.rotary_fraction, "rope_theta": cfg.rope_base,
                                    "rope_type": "default"},
                "tie_word_embeddings": cfg.tie_word_embeddings, "use_cache": True, "vocab_size": cfg.vocab_size}

    def mappings(self, cfg: GLMConfig, dtype: torch.dtype = torch.float32, keys: Optional[Sequence[str]] = None,
                 hf_config: Optional[dict[str, Any]] = None) -> list[Mapping]:
        m = [rename("embed.weight", "model.embed_tokens.weight")]
        names = {"attn_norm": "input_layernorm", "attn.out": "self_attn.o_proj",
                 "mlp_norm": "post_attention_layernorm", "mlp.w_in": "mlp.gate_up_proj",
                 "mlp.w_out": "mlp.down_proj"}
        if cfg.sandwich_norm:
            # Naming trap: transformers' post_attention_layernorm is the pre-MLP norm; these two sit on the
            # sub-layer outputs.
            names |= {"attn_out_norm": "post_self_attn_layernorm", "mlp_out_norm": "post_mlp_layernorm"}
        for i in range(cfg.num_layers):
            hl = f"model.layers.{i}"
            m += layer_renames(i, hl, names, biases(cfg))
            m.append(separate_qkv_mapping(cfg, f"layers.{i}.attn.qkv.weight",
                                          tuple(f"{hl}.self_attn.{p}_proj.weight" for p in "qkv")))
            if cfg.qkv_bias:
                m.append(separate_qkv_mapping(cfg, f"layers.{i}.attn.qkv.bias",
                                              tuple(f"{hl}.self_attn.{p}_proj.bias" for p in "qkv")))
        m.append(rename("final_norm.weight", "model.norm.weight"))
        if not cfg.tie_word_embeddings:
            m.append(rename("lm_head.weight", "lm_head.weight"))
        return m

    def adopt(self, cfg: GLMConfig, dtype: torch.dtype) -> GLMConfig:
        # A half-precision target gets rope_inv_freq_dtype = that dtype, as config_from_hf reads such a file
        # (the fixtures' transformers reference, cast to bf16, rounds its RoPE frequencies; the chatglm code
        # never does): that difference (<1e-3 in logits) is kept, not hidden.
        rounded = DTYPE_NAMES[dtype] if dtype in (torch.float16, torch.bfloat16) else None
        return cfg.replace(family=self.family, rope_inv_freq_dtype=rounded)


register(TransformersGlmFormat("glm-hf", "transformers GlmForCausalLM (glm-4-9b-chat-hf)", "glm", "GlmForCausalLM",
                               "transformers Glm (model_type 'glm', num_hidden_layers)", sandwich_norm=False))
register(TransformersGlmFormat("glm4-hf", "transformers Glm4ForCausalLM (GLM-4-9B-0414): sandwich RMSNorms", "glm4",
                               "Glm4ForCausalLM", "Glm4 (model_type 'glm4')", sandwich_norm=True))
