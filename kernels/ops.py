"""glm.kernels' ops: loading the compiled kernels, their fake impls and autograd, and the Python entry points.

The compiled extension ``glm.kernels._C`` (built at ``pip install``, never at import) defines four
ops in the ``glm`` namespace, each with a CPU kernel (C++) and, where built, a CUDA one:

- ``glm::attention_fwd(q, k, v, prefix_len, kv_start, kv_len, causal, q_offset, scale) -> (out, lse, stats)``
- ``glm::attention_bwd(grad_out, grad_lse, q, k, v, out, stats, prefix_len, kv_start, kv_len, causal,
  q_offset, scale) -> (dq, dk, dv)``
- ``glm::attention_decode(...)`` same arguments and results as the forward, split along the keys
  for a few query rows against a long KV cache.
- ``glm::small_linear(x [M, K], weight [N, K], bias?) -> [M, N]``: a linear layer for a few rows
  (decode), bandwidth-bound and split over all threads (:func:`linear` routes to it). CPU only.
- ``glm::int8_linear`` / ``glm::int4_linear(x [M, K], qweight, scales [N, G], bias?) -> [M, N]``: the
  weight-only quantized linears, dequantizing in registers (``kernels/csrc/quant_cpu.cpp``; :func:`int8_linear`,
  :func:`int4_linear` route to them and keep the references beside them). CPU only.
- ``glm::rms_norm``, ``glm::rope``, ``glm::swiglu`` and their backwards (``kernels/csrc/elementwise_cpu.cpp``):
  the model's elementwise layers in one pass each, fp32 on CPU (:func:`rms_norm`, :func:`rope`,
  :func:`swiglu` route to them and keep the plain-PyTorch references beside them).

The CUDA kernels (``kernels/csrc/attention_cuda.cu``) live in a second library, ``glm.kernels._C_cuda``,
built only where the install finds nvcc and a CUDA build of torch; it adds CUDA implementations of
the three attention ops (bf16/fp16, head dims multiple of 8 up to 128).

``prefix_len`` and ``kv_start`` are int32 ``[B, Tq]``, ``kv_len`` int32 ``[B]``; the mask they describe
is the one in :mod:`glm.attention`. ``lse`` is fp32 ``[B, n, Tq]`` (natural log; ``-inf`` for a row that
sees no key, whose output is 0); ``stats`` fp32 ``[B, n, Tq, 2]`` holds each row's score maximum and
log2 of its softmax sum (log2 domain), which the backward needs separately to recompute the
probabilities without losing precision at large logits. This module adds the fake (meta) implementations
and the autograd formula, so eager mode, autograd and ``torch.compile`` all see one op, and registers the ``fused``
attention backend.
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys
import time
from typing import Callable, Optional

import torch
from torch import Tensor

from glm import tuning
from glm.attention import register_backend
from glm.errors import KernelUnavailable

_load_error: Optional[str] = None
_cuda_load_error: Optional[str] = None
try:
    import glm.kernels._C  # noqa: F401  (loading it registers the ops)
except ImportError as exc:  # not built (isolated install, no compiler) or built for another torch
    why = ("they were not built at install time" if importlib.util.find_spec("glm.kernels._C") is None
           else f"the compiled library failed to load: {exc}")
    _load_error = (f"the C++ attention kernels are not available ({why}). Build them with "
                   "`pip install --no-build-isolation -e .` in the repository (needs a C++ compiler, and torch "
                   "installed first); until then the 'auto' attention backend uses 'sdpa'")
else:
    # What `auto` measured with one build of the kernels says nothing about the next one.
    _stat = os.stat(sys.modules["glm.kernels._C"].__file__)
    tuning.register_build("glm.kernels._C", f"{_stat.st_size}-{_stat.st_mtime_ns}")
    # The CUDA kernels are a second library that adds CUDA implementations to the ops _C defined.
    # It exists only where the install found nvcc and a CUDA build of torch.
    if importlib.util.find_spec("glm.kernels._C_cuda") is None:
        _cuda_load_error = ("the CUDA kernels were not built (the install needs nvcc and a CUDA build of torch; "
                            "`make kernels` on a GPU machine)")
    else:
        try:
            import glm.kernels._C_cuda  # noqa: F401
        except ImportError as exc:
            _cuda_load_error = f"the CUDA kernels failed to load: {exc}"


def available() -> bool:
    """True when the compiled kernels loaded."""
    return _load_error is None


def load_error() -> Optional[str]:
    """Why the kernels are unavailable (None when they loaded)."""
    return _load_error


def cuda_load_error() -> Optional[str]:
    """Why the CUDA kernels are unavailable (None when they loaded; the CPU ones may still be there)."""
    return _load_error or _cuda_load_error


def devices() -> set[str]:
    """Device types the ``glm`` ops have kernels for."""
    if not available():
        return set()
    found = {"cpu"}
    if torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key("glm::attention_fwd", "CUDA"):
        found.add("cuda")
    return found


def _require() -> None:
    if _load_error is not None:
        raise KernelUnavailable(_load_error)


def structure(q: Tensor, k: Tensor, prefix_len: Optional[Tensor], kv_start: Optional[Tensor],
              kv_len: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """The attention structure as the ops take it: int32 ``[B, Tq]``, ``[B, Tq]``, ``[B]``."""
    B, Tq, Tk = q.shape[0], q.shape[2], k.shape[2]

    def as_slots(t: Tensor) -> Tensor:
        # Every value beyond [0, Tk] means the same as its bound (all keys / none); clamping first
        # keeps an int64 like 2**31 from wrapping around in the int32 the kernels read.
        return t.to(q.device).clamp(0, Tk).to(torch.int32)

    def per_query(t: Optional[Tensor]) -> Tensor:
        if t is None:
            return torch.zeros(B, Tq, dtype=torch.int32, device=q.device)
        return as_slots(t).reshape(B, -1).expand(B, Tq).contiguous()

    lens = (torch.full((B,), Tk, dtype=torch.int32, device=q.device) if kv_len is None
            else as_slots(kv_len).contiguous())
    return per_query(prefix_len), per_query(kv_start), lens


if available():
    @torch.library.register_fake("glm::attention_fwd")
    def _fwd_fake(q, k, v, prefix_len, kv_start, kv_len, causal, q_offset, scale):
        return (q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32),
                q.new_empty((*q.shape[:3], 2), dtype=torch.float32))

    @torch.library.register_fake("glm::attention_decode")
    def _decode_fake(q, k, v, prefix_len, kv_start, kv_len, causal, q_offset, scale):
        return _fwd_fake(q, k, v, prefix_len, kv_start, kv_len, causal, q_offset, scale)

    @torch.library.register_fake("glm::attention_bwd")
    def _bwd_fake(grad_out, grad_lse, q, k, v, out, stats, prefix_len, kv_start, kv_len, causal, q_offset, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def _setup_context(ctx, inputs, output):
        q, k, v, prefix_len, kv_start, kv_len, causal, q_offset, scale = inputs
        out, lse, stats = output
        ctx.save_for_backward(q, k, v, out, stats, prefix_len, kv_start, kv_len)
        ctx.args = (causal, q_offset, scale)

    def _backward(ctx, grad_out, grad_lse, grad_stats):
        # stats is an internal by-product; nothing differentiates through it.
        q, k, v, out, stats, prefix_len, kv_start, kv_len = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        if grad_lse is None:
            grad_lse = stats.new_zeros(stats.shape[:3])
        dq, dk, dv = torch.ops.glm.attention_bwd(grad_out, grad_lse, q, k, v, out, stats, prefix_len, kv_start,
                                                 kv_len, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None

    torch.library.register_autograd("glm::attention_fwd", _backward, setup_context=_setup_context)

    def _no_double_backward(ctx, *grads):
        raise RuntimeError("glm's fused attention is differentiable once (its backward has no backward): for "
                           "higher-order gradients (create_graph=True, gradient penalties) use backend='sdpa' or "
                           "'reference'")

    # Without this, differentiating the backward would silently give zeros (torch only warns).
    torch.library.register_autograd("glm::attention_bwd", _no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)

    @torch.library.register_fake("glm::small_linear")
    def _small_linear_fake(x, weight, bias):
        return x.new_empty((x.shape[0], weight.shape[0]))


# Input dtypes of the kernels (all computing in fp32). The CUDA kernels run on tensor cores, which
# take 16-bit operands: fp32 stays with sdpa there (an fp32 tensor-core path would be tf32, below
# the accuracy an fp32 caller checks at), as do head dims the CUDA tiles do not cover.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CUDA_DTYPES = (torch.bfloat16, torch.float16)
CUDA_MAX_HEAD_DIM = 128


def _names(dtypes) -> str:
    return ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))


def supports(device_type: Optional[str], dtype: Optional[torch.dtype], head_dim: Optional[int]) -> Optional[str]:
    """Why the kernels cannot take tensors of this device type, dtype and head dim (None if they can)."""
    allowed = CUDA_DTYPES if device_type == "cuda" else DTYPES
    if dtype is not None and dtype not in allowed:
        where = " on cuda" if device_type == "cuda" else ""
        return f"does not take {str(dtype).replace('torch.', '')} tensors{where} (it takes {_names(allowed)})"
    if device_type == "cuda" and head_dim is not None and (head_dim % 8 or head_dim > CUDA_MAX_HEAD_DIM):
        return f"takes head dims that are multiples of 8 up to {CUDA_MAX_HEAD_DIM} on cuda, not {head_dim}"
    return None

# Up to this many query rows against the cache use the split-KV decode kernel (inference only).
DECODE_MAX_Q = 16


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, prefix_len: Optional[Tensor] = None,
                       kv_start: Optional[Tensor] = None, kv_len: Optional[Tensor] = None, q_offset: int = 0,
                       scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """Fused attention returning ``(out, lse)``; differentiable in q, k, v (and through lse)."""
    _require()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    pl, ks, kl = structure(q, k, prefix_len, kv_start, kv_len)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    op = (torch.ops.glm.attention_decode if q.shape[2] <= DECODE_MAX_Q and not needs_grad
          else torch.ops.glm.attention_fwd)
    out, lse, _ = op(q, k, v, pl, ks, kl, causal, q_offset, scale)
    return out, lse


def fused_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, prefix_len: Optional[Tensor] = None,
                    kv_start: Optional[Tensor] = None, kv_len: Optional[Tensor] = None, q_offset: int = 0,
                    scale: Optional[float] = None) -> Tensor:
    """The ``fused`` attention backend (same arguments as every backend in :mod:`glm.attention`)."""
    dev = q.device.type
    if torch.is_autocast_enabled(dev):
        # As autocast does for sdpa: run in its dtype (q may come out of fp32 RoPE while the cache
        # holds keys in the autocast dtype).
        dt = torch.get_autocast_dtype(dev)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    return attention_with_lse(q, k, v, causal=causal, prefix_len=prefix_len, kv_start=kv_start, kv_len=kv_len,
                              q_offset=q_offset, scale=scale)[0]


# Up to this many rows :func:`linear` takes the small-batch kernel (its C++ limit). Measured on the
# 2-core test machine against torch's linear with weights streamed from memory: 1.75-4.5x faster in
# fp32 at 1-8 rows, 1.2-1.9x in bf16 (benchmarks/decode.py has the model-level figure).
SMALL_LINEAR_MAX_ROWS = 8


def linear_calibration_key(rows: int, weight: Tensor) -> str:
    """The shape bucket of a few-row linear call, as `glm.tuning` stores its choice: the exact weight shape
    (a model has a handful) and row count, dtype and thread count."""
    out_f, in_f = weight.shape
    return (f"linear|cpu|{str(weight.dtype).replace('torch.', '')}|rows{rows}|{out_f}x{in_f}"
            f"|threads{torch.get_num_threads()}")


def time_paths(paths: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Seconds per call of each of ``paths`` (name -> call on the caller's own tensors), calls alternated, best
    of ``repeats`` each after a warm-up: what `measured_choice` hands `glm.tuning`."""
    best = {name: float("inf") for name in paths}
    for fn in paths.values():
        fn()
    for _ in range(repeats):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


