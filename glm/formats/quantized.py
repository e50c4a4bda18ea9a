"""Quantized checkpoints in the folder formats: the scheme record of glm's config.json, THUDM's quantized layout
(config.json ``quantization_bit``; per projection ``weight`` holding the integers and ``weight_scale`` one scale
per output row) as a wrapper over a release's float weight table, and tables that quantize float weights as
they stream in.

Wrapping the float table is exact, not an approximation: every transform a release table applies to the
projections acts on rows only (per-head QKV order, the RoPE row permutation, concatenating or splitting row
blocks). Per-row quantization commutes with row operations, so the table's own transform, applied to the integer
rows and to the scale rows, gives the integers and scales of the transformed float weight. The same holds for
glm's group scales, which stay inside their row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from ..config import GLMConfig
from ..errors import ConfigError, FormatError
from ..quant import BITS, QUANTIZED_TENSORS, quantize_weight, quantized_weights, scheme
from .hf_fields import as_bool
from .layout import DTYPE_NAMES, Mapping

# ---------------------------------------------------------------------------------------------
# glm's config.json record

RECORD_KEYS = ("bits", "group_size", "embeddings", "lm_head")


def read_record(value: Any, cfg: GLMConfig, source: str) -> Optional[dict]:
    """The scheme a glm-format config.json's ``quantization`` records (None: absent or null, a float model),
    every field checked against the model ``cfg`` describes; ConfigError naming the field otherwise."""
    if value is None:
        return None
    where = f"{source}: 'quantization'"
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be an object with {', '.join(RECORD_KEYS)} (or null for a float model), "
                          f"got {type(value).__name__}; re-save the folder with glm")
    unknown = sorted(set(value) - set(RECORD_KEYS))
    if unknown:
        raise ConfigError(f"{where} has field(s) {unknown} this glm does not know (it knows {', '.join(RECORD_KEYS)}); "
                          f"open the folder with the glm that wrote it")
    bits, group = value.get("bits"), value.get("group_size")
    if isinstance(bits, bool) or bits not in BITS:
        raise ConfigError(f"{where}.bits is {bits!r}; it must be 8 or 4")
    if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 1):
        raise ConfigError(f"{where}.group_size is {group!r}; it must be a positive integer or null (one scale "
                          f"per output row)")
    embeddings = as_bool("quantization.embeddings", value.get("embeddings", False))
    lm_head = as_bool("quantization.lm_head", value.get("lm_head", False))
    if lm_head and cfg.tie_word_embeddings:
        raise ConfigError(f"{where}.lm_head is true but the model's output layer is tied to its embeddings (it has "
                          f"no lm_head of its own); set it false, or embeddings true to quantize the shared table")
    return scheme(bits, group, embeddings, lm_head)


def record_json(quantization: dict) -> dict:
    """The ``quantization`` object glm's config.json keeps for a quantized model."""
    return {k: quantization[k] for k in RECORD_KEYS}


# ---------------------------------------------------------------------------------------------
# Wrapping a release's float weight table

def _column(s: Tensor) -> Tensor:
    # THUDM's weight_scale is [out]; the table's row transforms take it as a one-column weight.
    if s.dim() != 1:
        raise RuntimeError(f"a weight_scale of shape {tuple(s.shape)} is not one scale per output row")
    return s[:, None]


def _row(s: Tensor) -> Tensor:
    if s.dim() != 2 or s.shape[1] != 1:
        raise FormatError(f"scales of shape {tuple(s.shape)} are not one per output row, which weight_scale holds")
    return s[:, 0]


def _replace_quantized(table: Sequence[Mapping], weights: dict[str, str],
                       replace: Callable[[Mapping], list[Mapping]]) -> list[Mapping]:
    """``table`` with each mapping that produces quantized ``weights`` (all its glm tensors, or none of them)
    replaced by ``replace(mapping)``."""
    out: list[Mapping] = []
    for mp in table:
        hit = [g in weights for g in mp.glm]
        if any(hit) and not all(hit):
            raise FormatError(f"the weight table maps {', '.join(mp.glm)} together, a quantized weight with other "
                              f"tensors, which the quantized layout cannot split; save in glm format")
        out += replace(mp) if any(hit) else [mp]
    return out


