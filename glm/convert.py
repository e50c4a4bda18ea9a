"""Weight layouts: pure functions between each release's checkpoint format and glm's own layout.

A family's format is a list of `Mapping`s. Each ties a few glm tensors to a few release tensors and
carries both directions as small pure functions (renames, splits, concatenations, the RoPE row
permutation). Everything else — streaming shards, dtypes, atomic writes — lives in the callers,
so these tables can be read and round-trip tested on their own.

glm's layout (see `glm/model.py`): fused ``attn.qkv`` ``[q | k | v]`` with contiguous heads,
half-split RoPE, GLU ``w_in`` as ``[gate | up]``.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from .config import GLMConfig, check_glm_format_version
from .errors import FormatError, KeyMismatchError
from .tokenizer.load import MODEL_FILES


@dataclass(frozen=True)
class Mapping:
    glm: tuple[str, ...]  # glm tensor names
    hf: tuple[str, ...]  # release tensor names
    to_glm: Callable[..., tuple[Tensor, ...]]  # (*hf tensors) -> glm tensors
    to_hf: Callable[..., tuple[Tensor, ...]]  # (*glm tensors) -> release tensors


def _same(*ts: Tensor) -> tuple[Tensor, ...]:
    return ts


def rename(glm: str, hf: str) -> Mapping:
    return Mapping((glm,), (hf,), _same, _same)


# ---------------------------------------------------------------------------------------------
# Tensor transforms

def rope_permutation(head_dim: int, rotary_dim: int) -> Tensor:
    """Index that turns an interleaved-pairs head ``(x0,x1),(x2,x3),...`` into half-split order
    ``x0,x2,...,x1,x3,...`` over the first ``rotary_dim`` dims. Attention scores are unchanged
    because q and k are permuted alike."""
    rot = torch.arange(rotary_dim)
    perm = torch.cat((rot[0::2], rot[1::2]))
    return torch.cat((perm, torch.arange(rotary_dim, head_dim)))


def _permute_heads(t: Tensor, heads: int, index: Tensor) -> Tensor:
    # t is [heads*d, ...] (weight) or [heads*d] (bias): permute inside each head.
    d = index.numel()
    return t.reshape(heads, d, *t.shape[1:])[:, index].reshape(t.shape)


def _check_rows(t: Tensor, heads: int, head_dim: int) -> None:
    # Before building an index of head_dim entries: a config that does not fit the stored rows
    # (e.g. a corrupt head_dim of 10**10) fails here, as a RuntimeError like a failed reshape.
    if t.dim() == 0 or t.shape[0] != heads * head_dim:
        raise RuntimeError(f"{tuple(t.shape)} has no {heads} x {head_dim} head rows")


def interleaved_to_half(t: Tensor, heads: int, head_dim: int, rotary_dim: int) -> Tensor:
    _check_rows(t, heads, head_dim)
    return _permute_heads(t, heads, rope_permutation(head_dim, rotary_dim))


def half_to_interleaved(t: Tensor, heads: int, head_dim: int, rotary_dim: int) -> Tensor:
    _check_rows(t, heads, head_dim)
    return _permute_heads(t, heads, torch.argsort(rope_permutation(head_dim, rotary_dim)))


def per_head_qkv_to_blocks(t: Tensor, heads: int, head_dim: int) -> Tensor:
    """ChatGLM-6B's ``[n, (q|k|v), d]`` output rows -> ``[q (n*d) | k | v]``."""
    v = t.reshape(heads, 3, head_dim, *t.shape[1:])
    return v.transpose(0, 1).reshape(t.shape)


def blocks_to_per_head_qkv(t: Tensor, heads: int, head_dim: int) -> Tensor:
    v = t.reshape(3, heads, head_dim, *t.shape[1:])
    return v.transpose(0, 1).reshape(t.shape)


def chatglm6b_inv_freq(head_dim: int, dtype: torch.dtype) -> Tensor:
    """The ``rotary_emb.inv_freq`` buffer ChatGLM-6B stores per layer (its loader ignores it)."""
    dim = head_dim // 2
    return (1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))).half().to(dtype)


def chatglm2_inv_freq(head_dim: int, dtype: torch.dtype) -> Tensor:
    """The ``rotary_pos_emb.inv_freq`` buffer of ChatGLM2/3/GLM-4 (built with base 10000 even when
    rope_ratio changes the base used at run time; the forward recomputes it and ignores this)."""
    dim = head_dim // 2
    return 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32).to(dtype) / dim))


# ---------------------------------------------------------------------------------------------
# Per-family formats

