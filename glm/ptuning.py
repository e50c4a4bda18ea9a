"""P-tuning v2 as ChatGLM-6B/2/3 implement it: ``pre_seq_len`` learned keys and values for every layer.

    from glm import ptuning
    ptuning.apply(model, ptuning.PrefixConfig(pre_seq_len=16))   # freezes the base, adds model.prefix_encoder
    opt = torch.optim.AdamW(ptuning.prefix_parameters(model), lr=2e-2)
    ...                                                          # model(...) / glm.generate see the prefix
    ptuning.remove(model)                                        # the base model again, trainable

The encoder turns the prefix ids ``0..P-1`` into one flat vector per prefix slot, either straight from an
embedding or through THUDM's two-layer MLP (``prefix_projection``: Linear, tanh, Linear), then into each
layer's keys and values. The flat axis is ordered (layer, key|value, KV head, head dim), as THUDM's
``get_prompt`` views it, with the key dims in glm's half-split RoPE layout (the converter in
`glm.formats.ptuning_checkpoint` permutes a release's interleaved ones). The keys are not rotated;
how the model places them is `glm.kv_cache.PrefixKV`. THUDM's checkpoint layout is in
`glm.formats.ptuning_checkpoint`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .config import GLMConfig
from .errors import ArgumentError
from .model import GLM


@dataclass
class PrefixConfig:
    """``pre_seq_len``: prefix slots per layer. ``prefix_projection``: THUDM's MLP reparametrisation.
    ``prefix_hidden_size``: that MLP's hidden width (None: the model's hidden size, the only width THUDM's
    encoder and checkpoint layout have). ``dropout``: on the prefix keys/values while training (THUDM's
    modeling files fix it at 0.1)."""

    pre_seq_len: int = 16
    prefix_projection: bool = False
    prefix_hidden_size: Optional[int] = None
    dropout: float = 0.0

    def validate(self) -> None:
        def positive(name: str, value, optional: bool = False) -> None:
            if value is None and optional:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ArgumentError(f"PrefixConfig.{name} must be a positive integer, got {value!r}")

        positive("pre_seq_len", self.pre_seq_len)
        positive("prefix_hidden_size", self.prefix_hidden_size, optional=True)
        if not isinstance(self.prefix_projection, bool):
            raise ArgumentError(f"PrefixConfig.prefix_projection must be true or false, got {self.prefix_projection!r}")
        d = self.dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
            raise ArgumentError(f"PrefixConfig.dropout must be a number in [0, 1), got {d!r}")


# Width of the embedding the MLP reads (with ``prefix_projection``), by family. ChatGLM2/3 embed straight
# into the keys/values' width; ChatGLM-6B into its hidden size (its format module registers that).
_EMBED_WIDTH: dict[str, Callable[[GLMConfig], int]] = {}


def register_embed_width(family: str, width: Callable[[GLMConfig], int]) -> None:
    """Say how wide ``family``'s projected prefix embedding is (default: the keys/values' width)."""
    _EMBED_WIDTH[family] = width


def kv_width(cfg: GLMConfig) -> int:
    """Length of one prefix slot's flat keys and values: layers x 2 x KV heads x head dim."""
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim


def embed_width(cfg: GLMConfig, projection: bool) -> int:
    """Width of the prefix embedding of a ``cfg`` model."""
    if not projection:
        return kv_width(cfg)
    return _EMBED_WIDTH.get(cfg.family, kv_width)(cfg)