def per_row_table(table: Sequence[Mapping], weights: dict[str, str], scale_name: Callable[[str], str]) -> list[Mapping]:
    """``table`` for a model whose ``weights`` (float weight name -> quantized module name) are quantized with one
    scale per output row: each mapping of a quantized weight becomes two with the same transform, one moving the
    integer rows (release name unchanged, glm ``qweight``) and one the scale rows (release name
    ``scale_name(name)`` holding ``[out]``, glm ``scales`` ``[out, 1]``)."""
    def split(mp: Mapping) -> list[Mapping]:
        def to_glm(*s: Tensor) -> tuple[Tensor, ...]:
            return mp.to_glm(*map(_column, s))

        def to_hf(*s: Tensor) -> tuple[Tensor, ...]:
            return tuple(map(_row, mp.to_hf(*s)))

        return [Mapping(tuple(f"{weights[g]}.qweight" for g in mp.glm), mp.hf, mp.to_glm, mp.to_hf),
                Mapping(tuple(f"{weights[g]}.scales" for g in mp.glm), tuple(map(scale_name, mp.hf)), to_glm, to_hf)]

    return _replace_quantized(table, weights, split)


# Float bytes quantized at a time. quantize_weight's temporaries (|W|, W / scale in fp32, its rounding) come to
# several times the weight; per-row quantization done a block of rows at a time gives the same integers and
# scales bit for bit, with temporaries of one block.
BLOCK_BYTES = 16 * 2**20


