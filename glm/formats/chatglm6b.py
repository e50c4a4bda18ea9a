"""ChatGLM-6B (THUDM/chatglm-6b): 2D RoPE, GeLU-tanh, alpha-scaled residual, per-head fused QKV rows, and a
prompt convention of its own (positions and a bidirectional prefix read from bos and [gMASK])."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .. import positions
from ..config import GLMConfig
from ..errors import ConfigError
from . import hf_fields as hf_
from .layout import (
    DTYPE_NAMES,
    Mapping,
    biases,
    blocks_to_per_head_qkv,
    layer_renames,
    per_head_qkv_to_blocks,
    regenerated,
    rename,
    tied,
)
from .quantized import ThudmLayout
from .registry import Format, register

# ChatGLM-6B's GLMBlock defaults num_layers=28 and ChatGLMModel never passes it, so the residual
# scale is sqrt(2*28) for every config, including 2-layer ones.
RESIDUAL_ALPHA = math.sqrt(2 * 28)

_AUTO_MAP = {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
             "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
             "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}
# The chatglm-format releases share model_type 'chatglm', so they are listed together when no format
# recognises a file.
RECOGNISED_BY = "ChatGLM-6B/2/3 and GLM-4 chatglm format (model_type 'chatglm')"
# ChatGLM-6B's quantization.py: weight_scale is made .half() whatever the model's dtype, and
# quantization_embeddings (ChatGLM-6B-int4-qe) also quantizes word_embeddings row-wise, the lm_head sharing
# its integers and scales.
QUANTIZED = ThudmLayout("ChatGLM-6B", torch.float16, "quantization_embeddings")
# config.json's *_token_id keys -> the special tokens they name.
_SPECIAL_KEYS = {"mask": "[MASK]", "gmask": "[gMASK]", "bos": "<sop>", "eos": "<eop>"}


def inv_freq(head_dim: int, dtype: torch.dtype) -> Tensor:
    """The ``rotary_emb.inv_freq`` buffer ChatGLM-6B stores per layer (its loader ignores it)."""
    dim = head_dim // 2
    return (1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))).half().to(dtype)


def is_chatglm6b_schema(hf: dict[str, Any]) -> bool:
    """ChatGLM-6B's config.json among the model_type 'chatglm' ones: its own keys, no padded_vocab_size."""
    return (hf.get("model_type") == "chatglm" and "padded_vocab_size" not in hf
            and ("position_encoding_2d" in hf or "inner_hidden_size" in hf))


