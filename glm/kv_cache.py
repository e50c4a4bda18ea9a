"""A static, preallocated, batched KV cache (gpt-fast style).

One buffer per layer for keys and values, ``[B, g, max_len, d]`` with the unexpanded KV heads and
RoPE already applied, so a decode step only writes ``T`` new slots and reads a prefix of the buffer.
The cache also remembers what describes the cached keys: left padding, the prefix length, and the
last position ids, so that ``model(next_token, cache=cache)`` continues a sequence unaided.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class CacheFullError(ValueError):
    pass


class KVCache:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 *, dtype: torch.dtype = torch.float32, device: "torch.device | str | None" = None):
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.batch, self.max_len = batch, max_len
        self.length = 0  # slots written so far (the same for every row: left padding aligns rows)
        self.pad_left: Optional[Tensor] = None
        self.prefix_len: Optional[Tensor] = None
        self.last_position_ids: Optional[Tensor] = None  # [B, S]

    @classmethod
    def for_model(cls, model: "torch.nn.Module", batch: int, max_len: int,
                  dtype: Optional[torch.dtype] = None) -> "KVCache":
        cfg = model.config
        p = next(model.parameters())
        return cls(cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim,
                   dtype=dtype or p.dtype, device=p.device)

    def reset(self) -> None:
        self.length = 0
        self.pad_left = self.prefix_len = self.last_position_ids = None

    def check_room(self, new_tokens: int) -> None:
        if self.length + new_tokens > self.max_len:
            raise CacheFullError(
                f"KV cache holds {self.max_len} tokens and already has {self.length}; "
                f"{new_tokens} more do not fit. Allocate it with a larger max_len.")

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k, v`` ``[B, g, T, d]`` after the cached tokens; return all keys/values so far.

        ``length`` advances in `advance`, once per forward, after every layer has written.
        """
        start, end = self.length, self.length + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, new_tokens: int, last_position_ids: Tensor) -> None:
        self.length += new_tokens
        self.last_position_ids = last_position_ids
