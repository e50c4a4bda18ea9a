"""The GLM model: one class for every family; the differences are `GLMConfig` fields.

Internal layout (the converter maps every release onto it at load time):
- QKV is one projection whose output is ``[q: n*d | k: g*d | v: g*d]``, heads contiguous;
- RoPE is half-split: within each rotated segment of ``r`` dims, dim ``j`` pairs with ``j + r/2``
  (the interleaved layout of ChatGLM2+/Glm is permuted into this one by the converter);
- a GLU MLP's input projection is ``[gate | up]``.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels, positions
from .attention import Mask, attention
from .config import GLMConfig
from .errors import CacheFullError, InputError
from .kv_cache import KVCache, PrefixKV

# Embedding and gather take int64 or int32 indices; other integer dtypes fail deep inside torch, and
# float or bool ids would be silently truncated or read as 0/1.
ID_DTYPES = (torch.int64, torch.int32)


def _min_max(t: Tensor) -> tuple[int, int]:
    """The smallest and largest value of a non-empty integer tensor, in one pass."""
    lo, hi = torch.aminmax(t)
    return int(lo), int(hi)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # transformers' Glm order (kernels.rms_norm_reference says it; the fused op computes the same).
        return kernels.rms_norm(x, self.weight, self.eps)


def make_norm(cfg: GLMConfig) -> nn.Module:
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
    return RMSNorm(cfg.hidden_size, cfg.norm_eps)


class Rotary(nn.Module):
    """RoPE over ``segments`` consecutive chunks of ``seg_dim`` dims, chunk s rotated by position stream s.

    1D RoPE (ChatGLM2+, Glm): one chunk of ``rotary_dim`` dims; the rest of the head passes through.
    2D RoPE (ChatGLM-6B): two chunks of ``d/2``, by position and by block position.
    """

    def __init__(self, cfg: GLMConfig):
        super().__init__()
        self.segments = 2 if cfg.position_encoding == "rope_2d" else 1
        self.seg_dim = cfg.rotary_dim // self.segments
        self.base = cfg.rope_base
        self.position_scale = cfg.rope_position_scale
        self.round_dtype = getattr(torch, cfg.rope_inv_freq_dtype) if cfg.rope_inv_freq_dtype else None
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self, device: "torch.device | str | None" = None) -> Tensor:
        r = self.seg_dim
        if torch.empty(0, device=device).is_meta:
            # Shape-only model: meta arange is a Python decomposition that imports torch._dynamo (~2 s).
            return torch.empty(r // 2 + r % 2, dtype=torch.float32, device=device)
        inv = 1.0 / (self.base ** (torch.arange(0, r, 2, dtype=torch.float32, device=device) / r))
        if self.round_dtype is not None:
            # ChatGLM-6B stores inv_freq as fp16; a transformers Glm cast to bf16 rounds it to bf16.
            # Upcasting keeps the rounded values, and skipping the rounding moves logits past 1e-4.
            inv = inv.to(self.round_dtype).float()
        return inv

    def reset_buffers(self, device: "torch.device | str | None" = None) -> None:
        self.inv_freq = self._inv_freq(device if device is not None else self.inv_freq.device)

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) / .half() would round the frequencies and move every angle; they are a
        # function of the config (rounded only where rope_inv_freq_dtype says the reference rounds),
        # so they are rebuilt in fp32 on the buffer's new device instead.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.reset_buffers()
        return self

    def cos_sin(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """position_ids ``[B, S, T]`` -> cos, sin ``[B, 1, T, segments, seg_dim/2]`` in ``dtype``."""
        pos = position_ids[:, : self.segments].transpose(1, 2).float()  # [B, T, segments]
        if self.position_scale != 1.0:
            pos = pos / self.position_scale  # ChatGLM2-6B-32k: (p / rope_ratio) * inv_freq
        # One fp32 multiply per angle, as the references' outer products do.
        ang = pos.unsqueeze(-1) * self.inv_freq  # [B, T, segments, r/2]
        return ang.cos().unsqueeze(1).to(dtype), ang.sin().unsqueeze(1).to(dtype)

    def apply(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x ``[B, h, T, d]`` (any strides); rotates the first ``segments * seg_dim`` dims
        (`glm.kernels.rope_reference` is the rule)."""
        return kernels.rope(x, cos, sin, self.segments)