class ChatGLM6BFormat(Format):
    family = "chatglm"
    description = "ChatGLM-6B: 2D RoPE, GeLU-tanh, alpha-scaled residual"
    tokenizer_family = "chatglm"
    recognised_by = RECOGNISED_BY
    flags = ("position_encoding_2d", "use_cache", "quantization_embeddings")
    quantized_layout = QUANTIZED

    def matches(self, hf: dict[str, Any]) -> bool:
        return is_chatglm6b_schema(hf)

    def config_from_hf(self, hf: dict[str, Any]) -> GLMConfig:
        H, n = hf_.heads(hf)
        if not hf_.bool_field(hf, "position_encoding_2d", True):
            raise ConfigError("position_encoding_2d=false is not supported; ChatGLM-6B uses 2D RoPE")
        specials = {k: hf_.int_field(hf, f"{k}_token_id") for k in ("mask", "gmask", "bos", "eos", "pad")
                    if hf.get(f"{k}_token_id") is not None}
        special_tokens = {_SPECIAL_KEYS[k]: v for k, v in specials.items() if k in _SPECIAL_KEYS}
        return GLMConfig(
            family=self.family, vocab_size=hf_.int_field(hf, "vocab_size", positive=True), hidden_size=H,
            num_layers=hf_.int_field(hf, "num_layers", positive=True), num_heads=n, num_kv_heads=n,
            head_dim=hf_.head_dim(H, n), ffn_hidden_size=hf_.size_field(hf, "inner_hidden_size", 4 * H),
            max_positions=hf_.int_field(hf, "max_sequence_length", 2048, positive=True),
            position_encoding="rope_2d", rope_inv_freq_dtype="float16", norm="layernorm",
            norm_eps=hf_.float_field(hf, "layernorm_epsilon", 1e-5),
            mlp="gelu_tanh", residual_alpha=RESIDUAL_ALPHA, qkv_bias=True, out_bias=True,
            mlp_bias=True, tie_word_embeddings=True, pad_token_id=specials.get("pad"),
            bos_token_id=specials.get("bos"), eos_token_ids=hf_.eos_list(specials.get("eos")),
            special_tokens=special_tokens, name=hf_.name_or_path(hf),
        )

    def config_to_hf(self, cfg: GLMConfig, dtype: torch.dtype) -> dict[str, Any]:
        self.require(cfg, position_encoding="rope_2d", norm="layernorm", mlp="gelu_tanh", sandwich_norm=False,
                     num_kv_heads=cfg.num_heads, head_dim=cfg.hidden_size // cfg.num_heads,
                     rope_inv_freq_dtype="float16", rope_base=10000.0, rope_position_scale=1.0)
        self.require(cfg, residual_alpha=RESIDUAL_ALPHA)
        st, eos = cfg.special_tokens, list(cfg.eos_token_ids)
        return {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "auto_map": dict(_AUTO_MAP),
                "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers,
                "num_attention_heads": cfg.num_heads, "inner_hidden_size": cfg.ffn_hidden_size,
                "max_sequence_length": cfg.max_positions, "layernorm_epsilon": cfg.norm_eps,
                "bos_token_id": cfg.bos_token_id, "eos_token_id": eos[0] if eos else None,
                "mask_token_id": st.get("[MASK]"), "gmask_token_id": st.get("[gMASK]"),
                "pad_token_id": cfg.pad_token_id, "position_encoding_2d": True, "use_cache": True,
                "torch_dtype": DTYPE_NAMES[dtype]}

    def mappings(self, cfg: GLMConfig, dtype: torch.dtype = torch.float32, keys: Optional[Sequence[str]] = None,
                 hf_config: Optional[dict[str, Any]] = None) -> list[Mapping]:
        n, d = cfg.num_heads, cfg.head_dim
        emb = "transformer.word_embeddings.weight"
        # A file may or may not store its tied lm_head.weight; glm writes it, as the release does.
        stored_head = keys is None or "lm_head.weight" in keys
        if cfg.tie_word_embeddings and not stored_head:
            m = [rename("embed.weight", emb)]
        elif cfg.tie_word_embeddings:
            # The release stores lm_head.weight equal to the embeddings and HF ties the two; glm keeps one.
            m = [tied("embed.weight", (emb, "lm_head.weight"))]
        else:
            m = [rename("embed.weight", emb), rename("lm_head.weight", "lm_head.weight")]
        names = {"attn_norm": "input_layernorm", "attn.out": "attention.dense",
                 "mlp_norm": "post_attention_layernorm", "mlp.w_in": "mlp.dense_h_to_4h",
                 "mlp.w_out": "mlp.dense_4h_to_h"}
        for i in range(cfg.num_layers):
            hl = f"transformer.layers.{i}"
            m += layer_renames(i, hl, names, biases(cfg))
            for kind in ("weight", "bias"):
                m.append(Mapping((f"layers.{i}.attn.qkv.{kind}",), (f"{hl}.attention.query_key_value.{kind}",),
                                 lambda t: (per_head_qkv_to_blocks(t, n, d),),
                                 lambda t: (blocks_to_per_head_qkv(t, n, d),)))
            # The per-layer inv_freq buffer is never loaded by the reference (its _load_from_state_dict is
            # a no-op); glm drops it and regenerates it when writing the release format.
            m.append(regenerated(f"{hl}.attention.rotary_emb.inv_freq", lambda: inv_freq(d, dtype)))
        m += [rename("final_norm.weight", "transformer.final_layernorm.weight"),
              rename("final_norm.bias", "transformer.final_layernorm.bias")]
        return m


register(ChatGLM6BFormat())
# The reference reads a prompt's positions from its tokens (context up to bos, the blank at the first
# [gMASK]) and generates only at the first [gMASK].
positions.register_convention("chatglm", positions.PromptConvention(derive=positions.sop_gmask_structure,
                                                                    infill_at_first_gmask=True))