class ChoiceMemo:
    """Choices already made in this process by a call site, keyed by a tuple of what its bucket depends on: a
    decode step makes about a hundred of them, so a lookup must cost less than a dictionary access under
    glm.tuning's lock. Emptied when glm.tuning's choices change (inject / forget)."""

    def __init__(self) -> None:
        self.table: dict[tuple, Optional[str]] = {}
        self.generation = -1


def measured_choice(memo: ChoiceMemo, ident: tuple, key: Callable[[], str],
                    measure: Callable[[], dict[str, float]]) -> Optional[str]:
    """The path `glm.tuning` has (or now measures, once per bucket and machine) as the fastest for the bucket
    ``key()``, remembered in ``memo`` under ``ident``. None without a measurement (``GLM_TUNING=off`` and
    nothing cached, or while torch.compile traces, which must not time anything): the caller's default."""
    if memo.generation != tuning.generation():
        memo.table.clear()
        memo.generation = tuning.generation()
    if ident in memo.table:
        return memo.table[ident]
    if torch.compiler.is_compiling():
        return None
    choice = memo.table[ident] = tuning.choose(key(), measure)
    return choice


def _measure_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], repeats: int = 5) -> dict[str, float]:
    """Seconds per call of ``small_linear`` and ``F.linear`` on the call's own tensors (the weight is what
    streams; x is a few rows)."""
    return time_paths({"small_linear": lambda: torch.ops.glm.small_linear(x, weight, bias),
                       "torch": lambda: torch.nn.functional.linear(x, weight, bias)}, repeats)