class Linear(nn.Linear):
    """nn.Linear whose few-row calls (decode) take glm.kernels' multi-threaded small-batch kernel:
    on CPU torch runs them as a single-threaded GEMV, which leaves most of the memory bandwidth idle."""

    def forward(self, x: Tensor) -> Tensor:
        return kernels.linear(x, self.weight, self.bias)


def _embedding(num: int, dim: int) -> nn.Embedding:
    """An embedding without torch's own random init: `GLM.init_weights` sets every weight anyway, and
    on the meta device (shape-only models of the converter) torch's normal_ is a Python decomposition
    whose first call imports torch._dynamo, about 2 s."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


class Attention(nn.Module):
    def __init__(self, cfg: GLMConfig):
        super().__init__()
        self.n, self.g, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv = Linear(cfg.hidden_size, (self.n + 2 * self.g) * self.d, bias=cfg.qkv_bias)
        self.out = Linear(self.n * self.d, cfg.hidden_size, bias=cfg.out_bias)

    def forward(self, x: Tensor, rotary: Optional[Rotary], cos_sin: Optional[tuple[Tensor, Tensor]], layer: int,
                cache: "Optional[KVCache | PrefixKV]", mask: Mask, backend: str, static: bool = False) -> Tensor:
        """x ``[B, T, hidden]``; keys and values of the ``T`` tokens go into ``cache`` (layer ``layer``)
        first: after the cached ones (behind a P-tuning prefix, for a `PrefixKV`), or at ``cache.slot``
        for a ``static`` step."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split((self.n * self.d, self.g * self.d, self.g * self.d), dim=-1)
        q = q.view(B, T, self.n, self.d).transpose(1, 2)
        k = k.view(B, T, self.g, self.d).transpose(1, 2)
        v = v.view(B, T, self.g, self.d).transpose(1, 2)
        if rotary is not None:
            q, k = rotary.apply(q, *cos_sin), rotary.apply(k, *cos_sin)
        if cache is not None:
            k, v = cache.update_static(layer, k, v) if static else cache.update(layer, k, v)
        o = attention(q, k, v, backend=backend, mask=mask)
        return self.out(o.transpose(1, 2).reshape(B, T, self.n * self.d))


class MLP(nn.Module):
    def __init__(self, cfg: GLMConfig):
        super().__init__()
        self.kind = cfg.mlp
        f_in = cfg.ffn_hidden_size * (2 if cfg.glu else 1)
        self.w_in = Linear(cfg.hidden_size, f_in, bias=cfg.mlp_bias)
        self.w_out = Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.w_in(x)
        if self.kind == "swiglu":
            h = kernels.swiglu(h)
        elif self.kind == "geglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.gelu(gate) * up
        elif self.kind == "gelu":
            h = F.gelu(h)  # exact erf GeLU (original GLM)
        else:
            h = F.gelu(h, approximate="tanh")  # ChatGLM-6B's tanh approximation
        return self.w_out(h)