def _glm_layers(cfg: GLMConfig, i: int, hf_layer: str, names: dict[str, str], biases: Iterable[str]) -> list[Mapping]:
    """Renames for one layer: ``names`` maps glm module -> release module under ``hf_layer``."""
    out = []
    for g, h in names.items():
        out.append(rename(f"layers.{i}.{g}.weight", f"{hf_layer}.{h}.weight"))
        if g in biases:
            out.append(rename(f"layers.{i}.{g}.bias", f"{hf_layer}.{h}.bias"))
    return out


def _biases(cfg: GLMConfig) -> set[str]:
    b = set()
    if cfg.norm == "layernorm":
        b |= {"attn_norm", "mlp_norm", "attn_out_norm", "mlp_out_norm"}
    if cfg.qkv_bias:
        b.add("attn.qkv")
    if cfg.out_bias:
        b.add("attn.out")
    if cfg.mlp_bias:
        b |= {"mlp.w_in", "mlp.w_out"}
    return b


def _glm_original_format(cfg: GLMConfig, prefix: str = "glm.") -> list[Mapping]:
    m = [rename("embed.weight", f"{prefix}word_embeddings.weight"),
         rename("pos_embed.weight", f"{prefix}transformer.position_embeddings.weight"),
         rename("block_pos_embed.weight", f"{prefix}transformer.block_position_embeddings.weight")]
    names = {"attn_norm": "input_layernorm", "attn.qkv": "attention.query_key_value",
             "attn.out": "attention.dense", "mlp_norm": "post_attention_layernorm",
             "mlp.w_in": "mlp.dense_h_to_4h", "mlp.w_out": "mlp.dense_4h_to_h"}
    for i in range(cfg.num_layers):
        # GLM's fused QKV is already [q | k | v] with contiguous heads: a plain rename.
        m += _glm_layers(cfg, i, f"{prefix}transformer.layers.{i}", names, _biases(cfg))
    m += [rename("final_norm.weight", f"{prefix}transformer.final_layernorm.weight"),
          rename("final_norm.bias", f"{prefix}transformer.final_layernorm.bias")]
    return m  # the head is tied to word_embeddings: no key


def _chatglm6b_format(cfg: GLMConfig, dtype: torch.dtype, stored_head: bool = True) -> list[Mapping]:
    n, d = cfg.num_heads, cfg.head_dim
    emb = "transformer.word_embeddings.weight"
    if cfg.tie_word_embeddings and not stored_head:
        m = [rename("embed.weight", emb)]
    elif cfg.tie_word_embeddings:
        # The release stores lm_head.weight equal to the embeddings and HF ties the two; glm keeps one.
        m = [Mapping(("embed.weight",), (emb, "lm_head.weight"), lambda e, _h: (e,), lambda e: (e, e.clone()))]
    else:
        m = [rename("embed.weight", emb), rename("lm_head.weight", "lm_head.weight")]
    names = {"attn_norm": "input_layernorm", "attn.out": "attention.dense",
             "mlp_norm": "post_attention_layernorm", "mlp.w_in": "mlp.dense_h_to_4h",
             "mlp.w_out": "mlp.dense_4h_to_h"}
    for i in range(cfg.num_layers):
        hl = f"transformer.layers.{i}"
        m += _glm_layers(cfg, i, hl, names, _biases(cfg))
        for kind in ("weight", "bias"):
            m.append(Mapping((f"layers.{i}.attn.qkv.{kind}",), (f"{hl}.attention.query_key_value.{kind}",),
                             lambda t: (per_head_qkv_to_blocks(t, n, d),),
                             lambda t: (blocks_to_per_head_qkv(t, n, d),)))
        # The per-layer inv_freq buffer is never loaded by the reference (its _load_from_state_dict is
        # a no-op); glm drops it and regenerates it when writing the release format.
        m.append(Mapping((), (f"{hl}.attention.rotary_emb.inv_freq",), lambda _t: (),
                         lambda: (chatglm6b_inv_freq(d, dtype),)))
    m += [rename("final_norm.weight", "transformer.final_layernorm.weight"),
          rename("final_norm.bias", "transformer.final_layernorm.bias")]
    return m


def _qkv_split(cfg: GLMConfig) -> tuple[int, int, int]:
    return cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim


def _fused_qkv_mapping(cfg: GLMConfig, glm_name: str, hf_name: str, per_head: bool = False) -> Mapping:
    """ChatGLM2+ fused ``[q | k | v]``: same blocks as glm; q and k rows go interleaved -> half-split.
    ``per_head``: the file's rows are ``[n, (q|k|v), d]`` instead, which is how the chatglm2-format
    code reads them when ``multi_query_attention`` is false."""
    n, g, d, r = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rotary_dim
    split = _qkv_split(cfg)

    def to_glm(t: Tensor) -> tuple[Tensor]:
        if per_head:
            _check_rows(t, 3 * n, d)
            t = per_head_qkv_to_blocks(t, n, d)
        q, k, v = t.split(split)
        return (torch.cat((interleaved_to_half(q, n, d, r), interleaved_to_half(k, g, d, r), v)),)

    def to_hf(t: Tensor) -> tuple[Tensor]:
        q, k, v = t.split(split)
        t = torch.cat((half_to_interleaved(q, n, d, r), half_to_interleaved(k, g, d, r), v))
        return (blocks_to_per_head_qkv(t, n, d) if per_head else t,)

    return Mapping((glm_name,), (hf_name,), to_glm, to_hf)


def _separate_qkv_mapping(cfg: GLMConfig, glm_name: str, hf_names: tuple[str, str, str]) -> Mapping:
    """transformers Glm's q_proj/k_proj/v_proj -> one fused glm projection (and back)."""
    n, g, d, r = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rotary_dim
    split = _qkv_split(cfg)

    def to_glm(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor]:
        return (torch.cat((interleaved_to_half(q, n, d, r), interleaved_to_half(k, g, d, r), v)),)

    def to_hf(t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = t.split(split)
        return half_to_interleaved(q, n, d, r), half_to_interleaved(k, g, d, r), v.clone()

    return Mapping((glm_name,), hf_names, to_glm, to_hf)


def _chatglm2_format(cfg: GLMConfig, dtype: torch.dtype, per_head_qkv: bool = False) -> list[Mapping]:
    m = [rename("embed.weight", "transformer.embedding.word_embeddings.weight"),
         Mapping((), ("transformer.rotary_pos_emb.inv_freq",), lambda _t: (),
                 lambda: (chatglm2_inv_freq(cfg.head_dim, dtype),))]
    names = {"attn_norm": "input_layernorm", "attn.out": "self_attention.dense",
             "mlp_norm": "post_attention_layernorm", "mlp.w_in": "mlp.dense_h_to_4h",
             "mlp.w_out": "mlp.dense_4h_to_h"}
    for i in range(cfg.num_layers):
        hl = f"transformer.encoder.layers.{i}"
        m += _glm_layers(cfg, i, hl, names, _biases(cfg))
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            m.append(_fused_qkv_mapping(cfg, f"layers.{i}.attn.qkv.{kind}",
                                        f"{hl}.self_attention.query_key_value.{kind}", per_head_qkv))
    m.append(rename("final_norm.weight", "transformer.encoder.final_layernorm.weight"))
    if cfg.tie_word_embeddings:
        # The format always has a separate output_layer: a tied model writes the embedding twice
        # (and reads back untied, computing the same logits).
        m[0] = Mapping(("embed.weight",), ("transformer.embedding.word_embeddings.weight",
                                           "transformer.output_layer.weight"),
                       lambda e, _o: (e,), lambda e: (e, e.clone()))
    else:
        m.append(rename("lm_head.weight", "transformer.output_layer.weight"))
    return m


def _glm_hf_format(cfg: GLMConfig) -> list[Mapping]:
    m = [rename("embed.weight", "model.embed_tokens.weight")]
    names = {"attn_norm": "input_layernorm", "attn.out": "self_attn.o_proj",
             "mlp_norm": "post_attention_layernorm", "mlp.w_in": "mlp.gate_up_proj", "mlp.w_out": "mlp.down_proj"}
    if cfg.sandwich_norm:
        # Naming trap: transformers' post_attention_layernorm is the pre-MLP norm; these two sit on the
        # sub-layer outputs.
        names |= {"attn_out_norm": "post_self_attn_layernorm", "mlp_out_norm": "post_mlp_layernorm"}
    for i in range(cfg.num_layers):
        hl = f"model.layers.{i}"
        m += _glm_layers(cfg, i, hl, names, _biases(cfg))
        m.append(_separate_qkv_mapping(cfg, f"layers.{i}.attn.qkv.weight",
                                       tuple(f"{hl}.self_attn.{p}_proj.weight" for p in "qkv")))
        if cfg.qkv_bias:
            m.append(_separate_qkv_mapping(cfg, f"layers.{i}.attn.qkv.bias",
                                           tuple(f"{hl}.self_attn.{p}_proj.bias" for p in "qkv")))
    m.append(rename("final_norm.weight", "model.norm.weight"))
    if not cfg.tie_word_embeddings:
        m.append(rename("lm_head.weight", "lm_head.weight"))
    return m


def per_head_qkv(family: str, hf_config: Optional[dict]) -> bool:
    """Whether a chatglm2-format file stores its fused QKV rows per head: the reference code views
    them as ``[n, 3d]`` unless ``multi_query_attention`` is true (its config default is false; every
    release sets it true)."""
    return (family in ("chatglm2", "chatglm3", "glm4-chatglm") and isinstance(hf_config, dict)
            and not hf_config.get("multi_query_attention", False))


def hf_format(cfg: GLMConfig, dtype: torch.dtype = torch.float32,
              keys: Optional[Sequence[str]] = None, per_head_qkv: bool = False) -> list[Mapping]:
    """The mappings between glm's layout and the release format of ``cfg.family``.

    ``dtype`` is that of the release file (it only matters for buffers glm regenerates on write).
    ``keys``, the names in an existing checkpoint, settle two variants: original-GLM files saved
    from ``GLMForConditionalGeneration`` prefix their keys with ``glm.`` (a bare ``GLMModel`` does
    not), and a ChatGLM-6B file may or may not store its tied ``lm_head.weight``. ``per_head_qkv``:
    see `per_head_qkv` (chatglm2-format files with ``multi_query_attention`` false).
    """
    fam = cfg.family
    if fam == "glm":
        prefix = "glm." if keys is None or any(k.startswith("glm.") for k in keys) else ""
        return _glm_original_format(cfg, prefix)
    if fam == "chatglm":
        return _chatglm6b_format(cfg, dtype, stored_head=keys is None or "lm_head.weight" in keys)
    if fam in ("chatglm2", "chatglm3", "glm4-chatglm"):
        return _chatglm2_format(cfg, dtype, per_head_qkv)
    if fam in ("glm-hf", "glm4-hf"):
        return _glm_hf_format(cfg)
    raise ValueError(f"no checkpoint format for family {fam!r}")


# ---------------------------------------------------------------------------------------------
# Applying a format

def check_keys(mappings: Sequence[Mapping], available: Iterable[str], side: str, source: str) -> None:
    """Raise one error listing every missing and unexpected tensor name on ``side`` ('hf' or 'glm')."""
    want = [n for mp in mappings for n in getattr(mp, side)]
    have = set(available)
    missing = [n for n in want if n not in have]
    unexpected = sorted(have - set(want))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:12])}"
                         + (" ..." if len(missing) > 12 else ""))
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:12])}"
                         + (" ..." if len(unexpected) > 12 else ""))
        raise KeyMismatchError(f"{source}: the tensors do not match the expected layout ({'; '.join(parts)}). "
                               f"Check that config.json belongs to these weights")