_linear_choices = ChoiceMemo()


def _small_linear_wins(x2: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether this machine measured ``glm::small_linear`` faster than ``F.linear`` for the call's bucket
    (`measured_choice`). Without a measurement it is F.linear: the kernel wins on some CPUs and loses 2x
    on others, so it is never the default unmeasured."""
    ident = (x2.shape[0], tuple(weight.shape), weight.dtype, torch.get_num_threads())
    return measured_choice(_linear_choices, ident, lambda: linear_calibration_key(x2.shape[0], weight),
                           lambda: _measure_linear(x2, weight, bias)) == "small_linear"


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear``, through the multi-threaded small-batch kernel ``glm::small_linear`` where this machine
    measured it faster: few rows (decode), CPU, no gradient needed (`_small_linear_wins`). The result
    equals F.linear's up to fp32 summation order."""
    # Cheapest tests first: in training (a gradient needed) this is F.linear after two of them.
    if (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                     or (bias is not None and bias.requires_grad))) or _load_error is not None:
        return torch.nn.functional.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (x.device.type == "cpu" and x.dtype in DTYPES and weight.dtype == x.dtype
            and 0 < rows <= SMALL_LINEAR_MAX_ROWS):
        x2 = x.reshape(rows, x.shape[-1])
        if _small_linear_wins(x2, weight, bias):
            return torch.ops.glm.small_linear(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])
    return torch.nn.functional.linear(x, weight, bias)


