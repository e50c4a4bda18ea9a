"""Weight layouts: pure functions between each release's checkpoint format and glm's own layout.

A family's format is a list of `Mapping`s. Each ties a few glm tensors to a few release tensors and
carries both directions as small pure functions (renames, splits, concatenations, the RoPE row
permutation). Everything else — streaming shards, dtypes, atomic writes — lives in the callers,
so these tables can be read and round-trip tested on their own.

glm's layout (see `glm/model.py`): fused ``attn.qkv`` ``[q | k | v]`` with contiguous heads,
half-split RoPE, GLU ``w_in`` as ``[gate | up]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from .config import GLMConfig


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


def interleaved_to_half(t: Tensor, heads: int, head_dim: int, rotary_dim: int) -> Tensor:
    return _permute_heads(t, heads, rope_permutation(head_dim, rotary_dim))


def half_to_interleaved(t: Tensor, heads: int, head_dim: int, rotary_dim: int) -> Tensor:
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


def _fused_qkv_mapping(cfg: GLMConfig, glm_name: str, hf_name: str) -> Mapping:
    """ChatGLM2+ fused ``[q | k | v]``: same blocks as glm; q and k rows go interleaved -> half-split."""
    n, g, d, r = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rotary_dim
    split = _qkv_split(cfg)

    def to_glm(t: Tensor) -> tuple[Tensor]:
        q, k, v = t.split(split)
        return (torch.cat((interleaved_to_half(q, n, d, r), interleaved_to_half(k, g, d, r), v)),)

    def to_hf(t: Tensor) -> tuple[Tensor]:
        q, k, v = t.split(split)
        return (torch.cat((half_to_interleaved(q, n, d, r), half_to_interleaved(k, g, d, r), v)),)

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


def _chatglm2_format(cfg: GLMConfig, dtype: torch.dtype) -> list[Mapping]:
    m = [rename("embed.weight", "transformer.embedding.word_embeddings.weight"),
         Mapping((), ("transformer.rotary_pos_emb.inv_freq",), lambda _t: (),
                 lambda: (chatglm2_inv_freq(cfg.head_dim, dtype),))]
    names = {"attn_norm": "input_layernorm", "attn.out": "self_attention.dense",
             "mlp_norm": "post_attention_layernorm", "mlp.w_in": "mlp.dense_h_to_4h",
             "mlp.w_out": "mlp.dense_4h_to_h"}
    for i in range(cfg.num_layers):
        hl = f"transformer.encoder.layers.{i}"
        m += _glm_layers(cfg, i, hl, names, _biases(cfg))
        m.append(_fused_qkv_mapping(cfg, f"layers.{i}.attn.qkv.weight", f"{hl}.self_attention.query_key_value.weight"))
        if cfg.qkv_bias:
            m.append(_fused_qkv_mapping(cfg, f"layers.{i}.attn.qkv.bias", f"{hl}.self_attention.query_key_value.bias"))
    m.append(rename("final_norm.weight", "transformer.encoder.final_layernorm.weight"))
    if not cfg.tie_word_embeddings:
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


def hf_format(cfg: GLMConfig, dtype: torch.dtype = torch.float32,
              keys: Optional[Sequence[str]] = None) -> list[Mapping]:
    """The mappings between glm's layout and the release format of ``cfg.family``.

    ``dtype`` is that of the release file (it only matters for buffers glm regenerates on write).
    ``keys``, the names in an existing checkpoint, settle two variants: original-GLM files saved
    from ``GLMForConditionalGeneration`` prefix their keys with ``glm.`` (a bare ``GLMModel`` does
    not), and a ChatGLM-6B file may or may not store its tied ``lm_head.weight``.
    """
    fam = cfg.family
    if fam == "glm":
        prefix = "glm." if keys is None or any(k.startswith("glm.") for k in keys) else ""
        return _glm_original_format(cfg, prefix)
    if fam == "chatglm":
        return _chatglm6b_format(cfg, dtype, stored_head=keys is None or "lm_head.weight" in keys)
    if fam in ("chatglm2", "chatglm3", "glm4-chatglm"):
        return _chatglm2_format(cfg, dtype)
    if fam in ("glm-hf", "glm4-hf"):
        return _glm_hf_format(cfg)
    raise ValueError(f"no checkpoint format for family {fam!r}")


# ---------------------------------------------------------------------------------------------
# Applying a format

class KeyMismatchError(ValueError):
    pass


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


def convert(mappings: Sequence[Mapping], get: Callable[[str], Tensor], direction: str,
            order: Optional[Callable[[Mapping], object]] = None) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(name, tensor)`` in the target layout, pulling sources one mapping at a time.

    direction: ``"to_glm"`` (release -> glm) or ``"to_hf"`` (glm -> release). ``order`` sorts the
    mappings (e.g. by source shard) so each shard is read once, front to back.
    """
    src_side, dst_side = ("hf", "glm") if direction == "to_glm" else ("glm", "hf")
    for mp in sorted(mappings, key=order) if order else mappings:
        srcs = [get(n) for n in getattr(mp, src_side)]
        outs = getattr(mp, direction)(*srcs)
        names = getattr(mp, dst_side)
        assert len(outs) == len(names), f"mapping {mp.glm}<->{mp.hf} produced {len(outs)} tensors"
        yield from zip(names, outs)