def quantize_rows(w: Tensor, bits: int, group_size: Optional[int], scale_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """`glm.quant.quantize_weight` of ``w`` computed a block of rows at a time (see `BLOCK_BYTES`)."""
    rows = max(1, BLOCK_BYTES // max(1, w.shape[1] * w.element_size()))
    if w.is_meta or w.shape[0] <= rows:
        return quantize_weight(w, bits, group_size, scale_dtype)
    qweight = scales = None
    for start in range(0, w.shape[0], rows):
        q, s = quantize_weight(w[start:start + rows], bits, group_size, scale_dtype)
        if qweight is None:
            qweight = q.new_empty((w.shape[0], *q.shape[1:]))
            scales = s.new_empty((w.shape[0], *s.shape[1:]))
        qweight[start:start + rows], scales[start:start + rows] = q, s
    return qweight, scales


def _read_only(*_: Tensor) -> tuple[Tensor, ...]:
    raise FormatError("a table that quantizes as it reads has no way back to float weights")


def quantizing_table(table: Sequence[Mapping], cfg: GLMConfig, quantization: dict, scale_dtype: torch.dtype,
                     prepare: Callable[[Tensor], Tensor], dtypes: dict[str, torch.dtype]) -> list[Mapping]:
    """A source table (release or glm names -> glm names) whose float weights come out quantized: each weight
    `glm.quantize` would replace under ``quantization`` is passed through ``prepare`` (the loader's cast and
    move, so the integers equal those of quantizing the loaded model) and quantized (`quantize_rows`),
    giving ``qweight`` and ``scales`` in its place; ``dtypes`` records each module's weight dtype (its compute
    dtype). Read-only: its ``to_hf`` refuses."""
    weights = quantized_weights(cfg, quantization)
    bits, group = quantization["bits"], quantization["group_size"]
    def quantizing(mp: Mapping) -> list[Mapping]:
        def to_glm(*hf: Tensor) -> tuple[Tensor, ...]:
            outs: list[Tensor] = []
            for name, t in zip(mp.glm, mp.to_glm(*hf)):
                w = prepare(t)
                dtypes[weights[name]] = w.dtype
                outs += quantize_rows(w, bits, group, scale_dtype)
            return tuple(outs)

        names = tuple(f"{weights[g]}.{t}" for g in mp.glm for t in QUANTIZED_TENSORS)
        return [Mapping(names, mp.hf, to_glm, _read_only)]

    return _replace_quantized(table, weights, quantizing)


# ---------------------------------------------------------------------------------------------
# THUDM's layout

@dataclass(frozen=True)
class ThudmLayout:
    """THUDM's quantized layout of one release generation: config.json ``quantization_bit`` (4 or 8; 0 or absent:
    not quantized), and for each quantized projection ``...weight`` int8 (``[out, in]``, or ``[out, in/2]`` two
    values a byte for 4 bits, as glm's ``qweight``) beside ``...weight_scale`` ``[out]`` (glm's ``scales``
    ``[out, 1]``). The release's remote code builds these tensors empty from ``quantization_bit`` and loads the
    file into them, so what it cannot build (group scales, a quantized untied head) cannot be written."""

    release: str  # the release whose quantization.py defines it, for messages
    # The dtype its weight_scale is stored in; None: the model's (the dtype of the file's float tensors).
    scale_dtype: Optional[torch.dtype]
    # The config.json key that quantizes the word embeddings row-wise too, the lm_head sharing them; None
    # where the release quantizes only the four projections.
    embeddings_key: Optional[str] = None

    def read(self, hf: dict[str, Any], cfg: GLMConfig, source: str) -> Optional[dict]:
        """The scheme a release config.json describes (None: not quantized); ConfigError naming the field."""
        bits = hf.get("quantization_bit")
        if bits is None or bits == 0 and not isinstance(bits, bool):
            return None
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
            raise ConfigError(f"{source}: field 'quantization_bit' is {bits!r}; {self.release}'s quantized releases "
                              f"use 4 or 8 (0 or absent: not quantized); fix it in config.json")
        embeddings = bool(self.embeddings_key) and as_bool(self.embeddings_key, hf.get(self.embeddings_key, False))
        if embeddings and not cfg.tie_word_embeddings:
            raise ConfigError(f"{source}: field {self.embeddings_key!r} is true, which quantizes the embeddings "
                              f"together with the lm_head that shares them, but this model's lm_head is untied; "
                              f"fix config.json")
        return scheme(bits, None, embeddings, False)

    def write_config(self, config: dict[str, Any], quantization: Optional[dict]) -> None:
        """Set the quantization keys of a release config.json for ``quantization``, in place. For a float model
        (None) a key already there says "not quantized" (ChatGLM2-6B's own config.json has quantization_bit 0)
        and an absent one stays absent."""
        values = {"quantization_bit": 0 if quantization is None else quantization["bits"]}
        if self.embeddings_key:
            values[self.embeddings_key] = quantization is not None and quantization["embeddings"]
        for k, v in values.items():
            if quantization is not None or k in config:
                config[k] = v

    def stored_scale_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype weight_scale is stored in beside float tensors of ``dtype``."""
        return self.scale_dtype or dtype

    def check_writable(self, cfg: GLMConfig, quantization: dict, scale_dtypes: set[torch.dtype],
                       dtype: torch.dtype) -> None:
        """FormatError, before anything is written, for what this layout cannot hold: group scales, a quantized
        untied lm_head, quantized embeddings where the release has none (or with an untied head), and scales
        whose dtype is not the one the layout stores (writing them would round them)."""
        fix = "save in glm format (format='glm', --to glm)"
        if quantization["group_size"] is not None:
            raise FormatError(f"{self.release}'s quantized layout keeps one scale per output row (weight_scale "
                              f"[out]); this model is quantized with group_size {quantization['group_size']}: {fix}, "
                              f"or quantize with group_size=None")
        if quantization["lm_head"]:
            raise FormatError(f"{self.release}'s quantized layout has no quantized lm_head of its own; this model's "
                              f"untied lm_head is quantized: {fix}, or quantize with lm_head=False")
        if quantization["embeddings"] and (self.embeddings_key is None or not cfg.tie_word_embeddings):
            what = ("quantizes only the four projections of each layer" if self.embeddings_key is None else
                    "quantizes the embeddings only together with the lm_head tied to them")
            raise FormatError(f"{self.release}'s quantized layout {what}; this model's embeddings are quantized: "
                              f"{fix}, or quantize with embeddings=False")
        want = self.stored_scale_dtype(dtype)
        other = sorted(str(d) for d in scale_dtypes if d != want)
        if other:
            stored = (f"in {want}" if self.scale_dtype is not None else
                      f"in the model's dtype ({want}, the dtype of the float tensors written)")
            extra = "" if self.scale_dtype is not None else (
                f", or write the float tensors in the scales' dtype (dtype={other[0]}; from_pretrained with "
                f"dtype=None keeps a release's own dtypes)")
            raise FormatError(f"{self.release}'s quantized layout stores weight_scale {stored}; this model's scales "
                              f"are {', '.join(other)}, and writing them as {DTYPE_NAMES[want]} would round them: "
                              f"quantize with scale_dtype=torch.{DTYPE_NAMES[want]}{extra}")

    def table(self, float_table: Sequence[Mapping], cfg: GLMConfig, quantization: dict) -> list[Mapping]:
        """The release's weight table for a model of ``cfg`` quantized with ``quantization``: its float table
        with each quantized weight's mapping applied to ``weight`` (integers) and ``weight_scale`` (scales)."""
        return per_row_table(float_table, quantized_weights(cfg, quantization), lambda h: h + "_scale")