# ------------------------------------------------------------------------------------------------
# Weight-only quantized linears (kernels/csrc/quant_cpu.cpp). Layout: qweight int8 [N, K] (int8) or
# [N, K / 2] (int4: column 2j in the high nibble of byte j, 2j + 1 in the low one, both sign-extended,
# THUDM's packing); scales [N, G] or [N] in fp32 / fp16 / bf16; W[n, k] = q[n, k] * scales[n, k // (K / G)].

# Up to this many rows the quantized linears consider the C++ kernels, measured per row count against
# dequantize-then-F.linear (`quant_kernel_wins`); beyond, the weight is dequantized (a prompt's many rows
# are a GEMM, and one calibration bucket per prompt length would be too many).
QUANT_LINEAR_MAX_ROWS = 16


def unpack_int4(qweight: Tensor) -> Tensor:
    """int8 ``[N, K / 2]`` packed nibbles -> int8 ``[N, K]`` in [-8, 7] (high nibble first)."""
    high = qweight >> 4  # arithmetic shift of an int8: the sign-extended high nibble
    low = (qweight << 4) >> 4  # int8 shifts wrap, so this sign-extends the low nibble
    return torch.stack((high, low), dim=-1).flatten(-2)


def pack_int4(q: Tensor) -> Tensor:
    """int8 ``[N, K]`` in [-8, 7] -> int8 ``[N, K / 2]``, column 2j in the high nibble (undoes :func:`unpack_int4`)."""
    pairs = q.to(torch.int8).unflatten(-1, (-1, 2))
    return (pairs[..., 0] << 4) | (pairs[..., 1] & 0xF)