# ---------------------------------------------------------------------------------------------
# Release config.json writers (glm -> release). Reading is GLMConfig.from_hf.

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_CHATGLM_AUTO_MAP = {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                     "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
                     "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}


def _require(cfg: GLMConfig, family: str, **fields) -> None:
    bad = [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in fields.items() if getattr(cfg, k) != v]
    if bad:
        raise FormatError(f"a {cfg.family} model cannot be written as {family}: {', '.join(bad)}")


def hf_config(cfg: GLMConfig, dtype: torch.dtype) -> dict:
    """The release-schema config.json for ``cfg`` (``cfg.family`` names the release format)."""
    fam, dt = cfg.family, _DTYPE_NAMES[dtype]
    eos = list(cfg.eos_token_ids)
    if fam == "glm":
        _require(cfg, fam, position_encoding="learned_2d", norm="layernorm", mlp="gelu", residual_alpha=None,
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
                "pool_token": "cls", "torch_dtype": dt}
    if fam == "chatglm":
        _require(cfg, fam, position_encoding="rope_2d", norm="layernorm", mlp="gelu_tanh", sandwich_norm=False,
                 num_kv_heads=cfg.num_heads, head_dim=cfg.hidden_size // cfg.num_heads,
                 rope_inv_freq_dtype="float16", rope_base=10000.0, rope_position_scale=1.0)
        from .config import CHATGLM6B_RESIDUAL_ALPHA
        _require(cfg, fam, residual_alpha=CHATGLM6B_RESIDUAL_ALPHA)
        st = cfg.special_tokens
        return {"architectures": ["ChatGLMModel"], "model_type": "chatglm",
                "auto_map": {k: v for k, v in _CHATGLM_AUTO_MAP.items() if k != "AutoModelForCausalLM"},
                "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers,
                "num_attention_heads": cfg.num_heads, "inner_hidden_size": cfg.ffn_hidden_size,
                "max_sequence_length": cfg.max_positions, "layernorm_epsilon": cfg.norm_eps,
                "bos_token_id": cfg.bos_token_id, "eos_token_id": eos[0] if eos else None,
                "mask_token_id": st.get("[MASK]"), "gmask_token_id": st.get("[gMASK]"),
                "pad_token_id": cfg.pad_token_id, "position_encoding_2d": True, "use_cache": True,
                "torch_dtype": dt}
    if fam in ("chatglm2", "chatglm3", "glm4-chatglm"):
        _require(cfg, fam, position_encoding="rope", norm="rmsnorm", mlp="swiglu", residual_alpha=None,
                 sandwich_norm=False, rotary_fraction=0.5, rope_inv_freq_dtype=None, out_bias=cfg.mlp_bias)
        d = {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "auto_map": dict(_CHATGLM_AUTO_MAP),
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
             "pad_token_id": cfg.pad_token_id, "torch_dtype": dt}
        # rope_ratio divides ChatGLM2's positions but multiplies ChatGLM3's / GLM-4's base.
        if fam == "chatglm2":
            _require(cfg, fam, rope_base=10000.0)
            if cfg.rope_position_scale != 1.0:
                d["rope_ratio"] = cfg.rope_position_scale
        else:
            _require(cfg, fam, rope_position_scale=1.0)
            if fam == "glm4-chatglm" or cfg.rope_base != 10000.0:
                d["rope_ratio"] = cfg.rope_base / 10000.0
        # The chatglm-format schemas are identical; the name is what lets from_hf tell them apart.
        d["_name_or_path"] = "THUDM/glm-4-9b" if fam == "glm4-chatglm" else f"THUDM/{fam}-6b"
        return d
    if fam in ("glm-hf", "glm4-hf"):
        _require(cfg, fam, position_encoding="rope", norm="rmsnorm", mlp="swiglu", residual_alpha=None,
                 sandwich_norm=(fam == "glm4-hf"), out_bias=False, mlp_bias=False, rope_position_scale=1.0)
        return {"architectures": ["Glm4ForCausalLM" if fam == "glm4-hf" else "GlmForCausalLM"],
                "model_type": "glm4" if fam == "glm4-hf" else "glm", "attention_bias": cfg.qkv_bias,
                "attention_dropout": 0.0, "bos_token_id": cfg.bos_token_id, "dtype": dt,
                "eos_token_id": eos, "head_dim": cfg.head_dim, "hidden_act": "silu",
                "hidden_size": cfg.hidden_size, "initializer_range": 0.02,
                "intermediate_size": cfg.ffn_hidden_size, "max_position_embeddings": cfg.max_positions,
                "num_attention_heads": cfg.num_heads, "num_hidden_layers": cfg.num_layers,
                "num_key_value_heads": cfg.num_kv_heads, "pad_token_id": cfg.pad_token_id,
                "rms_norm_eps": cfg.norm_eps,
                "rope_parameters": {"partial_rotary_factor": cfg.rotary_fraction, "rope_theta": cfg.rope_base,
                                    "rope_type": "default"},
                "tie_word_embeddings": cfg.tie_word_embeddings, "use_cache": True, "vocab_size": cfg.vocab_size}
    raise FormatError(f"no release format for family {fam!r}")


def retarget(cfg: GLMConfig, family: str, dtype: torch.dtype) -> GLMConfig:
    """``cfg`` re-expressed as another family with the same computation, where the formats allow it:
    the chatglm-format GLM-4 and transformers' Glm are the two public forms of GLM-4-9B (and
    ChatGLM2/3 map onto Glm the same way). The rotary base carries over as rope_theta = 10000 *
    rope_ratio. A half-precision Glm target gets ``rope_inv_freq_dtype`` = that dtype, as from_hf
    reads such a file (the fixtures' transformers reference, cast to bf16, rounds its RoPE
    frequencies; the chatglm code never does): that difference (<1e-3 in logits) is kept, not hidden."""
    if family == cfg.family:
        return cfg
    chatglm2_like = ("chatglm2", "chatglm3", "glm4-chatglm")
    if family in ("glm-hf", "glm4-hf") and cfg.family in chatglm2_like + ("glm-hf", "glm4-hf"):
        rd = _DTYPE_NAMES[dtype] if dtype in (torch.float16, torch.bfloat16) else None
        new = cfg.replace(family=family, rope_inv_freq_dtype=rd)
    elif family in chatglm2_like and cfg.family in chatglm2_like + ("glm-hf",):
        new = cfg.replace(family=family, rope_inv_freq_dtype=None)
    else:
        raise FormatError(f"a {cfg.family} model cannot be written in the {family} format: the architectures "
                          f"differ (positions, norms, MLP or residual); convert to 'glm' format instead")
    hf_config(new, dtype)  # raises FormatError naming any field the target cannot express
    return new


# ---------------------------------------------------------------------------------------------
# Streaming conversion between folders (and saving a model)

def _lossy(src: torch.dtype, dst: torch.dtype) -> bool:
    return src != dst and not (dst == torch.float32 and src in (torch.float16, torch.bfloat16))


@dataclass
class Source:
    """Where glm-layout tensors come from: a release folder, a glm folder, or a model in memory."""
    cfg: GLMConfig
    hf_config: Optional[dict]  # the release config.json this model came from, carried along
    mappings: list[Mapping]  # source names (mp.hf) -> glm names (mp.glm)
    get: Callable[[str], Tensor]
    meta: Callable[[str], Tensor]
    file_of: Callable[[str], str] = lambda name: ""
    names: list[str] = field(default_factory=list)

    def first_file(self, mp: Mapping) -> str:
        """The shard a mapping's first source tensor lives in: sorting by it reads each shard once."""
        return min((self.file_of(n) for n in mp.hf), default="")


def _glm_identity(cfg: GLMConfig) -> list[Mapping]:
    from .model import GLM

    with torch.device("meta"):
        names = list(GLM(cfg).state_dict())
    return [rename(n, n) for n in names]


def _meta_shapes(cfg: GLMConfig, where: str) -> dict[str, torch.Size]:
    """glm tensor name -> shape for ``cfg``, built on the meta device (no memory). Sizes no tensor
    can have (a corrupt config.json: 2**31 x 2**31 embeddings, 2**70 features) are a CheckpointError."""
    from .checkpoint import CheckpointError
    from .model import GLM

    try:
        with torch.device("meta"):
            return {n: p.shape for n, p in GLM(cfg).state_dict().items()}
    except (RuntimeError, TypeError, ValueError, OverflowError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{where}: config.json implies tensors no checkpoint can hold ({reason}); "
                              f"the config does not belong to these weights, restore it from the release") from None


def check_shapes(source: Source, where: str) -> None:
    """Run the source's mappings on meta tensors and compare with the shapes ``source.cfg`` implies,
    so a config that does not belong to its weights fails before anything is read or written."""
    from .checkpoint import CheckpointError

    expected = _meta_shapes(source.cfg, where)
    for mp in source.mappings:
        metas = [source.meta(n) for n in mp.hf]
        try:
            outs = mp.to_glm(*metas)
        except RuntimeError:  # a reshape that the stored shape cannot satisfy
            outs = [None] * len(mp.glm)
        for name, t in zip(mp.glm, outs):
            if t is None or t.shape != expected[name]:
                stored = ", ".join(f"{n} {tuple(m.shape)}" for n, m in zip(mp.hf, metas))
                raise CheckpointError(f"{where}: tensor {stored} does not fit the shape config.json implies, "
                                      f"{tuple(expected[name])} (glm name {name!r}); the config and weights "
                                      f"do not belong together")


def open_source(src: str, verify: bool = True) -> tuple[Source, "object"]:
    """A `Source` over a checkpoint folder in a release format or in glm's format. ``verify``: check the
    weight files against the checksum record of a folder glm wrote (after the cheap checks of config,
    names and shapes, before any tensor is read)."""
    from .checkpoint import CheckpointError, CheckpointReader, is_glm_format, verify_checksums
    from .config import ConfigError, read_json

    config_path = os.path.join(src, "config.json")
    raw = read_json(config_path)
    reader = CheckpointReader(src)
    if is_glm_format(src):
        check_glm_format_version(raw.get("glm_format_version"), config_path)
        cfg = GLMConfig.from_dict(raw.get("config", {}), source=config_path)
        hf_cfg = raw.get("hf_config")
        if hf_cfg is not None and not isinstance(hf_cfg, dict):
            raise ConfigError(f"{config_path}: 'hf_config' must be the release's config.json object or null, "
                              f"got {type(hf_cfg).__name__}; re-save the folder with glm convert")
    else:
        cfg = GLMConfig.from_hf(raw if isinstance(raw, dict) else config_path, source=config_path)
        hf_cfg = raw
    # Every layer has tensors of its own: a layer count beyond the number of stored tensors cannot
    # be these weights' (and would otherwise spend minutes building a layout for it).
    if cfg.num_layers > len(reader.keys()):
        raise CheckpointError(f"{src}: config.json says {cfg.num_layers} layers but the checkpoint holds only "
                              f"{len(reader.keys())} tensors; the config and weights do not belong together")
    if is_glm_format(src):
        mappings = [rename(n, n) for n in _meta_shapes(cfg, src)]
    else:
        per_head = per_head_qkv(cfg.family, hf_cfg)
        if per_head:
            import warnings

            # No release sets the flag false; glm before 2026-11-25 did, for models with as many KV
            # heads as query heads, while writing block rows: such files need the flag set true.
            warnings.warn(f"{config_path}: multi_query_attention is false, so the fused QKV rows are read per "
                          f"head ([n, 3d]) as THUDM's code reads them. If glm wrote this folder before "
                          f"2026-11-25, set multi_query_attention true and multi_query_group_num to "
                          f"num_attention_heads in config.json", stacklevel=2)
        mappings = hf_format(cfg, keys=reader.keys(), per_head_qkv=per_head)
        # Buffers glm regenerates (RoPE inv_freq) are optional: the references never read them.
        have = set(reader.keys())
        mappings = [mp for mp in mappings if mp.glm or all(n in have for n in mp.hf)]
    check_keys(mappings, reader.keys(), "hf", src)
    source = Source(cfg, hf_cfg, mappings, reader.get, reader.meta, reader.file_of, reader.keys())
    check_shapes(source, src)
    if verify:
        verify_checksums(src, reader.files() + ([reader.index] if reader.index else []))
    return source, reader


def model_source(model) -> Source:
    sd = model.state_dict()
    return Source(model.config, None, _glm_identity(model.config), sd.__getitem__,
                  lambda n: sd[n].to("meta"), names=list(sd))


@dataclass
class ConvertSummary:
    dst: str
    format: str
    family: str
    tensors: int
    bytes: int
    seconds: float
    peak_rss_bytes: int
    files: list[str]

    def line(self) -> str:
        return (f"wrote {self.dst} ({self.format}, {self.family}): {self.tensors} tensors, "
                f"{self.bytes / 1e9:.3f} GB in {len(self.files)} shard(s), {self.seconds:.1f} s "
                f"({self.bytes / 1e9 / max(self.seconds, 1e-9):.2f} GB/s), peak RSS {self.peak_rss_bytes / 1e9:.2f} GB")


def peak_rss() -> int:
    """High-water resident memory of this process (Linux VmHWM; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def write_from(source: Source, dst: str, *, to: str = "glm", family: Optional[str] = None,
               dtype: "torch.dtype | str | None" = None, allow_lossy: bool = False,
               shard_size: "int | str" = "2GB", overwrite: bool = False, progress: bool = False,
               extra_files: Optional[dict[str, bytes]] = None) -> ConvertSummary:
    """Write ``source`` to ``dst`` in glm's format (``to="glm"``) or a release format (``to="hf"``,
    ``family`` defaults to the source's). Streams one mapping at a time; atomic. ``extra_files``
    (name -> bytes, e.g. the tokenizer) are written into the folder with the weights."""
    from .checkpoint import check_destination, clear_stale_temps, write_checkpoint
    from .devices import as_dtype
    from .files import parse_size

    t0 = time.time()
    if to not in ("glm", "hf"):
        raise ValueError(f"to= (--to) must be 'glm' or 'hf', got {to!r}")
    if to == "glm" and family is not None and family != source.cfg.family:
        raise ValueError(f"family {family!r} picks the release format of an hf output (to='hf', --to hf); glm's format "
                         f"keeps the source's family ({source.cfg.family})")
    dtype = as_dtype(dtype)
    if dtype is not None and dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16")
    shard_bytes = parse_size(shard_size)
    dst = os.path.abspath(os.fspath(dst))
    clear_stale_temps(dst, CARRIED_FILES)
    check_destination(dst, overwrite, CARRIED_FILES)

    src_dtypes = {source.meta(n).dtype for mp in source.mappings for n in mp.hf}
    if dtype is not None and not allow_lossy:
        lossy = sorted(str(s) for s in src_dtypes if _lossy(s, dtype))
        if lossy:
            raise ValueError(f"casting {', '.join(lossy)} weights to {dtype} loses precision; pass "
                             f"--allow-lossy (allow_lossy=True) to do it anyway")
    emb_dtype = source.meta(next(n for mp in source.mappings if "embed.weight" in mp.glm for n in mp.hf)).dtype
    out_dtype = dtype or emb_dtype

    cfg = source.cfg
    if to == "glm":
        tcfg, targets = cfg, _glm_identity(cfg)
        config_json = {"glm_format_version": 1, "config": cfg.to_dict(), "hf_config": source.hf_config}
    else:
        tcfg = retarget(cfg, family or cfg.family, out_dtype)
        config_json = hf_config(tcfg, out_dtype)
        if source.hf_config is not None and tcfg.family == cfg.family:
            # Same release format: keep its own config.json (all its keys), with the dtype updated.
            config_json = dict(source.hf_config)
            keys = [k for k in ("torch_dtype", "dtype") if k in config_json] or ["torch_dtype"]
            config_json.update({k: _DTYPE_NAMES[out_dtype] for k in keys})
        # The rows must be laid out the way the config.json written beside them makes the reference read them.
        targets = hf_format(tcfg, dtype=out_dtype, per_head_qkv=per_head_qkv(tcfg.family, config_json))

    producer = {g: mp for mp in source.mappings for g in mp.glm}
    # Order target mappings by the shard their first glm tensor comes from: each shard read once.
    targets = sorted(targets, key=lambda mp: min((source.first_file(producer[g]) for g in mp.glm), default=""))

    def stream(get_src: Callable[[str], Tensor]) -> Iterator[tuple[str, Tensor]]:
        pending: dict[str, Tensor] = {}

        def get_glm(name: str) -> Tensor:
            if name not in pending:
                mp = producer[name]
                pending.update(zip(mp.glm, mp.to_glm(*[get_src(n) for n in mp.hf])))
            return pending.pop(name)

        for mp in targets:
            outs = mp.to_hf(*[get_glm(n) for n in mp.glm])
            for name, t in zip(mp.hf, outs):
                yield name, t if dtype is None else t.to(dtype)

    entries = list(stream(source.meta))
    total = sum(m.numel() * m.element_size() for _, m in entries)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"convert -> {os.path.basename(dst)}")
    on_tensor = (lambda _n, nbytes: bar.update(nbytes)) if bar is not None else None
    files = {**(extra_files or {}),
             "config.json": (json.dumps(config_json, indent=2, ensure_ascii=False) + "\n").encode()}
    try:
        names = write_checkpoint(dst, entries, stream(source.get), files, shard_size=shard_bytes,
                                 overwrite=overwrite, on_tensor=on_tensor, carried=CARRIED_FILES)
    finally:
        if bar is not None:
            bar.close()
    return ConvertSummary(dst, to, tcfg.family, len(entries), total, time.time() - t0, peak_rss(), names)


# Files a checkpoint folder carries besides weights and config.json that stay valid whatever the
# weight format: the tokenizer (what glm.tokenizer.load and the references read) and generation
# defaults. Remote-code .py files are not copied: they belong to one release format.
CARRIED_FILES = (*MODEL_FILES, "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 "tokenizer.json", "vocab.json", "merges.txt", "generation_config.json")


# Far above any real tokenizer file (GLM-4's tokenizer.json is ~7 MB); a larger one is not such a file.
CARRIED_LIMIT = 512 * 1024 * 1024


def carried_files(src: str) -> dict[str, bytes]:
    """The `CARRIED_FILES` present in ``src``, name -> bytes. One that is not a regular file (a FIFO would
    block the copy forever) or is larger than any tokenizer file is a CheckpointError."""
    from .checkpoint import CheckpointError
    from .files import FileKindError, read_bounded

    out = {}
    for name in CARRIED_FILES:
        path = os.path.join(src, name)
        if os.path.exists(path):
            try:
                out[name] = read_bounded(path, CARRIED_LIMIT, "tokenizer file")
            except FileKindError as e:
                raise CheckpointError(str(e)) from None
    return out


def _is_or_holds(folder: str, path: str) -> bool:
    """Whether ``folder`` is ``path`` or one of its ancestors, by file identity (links, bind mounts)."""
    here = os.path.realpath(path)
    while True:
        if os.path.exists(here) and os.path.samefile(here, folder):
            return True
        up = os.path.dirname(here)
        if up == here:
            return False
        here = up


def convert_checkpoint(src: str, dst: str, *, verify: bool = True, **kwargs) -> ConvertSummary:
    """Convert the checkpoint folder ``src`` (any release format or glm's) into ``dst``; see `write_from`.
    The tokenizer and generation_config.json come along (`CARRIED_FILES`). ``verify``: check a
    glm-written source against its checksum record first (see `glm.from_pretrained`)."""
    from .files import parse_size

    src = os.fspath(src)
    if os.path.exists(dst) and _is_or_holds(os.fspath(dst), src):
        raise ValueError(f"{dst} is the source folder or holds it; write to another folder (the conversion "
                         f"replaces the destination, which would delete the source's own files)")
    parse_size(kwargs.get("shard_size", "2GB"))  # a bad size fails before the source is read
    source, reader = open_source(src, verify=verify)
    try:
        return write_from(source, dst, extra_files=carried_files(src), **kwargs)
    finally:
        reader.close()


def save_pretrained(model, dst: str, *, format: str = "glm", family: Optional[str] = None, **kwargs) -> ConvertSummary:
    """Save a `glm.GLM` as a checkpoint folder: glm's format, or a release format the reference code
    and transformers load (``format="hf"``; ``family`` picks e.g. ``glm-hf`` for a GLM-4 model)."""
    return write_from(model_source(model), dst, to=format, family=family, **kwargs)
