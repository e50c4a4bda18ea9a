"""THUDM's chatglm2-format releases: ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B in the chatglm format. One
config.json schema and weight layout (MQA, RMSNorm, SwiGLU, partial interleaved RoPE); the three differ
in what ``rope_ratio`` means, their tokenizer, and how their config.json is told apart (by name)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ..config import GLMConfig
from ..errors import ConfigError
from . import hf_fields as hf_
from .chatglm6b import RECOGNISED_BY, is_chatglm6b_schema
from .layout import (
    DTYPE_NAMES,
    Mapping,
    biases,
    blocks_to_per_head_qkv,
    cat_rows,
    check_rows,
    half_to_interleaved,
    interleaved_to_half,
    layer_renames,
    per_head_qkv_to_blocks,
    qkv_split,
    regenerated,
    rename,
    tied,
)
from .quantized import ThudmLayout
from .registry import Format, register

_AUTO_MAP = {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
             "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
             "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
             "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}
FAMILIES = ("chatglm2", "chatglm3", "glm4-chatglm")
TRANSFORMERS_GLM = ("glm-hf", "glm4-hf")
# ChatGLM2-6B's quantization.py (ChatGLM3 and GLM-4's chatglm-format code keep it): weight_scale in the
# weight's own dtype, only the four projections of each layer quantized (no quantization_embeddings).
QUANTIZED = ThudmLayout("ChatGLM2-6B", None)


def schema_family(hf: dict[str, Any]) -> Optional[str]:
    """Which of the chatglm2-format releases a config.json is (None: not this schema). The schemas are
    identical, so the name decides; an unnamed file is GLM-4 by its 151k vocabulary or 1.5625e-7 eps,
    else ChatGLM3."""
    if hf.get("model_type") != "chatglm" or is_chatglm6b_schema(hf):
        return None
    name = hf_.name_or_path(hf).lower()
    if "glm-4" in name or "glm4" in name:
        return "glm4-chatglm"
    if "chatglm2" in name:
        return "chatglm2"
    if "chatglm3" in name:
        return "chatglm3"
    vocab, eps = hf.get("padded_vocab_size", 0), hf.get("layernorm_epsilon", 1e-5)
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if (number(vocab) and vocab >= 150000) or (number(eps) and eps < 1e-6):
        return "glm4-chatglm"
    return "chatglm3"


def inv_freq(head_dim: int, dtype: torch.dtype) -> Tensor:
    """The ``rotary_pos_emb.inv_freq`` buffer of ChatGLM2/3/GLM-4 (built with base 10000 even when
    rope_ratio changes the base used at run time; the forward recomputes it and ignores this)."""
    dim = head_dim // 2
    return 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32).to(dtype) / dim))


def per_head_qkv(hf_config: Optional[dict[str, Any]]) -> bool:
    """Whether a file read with ``hf_config`` stores its fused QKV rows per head: the reference code views
    them as ``[n, 3d]`` unless ``multi_query_attention`` is true (its config default is false; every
    release sets it true)."""
    return isinstance(hf_config, dict) and not hf_config.get("multi_query_attention", False)


def fused_qkv_mapping(cfg: GLMConfig, glm_name: str, hf_name: str, per_head: bool = False) -> Mapping:
    """The fused ``[q | k | v]``: same blocks as glm; q and k rows go interleaved -> half-split.
    ``per_head``: the file's rows are ``[n, (q|k|v), d]`` instead (see `per_head_qkv`)."""
    n, g, d, r = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rotary_dim
    split = qkv_split(cfg)

    def to_glm(t: Tensor) -> tuple[Tensor]:
        if per_head:
            check_rows(t, 3 * n, d)
            t = per_head_qkv_to_blocks(t, n, d)
        q, k, v = t.split(split)
        return (cat_rows((interleaved_to_half(q, n, d, r), interleaved_to_half(k, g, d, r), v)),)

    def to_hf(t: Tensor) -> tuple[Tensor]:
        q, k, v = t.split(split)
        t = cat_rows((half_to_interleaved(q, n, d, r), half_to_interleaved(k, g, d, r), v))
        return (blocks_to_per_head_qkv(t, n, d) if per_head else t,)

    return Mapping((glm_name,), (hf_name,), to_glm, to_hf)