class PrefixEncoder(nn.Module):
    """The prefix ids ``0..P-1`` -> the keys and values of every layer. Parameters: ``embed.weight``
    ``[P, E]``, with ``prefix_projection`` also ``w_in`` ``[hidden, E]`` and ``w_out`` ``[kv, hidden]``
    (and their biases)."""

    def __init__(self, model_cfg: GLMConfig, cfg: PrefixConfig, device: "torch.device | str | None" = None):
        super().__init__()
        self.pre_seq_len = P = cfg.pre_seq_len
        self.shape = (model_cfg.num_layers, 2, model_cfg.num_kv_heads, model_cfg.head_dim)
        kv = kv_width(model_cfg)
        # torch's own initialisations (N(0, 1) embedding, uniform Linear), which THUDM's encoder keeps: its
        # _init_weights leaves the prefix encoder alone. The encoder stays fp32 as THUDM's scripts keep it
        # (prefix_encoder.float() beside a half model).
        kw = {"device": device, "dtype": torch.float32}
        if cfg.prefix_projection:
            E, hidden = embed_width(model_cfg, True), cfg.prefix_hidden_size or model_cfg.hidden_size
            self.embed = nn.Embedding(P, E, **kw)
            self.w_in, self.w_out = nn.Linear(E, hidden, **kw), nn.Linear(hidden, kv, **kw)
        else:
            self.embed = nn.Embedding(P, kv, **kw)
            self.w_in = self.w_out = None
        self.dropout = nn.Dropout(cfg.dropout)
        self.config = cfg
        self.frozen: list[str] = []  # the base parameters `apply` froze, which `remove` makes trainable again

    def flat(self) -> Tensor:
        """``[P, layers * 2 * g * d]``: each prefix slot's keys and values, before dropout."""
        h = self.embed.weight  # = embed(arange(P)), the ids THUDM feeds
        if self.w_in is not None:
            h = self.w_out(torch.tanh(self.w_in(h)))
        return h

    def forward(self, batch: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Keys and values ``[layers, rows, g, P, d]`` in ``dtype``; ``rows`` is ``batch`` while dropout is
        active (each row draws its own mask, as THUDM's batch of prefixes does), else 1."""
        rows = batch if self.training and self.dropout.p > 0 else 1
        h = self.flat().to(dtype)
        h = self.dropout(h.expand(rows, *h.shape))
        L, _, g, d = self.shape
        kv = h.view(rows, self.pre_seq_len, L, 2, g, d).permute(2, 3, 0, 4, 1, 5)  # [L, 2, rows, g, P, d]
        return kv[:, 0], kv[:, 1]


def apply(model: GLM, cfg: PrefixConfig) -> GLM:
    """Give ``model`` a P-tuning prefix, in place: ``model.prefix_encoder`` (random, torch's default
    initialisation, on the model's device, fp32) and every base parameter frozen. Returns ``model``."""
    if not isinstance(cfg, PrefixConfig):
        raise ArgumentError(f"ptuning.apply takes a PrefixConfig, got {type(cfg).__name__}")
    cfg.validate()
    if model.prefix_encoder is not None:
        raise ArgumentError("the model already has a P-tuning prefix; ptuning.remove(model) first to replace it")
    model.check_runnable()
    encoder = PrefixEncoder(model.config, cfg, device=model.float_probe.device)
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.requires_grad_(False)
            encoder.frozen.append(name)
    encoder.train(model.training)
    model.prefix_encoder = encoder
    return model


def prefix_encoder(model: GLM) -> PrefixEncoder:
    """``model``'s prefix encoder; ArgumentError when it has none."""
    encoder = model.prefix_encoder
    if not isinstance(encoder, PrefixEncoder):
        raise ArgumentError("the model has no P-tuning prefix; add one with glm.ptuning.apply(model, PrefixConfig())")
    return encoder


def prefix_parameters(model: GLM) -> list[nn.Parameter]:
    """The trainable parameters of ``model``'s prefix (what an optimizer of a P-tuning run gets)."""
    return list(prefix_encoder(model).parameters())


def remove(model: GLM) -> GLM:
    """Take the prefix off ``model`` and make the parameters `apply` froze trainable again. Returns ``model``."""
    encoder = prefix_encoder(model)
    params = dict(model.named_parameters())
    model.prefix_encoder = None
    for name in encoder.frozen:
        if name in params:
            params[name].requires_grad_(True)
    return model
