"""The pieces every release format's weight table is built from.

A format's table is a list of `Mapping`s. Each ties a few glm tensors to a few release tensors and
carries both directions as small pure functions (renames, splits, concatenations, the RoPE row
permutation), so a table can be read and round-trip tested on its own. Streaming shards, dtypes and
atomic writes live in glm.hub.

glm's layout (see `glm/model.py`): fused ``attn.qkv`` ``[q | k | v]`` with contiguous heads,
half-split RoPE, GLU ``w_in`` as ``[gate | up]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor

from ..config import GLMConfig

# The dtypes a release file may be written in, by the name config.json gives them.
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


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


def tied(glm: str, hf: tuple[str, str]) -> Mapping:
    """One glm tensor stored twice by the release (an output layer equal to the embeddings): read from
    the first name, written to both."""
    return Mapping((glm,), hf, lambda first, _second: (first,), lambda t: (t, t.clone()))


def regenerated(hf: str, make: Callable[[], Tensor]) -> Mapping:
    """A release buffer glm does not keep (its reference never loads it): dropped on read, ``make()`` on write."""
    return Mapping((), (hf,), lambda _t: (), lambda: (make(),))


# ---------------------------------------------------------------------------------------------
# Tensor transforms

def rope_permutation(head_dim: int, rotary_dim: int) -> Tensor:
    """Index that turns an interleaved-pairs head ``(x0,x1),(x2,x3),...`` into half-split order
    ``x0,x2,...,x1,x3,...`` over the first ``rotary_dim`` dims. Attention scores are unchanged
    because q and k are permuted alike."""
    rot = torch.arange(rotary_dim)
    perm = torch.cat((rot[0::2], rot[1::2]))
    return torch.cat((perm, torch.arange(rotary_dim, head_dim)))


def cat_rows(parts: Iterable[Tensor]) -> Tensor:
    """``torch.cat`` along rows. The shape checks run every table on meta tensors, where torch's cat
    is a Python decomposition whose first call imports torch._dynamo (about 2 s of a conversion); a
    meta result only needs its shape, so it is built directly."""
    parts = tuple(parts)
    if all(p.is_meta for p in parts):
        rows = sum(p.shape[0] for p in parts)
        return torch.empty((rows, *parts[0].shape[1:]), dtype=parts[0].dtype, device="meta")
    return torch.cat(parts)


def _permute_heads(t: Tensor, heads: int, index: Tensor) -> Tensor:
    # t is [heads*d, ...] (weight) or [heads*d] (bias): permute inside each head.
    d = index.numel()
    return t.reshape(heads, d, *t.shape[1:])[:, index].reshape(t.shape)


def check_rows(t: Tensor, heads: int, head_dim: int) -> None:
    """Before building an index of head_dim entries: a config that does not fit the stored rows (e.g. a
    corrupt head_dim of 10**10) fails here, as a RuntimeError like a failed reshape (glm.hub reports it
    as a shape mismatch)."""
    if t.dim() == 0 or t.shape[0] != heads * head_dim:
        raise RuntimeError(f"{tuple(t.shape)} has no {heads} x {head_dim} head rows")


def interleaved_to_half(t: Tensor, heads: int, head_dim: int, rotary_dim: int) -> Tensor:
    check_rows(t, heads, head_dim)
    return _permute_heads(t, heads, rope_permutation(head_dim, rotary_dim))


def half_to_interleaved(t: Tensor, heads: int, head_dim: int, rotary_dim: int) -> Tensor:
    check_rows(t, heads, head_dim)
    return _permute_heads(t, heads, torch.argsort(rope_permutation(head_dim, rotary_dim)))


def per_head_qkv_to_blocks(t: Tensor, heads: int, head_dim: int) -> Tensor:
    """``[n, (q|k|v), d]`` output rows (ChatGLM-6B, MHA chatglm2-format files) -> ``[q (n*d) | k | v]``."""
    v = t.reshape(heads, 3, head_dim, *t.shape[1:])
    return v.transpose(0, 1).reshape(t.shape)


def blocks_to_per_head_qkv(t: Tensor, heads: int, head_dim: int) -> Tensor:
    v = t.reshape(3, heads, head_dim, *t.shape[1:])
    return v.transpose(0, 1).reshape(t.shape)


def qkv_split(cfg: GLMConfig) -> tuple[int, int, int]:
    """Rows of q, k and v in glm's fused projection."""
    return cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim


# ---------------------------------------------------------------------------------------------
# Shared table builders

def layer_renames(i: int, hf_layer: str, names: dict[str, str], biases: Iterable[str]) -> list[Mapping]:
    """Renames for layer ``i``: ``names`` maps glm module -> release module under ``hf_layer``; the modules
    in ``biases`` have a bias too."""
    out = []
    for g, h in names.items():
        out.append(rename(f"layers.{i}.{g}.weight", f"{hf_layer}.{h}.weight"))
        if g in biases:
            out.append(rename(f"layers.{i}.{g}.bias", f"{hf_layer}.{h}.bias"))
    return out


def biases(cfg: GLMConfig) -> set[str]:
    """The glm modules of a layer that carry a bias under ``cfg``."""
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