def dequantize_weight(qweight: Tensor, scales: Tensor, bits: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The weight ``[N, K]`` that ``qweight`` and ``scales`` (``[N, G]`` or ``[N]``) encode, in ``dtype``. With fp16 /
    bf16 scales each ``q * scale`` is exact in fp32 (an 8-bit integer times an 11- or 8-bit significand), so it is
    rounded once to ``dtype``: formed in fp32, or directly in ``dtype`` when that is the scales' dtype (THUDM's
    ``extract_weight_to_half``, bit for bit). With fp32 scales it is the fp32 product, then ``dtype``."""
    q = unpack_int4(qweight) if bits == 4 else qweight
    s = scales.reshape(scales.shape[0], -1)
    work = dtype if dtype == scales.dtype else torch.float32
    w = (q.unflatten(-1, (s.shape[1], -1)).to(work) * s.to(work)[..., None]).flatten(-2)
    return w if w.dtype == dtype else w.to(dtype)


def _quant_linear_reference(bits: int, x: Tensor, qweight: Tensor, scales: Tensor, bias: Optional[Tensor]) -> Tensor:
    w = dequantize_weight(qweight, scales, bits).to(x.device)
    b = None if bias is None else bias.float()
    return torch.nn.functional.linear(x.float(), w, b).to(x.dtype)


def int8_linear_reference(x: Tensor, qweight: Tensor, scales: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear`` of x with the dequantized int8 weight, in fp32, the result in x's dtype (differentiable in x)."""
    return _quant_linear_reference(8, x, qweight, scales, bias)


