"""Attention with the GLM mask expressed as structure, and named backends.

A dense mask is never an argument. The mask is derived from small pieces of structure:

- ``causal``: query ``i`` sees keys ``j <= i``;
- ``prefix_len[b]``: keys ``j < prefix_len[b]`` are visible to every query of sample ``b``
  (GLM's bidirectional Part A / ChatGLM-6B's context; 0 or None = plain causal);
- ``kv_start[b]``: keys ``j < kv_start[b]`` are left padding and hidden;
- ``kv_len[b]``: keys ``j >= kv_len[b]`` are not (yet) valid, e.g. the unused tail of a static cache
  (the model itself passes the filled slice of its cache instead; ``kv_len`` is for callers that
  hand over the whole buffer, as the decode benchmarks and kernel tests do).

``prefix_len`` and ``kv_start`` may also be given per query, ``[B, Tq]``: several documents packed
in one row then each see only their own keys (``kv_start`` = the document's first slot) and their
own bidirectional prefix (``prefix_len`` = the end of the document's Part A).

Query ``t`` sits at index ``q_offset + t`` of the key sequence (``q_offset`` = tokens already in
the cache). Every query also sees its own key: a left-pad query row would otherwise have no key at
all and turn into NaN, which would then leak through ``0 * NaN`` in later layers. Pad rows are
garbage either way (the references' are too) and are never compared.

Backends take identical arguments. ``reference`` is the fp32 oracle that builds the dense mask;
``sdpa`` calls ``scaled_dot_product_attention`` (using ``is_causal`` when the mask is plain causal);
``fused`` (registered by :mod:`glm.kernels` when the compiled kernels load) runs the flash-style
kernels that read this structure directly and skip the key tiles nobody sees.

`Mask` bundles the five pieces of structure, as the model hands them from layer to layer.

``auto`` is ``fused`` wherever the kernels take the tensors, except where this machine measured sdpa
faster for the call's shape bucket (`auto_backend`): at small shapes, and on GPUs, sdpa's kernels can
win. The measurement (tens of ms at most) happens at the first call of a bucket and is cached per
machine by `glm.tuning`; with measuring off (``GLM_TUNING=off``) the static rule applies.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import tuning
from .errors import ArgumentError, InputError


@dataclass(frozen=True, eq=False)
class Mask:
    """The attention mask as structure (the rule in the module docstring); no dense mask is built from it
    outside the reference oracle."""

    causal: bool = True
    prefix_len: Optional[Tensor] = None  # [B] or [B, Tq]
    kv_start: Optional[Tensor] = None  # [B] or [B, Tq]
    kv_len: Optional[Tensor] = None  # [B]
    q_offset: int = 0


def _per_query(t: Tensor, device) -> Tensor:
    # [B] (one value per sample) or [B, Tq] (one per query, e.g. packed documents) -> [B, Tq|1, 1]
    return t.reshape(t.shape[0], -1, 1).to(device)


def visible_mask(
    batch: int,
    q_len: int,
    kv_size: int,
    *,
    causal: bool,
    prefix_len: Optional[Tensor] = None,
    kv_start: Optional[Tensor] = None,
    kv_len: Optional[Tensor] = None,
    q_offset: int = 0,
    device: "torch.device | str | None" = None,
) -> Tensor:
    """Dense ``[B, 1, Tq, Tk]`` bool mask (True = visible) of the rule in the module docstring."""
    i = torch.arange(q_offset, q_offset + q_len, device=device).view(1, q_len, 1)
    j = torch.arange(kv_size, device=device).view(1, 1, kv_size)
    vis = torch.ones(batch, q_len, kv_size, dtype=torch.bool, device=device)
    if causal:
        allowed = j <= i
        if prefix_len is not None:
            allowed = allowed | (j < _per_query(prefix_len, device))
        vis = vis & allowed
    if kv_start is not None:
        vis = vis & (j >= _per_query(kv_start, device))
    vis = vis | (j == i)
    if kv_len is not None:
        vis = vis & (j < kv_len.view(-1, 1, 1).to(device))
    return vis.unsqueeze(1)


def _expand_kv(x: Tensor, groups: int) -> Tensor:
    # Query head h reads KV head h // (n/g): each KV head repeats n/g times contiguously.
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool, prefix_len: Optional[Tensor] = None,
    kv_start: Optional[Tensor] = None, kv_len: Optional[Tensor] = None, q_offset: int = 0,
    scale: Optional[float] = None,
) -> Tensor:
    """The oracle: fp32 (float64 inputs stay float64), dense mask, explicit softmax. Returns the
    output in q's dtype."""
    B, n, Tq, d = q.shape
    g, Tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    # Never narrower than fp32, never narrower than the input: a float64 caller is checking at
    # float64 tolerances, which an fp32 oracle would fail by rounding alone.
    ct = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = q.to(ct), _expand_kv(k.to(ct), n // g), _expand_kv(v.to(ct), n // g)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    vis = visible_mask(B, Tq, Tk, causal=causal, prefix_len=prefix_len, kv_start=kv_start,
                       kv_len=kv_len, q_offset=q_offset, device=q.device)
    s = s.masked_fill(~vis, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, vf).to(q.dtype)