class Block(nn.Module):
    def __init__(self, cfg: GLMConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.alpha = cfg.residual_alpha
        if cfg.sandwich_norm:
            self.attn_out_norm = make_norm(cfg)
            self.mlp_out_norm = make_norm(cfg)
        else:
            self.attn_out_norm = self.mlp_out_norm = None

    def forward(self, x: Tensor, rotary: Optional[Rotary], cos_sin: Optional[tuple[Tensor, Tensor]], layer: int,
                cache: Optional[KVCache], mask: Mask, backend: str, static: bool = False) -> Tensor:
        """Pre-norm residual block; ``r`` is the residual stream, or the normalised input times
        ``residual_alpha`` where set (ChatGLM-6B)::

            x ─┬─ attn_norm ─ h ─ attn ─ [attn_out_norm] ─ a ─┐
               └──────────── r = x | alpha·h ────────────── + ─ x'
            x' ─┬─ mlp_norm ─ h' ─ mlp ─ [mlp_out_norm] ─ m ─┐
                └──────────── r' = x' | alpha·h' ────────── + ─ out
        """
        h = self.attn_norm(x)
        a = self.attn(h, rotary, cos_sin, layer, cache, mask, backend, static)
        if self.attn_out_norm is not None:
            a = self.attn_out_norm(a)
        # ChatGLM-6B: the residual is the *normalised* input times alpha, not the raw stream.
        x = (h * self.alpha if self.alpha is not None else x) + a
        h = self.mlp_norm(x)
        m = self.mlp(h)
        if self.mlp_out_norm is not None:
            m = self.mlp_out_norm(m)
        return (h * self.alpha if self.alpha is not None else x) + m


class GLM(nn.Module):
    """Every GLM family. ``forward`` returns logits ``[B, T, V]`` (or ``[B, 1, V]`` with ``last_only``).

    Forward inputs:

    position_ids: ``[B, T]`` (1D families) or ``[B, 2, T]`` (GLM, ChatGLM-6B); default counts from 0 at
      each row's first real token, or continues the cache's last positions. A family with a prompt
      convention (ChatGLM-6B) derives them, and ``prefix_len``, from the prompt's tokens as its
      reference does (see `glm.positions`).
    prefix_len: ``[B]``, keys before it are visible to every query (bidirectional prefix); or ``[B, T]``
      per query, for packed documents (each document's Part A end).
    pad_left: ``[B]`` left pads per row; their keys are hidden.
    doc_start: ``[B, T]`` first key slot each query may see: documents packed in one row do not attend
      across each other (training; replaces pad_left).
    cache: a `KVCache`; the first call fills it (prefill), later calls append one or more tokens.
    backend: the attention backend (default ``self.backend``, "auto").
    last_only: logits of the last position only, ``[B, 1, V]``.
    logits_at: ``[B, T]`` bool: return logits ``[N, V]`` for the N selected positions only (in row-major
      order, as ``x[logits_at]``). Training with loss on a few positions (GLM's Part B) then skips the
      vocabulary projection everywhere else.
    return_hidden: the final-normed hidden states instead of logits.
    check_inputs: validate the inputs first (reads their values, which synchronises with the device).
    static: one decode step in device tensors only, so a CUDA graph can capture it: one token per row at
      ``position_ids`` (required) is written at ``cache.slot`` and attends over the whole cache buffer,
      masked by ``cache.kv_start`` / ``cache.kv_len``. The caller brackets it with
      ``cache.begin_static_step()`` and ``cache.advance(1, position_ids)`` (host bookkeeping a graph
      would not replay); `glm.generate.StaticDecoder` does. Its checks read host metadata only.

    With a P-tuning prefix (``prefix_encoder``, set by `glm.ptuning.apply`), every sequence a call starts
    attends to the prefix's keys and values first (`glm.kv_cache.PrefixKV`); position ids and
    ``prefix_len`` still count the tokens only, and ``new_cache`` reserves the prefix's slots.
    """

    # glm.hub's save_pretrained, which registers itself when imported (the model layer cannot import it).
    saver: ClassVar[Optional[Callable[..., Any]]] = None

    def __init__(self, config: GLMConfig):
        super().__init__()
        config.validate()
        self.config = cfg = config
        self.embed = _embedding(cfg.vocab_size, cfg.hidden_size)
        if cfg.position_encoding == "learned_2d":
            self.pos_embed = _embedding(cfg.max_positions, cfg.hidden_size)
            self.block_pos_embed = _embedding(cfg.max_positions, cfg.hidden_size)
            self.rotary = None
        else:
            self.pos_embed = self.block_pos_embed = None
            self.rotary = Rotary(cfg)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final_norm = make_norm(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.backend = "auto"
        # P-tuning v2's learned prefix (glm.ptuning): called with (batch, dtype), it returns the keys and
        # values [layers, batch or 1, g, pre_seq_len, d] that every sequence starts with.
        self.prefix_encoder: Optional[nn.Module] = None
        self.init_weights()

    # ------------------------------------------------------------------------------------------
    def init_weights(self, std: float = 0.02, seed: Optional[int] = None) -> None:
        """Random init for training from scratch: N(0, std) matrices, zero biases, unit norms."""
        if self.float_probe.is_meta:
            return
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            with torch.no_grad():
                if p.dim() >= 2:
                    # Output projections are scaled down with depth (GPT-2 / nanoGPT practice).
                    deep = name.endswith(("out.weight", "w_out.weight"))
                    s = std / (2 * self.config.num_layers) ** 0.5 if deep else std
                    p.copy_(torch.randn(p.shape, generator=gen) * s)
                elif name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.zero_()

    def reset_buffers(self, device: "torch.device | str | None" = None) -> None:
        """Recompute non-persistent buffers (after building on the meta device and loading)."""
        if self.rotary is not None:
            self.rotary.reset_buffers(device)

    @property
    def float_probe(self) -> Tensor:
        """A tensor with the model's compute dtype and device, meta where the weights are, read without
        building anything: the embedding table, or a quantized embedding's empty dtype probe (its ``weight``
        dequantizes the whole table, hundreds of MB for a release's vocabulary)."""
        probe = getattr(self.embed, "dtype_probe", None)
        return self.embed.weight if probe is None else probe

    @property
    def prefix_slots(self) -> int:
        """Key slots the P-tuning prefix takes in front of each sequence (0 without one)."""
        return 0 if self.prefix_encoder is None else self.prefix_encoder.pre_seq_len

    @property
    def output_weight(self) -> Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    # ------------------------------------------------------------------------------------------
    def check_runnable(self) -> None:
        """Refuse a model whose weights have no values (built or loaded on the meta device)."""
        if self.float_probe.is_meta:
            raise InputError("the model's weights are on the meta device (shapes without values), which cannot "
                             "compute anything; load them onto a real device (e.g. from_pretrained(..., device='cpu'))")

    def check_input_types(self, input_ids: Tensor, position_ids: Optional[Tensor] = None, *,
                          prefix_len: Optional[Tensor] = None, pad_left: Optional[Tensor] = None,
                          doc_start: Optional[Tensor] = None, cache: Optional[KVCache] = None) -> None:
        """The kinds of the inputs: tensors of integer dtypes, ``input_ids`` ``[batch, seq]``, a cache
        made for this model. Reads host metadata only (no values), so a static step may run it too."""
        self.check_runnable()
        if not isinstance(input_ids, Tensor):
            raise InputError(f"input_ids must be a torch tensor [batch, seq] of token ids, got "
                             f"{type(input_ids).__name__}")
        if input_ids.dtype not in ID_DTYPES:
            raise InputError(f"input_ids must be an integer tensor of dtype int64 or int32, got {input_ids.dtype}; "
                             f"convert it with .long()")
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        for name, t in (("position_ids", position_ids), ("prefix_len", prefix_len), ("pad_left", pad_left),
                        ("doc_start", doc_start)):
            if t is None:
                continue
            if not isinstance(t, Tensor):
                raise InputError(f"{name} must be a torch tensor of dtype int64 or int32 (or None), got "
                                 f"{type(t).__name__} {t!r}")
            # Positions index the learned tables as ids do; the others count key slots, any integer dtype.
            ok = t.dtype in ID_DTYPES if name == "position_ids" else not (
                t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)
            if not ok:
                raise InputError(f"{name} must be an integer tensor of dtype int64 or int32, got {t.dtype}")
        if cache is not None:
            self.check_cache(cache, input_ids.device)

    def check_cache(self, cache: KVCache, device: Optional[torch.device] = None) -> None:
        """A KV cache made for this model: its layers, KV heads and head dim, its position streams
        (once it holds a sequence) and, when given, ``device``."""
        cfg = self.config
        if not isinstance(cache, KVCache):
            raise InputError(f"cache must be a glm KVCache (model.new_cache(batch, max_len)), got "
                             f"{type(cache).__name__}")
        layers, _, heads, _, dim = cache.k.shape
        if (layers, heads, dim) != (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim):
            raise InputError(f"the KV cache was made for another model ({layers} layers, {heads} KV heads, head dim "
                             f"{dim}); this model has {cfg.num_layers} layers, {cfg.num_kv_heads} KV heads, head dim "
                             f"{cfg.head_dim}: make it with model.new_cache(batch, max_len)")
        last = cache.last_position_ids
        if last is not None and last.shape[1] != cfg.position_streams:
            raise InputError(f"the KV cache holds a sequence with {last.shape[1]} position stream(s), from another "
                             f"model; family {cfg.family} uses {cfg.position_streams}: make a new cache with "
                             f"model.new_cache(batch, max_len)")
        if device is not None and cache.k.device != device:
            raise InputError(f"the KV cache is on {cache.k.device} but the input on {device}; make it with "
                             f"model.new_cache(batch, max_len) after moving the model")

    def _check_values(self, input_ids: Tensor, position_ids: Tensor, cache: Optional[KVCache],
                      prefix_len: Optional[Tensor] = None, pad_left: Optional[Tensor] = None,
                      doc_start: Optional[Tensor] = None) -> None:
        """The values and shapes of a (non-static) call's inputs, position ids already in ``[B, S, T]``
        form: token and position ids inside the model's tables, structure counts inside the keys, a
        cache with room, batch and dtype for them. Reads values, so it synchronises with the device."""
        cfg = self.config
        if input_ids.numel():
            lo, hi = _min_max(input_ids)
            if lo < 0 or hi >= cfg.vocab_size:
                bad = hi if hi >= cfg.vocab_size else lo
                raise InputError(f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size}); "
                                 f"check the tokenizer matches this checkpoint")
        B, T = input_ids.shape
        if position_ids.shape != (B, cfg.position_streams, T):
            want = "[B, 2, T] (position, block position)" if cfg.position_streams == 2 else "[B, T]"
            raise InputError(f"position_ids has shape {tuple(position_ids.shape)}; family {cfg.family} "
                             f"takes {want} for input_ids {tuple(input_ids.shape)}")
        if position_ids.numel():
            lo, hi = _min_max(position_ids)
            if lo < 0 or hi >= cfg.max_positions:
                raise InputError(f"position id {hi if hi >= cfg.max_positions else lo} is outside "
                                 f"[0, {cfg.max_positions}): the sequence is longer than the model's "
                                 f"{cfg.max_positions} positions; shorten the input")
        start = cache.length if cache is not None else 0
        for name, t in (("prefix_len", prefix_len), ("pad_left", pad_left), ("doc_start", doc_start)):
            if t is None:
                continue
            shapes = {"prefix_len": [(B,), (B, T)], "pad_left": [(B,)], "doc_start": [(B, T)]}[name]
            if tuple(t.shape) not in shapes:
                want = " or ".join(str(list(x)) for x in shapes)
                raise InputError(f"{name} must have shape {want} for input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(t.shape)}")
            if cache is not None and t.dim() == 2:
                raise InputError(f"per-token {name} (packed documents) is for training; it cannot be "
                                 f"used with a KV cache")
            lo, hi = _min_max(t) if t.numel() else (0, 0)
            if lo < 0 or hi > start + T:
                raise InputError(f"{name} values must lie in [0, {start + T}] (they count key slots, left "
                                 f"padding included); got {t.tolist()}")
        if cache is not None:
            cache.check_room(T)
            if cache.batch != B:
                raise InputError(f"KV cache was made for batch {cache.batch}, input has batch {B}")
            dtype = self.float_probe.dtype
            dev = input_ids.device.type
            # Under autocast the keys come out in its dtype; a cache in either dtype holds them.
            ok = {dtype, torch.get_autocast_dtype(dev)} if torch.is_autocast_enabled(dev) else {dtype}
            if cache.k.dtype not in ok:
                raise InputError(f"the KV cache holds {cache.k.dtype} but the model computes in {dtype}; make it "
                                 f"with model.new_cache(batch, max_len) after casting the model (its dtype follows "
                                 f"the model's)")

    def _static_step_inputs(self, input_ids: Tensor, position_ids: Optional[Tensor],
                            cache: Optional[KVCache]) -> tuple[Tensor, Mask]:
        """Position ids ``[B, S, 1]`` and mask of a static step. Its checks read host metadata only
        (reading values would synchronise)."""
        S = self.config.position_streams
        if cache is None:
            raise InputError("static=True decodes one token against a KV cache; pass cache=")
        if input_ids.dim() != 2 or input_ids.shape[1] != 1:
            raise InputError(f"static=True takes one token per row, input_ids [batch, 1]; got shape "
                             f"{tuple(input_ids.shape)}")
        B = input_ids.shape[0]
        if cache.batch != B:
            raise InputError(f"KV cache was made for batch {cache.batch}, input has batch {B}")
        if position_ids is None:
            raise InputError("static=True needs position_ids on the device (e.g. "
                             "positions.next_after(cache.last_position_ids)); it never derives them on the host")
        position_ids = positions.as_streams(self.config, position_ids)
        if tuple(position_ids.shape) != (B, S, 1):
            want = "[B, 2, 1]" if S == 2 else "[B, 1]"
            raise InputError(f"position_ids has shape {tuple(position_ids.shape)}; a static step of family "
                             f"{self.config.family} takes {want}")
        # The query sits at the last key index, max_len - 1, and is not causal: with kv_len masking it
        # sees exactly the filled slots from kv_start on, its own included, as the causal step at
        # q_offset = length does. (Attention's "own key" exemption, j == i, only fires on the last slot,
        # i.e. when this token fills the cache and is that key; the prefix length cannot widen what the
        # last query sees.)
        return position_ids, Mask(causal=False, kv_start=cache.kv_start, kv_len=cache.kv_len,
                                  q_offset=cache.max_len - 1)

    def _call_inputs(self, input_ids: Tensor, position_ids: Optional[Tensor], prefix_len: Optional[Tensor],
                     pad_left: Optional[Tensor], doc_start: Optional[Tensor], cache: Optional[KVCache],
                     check: bool) -> tuple[Tensor, Mask, Optional[Tensor], Optional[Tensor],
                                           "Optional[KVCache | PrefixKV]"]:
        """Position ids ``[B, S, T]``, mask, left padding and prefix length of a call that is not a static
        step: those given, else (decoding) the cache's, else the rules of `glm.positions`; and where the
        layers' keys go: the cache, or a `PrefixKV` in front of it when this call starts a sequence of a
        model with a P-tuning prefix (the mask then counts the prefix's slots)."""
        start = cache.length if cache is not None else 0
        if start > 0:  # decoding: the structure of the cached keys was fixed at prefill
            pad_left = cache.pad_left if pad_left is None else pad_left
            prefix_len = cache.prefix_len if prefix_len is None else prefix_len
        last = cache.last_position_ids if cache is not None else None
        position_ids, prefix_len = positions.for_call(self.config, input_ids, position_ids, prefix_len, pad_left,
                                                      start, last)
        if check:
            self._check_values(input_ids, position_ids, cache, prefix_len, pad_left, doc_start)
            if prefix_len is not None and prefix_len.dim() == 1 and not bool(prefix_len.any()):
                # A prefix of 0 everywhere is plain causal (causal LM batches carry one): without it the
                # attention takes its causal fast paths instead of building a mask in every layer.
                prefix_len = None
        keys, learned = cache, (self.prefix_slots if start == 0 else 0)
        if learned:
            if doc_start is not None:
                raise InputError("doc_start (documents packed in one row) cannot be used with a P-tuning prefix, "
                                 "which every sequence starts with; give one document per row (pad_left or "
                                 "right padding)")
            if cache is not None and input_ids.shape[1] + learned > cache.max_len:
                raise CacheFullError(f"the KV cache holds {cache.max_len} slots, fewer than the {learned} of the "
                                 f"P-tuning prefix plus {input_ids.shape[1]} tokens; make it with "
                                 f"model.new_cache(batch, max_len), which reserves the prefix's slots")
            keys = PrefixKV(*self.prefix_encoder(input_ids.shape[0], self.float_probe.dtype), pad_left, cache)
            prefix_len = None if prefix_len is None else prefix_len + learned
        mask = Mask(causal=True, prefix_len=prefix_len, kv_start=pad_left if doc_start is None else doc_start,
                    q_offset=start + learned)
        return position_ids, mask, pad_left, prefix_len, keys

    # ------------------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, position_ids: Optional[Tensor] = None, *,
                prefix_len: Optional[Tensor] = None, pad_left: Optional[Tensor] = None,
                doc_start: Optional[Tensor] = None, cache: Optional[KVCache] = None, backend: Optional[str] = None,
                last_only: bool = False, logits_at: Optional[Tensor] = None, return_hidden: bool = False,
                check_inputs: bool = True, static: bool = False) -> Tensor:
        """Logits for ``input_ids`` ``[B, T]``; the class docstring describes every input."""
        check = check_inputs and not torch.compiler.is_compiling()
        if check:  # before anything reads them: a list or a float tensor would otherwise fail deep in torch
            self.check_input_types(input_ids, position_ids, prefix_len=prefix_len, pad_left=pad_left,
                                   doc_start=doc_start, cache=cache)
        keys = cache
        if static:
            position_ids, mask = self._static_step_inputs(input_ids, position_ids, cache)
        else:
            position_ids, mask, pad_left, prefix_len, keys = self._call_inputs(
                input_ids, position_ids, prefix_len, pad_left, doc_start, cache, check)

        x = self.embed(input_ids)
        cos_sin = None
        if self.pos_embed is not None:
            x = x + self.pos_embed(position_ids[:, 0]) + self.block_pos_embed(position_ids[:, 1])
        else:
            cos_sin = self.rotary.cos_sin(position_ids, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, self.rotary, cos_sin, i, keys, mask, backend or self.backend, static)
        if cache is not None and not static:
            cache.record_call(position_ids, pad_left, prefix_len, learned=0 if keys is cache else keys.length)
        return self._head(x, last_only, logits_at, return_hidden)

    def _head(self, x: Tensor, last_only: bool, logits_at: Optional[Tensor], return_hidden: bool) -> Tensor:
        """The final norm and the vocabulary projection, at the positions asked for."""
        if last_only:
            x = x[:, -1:]
        elif logits_at is not None:
            B, T = x.shape[:2]
            if logits_at.shape != (B, T) or logits_at.dtype != torch.bool:
                raise InputError(f"logits_at must be a bool [batch, seq] = [{B}, {T}] mask, got "
                                 f"{logits_at.dtype} {tuple(logits_at.shape)}")
            # Every position selected (causal LM): the same rows in the same order, without x[logits_at]'s copy
            # forward and scatter backward. Reading the mask is free on CPU; elsewhere it would synchronise.
            every = x.device.type == "cpu" and not torch.compiler.is_compiling() and bool(logits_at.all())
            x = x.flatten(0, 1) if every else x[logits_at]
        x = self.final_norm(x)
        if return_hidden:
            return x
        if self.lm_head is not None:
            return self.lm_head(x)
        # A tied head reads the embedding table; a quantized table (glm.quant) projects with its integers
        # directly instead of materialising the whole dequantized table each call.
        project = getattr(self.embed, "project", None)
        return project(x) if project is not None else kernels.linear(x, self.embed.weight)

    def new_cache(self, batch: int, max_len: int, dtype: Optional[torch.dtype] = None) -> KVCache:
        """A cache for ``max_len`` tokens per row (plus the P-tuning prefix's slots, when there is one)."""
        return KVCache.for_model(self, batch, max_len + self.prefix_slots, dtype)

    def save_pretrained(self, folder: str, *, format: str = "glm", family: Optional[str] = None, **kwargs):
        """Write this model as a checkpoint folder (glm's format, or ``format="hf"`` for the release
        format the reference code and transformers load); see `glm.hub.save_pretrained`."""
        if GLM.saver is None:
            raise RuntimeError("no checkpoint writer is registered: glm.hub registers it when imported "
                               "(import glm loads it)")
        return GLM.saver(self, folder, format=format, family=family, **kwargs)


def lm_loss(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross entropy of ``logits[t]`` against ``targets[t]`` (already-aligned targets, no shift)
    over targets != ignore_index, in fp32 as every reference computes it."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index)
