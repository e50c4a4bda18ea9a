"""THUDM's original GLM (glm-large-chinese, glm-10b, glm-10b-chinese): learned 2D positions, LayerNorm and
GeLU, a head tied to the word embeddings."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ..config import GLMConfig
from ..errors import ConfigError
from . import hf_fields as hf_
from .layout import DTYPE_NAMES, Mapping, biases, layer_renames, rename
from .registry import Format, register


class GLMOriginalFormat(Format):
    family = "glm"
    description = "original GLM (glm-large-chinese, glm-10b, glm-10b-chinese): learned 2D positions"
    tokenizer_family = "glm"
    recognised_by = "original GLM (model_type 'glm', num_layers)"
    # use_cache and tie_word_embeddings are transformers' PretrainedConfig keys, in any release's file.
    flags = ("use_cache", "tie_word_embeddings", "block_position_encoding", "relative_encoding",
             "checkpoint_activations", "parallel_output", "output_predict")
    # GLM's reference computes its loss on labels already shifted to the next token.
    labels_are_next_tokens = True

    def matches(self, hf: dict[str, Any]) -> bool:
        # transformers' Glm says model_type "glm" too; its schema has num_hidden_layers and Glm* classes.
        archs = hf_.architectures(hf)
        if hf.get("model_type") != "glm" or "num_hidden_layers" in hf or any(a.startswith("Glm") for a in archs):
            return False
        return "num_layers" in hf or any(a.startswith("GLM") for a in archs)

    def config_from_hf(self, hf: dict[str, Any]) -> GLMConfig:
        H, n = hf_.heads(hf)
        if not hf_.bool_field(hf, "block_position_encoding", True):
            raise ConfigError("block_position_encoding=false (1D learned positions) is not supported; "
                              "every GLM release uses block positions")
        if hf_.bool_field(hf, "relative_encoding", False):
            raise ConfigError("relative_encoding=true (Transformer-XL positions) is not supported")
        return GLMConfig(
            family=self.family, vocab_size=hf_.int_field(hf, "vocab_size", positive=True), hidden_size=H,
            num_layers=hf_.int_field(hf, "num_layers", positive=True), num_heads=n, num_kv_heads=n,
            head_dim=hf_.head_dim(H, n), ffn_hidden_size=4 * H,
            # The position tables have max_sequence_length + 1 rows.
            max_positions=hf_.int_field(hf, "max_sequence_length", positive=True) + 1,
            position_encoding="learned_2d",
            norm="layernorm", norm_eps=1e-5,  # GLMStack's default; the config has no eps field
            mlp="gelu", qkv_bias=True, out_bias=True, mlp_bias=True, tie_word_embeddings=True,
            name=hf_.name_or_path(hf),
        )

    def config_to_hf(self, cfg: GLMConfig, dtype: torch.dtype) -> dict[str, Any]:
        self.require(cfg, position_encoding="learned_2d", norm="layernorm", mlp="gelu", residual_alpha=None,
                     sandwich_norm=False, tie_word_embeddings=True, num_kv_heads=cfg.num_heads,
                     head_dim=cfg.hidden_size // cfg.num_heads, ffn_hidden_size=4 * cfg.hidden_size, norm_eps=1e-5)
        return {"architectures": ["GLMForConditionalGeneration"], "model_type": "glm",
                "auto_map": {"AutoConfig": "configuration_glm.GLMConfig", "AutoModel": "modeling_glm.GLMModel",
                             "AutoModelForSeq2SeqLM": "modeling_glm.GLMForConditionalGeneration"},
                "num_layers": cfg.num_layers, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
                "num_attention_heads": cfg.num_heads, "max_sequence_length": cfg.max_positions - 1,
                "embedding_dropout_prob": 0.0, "attention_dropout_prob": 0.0, "output_dropout_prob": 0.0,
                "checkpoint_activations": False, "checkpoint_num_layers": 1, "parallel_output": True,
                "relative_encoding": False, "block_position_encoding": True, "output_predict": True,
                "spell_length": None, "spell_func": "lstm", "attention_scale": 1.0, "initializer_range": 0.02,
                "pool_token": "cls", "torch_dtype": DTYPE_NAMES[dtype]}

    def mappings(self, cfg: GLMConfig, dtype: torch.dtype = torch.float32, keys: Optional[Sequence[str]] = None,
                 hf_config: Optional[dict[str, Any]] = None) -> list[Mapping]:
        # Files saved from GLMForConditionalGeneration prefix their keys with "glm."; a bare GLMModel's do
        # not. glm writes the prefixed form.
        prefix = "glm." if keys is None or any(k.startswith("glm.") for k in keys) else ""
        m = [rename("embed.weight", f"{prefix}word_embeddings.weight"),
             rename("pos_embed.weight", f"{prefix}transformer.position_embeddings.weight"),
             rename("block_pos_embed.weight", f"{prefix}transformer.block_position_embeddings.weight")]
        names = {"attn_norm": "input_layernorm", "attn.qkv": "attention.query_key_value",
                 "attn.out": "attention.dense", "mlp_norm": "post_attention_layernorm",
                 "mlp.w_in": "mlp.dense_h_to_4h", "mlp.w_out": "mlp.dense_4h_to_h"}
        for i in range(cfg.num_layers):
            # GLM's fused QKV is already [q | k | v] with contiguous heads: a plain rename.
            m += layer_renames(i, f"{prefix}transformer.layers.{i}", names, biases(cfg))
        m += [rename("final_norm.weight", f"{prefix}transformer.final_layernorm.weight"),
              rename("final_norm.bias", f"{prefix}transformer.final_layernorm.bias")]
        return m  # the head is tied to word_embeddings: no key


register(GLMOriginalFormat())
