"""A static, preallocated, batched KV cache (gpt-fast style).

One buffer per layer for keys and values, ``[B, g, max_len, d]`` with the unexpanded KV heads and
RoPE already applied, so a decode step only writes ``T`` new slots and reads a prefix of the buffer.
The cache also remembers what describes the cached keys: left padding, the prefix length, and the
last position ids, so that ``model(next_token, cache=cache)`` continues a sequence unaided.

The static decode step (``GLM.forward(..., static=True)``, which CUDA graphs replay) never reads the
host-side ``length``: it writes the new token at the device tensor ``slot`` and attends over the
whole buffer, masked by the device tensors ``kv_start`` (left padding) and ``kv_len`` (filled
slots). `begin_static_step` sets them from ``length`` before each step; `advance` follows it.

A model with a P-tuning prefix writes the prefix's keys into the cache at prefill (`PrefixKV`), after
each row's left padding; ``length`` counts them, the position ids do not.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .errors import CacheFullError, InputError


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
        # The static step's view of the cache, on the device. A captured CUDA graph holds on to these
        # very tensors, so they are only ever written in place, never replaced.
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # where the next token goes
        self.kv_len = torch.zeros(batch, dtype=torch.int32, device=device)  # filled slots, new token included
        self.kv_start = torch.zeros(batch, dtype=torch.int32, device=device)  # = pad_left (0 without padding)

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
        self.kv_start.zero_()

    def set_structure(self, pad_left: Optional[Tensor], prefix_len: Optional[Tensor]) -> None:
        """Record, at prefill, the left padding and prefix length that describe the cached keys."""
        self.pad_left, self.prefix_len = pad_left, prefix_len
        if pad_left is None:
            self.kv_start.zero_()
        else:
            self.kv_start.copy_(pad_left)

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

    def begin_static_step(self) -> None:
        """Point the device-side step state at slot ``length`` (host values written into device
        tensors: no synchronisation). Call before each static step, outside any CUDA graph."""
        if self.length == 0:
            raise InputError("the static decode step continues a prefilled cache; run the prompt through "
                             "the model with this cache first")
        self.check_room(1)
        self.slot.fill_(self.length)
        self.kv_len.fill_(self.length + 1)

    def update_static(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write one token's ``k, v`` ``[B, g, 1, d]`` at ``slot``; return the whole buffers
        ``[B, g, max_len, d]`` (``kv_len`` says which slots are filled)."""
        self.k[layer].index_copy_(2, self.slot, k)
        self.v[layer].index_copy_(2, self.slot, v)
        return self.k[layer], self.v[layer]

    def advance(self, new_tokens: int, last_position_ids: Tensor) -> None:
        self.length += new_tokens
        self.last_position_ids = last_position_ids

    def record_call(self, position_ids: Tensor, pad_left: Optional[Tensor], prefix_len: Optional[Tensor],
                    learned: int = 0) -> None:
        """After a forward (not a static step) wrote the keys of tokens at ``position_ids`` ``[B, S, T]``,
        and at prefill ``learned`` keys of a `PrefixKV` besides: the structure of the keys (on the first
        call, the prefill) and the new length. A call of no tokens leaves the cache as it was."""
        if position_ids.shape[-1] == 0:
            return
        if self.length == 0:
            self.set_structure(pad_left, prefix_len)
        self.advance(position_ids.shape[-1] + learned, position_ids[:, :, -1])


class PrefixKV:
    """Learned keys and values in front of a fresh sequence (P-tuning v2), for the layers to attend to.

    Each row's keys are laid out ``[left pads | prefix | tokens]``: after the pads, so that ``kv_start``
    (= ``pad_left``) hides exactly the pads, and before every real token, so that causal attention alone
    shows the prefix to every real query, as the references' all-visible prefix columns do. The caller
    shifts the queries (``q_offset``) and a bidirectional ``prefix_len`` by the prefix length. The keys
    are not rotated: they enter after RoPE, as the references concatenate their past keys.

    It stands in for the cache at the call that starts a sequence: `update` puts the prefix in front
    of the layer's new keys and hands all of them to ``cache`` when there is one, so the cache holds
    the prefix from then on and decoding goes on as without it.
    """

    def __init__(self, k: Tensor, v: Tensor, pad_left: Optional[Tensor], cache: Optional[KVCache]):
        self.k, self.v = k, v  # [layers, B or 1, g, P, d]
        self.pad_left, self.cache = pad_left, cache
        self.index: Optional[Tensor] = None

    @property
    def length(self) -> int:
        return self.k.shape[3]

    def _layout(self, tokens: int) -> Tensor:
        """Index into ``cat(prefix, keys)`` that moves the prefix after each row's left pads, ``[B, 1, P + T, 1]``."""
        P = self.length
        s = torch.arange(P + tokens, device=self.pad_left.device).view(1, -1)
        pads = self.pad_left.view(-1, 1).to(s.dtype)
        index = torch.where(s < pads, P + s, torch.where(s < pads + P, s - pads, s))
        return index[:, None, :, None]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``k, v`` ``[B, g, T, d]`` of the tokens -> the keys/values ``[B, g, P + T, d]`` they attend to
        (written to the cache too when there is one)."""
        B = k.shape[0]
        k = torch.cat((self.k[layer].to(k.dtype).expand(B, -1, -1, -1), k), dim=2)
        v = torch.cat((self.v[layer].to(v.dtype).expand(B, -1, -1, -1), v), dim=2)
        if self.pad_left is not None:
            if self.index is None:
                self.index = self._layout(k.shape[2] - self.length)
            k, v = k.gather(2, self.index.expand_as(k)), v.gather(2, self.index.expand_as(v))
        return (k, v) if self.cache is None else self.cache.update(layer, k, v)