def sdpa_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool, prefix_len: Optional[Tensor] = None,
    kv_start: Optional[Tensor] = None, kv_len: Optional[Tensor] = None, q_offset: int = 0,
    scale: Optional[float] = None,
) -> Tensor:
    B, n, Tq, d = q.shape
    g, Tk = k.shape[1], k.shape[2]
    gqa = n != g
    plain = kv_start is None and kv_len is None and prefix_len is None
    if gqa and Tq == 1:
        # One decode step: the n/g query heads of a group share their KV head and their mask row, so
        # fold them into the query axis. (SDPA's enable_gqa path costs ~7 ms per call on CPU in
        # torch 2.13 whatever the size, which made batch-1 decode attention-bound.)
        mask = None
        if not (plain and (not causal or q_offset == Tk - 1)):
            mask = visible_mask(B, 1, Tk, causal=causal, prefix_len=prefix_len, kv_start=kv_start,
                                kv_len=kv_len, q_offset=q_offset, device=q.device)
        o = F.scaled_dot_product_attention(q.reshape(B, g, n // g, d), k, v, attn_mask=mask, scale=scale)
        return o.reshape(B, n, 1, d)
    if gqa and q.device.type == "cpu":
        # See above: on CPU, expanding the KV heads is far cheaper than SDPA's enable_gqa path.
        k, v = _expand_kv(k, n // g), _expand_kv(v, n // g)
        gqa = False
    if plain and (not causal or (Tq == 1 and q_offset == Tk - 1)):
        # Nothing hidden: full attention (or one decode step that sees the whole cache).
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    if plain and causal and Tq == Tk and q_offset == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = visible_mask(B, Tq, Tk, causal=causal, prefix_len=prefix_len, kv_start=kv_start,
                        kv_len=kv_len, q_offset=q_offset, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


AttentionFn = Callable[..., Tensor]
BACKENDS: dict[str, AttentionFn] = {
    "reference": reference_attention,
    "sdpa": sdpa_attention,
}


# Limits of the backends that do not run everywhere torch does: the device types they have kernels
# for, and a check of the rest (dtype, head dim) that says why a call cannot go there.
BACKEND_DEVICES: dict[str, set[str]] = {}
SupportsFn = Callable[[Optional[str], Optional[torch.dtype], Optional[int]], Optional[str]]
BACKEND_SUPPORTS: dict[str, SupportsFn] = {}


# Backends that exist in principle but could not be loaded here: name -> why (shown when one is asked for).
MISSING_BACKENDS: dict[str, str] = {}


def register_backend(name: str, fn: Optional[AttentionFn], devices: Optional[set[str]] = None,
                     supports: Optional[SupportsFn] = None, why_missing: Optional[str] = None) -> None:
    """Add a backend (the fused kernels register themselves here), optionally limited to some device
    types (``{"cpu"}``, ``{"cpu", "cuda"}``) and by ``supports(device_type, dtype, head_dim)``, which
    returns why those tensors cannot go there (None when they can). ``fn=None`` records a backend that
    could not be loaded, with ``why_missing`` for the error of whoever asks for it."""
    if fn is None:
        BACKENDS.pop(name, None)
        MISSING_BACKENDS[name] = why_missing or "it could not be loaded"
        return
    MISSING_BACKENDS.pop(name, None)
    BACKENDS[name] = fn
    for table, value in ((BACKEND_DEVICES, None if devices is None else set(devices)), (BACKEND_SUPPORTS, supports)):
        if value is None:
            table.pop(name, None)
        else:
            table[name] = value


def _unsupported(name: str, device_type: Optional[str], dtype: Optional[torch.dtype],
                 head_dim: Optional[int]) -> Optional[str]:
    """Why backend ``name`` cannot take these tensors (None when it can)."""
    if device_type is not None and name in BACKEND_DEVICES and device_type not in BACKEND_DEVICES[name]:
        return f"has no kernel for {device_type} tensors (it runs on {', '.join(sorted(BACKEND_DEVICES[name]))})"
    if name in BACKEND_SUPPORTS:
        return BACKEND_SUPPORTS[name](device_type, dtype, head_dim)
    return None


def resolve_backend(name: str, device_type: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                    head_dim: Optional[int] = None) -> AttentionFn:
    """The backend called ``name``; ``auto`` = ``fused`` where it has a kernel for this device type,
    dtype and head dim, else ``sdpa`` (the static rule: `attention` refines it by the call's shape with
    `auto_backend`)."""
    if name == "auto":
        fused_ok = "fused" in BACKENDS and _unsupported("fused", device_type, dtype, head_dim) is None
        name = "fused" if fused_ok else "sdpa"
    try:
        fn = BACKENDS[name]
    except KeyError:
        hint = f" ({MISSING_BACKENDS[name]})" if name in MISSING_BACKENDS else ""
        raise ArgumentError(f"unknown attention backend {name!r}{hint}; available: "
                         f"{', '.join(['auto', *BACKENDS])}") from None
    why = _unsupported(name, device_type, dtype, head_dim)
    if why is not None:
        raise ArgumentError(f"attention backend {name!r} {why}; use backend 'auto' or 'sdpa'")
    return fn


# ------------------------------------------------------------------------------------------------
# `auto` by shape: fused or sdpa, whichever this machine measured faster for the call's bucket

# Work of one calibration call on CPU (multiply-adds of QK^T and PV, times 3.5 with the backward; a GPU,
# ~10^4 times faster, gets `CALIBRATION_GPU_FACTOR` times more): the batch and the KV groups are cut
# down to stay near it, so measuring a bucket (both backends, a warm-up and two timed calls each) takes
# tens of ms. A bucket whose single row of one KV group is 4 times over is not measured: the static
# rule decides there (on CPU, at such lengths, the fused kernels' tile skipping is what wins).
CALIBRATION_MACS = 3e7
CALIBRATION_GPU_FACTOR = 1e5


def _bucket(t: int) -> int:
    """Lengths 1..16 are their own bucket (decode steps); longer ones round up to a power of two."""
    return t if t <= 16 else 1 << (t - 1).bit_length()


def _mask_kind(causal: bool, prefix_len, kv_start, kv_len) -> str:
    if prefix_len is None and kv_start is None and kv_len is None:
        return "causal" if causal else "full"
    return "masked"


def calibration_key(q: Tensor, k: Tensor, *, causal: bool, prefix_len=None, kv_start=None, kv_len=None,
                    train: bool) -> str:
    """The shape bucket of an attention call, as `glm.tuning` stores its choice."""
    B, n, Tq, d = q.shape
    return (f"attention|{q.device.type}|{str(q.dtype).replace('torch.', '')}|d{d}|q{_bucket(Tq)}|k{_bucket(k.shape[2])}"
            f"|gqa{n // k.shape[1]}|{_mask_kind(causal, prefix_len, kv_start, kv_len)}|{'train' if train else 'infer'}"
            f"|threads{torch.get_num_threads()}")


def _measure(q: Tensor, k: Tensor, *, causal: bool, kind: str, train: bool) -> dict[str, float]:
    """Seconds per call of ``fused`` and ``sdpa`` (forward, plus backward when ``train``) on random
    tensors of the bucket's shape: the bucket's lengths, the call's head dim and query heads per KV
    head, and as many KV heads and rows as fit ~`CALIBRATION_MACS` ({} when even one is too much). A
    ``masked`` bucket is timed with a bidirectional prefix of half the rows, the GLM objective's
    structure."""
    B, n, Tq, d = q.shape
    g, Tk = k.shape[1], k.shape[2]
    Tq_b, Tk_b = _bucket(Tq), max(_bucket(Tk), _bucket(Tq))
    budget = CALIBRATION_MACS * (CALIBRATION_GPU_FACTOR if q.device.type == "cuda" else 1)
    per_group = (n // g) * Tq_b * Tk_b * d * 2 * (3.5 if train else 1.0)  # one row, one KV head
    if per_group > 4 * budget:
        return {}
    g = max(1, min(g, int(budget // per_group)))
    n = g * (n // k.shape[1])
    rows = max(1, min(B, int(budget // (per_group * g))))
    gen = torch.Generator(device=q.device).manual_seed(0)

    def rand(heads: int, t: int) -> Tensor:
        x = torch.randn(rows, heads, t, d, generator=gen, device=q.device, dtype=torch.float32).to(q.dtype)
        return x.requires_grad_(train)

    qq, kk, vv = rand(n, Tq_b), rand(g, Tk_b), rand(g, Tk_b)
    structure = {}
    if kind == "masked":
        structure["prefix_len"] = torch.full((rows,), Tq_b // 2, dtype=torch.int64, device=q.device)
    offset = Tk_b - Tq_b
    grad = torch.randn(qq.shape, generator=gen, device=q.device, dtype=torch.float32).to(q.dtype)

    def call(fn: AttentionFn) -> float:
        if q.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.set_grad_enabled(train):
            out = fn(qq, kk, vv, causal=causal, q_offset=offset, **structure)
            if train:
                torch.autograd.backward(out, grad)
        if q.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    fns = {"fused": BACKENDS["fused"], "sdpa": BACKENDS["sdpa"]}
    for fn in fns.values():  # warm-up: first-call allocations and lazy initialisation
        call(fn)
    best = {name: math.inf for name in fns}
    for _ in range(2):  # alternated, so a burst of load elsewhere hits both
        for name, fn in fns.items():
            best[name] = min(best[name], call(fn))
    return best


def auto_backend(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, prefix_len: Optional[Tensor] = None,
                 kv_start: Optional[Tensor] = None, kv_len: Optional[Tensor] = None) -> str:
    """What ``auto`` runs for this call: ``sdpa`` where the fused kernels cannot take the tensors or this
    machine measured sdpa faster for the call's bucket (`calibration_key`), else ``fused``.

    Measuring happens once per bucket and machine (`glm.tuning`); it is skipped, leaving ``fused``,
    while torch.compile traces or a CUDA graph captures, and when measuring is off."""
    if "fused" not in BACKENDS or _unsupported("fused", q.device.type, q.dtype, q.shape[-1]) is not None:
        return "sdpa"
    train = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    key = calibration_key(q, k, causal=causal, prefix_len=prefix_len, kv_start=kv_start, kv_len=kv_len, train=train)
    if (torch.compiler.is_compiling() or q.device.type not in ("cpu", "cuda")
            or (q.device.type == "cuda" and torch.cuda.is_current_stream_capturing())):
        return tuning.lookup(key) or "fused"
    kind = _mask_kind(causal, prefix_len, kv_start, kv_len)
    return tuning.choose(key, lambda: _measure(q, k, causal=causal, kind=kind, train=train)) or "fused"


def attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, prefix_len: Optional[Tensor] = None,
    kv_start: Optional[Tensor] = None, kv_len: Optional[Tensor] = None, q_offset: int = 0,
    scale: Optional[float] = None, backend: str = "auto", mask: Optional[Mask] = None,
) -> Tensor:
    """q ``[B, n, Tq, d]``, k/v ``[B, g, Tk, d]`` (``g`` divides ``n``) -> ``[B, n, Tq, d]``.

    The mask is ``mask`` when given (the five structure keywords are then ignored), else the one those
    keywords describe. Checks read shapes and dtypes only, so a captured decode step may run them."""
    if mask is not None:
        causal, prefix_len, kv_start, kv_len, q_offset = (mask.causal, mask.prefix_len, mask.kv_start,
                                                          mask.kv_len, mask.q_offset)
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise InputError(f"attention expects q [B,n,Tq,d] and k, v [B,g,Tk,d]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise InputError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or "
                         f"head dim, or KV heads do not divide query heads")
    B, Tq, Tk = q.shape[0], q.shape[2], k.shape[2]
    for name, t in (("prefix_len", prefix_len), ("kv_start", kv_start), ("kv_len", kv_len)):
        per_query_ok = name != "kv_len" and t is not None and tuple(t.shape) == (B, Tq)
        if t is not None and tuple(t.shape) != (B,) and not per_query_ok:
            raise InputError(f"attention: {name} must have shape [B] = ({B},)"
                             f"{'' if name == 'kv_len' else f' or [B, Tq] = ({B}, {Tq})'}, got {tuple(t.shape)}")
        if t is not None and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
            # A count of key slots: 2.5 would mean something different to each backend.
            raise InputError(f"attention: {name} must be an integer tensor (it counts key slots), got {t.dtype}")
    if q_offset < 0 or q_offset + Tq > Tk:
        raise InputError(f"attention: queries at key indices [{q_offset}, {q_offset + Tq}) do not fit the "
                         f"{Tk} keys; q_offset must be in [0, Tk - Tq]")
    if backend == "auto":
        backend = auto_backend(q, k, v, causal=causal, prefix_len=prefix_len, kv_start=kv_start, kv_len=kv_len)
    fn = resolve_backend(backend, q.device.type, q.dtype, q.shape[-1])
    return fn(q, k, v, causal=causal, prefix_len=prefix_len, kv_start=kv_start, kv_len=kv_len, q_offset=q_offset,
              scale=scale)