class ChatGLM2Format(Format):
    """One of the chatglm2-format releases. ``rope_ratio_scales_positions``: ChatGLM2-6B-32k's code divides
    the positions by rope_ratio (interpolation); ChatGLM3-32k/128k's and GLM-4's multiply the rotary base."""

    recognised_by = RECOGNISED_BY
    flags = ("rmsnorm", "apply_residual_connection_post_layernorm", "post_layer_norm", "add_bias_linear",
             "add_qkv_bias", "bias_dropout_fusion", "multi_query_attention", "apply_query_key_layer_scaling",
             "attention_softmax_in_fp32", "fp32_residual_connection", "original_rope", "use_cache",
             "tie_word_embeddings")
    # Models of these families compute the same function (Glm is GLM-4-9B's transformers form; glm4-hf's
    # sandwich norms have no place here).
    converts_from = FAMILIES + ("glm-hf",)
    quantized_layout = QUANTIZED

    def __init__(self, family: str, description: str, tokenizer_family: str, name_or_path: str,
                 rope_ratio_scales_positions: bool = False, always_writes_rope_ratio: bool = False):
        self.family, self.description, self.tokenizer_family = family, description, tokenizer_family
        # Written as _name_or_path: the name is what tells the releases' identical schemas apart.
        self.name_or_path = name_or_path
        self.rope_ratio_scales_positions = rope_ratio_scales_positions
        # GLM-4's config.json always has rope_ratio (its base is 500 * 10000); ChatGLM3's only when not 1.
        self.always_writes_rope_ratio = always_writes_rope_ratio

    def matches(self, hf: dict[str, Any]) -> bool:
        return schema_family(hf) == self.family

    def config_from_hf(self, hf: dict[str, Any]) -> GLMConfig:
        H, n = hf_.heads(hf)
        mqa = hf_.bool_field(hf, "multi_query_attention", False)
        if not hf_.bool_field(hf, "rmsnorm", True):
            raise ConfigError("rmsnorm=false is not supported; every chatglm2-format release uses RMSNorm")
        if hf_.bool_field(hf, "apply_residual_connection_post_layernorm", False):
            raise ConfigError("apply_residual_connection_post_layernorm=true is not supported")
        if not hf_.bool_field(hf, "post_layer_norm", True):
            raise ConfigError("post_layer_norm=false (no final norm) is not supported")
        if not hf_.bool_field(hf, "original_rope", True):
            raise ConfigError("original_rope=false is not supported")
        rope_ratio = hf_.float_field(hf, "rope_ratio", 1.0)
        if not rope_ratio > 0:
            raise ConfigError(f"field 'rope_ratio' must be positive, got {rope_ratio}; fix it in config.json")
        # The reference model sizes its embedding by padded_vocab_size; vocab_size stands in where it is absent.
        if hf.get("padded_vocab_size") is None:
            vocab = hf_.int_field(hf, "vocab_size", positive=True)
        else:
            vocab = hf_.int_field(hf, "padded_vocab_size", positive=True)
        # multi_query_group_num is read only with multi_query_attention, as the reference model does.
        kv_heads = hf_.kv_groups(hf, "multi_query_group_num", n) if mqa else n
        kv_channels = hf.get("kv_channels")
        scales_positions = self.rope_ratio_scales_positions
        return GLMConfig(
            family=self.family, vocab_size=vocab, hidden_size=H,
            num_layers=hf_.int_field(hf, "num_layers", positive=True), num_heads=n, num_kv_heads=kv_heads,
            head_dim=hf_.head_dim(H, n) if kv_channels is None else hf_.as_int("kv_channels", kv_channels,
                                                                                 positive=True),
            ffn_hidden_size=hf_.int_field(hf, "ffn_hidden_size", positive=True),
            max_positions=hf_.int_field(hf, "seq_length", positive=True), position_encoding="rope",
            rotary_fraction=0.5,
            rope_base=10000.0 if scales_positions else 10000.0 * rope_ratio,
            rope_position_scale=rope_ratio if scales_positions else 1.0, norm="rmsnorm",
            norm_eps=hf_.float_field(hf, "layernorm_epsilon", 1e-5),
            mlp="swiglu", qkv_bias=hf_.bool_field(hf, "add_qkv_bias", False),
            out_bias=hf_.bool_field(hf, "add_bias_linear", False),
            mlp_bias=hf_.bool_field(hf, "add_bias_linear", False),
            tie_word_embeddings=False, pad_token_id=hf_.optional_id(hf, "pad_token_id"),
            eos_token_ids=hf_.eos_list(hf.get("eos_token_id")), name=hf_.name_or_path(hf),
        )

    def config_to_hf(self, cfg: GLMConfig, dtype: torch.dtype) -> dict[str, Any]:
        self.require(cfg, position_encoding="rope", norm="rmsnorm", mlp="swiglu", residual_alpha=None,
                     sandwich_norm=False, rotary_fraction=0.5, rope_inv_freq_dtype=None, out_bias=cfg.mlp_bias)
        eos = list(cfg.eos_token_ids)
        d = {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "auto_map": dict(_AUTO_MAP),
             "num_layers": cfg.num_layers, "padded_vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
             "ffn_hidden_size": cfg.ffn_hidden_size, "kv_channels": cfg.head_dim,
             "num_attention_heads": cfg.num_heads, "seq_length": cfg.max_positions, "hidden_dropout": 0.0,
             "attention_dropout": 0.0, "layernorm_epsilon": cfg.norm_eps, "rmsnorm": True,
             "apply_residual_connection_post_layernorm": False, "post_layer_norm": True,
             "add_bias_linear": cfg.out_bias, "add_qkv_bias": cfg.qkv_bias, "bias_dropout_fusion": True,
             # Always true: with it false the reference reads the fused QKV rows per head (see
             # per_head_qkv); true with as many groups as heads is plain multi-head attention.
             "multi_query_attention": True, "multi_query_group_num": cfg.num_kv_heads,
             "apply_query_key_layer_scaling": True, "attention_softmax_in_fp32": True,
             "fp32_residual_connection": False, "original_rope": True, "use_cache": True,
             "tie_word_embeddings": False, "eos_token_id": eos[0] if len(eos) == 1 else eos,
             "pad_token_id": cfg.pad_token_id, "torch_dtype": DTYPE_NAMES[dtype]}
        if self.rope_ratio_scales_positions:
            self.require(cfg, rope_base=10000.0)
            if cfg.rope_position_scale != 1.0:
                d["rope_ratio"] = cfg.rope_position_scale
        else:
            self.require(cfg, rope_position_scale=1.0)
            if self.always_writes_rope_ratio or cfg.rope_base != 10000.0:
                d["rope_ratio"] = cfg.rope_base / 10000.0
        d["_name_or_path"] = self.name_or_path
        return d

    def mappings(self, cfg: GLMConfig, dtype: torch.dtype = torch.float32, keys: Optional[Sequence[str]] = None,
                 hf_config: Optional[dict[str, Any]] = None) -> list[Mapping]:
        per_head = per_head_qkv(hf_config)
        emb = "transformer.embedding.word_embeddings.weight"
        # The format always has a separate output_layer: a tied model writes the embedding twice (and
        # reads back untied, computing the same logits).
        m = [tied("embed.weight", (emb, "transformer.output_layer.weight")) if cfg.tie_word_embeddings
             else rename("embed.weight", emb),
             regenerated("transformer.rotary_pos_emb.inv_freq", lambda: inv_freq(cfg.head_dim, dtype))]
        names = {"attn_norm": "input_layernorm", "attn.out": "self_attention.dense",
                 "mlp_norm": "post_attention_layernorm", "mlp.w_in": "mlp.dense_h_to_4h",
                 "mlp.w_out": "mlp.dense_4h_to_h"}
        for i in range(cfg.num_layers):
            hl = f"transformer.encoder.layers.{i}"
            m += layer_renames(i, hl, names, biases(cfg))
            for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
                m.append(fused_qkv_mapping(cfg, f"layers.{i}.attn.qkv.{kind}",
                                           f"{hl}.self_attention.query_key_value.{kind}", per_head))
        m.append(rename("final_norm.weight", "transformer.encoder.final_layernorm.weight"))
        if not cfg.tie_word_embeddings:
            m.append(rename("lm_head.weight", "transformer.output_layer.weight"))
        return m

    def load_warning(self, hf_config: Optional[dict[str, Any]], source: str) -> Optional[str]:
        if not per_head_qkv(hf_config):
            return None
        # No release sets the flag false; older glm versions did, for models with as many KV heads as query
        # heads, while writing block rows: such files need the flag set true.
        return (f"{source}: multi_query_attention is false, so the fused QKV rows are read per head ([n, 3d]) "
                f"as THUDM's code reads them. If glm wrote this folder before 2026-11-25, set "
                f"multi_query_attention true and multi_query_group_num to num_attention_heads in config.json")

    def adopt(self, cfg: GLMConfig, dtype: torch.dtype) -> GLMConfig:
        # The chatglm code never rounds its RoPE frequencies.
        return cfg.replace(family=self.family, rope_inv_freq_dtype=None)


register(ChatGLM2Format("chatglm2", "ChatGLM2-6B: MQA, RMSNorm, SwiGLU, partial interleaved RoPE", "chatglm2",
                        "THUDM/chatglm2-6b", rope_ratio_scales_positions=True))
register(ChatGLM2Format("chatglm3", "ChatGLM3-6B: the ChatGLM2 architecture", "chatglm3", "THUDM/chatglm3-6b"))
register(ChatGLM2Format("glm4-chatglm", "GLM-4-9B in the chatglm format: ChatGLM3 with rope_ratio", "glm4",
                        "THUDM/glm-4-9b", always_writes_rope_ratio=True))
