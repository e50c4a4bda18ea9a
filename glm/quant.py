"""Weight-only INT8 / INT4 quantization of a `GLM`'s linear layers, in THUDM's own layout.

    import glm
    glm.quantize(model, bits=4, group_size=32)   # in place: attention and MLP projections become QuantLinear

A quantized weight is symmetric integers times a float scale: ``W[o, i] = q[o, i] · scales[o, i // group_size]``
(one scale per output row when ``group_size`` is None). The layout is the one ChatGLM-6B / ChatGLM2-6B's
``quantization.py`` stores, so their ``-int4`` / ``-int8`` releases load without repacking:

- ``scale = max|W| over the row (or group) / (2^(bits-1) - 1)``, ``q = round(W / scale)`` with torch.round
  (half to even): values in [-127, 127] or [-7, 7];
- ``qweight`` int8 ``[out, in]``; for 4 bits ``[out, in/2]``, input column ``2j`` in the high nibble and ``2j+1``
  in the low one, both two's-complement nibbles (`pack_int4`);
- dequantizing is ``q.to(scales.dtype) * scales`` (THUDM's ``extract_weight_to_half``), bit for bit.

glm's ``scales`` are ``[out, groups]`` (THUDM's ``weight_scale`` is ``[out]``, i.e. one group). Their dtype is part
of the format: fp32 by default, fp16 as ChatGLM-6B stores it, the model's dtype as ChatGLM2/3 do; casting the
model (``.half()``, ``.to(bfloat16)``) changes the compute dtype but leaves scales and integers as they are.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .config import GLMConfig
from .errors import CheckpointError, InputError
from .kernels.ops import quant_linear_kernel
from .model import GLM, Linear

BITS = (4, 8)
# The names the loaders and the CLI take for the two schemes (``quantize="int4"``, ``--quantize int4``).
SCHEME_BITS = {"int8": 8, "int4": 4}
# The projections of every block that `quantize` replaces: THUDM's quantize() replaces the same four
# (query_key_value, dense, dense_h_to_4h, dense_4h_to_h) in every ChatGLM release, and they hold all of a
# block's matrix weights in every family.
LAYER_MODULES = ("attn.qkv", "attn.out", "mlp.w_in", "mlp.w_out")
# Rows up to which the compiled CPU kernels (glm::int8_linear / int4_linear) may take a layer (decode and small
# batches), where this machine measured them faster than dequantizing; past it the weight is dequantized once per
# call and multiplied by torch's GEMM.
KERNEL_MAX_ROWS = kernels.QUANT_LINEAR_MAX_ROWS


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


# ----------------------------------------------------------------------------------------------
# The format: packing, quantizing, dequantizing
def pack_int4(q: Tensor) -> Tensor:
    """int8 values in [-8, 7], ``[out, in]`` (``in`` even) -> ``[out, in/2]`` int8, two per byte: column ``2j``
    in the high nibble, ``2j+1`` in the low one (THUDM's compress_int4_weight)."""
    if q.dtype != torch.int8 or q.dim() != 2 or q.shape[1] % 2:
        raise InputError(f"pack_int4 takes an int8 [out, in] tensor with an even number of columns, got "
                         f"{q.dtype} {tuple(q.shape)}")
    return kernels.pack_int4(q)


def unpack_int4(packed: Tensor) -> Tensor:
    """``[out, in/2]`` int8 -> ``[out, in]`` int8 in [-8, 7]: the high nibble (column ``2j``) is ``byte >> 4``
    on the signed byte, the low one ``(byte << 4) >> 4``: both sign-extended, as THUDM's CPU kernel reads them."""
    if packed.dtype != torch.int8 or packed.dim() != 2:
        raise InputError(f"unpack_int4 takes an int8 [out, in/2] tensor, got {packed.dtype} {tuple(packed.shape)}")
    return kernels.unpack_int4(packed)


def check_scheme(bits: int, group_size: Optional[int], in_features: Optional[int] = None,
                 where: str = "the layer") -> None:
    """InputError unless ``bits`` is 4 or 8 and ``group_size`` (None: per output row) divides ``in_features``
    (and is even for 4 bits, so that a group is whole bytes)."""
    if isinstance(bits, bool) or bits not in BITS:
        raise InputError(f"bits must be 8 or 4 (weight-only INT8 / INT4), got {bits!r}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size < 1):
        raise InputError(f"group_size must be a positive number of input columns (32, 64, 128 are usual) or None "
                         f"for one scale per output row, got {group_size!r}")
    if bits == 4 and group_size is not None and group_size % 2:
        raise InputError(f"group_size must be even for 4 bits (two values share a byte), got {group_size}")
    if in_features is None:
        return
    if bits == 4 and in_features % 2:
        raise InputError(f"{where} has {in_features} input features, an odd number, which INT4 cannot pack two per "
                         f"byte; use bits=8")
    if group_size is not None and in_features % group_size:
        raise InputError(f"group_size {group_size} does not divide the {in_features} input features of {where}; "
                         f"use a divisor of {in_features} (or group_size=None for one scale per output row)")


def quantize_weight(w: Tensor, bits: int, group_size: Optional[int] = None,
                    scale_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """Float ``w`` ``[out, in]`` -> (``qweight``, ``scales`` ``[out, groups]`` in ``scale_dtype``, default
    ``w``'s dtype). As THUDM's QuantizedLinear: the scale is computed in ``w``'s dtype and then rounded to
    ``scale_dtype``, and ``w`` is divided by the rounded scale (torch's type promotion) and rounded half to even."""
    if not isinstance(w, Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise InputError(f"quantize_weight takes a float [out, in] weight, got "
                         f"{getattr(w, 'dtype', type(w).__name__)} {tuple(getattr(w, 'shape', ()))}")
    out_f, in_f = w.shape
    check_scheme(bits, group_size, in_f, "the weight")
    groups = 1 if group_size is None else in_f // group_size
    wg = w.reshape(out_f, groups, in_f // groups)
    scales = (wg.abs().amax(dim=-1) / _qmax(bits)).to(scale_dtype or w.dtype)  # [out, groups]
    # An all-zero row (or group) has scale 0: divide by 1 there so its integers are 0, not NaN cast to int8.
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    q = torch.round(wg / safe[..., None])
    # The reference has no clamp. In fp32 and fp16 the rounded scale keeps max|W|/scale within half a step of
    # qmax, but a bf16 weight divided by its bf16 scale can land on 127.5 and round to 128, which THUDM's int8
    # cast wraps to -128 (a sign flip); glm keeps such values at +qmax. The clamp also guards subnormal fp16
    # scales of near-zero rows.
    q = q.clamp_(-_qmax(bits), _qmax(bits)).to(torch.int8).reshape(out_f, in_f)
    return (pack_int4(q) if bits == 4 else q), scales


def dequantize(qweight: Tensor, scales: Tensor, bits: int, group_size: Optional[int] = None,
               dtype: Optional[torch.dtype] = None) -> Tensor:
    """The float weight ``[out, in]`` in ``dtype`` (default: the scales' dtype): each ``q * scale`` rounded once
    (``glm.kernels.dequantize_weight``; in the scales' dtype this is THUDM's extract_weight_to_half for one scale
    per row, bit for bit). ``scales`` is ``[out, groups]`` or ``[out]``."""
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise InputError(f"dequantize takes an int8 [out, in] (or [out, in/2] for 4 bits) qweight, got "
                         f"{qweight.dtype} {tuple(qweight.shape)}")
    out_f, in_f = qweight.shape[0], qweight.shape[1] * (2 if bits == 4 else 1)
    groups = scales.reshape(out_f, -1).shape[1] if scales.numel() else 0
    if group_size is not None and groups * group_size != in_f or group_size is None and groups != 1:
        raise InputError(f"scales {tuple(scales.shape)} do not fit a [{out_f}, {in_f}] weight with "
                         f"group_size {group_size}")
    return kernels.dequantize_weight(qweight, scales, bits, dtype or scales.dtype)


def quantized_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Optional[Tensor], bits: int,
                     group_size: Optional[int]) -> Tensor:
    """``F.linear(x, dequantize(...), bias)`` in ``x``'s dtype. Up to KERNEL_MAX_ROWS rows on CPU with no gradient
    to x, through glm's kernels (glm::int8_linear / int4_linear, which dequantize in registers and never build the
    float weight) where this machine measured them faster for the call's bits, group size, rows, shape, dtypes
    and threads (measured once, kept by glm.tuning; unmeasured, the kernels: `glm.kernels.ops.quant_kernel_wins`);
    otherwise through the weight dequantized once per call."""
    y = quant_linear_kernel(bits, x, qweight, scales, bias)
    return y if y is not None else F.linear(x, dequantize(qweight, scales, bits, group_size, x.dtype), bias)


# ----------------------------------------------------------------------------------------------
# Modules
class _QuantizedWeight(nn.Module):
    """The stored format both quantized modules share: buffers ``qweight`` (int8 ``[rows, cols]``, or
    ``[rows, cols/2]`` packed for 4 bits) and ``scales`` ``[rows, groups]``, and the compute dtype."""

    def _init_weight(self, rows: int, cols: int, bits: int, group_size: Optional[int], scale_dtype: torch.dtype,
                     dtype: torch.dtype, device: "torch.device | str | None") -> None:
        self.bits, self.group_size = bits, group_size
        groups = 1 if group_size is None else cols // group_size
        stored = cols // 2 if bits == 4 else cols
        self.register_buffer("qweight", torch.zeros(rows, stored, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.zeros(rows, groups, dtype=scale_dtype, device=device))
        # Carries the compute dtype through .half() / .to(dtype) (the module has no float weight to say it).
        self.register_buffer("dtype_probe", torch.empty(0, dtype=dtype, device=device), persistent=False)

    def _quantize_from(self, w: Tensor, scale_dtype: torch.dtype) -> None:
        self.qweight, self.scales = quantize_weight(w.detach(), self.bits, self.group_size, scale_dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.dtype_probe.dtype

    @property
    def weight(self) -> Tensor:
        """The dequantized weight in the compute dtype (a new tensor each call: writing to it changes nothing)."""
        return dequantize(self.qweight, self.scales, self.bits, self.group_size, self.compute_dtype)

    def _apply(self, fn, recurse=True):
        # A dtype cast must not round the scales (they are part of the stored format, and a round trip
        # through bf16 would change every weight); a device move does move them.
        scales = self.scales
        super()._apply(fn, recurse)
        if self.scales.dtype != scales.dtype:
            self.scales = scales.to(self.scales.device)
        return self


class QuantLinear(_QuantizedWeight):
    """A linear layer with a weight-only quantized weight (``qweight`` ``[out, in]``, ``scales`` ``[out, groups]``)
    and an optional float ``bias``. Its weights are not parameters: training the base through it is refused
    (`glm.lora.check_trainable`); LoRA adapters on a quantized base are the way to fine-tune one."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: Optional[int] = None,
                 bias: bool = False, *, scale_dtype: torch.dtype = torch.float32,
                 dtype: torch.dtype = torch.float32, device: "torch.device | str | None" = None):
        super().__init__()
        check_scheme(bits, group_size, in_features)
        self.in_features, self.out_features = in_features, out_features
        self._init_weight(out_features, in_features, bits, group_size, scale_dtype, dtype, device)
        # Registered even when absent (as nn.Linear does), so the bias is part of the module's parameter table.
        self.register_parameter("bias", nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
                                if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: Optional[int] = None,
                    scale_dtype: Optional[torch.dtype] = None) -> "QuantLinear":
        """``linear``'s weight quantized (scales in ``scale_dtype``, default fp32); the bias is shared."""
        w = linear.weight
        mod = cls(linear.in_features, linear.out_features, bits, group_size, bias=False,
                  scale_dtype=scale_dtype or torch.float32, dtype=w.dtype, device=w.device)
        mod._quantize_from(w, scale_dtype or torch.float32)
        mod.bias = linear.bias
        return mod

    def forward(self, x: Tensor) -> Tensor:
        return quantized_linear(x, self.qweight, self.scales, self.bias, self.bits, self.group_size)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, scales={self.scales.dtype}")


class QuantEmbedding(_QuantizedWeight):
    """An embedding table quantized row-wise (``embeddings=True``): each looked-up row is dequantized alone.
    ``weight`` is the whole dequantized table (a tied output head reads it)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: Optional[int] = None, *,
                 scale_dtype: torch.dtype = torch.float32, dtype: torch.dtype = torch.float32,
                 device: "torch.device | str | None" = None):
        super().__init__()
        check_scheme(bits, group_size, embedding_dim, "the embedding")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self._init_weight(num_embeddings, embedding_dim, bits, group_size, scale_dtype, dtype, device)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int, group_size: Optional[int] = None,
                       scale_dtype: Optional[torch.dtype] = None) -> "QuantEmbedding":
        w = emb.weight
        mod = cls(emb.num_embeddings, emb.embedding_dim, bits, group_size, scale_dtype=scale_dtype or torch.float32,
                  dtype=w.dtype, device=w.device)
        mod._quantize_from(w, scale_dtype or torch.float32)
        return mod

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        rows = dequantize(self.qweight[flat], self.scales[flat], self.bits, self.group_size, self.compute_dtype)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def project(self, x: Tensor) -> Tensor:
        """``x @ table^T``: the output head of a model whose head is tied to this table (ChatGLM-6B-int4 with
        quantized embeddings shares the integers and scales with its lm_head), through the quantized linear."""
        return quantized_linear(x, self.qweight, self.scales, None, self.bits, self.group_size)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}, "
                f"scales={self.scales.dtype}")


QUANT_MODULES = (QuantLinear, QuantEmbedding)


# ----------------------------------------------------------------------------------------------
# Whole models
def _target_names(cfg: GLMConfig, embeddings: bool, lm_head: bool) -> list[str]:
    """The dotted names of the modules ``quantize`` replaces in a model of ``cfg``, in model order (a tied model
    has no lm_head of its own)."""
    names = ["embed"] if embeddings else []
    names += [f"layers.{i}.{m}" for i in range(cfg.num_layers) for m in LAYER_MODULES]
    if lm_head and not cfg.tie_word_embeddings:
        names.append("lm_head")
    return names


def _targets(model: GLM, embeddings: bool, lm_head: bool) -> list[tuple[str, nn.Module]]:
    """(dotted name, module) of every module ``quantize`` replaces, in model order."""
    return [(n, model.get_submodule(n)) for n in _target_names(model.config, embeddings, lm_head)]


def is_quantized(model: nn.Module) -> bool:
    return getattr(model, "quantization", None) is not None or any(
        isinstance(m, QUANT_MODULES) for m in model.modules())


def quantize(model: GLM, bits: int = 8, group_size: Optional[int] = None, *, embeddings: bool = False,
             lm_head: bool = False, scale_dtype: torch.dtype = torch.float32) -> GLM:
    """Replace ``model``'s attention and MLP projections (``layers.{i}.attn.qkv / attn.out / mlp.w_in /
    mlp.w_out``) with `QuantLinear` of ``bits`` (8 or 4) and ``group_size`` (None: one scale per output row;
    else a divisor of each layer's input features, even for 4 bits), in place. ``embeddings`` quantizes the
    token embedding row-wise too, ``lm_head`` an untied output head; both stay float by default. Every layer
    is checked before any is changed. Records the scheme in ``model.quantization``. A model on the meta
    device gets quantized modules of the right shapes (to load a quantized checkpoint into)."""
    if not isinstance(model, GLM):
        raise InputError(f"quantize takes a glm.GLM model, got {type(model).__name__}")
    if is_quantized(model):
        raise InputError(f"the model is already quantized ({model.quantization}); quantize the full-precision "
                         f"model (load it again without quantize=)")
    check_scheme(bits, group_size)
    if scale_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise InputError(f"scale_dtype must be torch.float32, float16 or bfloat16, got {scale_dtype!r}")
    targets = _targets(model, embeddings, lm_head)
    for name, mod in targets:
        # A LoRA-adapted projection (glm.lora wraps them) would lose its adapters here.
        if type(mod) not in (Linear, nn.Embedding):
            raise InputError(f"{name} is a {type(mod).__name__}, not a plain projection: a model carrying LoRA "
                             f"adapters is quantized after merging them (glm.lora.remove(model)), or load the base "
                             f"quantized and apply the adapters to it")
    for name, mod in targets:
        check_scheme(bits, group_size, mod.embedding_dim if name == "embed" else mod.in_features, name)
    for name, mod in targets:
        with torch.no_grad():
            new = (QuantEmbedding.from_embedding(mod, bits, group_size, scale_dtype) if name == "embed"
                   else QuantLinear.from_linear(mod, bits, group_size, scale_dtype))
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
    model.quantization = {"bits": bits, "group_size": group_size, "embeddings": embeddings,
                          "lm_head": lm_head and model.lm_head is not None}
    return model


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QUANT_MODULES)}


def quantized_state_dict(model: GLM) -> dict[str, Tensor]:
    """Every tensor of a quantized model by name (``...qweight`` int8, ``...scales``, biases and the float
    weights): `load_quantized_state_dict` on a model quantized with the same scheme restores it exactly."""
    if not is_quantized(model):
        raise InputError("the model is not quantized; use model.state_dict() (or glm.quantize it first)")
    return {k: v for k, v in model.state_dict().items()}


def load_quantized_state_dict(model: GLM, state_dict: dict[str, Tensor]) -> GLM:
    """Copy ``state_dict`` into ``model`` (quantized with the same scheme, e.g. on the meta device): every key
    present with its shape and dtype, checked before anything is copied. Scales keep the file's dtype."""
    if not is_quantized(model):
        raise InputError("load_quantized_state_dict needs a quantized model: glm.quantize(model, bits, group_size) "
                         "with the checkpoint's scheme first")
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    extra = [k for k in state_dict if k not in own]
    if missing or extra:
        raise CheckpointError(f"the quantized checkpoint does not match the model's {model.quantization} layout: "
                              f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, unexpected "
                              f"{extra[:4]}{'...' if len(extra) > 4 else ''}; check its quantization scheme")
    scale_dtypes = (torch.float32, torch.float16, torch.bfloat16)
    for k, t in own.items():
        src = state_dict[k]
        if tuple(src.shape) != tuple(t.shape):
            raise CheckpointError(f"tensor {k} has shape {tuple(src.shape)}, the quantization scheme "
                                  f"{model.quantization} needs {tuple(t.shape)}")
        if k.endswith("qweight") and src.dtype != torch.int8:
            raise CheckpointError(f"tensor {k} is {src.dtype}; quantized weights are int8")
        if k.endswith("scales") and src.dtype not in scale_dtypes:
            raise CheckpointError(f"tensor {k} is {src.dtype}; scales are float32, float16 or bfloat16")
    # A model built on the meta device takes the file's tensors themselves; a real one copies into its own.
    meta = any(t.is_meta for t in own.values())
    mods = quantized_modules(model)
    for name, m in mods.items():
        # Scales keep the file's dtype (fp16 in ChatGLM-6B's releases): assigned, not copied into the
        # module's buffer, whose dtype may differ.
        src = state_dict[f"{name}.scales"]
        m.scales = src if meta else src.to(m.qweight.device, copy=True)
    scale_keys = {f"{name}.scales" for name in mods}
    model.load_state_dict({k: v for k, v in state_dict.items() if k not in scale_keys}, strict=False, assign=meta)
    return model


# ----------------------------------------------------------------------------------------------
# Checkpoints: what the loaders and writers (glm.formats.quantized, glm.hub) ask of a scheme
# The tensors a quantized module stores in place of its float ``weight``.
QUANTIZED_TENSORS = ("qweight", "scales")


def scheme(bits: int, group_size: Optional[int] = None, embeddings: bool = False, lm_head: bool = False) -> dict:
    """The record `quantize` leaves in ``model.quantization`` (and glm's config.json keeps), checked."""
    check_scheme(bits, group_size)
    return {"bits": bits, "group_size": group_size, "embeddings": bool(embeddings), "lm_head": bool(lm_head)}


def describe(quantization: dict) -> str:
    """A scheme in words, for messages: "int4, group 32, embeddings quantized"."""
    words = [f"int{quantization['bits']}",
             "per-row scales" if quantization["group_size"] is None else f"group {quantization['group_size']}"]
    words += [f"{part} quantized" for part in ("embeddings", "lm_head") if quantization[part]]
    return ", ".join(words)


def quantized_weights(cfg: GLMConfig, quantization: dict) -> dict[str, str]:
    """Float weight name -> name of the module that holds it quantized, for every weight `quantize` with the
    record ``quantization`` replaces in a model of ``cfg``."""
    return {f"{n}.weight": n for n in _target_names(cfg, quantization["embeddings"], quantization["lm_head"])}


def quantized_tensor_names(cfg: GLMConfig, quantization: Optional[dict]) -> set[str]:
    """The ``qweight`` and ``scales`` names of a model of ``cfg`` quantized with ``quantization`` (none for None):
    the tensors a conversion copies as they are, never cast."""
    if quantization is None:
        return set()
    return {f"{m}.{t}" for m in quantized_weights(cfg, quantization).values() for t in QUANTIZED_TENSORS}


def quantize_as(model: GLM, quantization: dict, scale_dtype: torch.dtype = torch.float32) -> GLM:
    """`quantize` with a recorded scheme: on a model built on the meta device, the modules a quantized checkpoint
    of that scheme loads into (the file's scales replace the ``scale_dtype`` placeholders)."""
    return quantize(model, quantization["bits"], quantization["group_size"], embeddings=quantization["embeddings"],
                    lm_head=quantization["lm_head"], scale_dtype=scale_dtype)


def set_compute_dtypes(model: GLM, device: "torch.device | str", dtypes: dict[str, torch.dtype],
                       default: torch.dtype) -> None:
    """After loading into a model built on the meta device: give every quantized module its compute dtype on
    ``device`` (``dtypes`` by module name: the dtype its float weight had before quantizing; else its bias's
    dtype, else ``default``), which `quantize` takes from the float weight it replaces."""
    for name, m in quantized_modules(model).items():
        bias = getattr(m, "bias", None)
        dtype = dtypes.get(name) or (bias.dtype if bias is not None else default)
        m.dtype_probe = torch.empty(0, dtype=dtype, device=device)