def int4_linear_reference(x: Tensor, qweight: Tensor, scales: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear`` of x with the dequantized int4 weight, in fp32, the result in x's dtype (differentiable in x)."""
    return _quant_linear_reference(4, x, qweight, scales, bias)


def quant_linear_calibration_key(bits: int, x2: Tensor, qweight: Tensor, scales: Tensor) -> str:
    """The bucket of a few-row quantized linear call, as `glm.tuning` stores its choice: bits, group size (per
    row, or the columns per group), rows, weight shape [N x K], the dtypes of x and of the scales, threads."""
    K, groups = x2.shape[-1], scales.shape[1] if scales.dim() == 2 else 1
    group = "row" if groups == 1 else f"g{K // groups}"
    return (f"quant_linear|cpu|int{bits}|{group}|{str(x2.dtype).replace('torch.', '')}"
            f"|scales-{str(scales.dtype).replace('torch.', '')}|rows{x2.shape[0]}|{qweight.shape[0]}x{K}"
            f"|threads{torch.get_num_threads()}")


def _quant_op(bits: int):
    return torch.ops.glm.int4_linear if bits == 4 else torch.ops.glm.int8_linear


def _measure_quant_linear(bits: int, x2: Tensor, qweight: Tensor, scales: Tensor, bias: Optional[Tensor],
                          repeats: int = 3) -> dict[str, float]:
    """Seconds per call of the kernel and of dequantize-then-F.linear (in x's dtype, as glm.quant does it) on the
    call's own tensors."""
    op = _quant_op(bits)
    b = None if bias is None else bias.to(x2.dtype)
    return time_paths({"kernel": lambda: op(x2, qweight, scales, bias),
                       "dequantize": lambda: torch.nn.functional.linear(
                           x2, dequantize_weight(qweight, scales, bits, x2.dtype), b)}, repeats)


_quant_choices = ChoiceMemo()


def quant_kernel_wins(bits: int, x2: Tensor, qweight: Tensor, scales: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether ``glm::int{bits}_linear`` is the path for the call ``x2 [rows, K]``: where this machine measured it
    faster than dequantize-then-F.linear for the call's bucket (`quant_linear_calibration_key`, measured once per
    bucket and machine by `measured_choice`). Without a measurement it is the kernel: dequantizing writes the
    whole float weight (4 or 8 times the integers' bytes) and reads it back on every call, after reading
    the integers the kernel reads once, so it cannot beat the kernel by much, while on the machine glm is
    measured on it took 9-85x the kernel's time at one row and 2.7-14x at 16 (docs/kernels.md)."""
    ident = (bits, x2.shape[0], tuple(qweight.shape), tuple(scales.shape), scales.dtype, x2.dtype,
             torch.get_num_threads())
    return measured_choice(_quant_choices, ident, lambda: quant_linear_calibration_key(bits, x2, qweight, scales),
                           lambda: _measure_quant_linear(bits, x2, qweight, scales, bias)) != "dequantize"


def quant_linear_kernel(bits: int, x: Tensor, qweight: Tensor, scales: Tensor,
                        bias: Optional[Tensor]) -> Optional[Tensor]:
    """``x [..., K]`` times the quantized weight through ``glm::int{bits}_linear`` when the kernel applies (built,
    CPU, a float x of 1 to QUANT_LINEAR_MAX_ROWS rows, no gradient to x or bias) and is the chosen path
    (`quant_kernel_wins`); None otherwise, and the caller dequantizes."""
    if _load_error is not None or x.device.type != "cpu" or x.dtype not in DTYPES:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return None
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not 0 < rows <= QUANT_LINEAR_MAX_ROWS:
        return None
    x2 = x.reshape(rows, x.shape[-1])
    if not quant_kernel_wins(bits, x2, qweight, scales, bias):
        return None
    op = _quant_op(bits)
    return op(x2, qweight, scales, bias).view(*x.shape[:-1], qweight.shape[0])


def int8_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x [..., K]`` times the int8 weight ``qweight [N, K]`` with ``scales [N, G]`` (+ bias) -> ``[..., N]`` in x's
    dtype: ``glm::int8_linear`` (dequantizing in registers) where `quant_linear_kernel` takes it, otherwise
    :func:`int8_linear_reference`."""
    y = quant_linear_kernel(8, x, qweight, scales, bias)
    return y if y is not None else _quant_linear_reference(8, x, qweight, scales, bias)


def int4_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """:func:`int8_linear` for packed int4 weights, ``qweight [N, K / 2]`` (``glm::int4_linear``)."""
    y = quant_linear_kernel(4, x, qweight, scales, bias)
    return y if y is not None else _quant_linear_reference(4, x, qweight, scales, bias)


if available():
    def _quant_linear_fake(bits: int, x, qweight, scales, bias):
        name = f"glm::int{bits}_linear"
        torch._check(x.dim() == 2, lambda: f"{name}: x must be [M, K]")
        torch._check(qweight.dim() == 2 and qweight.dtype == torch.int8, lambda: f"{name}: qweight must be 2-D int8")
        torch._check(qweight.shape[1] * (2 if bits == 4 else 1) == x.shape[1],
                     lambda: f"{name}: qweight {tuple(qweight.shape)} does not match x {tuple(x.shape)}")
        torch._check(scales.dim() in (1, 2) and scales.shape[0] == qweight.shape[0],
                     lambda: f"{name}: scales must be [N, G] or [N]")
        return x.new_empty((x.shape[0], qweight.shape[0]))

    @torch.library.register_fake("glm::int8_linear")
    def _int8_linear_fake(x, qweight, scales, bias):
        return _quant_linear_fake(8, x, qweight, scales, bias)

    @torch.library.register_fake("glm::int4_linear")
    def _int4_linear_fake(x, qweight, scales, bias):
        return _quant_linear_fake(4, x, qweight, scales, bias)


# ------------------------------------------------------------------------------------------------
# Fused elementwise layers. Each has a plain-PyTorch reference (the model's definition of the layer,
# used everywhere the op does not apply) and an entry point that takes the op for fp32 CPU tensors.

def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm as transformers' Glm computes it: normalise in fp32, cast back, then scale. (ChatGLM2
    scales before the cast; the two agree exactly in fp32 and differ by one rounding in bf16/fp16.)"""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_reference(x: Tensor, cos: Tensor, sin: Tensor, segments: int) -> Tensor:
    """Half-split RoPE of x ``[B, h, T, d]`` over ``segments`` chunks of its first dims; cos and sin are
    ``[B|1, 1, T, segments, half]`` in x's dtype. Within chunk s (``2 * half`` dims), dim j pairs with
    j + half; the dims past the chunks pass through."""
    half = cos.shape[-1]
    rot = segments * 2 * half
    xr = x[..., :rot].unflatten(-1, (segments, 2 * half))
    x1, x2 = xr.chunk(2, dim=-1)
    y = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return y if rot == x.shape[-1] else torch.cat((y, x[..., rot:]), dim=-1)


def swiglu_reference(h: Tensor) -> Tensor:
    """``silu(gate) * up`` of ``h = [gate | up]`` (last dim)."""
    gate, up = h.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


_fused_elementwise = True


def set_fused_elementwise(enabled: bool) -> bool:
    """Turn the fused RMSNorm / RoPE / SwiGLU ops on or off for this process (the references run
    instead; benchmarks compare the two). Returns the previous setting."""
    global _fused_elementwise
    previous, _fused_elementwise = _fused_elementwise, bool(enabled)
    return previous


def _fused_ok(*tensors: Tensor) -> bool:
    # Under torch.compile the references are traced instead: inductor fuses them itself. (A plain loop,
    # not all(): this runs ~20 times a training step.)
    if not _fused_elementwise or _load_error is not None or torch.compiler.is_compiling():
        return False
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu":
            return False
    return True


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """:func:`rms_norm_reference`, in one pass (``glm::rms_norm``) for fp32 CPU tensors."""
    if _fused_ok(x, weight) and weight.shape == x.shape[-1:]:
        return torch.ops.glm.rms_norm(x, weight, float(eps))[0]
    return rms_norm_reference(x, weight, eps)


def rope(x: Tensor, cos: Tensor, sin: Tensor, segments: int) -> Tensor:
    """:func:`rope_reference`, in one pass (``glm::rope``) for fp32 CPU tensors. The result is
    contiguous ``[B, h, T, d]`` whatever x's strides (x may be a view of the QKV projection)."""
    if (_fused_ok(x, cos, sin) and x.dim() == 4 and cos.dim() == 5 and cos.shape == sin.shape
            and not (cos.requires_grad or sin.requires_grad)):
        B, _, T, S, half = cos.shape
        return torch.ops.glm.rope(x, cos.reshape(B, T, S * half), sin.reshape(B, T, S * half), segments, False)
    return rope_reference(x, cos, sin, segments)


def swiglu(h: Tensor) -> Tensor:
    """:func:`swiglu_reference`, in one pass (``glm::swiglu``) for fp32 CPU tensors."""
    if _fused_ok(h) and h.shape[-1] % 2 == 0:
        return torch.ops.glm.swiglu(h)
    return swiglu_reference(h)


if available():
    @torch.library.register_fake("glm::rms_norm")
    def _rms_norm_fake(x, weight, eps):
        torch._check(weight.shape == x.shape[-1:], lambda: "glm::rms_norm: weight must be [x.shape[-1]]")
        return x.new_empty(x.shape), x.new_empty(x.shape[:-1]).reshape(-1)

    @torch.library.register_fake("glm::rms_norm_bwd")
    def _rms_norm_bwd_fake(grad, x, weight, rstd):
        return x.new_empty(x.shape), weight.new_empty(weight.shape)

    @torch.library.register_fake("glm::rope")
    def _rope_fake(x, cos, sin, segments, inverse):
        torch._check(x.dim() == 4, lambda: "glm::rope: x must be [B, heads, T, head_dim]")
        return x.new_empty(x.shape)

    @torch.library.register_fake("glm::swiglu")
    def _swiglu_fake(h):
        torch._check(h.shape[-1] % 2 == 0, lambda: "glm::swiglu: the last dim holds [gate | up]")
        return h.new_empty((*h.shape[:-1], h.shape[-1] // 2))

    @torch.library.register_fake("glm::swiglu_bwd")
    def _swiglu_bwd_fake(grad, h):
        return h.new_empty(h.shape)

    # The forward ops' autograd is registered in C++ (kernels/csrc/elementwise_cpu.cpp: a Python formula
    # would cost ~0.2 ms of interpreter time per call); a create_graph backward runs in ATen ops there. The
    # backward ops themselves are internal and refuse to be differentiated rather than give zeros.
    def _internal_backward(ctx, *grads):
        raise RuntimeError("glm::rms_norm_bwd and glm::swiglu_bwd are the backward kernels of glm::rms_norm and "
                           "glm::swiglu; differentiate those ops (or glm.kernels.rms_norm / swiglu) instead")

    for _name in ("glm::rms_norm_bwd", "glm::swiglu_bwd"):
        torch.library.register_autograd(_name, _internal_backward, setup_context=lambda ctx, inputs, output: None)


if available():
    # The kernels compute in fp32: float64 (a numerics-checking dtype) stays with sdpa / reference.
    register_backend("fused", fused_attention, devices=devices(), supports=supports)
else:
    register_backend("fused", None, why_missing=_load_error)
