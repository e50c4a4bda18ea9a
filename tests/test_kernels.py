"""The compiled attention kernels (`glm.kernels`, ops ``torch.ops.glm.*``) against the oracle.

Tolerances come from the oracle (STYLE.md practice 5): in dtype X the kernel passes when its error
is at most 3x the error of plain PyTorch doing the same dense-mask math (matmul, masked softmax,
matmul; autograd for the gradients) in X on the same inputs, plus a tiny floor relative to the
result's scale. Errors are measured against that math in float64 on the same (already rounded)
inputs: in fp32 the plain math *is* glm.attention's fp32 oracle, so its own rounding sets the fp32
tolerance. (Against the fp32 oracle itself, plain fp32 would have error 0 and a badly conditioned
case -- peaky softmax, large scores -- would then need a fixed floor well above the kernel's typical
error; float64 measures the conditioning instead.) `reference_attention` is checked to be that
fp32 math.

Rows that see no key (every key they would see, their own included, is padding or lies at or past
``kv_len``) have no defined softmax: `reference_attention` gives NaN there. They are left out of
every comparison and checked on their own: output 0, lse -inf, and no gradient.

Large logits (LARGE_LOGITS): recomputing P = exp(s - lse) from a saved fp32 lse loses ~eps x |lse|
of relative accuracy, which past |logit| ~ 20 exceeded 3x plain autograd's error. The kernels now
save each row's max and log2-sum apart (``stats``) and recompute the scores with the forward's exact
rounding; this example keeps that fixed.

Every test but `test_fallback_without_the_extension` needs the compiled extension and skips cleanly
(with the load error) when it is not built.
"""
from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
import textwrap
from typing import Optional

import pytest
import torch
from conftest import FIXTURE_FAMILIES, reference_dir
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import glm
from glm import kernels
from glm.attention import BACKENDS, reference_attention, resolve_backend, visible_mask
from glm.generate import generate, left_pad
from glm.parity import run_parity

# `glm.attention` is the function (re-exported by glm/__init__), which shadows the module of that name.
attention_module = importlib.import_module("glm.attention")

needs_kernels = pytest.mark.skipif(
    not kernels.available(), reason=f"glm.kernels not built: {kernels.load_error()}")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Relative to max(1, |truth|): ~10 fp32 ulps, for results plain fp32 happens to get (nearly) exact.
FLOOR = 1e-6

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------------------------------------
# Oracle and plain math


def scores_mask(q, k, *, causal, prefix_len=None, kv_start=None, kv_len=None, q_offset=0):
    B, Tq, Tk = q.shape[0], q.shape[2], k.shape[2]
    return visible_mask(B, Tq, Tk, causal=causal, prefix_len=prefix_len, kv_start=kv_start, kv_len=kv_len,
                        q_offset=q_offset)  # [B, 1, Tq, Tk]


def dense_attention(q, k, v, mask: torch.Tensor, scale: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention in the inputs' own dtype, ``(out, lse)``, differentiable.

    Rows with no visible key get out 0 and lse -inf, with zero gradients (no NaN leaks into the
    backward through them), which is what the kernels promise for such rows.
    """
    out, lse, _ = _dense(q, k, v, mask, scale)
    return out, lse


def _dense(q, k, v, mask, scale):
    n, g, d = q.shape[1], k.shape[1], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k, v = k.repeat_interleave(n // g, dim=1), v.repeat_interleave(n // g, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    empty = ~mask.any(-1, keepdim=True)  # [B, 1, Tq, 1]
    s = s.masked_fill(~mask | empty, float("-inf")).masked_fill(empty, 0.0)  # empty rows: dummy zeros
    p = torch.softmax(s, dim=-1).masked_fill(empty, 0.0)
    out = torch.matmul(p, v)
    lse = torch.logsumexp(s, dim=-1).masked_fill(empty[..., 0], float("-inf"))
    return out, lse, p


def oracle(q, k, v, mask, scale=None):
    """The fp32 oracle on the (already rounded) inputs."""
    return dense_attention(q.float(), k.float(), v.float(), mask, scale)


def truth(q, k, v, mask, scale=None):
    """The oracle's math in float64, what every error is measured against."""
    return dense_attention(q.double(), k.double(), v.double(), mask, scale)


def max_err(x: torch.Tensor, ref: torch.Tensor, keep: torch.Tensor) -> float:
    diff = (x.float() - ref.float()).abs().masked_select(keep.expand_as(ref))
    return diff.max().item() if diff.numel() else 0.0


def assert_within_oracle_tolerance(what: str, got, ref, plain, keep, ctx: str = "",
                                   magnitude: Optional[float] = None, max_logit: float = 0.0) -> None:
    """|got - ref| <= 3 |plain - ref| + floor * magnitude over the kept entries.

    ``magnitude`` (default max(1, |ref|)) is the size of the largest terms summed into the result.
    The floor is FLOOR for fp32 results and one ulp of the result's dtype for bf16/fp16: storing the
    result rounds it once even for an exact kernel, and on a handful of entries plain PyTorch can
    happen to round closer, which a pure 3x rule would then hold against the kernel.

    ``max_logit`` (the largest |scaled score|) adds the conditioning of the softmax to the fp32
    floor: a score s is only known to eps * |s| whatever computes it, which moves its probability by
    that much relative. Plain PyTorch can land far closer on a given example (seen: a 6-key row at
    logits ~30, plain 2.5e-7, the kernel 4.2e-6 vs a 1e-6 floor), so 3x its error alone is no bound.
    """
    if magnitude is None:
        ref_abs = ref.float().abs().masked_select(keep.expand_as(ref))
        magnitude = max(1.0, ref_abs.max().item() if ref_abs.numel() else 0.0)
    err, err_plain = max_err(got, ref, keep), max_err(plain, ref, keep)
    if got.dtype == torch.float32:
        floor = (FLOOR + 2 * torch.finfo(torch.float32).eps * max_logit) * magnitude
    else:
        floor = torch.finfo(got.dtype).eps * magnitude
    tol = 3 * err_plain + floor
    assert err <= tol, (f"{what}: max error {err:.3e} > 3 x plain-PyTorch error {err_plain:.3e} + "
                        f"floor {floor:.1e} {ctx}")


def grad_magnitudes(q, k, v, mask, scale, go, gl) -> tuple[float, float, float]:
    """The largest sum of |terms| that makes up an entry of dq, dk, dv (float64).

    With P the probabilities, dS = P o (dO V^T - rowsum(dO o O) + g_lse): dq = scale dS K,
    dk = scale dS^T Q, dv = P^T dO. When the exact gradient is ~0 by cancellation (one visible key:
    dS = 0 exactly), plain autograd can land on exactly 0 while any other evaluation order -- the
    kernel's FlashAttention-2 backward forms rowsum(dO o O) from the saved output -- leaves a few
    ulps of these terms. The floor is relative to them, not to the (zero) result.
    """
    B, n, Tq, d = q.shape
    g = k.shape[1]
    q, k, v, go = (t.double() for t in (q, k, v, go))
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    K, V = k.repeat_interleave(n // g, dim=1).abs(), v.repeat_interleave(n // g, dim=1).abs()
    out, _, P = _dense(q, k, v, mask, scale)
    rows = (go.abs() * out.abs()).sum(-1, keepdim=True)
    if gl is not None:
        rows = rows + gl.double().abs().unsqueeze(-1)
    dS = P * (go.abs() @ V.transpose(-1, -2) + rows)
    dq = scale * dS @ K
    dk = (scale * dS.transpose(-1, -2) @ q.abs()).view(B, g, n // g, -1, d).sum(2)
    dv = (P.transpose(-1, -2) @ go.abs()).view(B, g, n // g, -1, d).sum(2)
    return dq.max().item(), dk.max().item(), dv.max().item()


def fused_ops_args(q, k, prefix_len, kv_start, kv_len):
    return kernels.structure(q, k, prefix_len, kv_start, kv_len)


def make_qkv(B, n, g, Tq, Tk, d, seed, dtype=torch.float32, temp=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, n, Tq, d, generator=gen) * temp
    k = torch.randn(B, g, Tk, d, generator=gen)
    v = torch.randn(B, g, Tk, d, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


# ------------------------------------------------------------------------------------------------
# Random problems


@st.composite
def problems(draw, max_t: int = 150):
    """Sizes, GQA, head dim, q_offset, causal, and every kind of structure the ops take."""
    B = draw(st.integers(1, 3))
    g = draw(st.sampled_from([1, 2]))
    n = g * draw(st.sampled_from([1, 2, 4]))
    d = draw(st.sampled_from([8, 40, 64, 128]))
    Tk = draw(st.integers(1, max_t))
    Tq = draw(st.one_of(st.just(Tk), st.just(1), st.integers(1, Tk)))
    q_offset = draw(st.sampled_from([Tk - Tq, 0]))  # a chunk after the cache / a static cache's start
    filled = q_offset + Tq
    causal = draw(st.booleans())
    per_sample = lambda lo, hi: torch.tensor([draw(st.integers(lo, hi)) for _ in range(B)])  # noqa: E731
    pkind = draw(st.sampled_from(["none", "zero", "partial", "full", "per_sample", "per_query"]))
    prefix_len = {
        "none": lambda: None,
        "zero": lambda: torch.zeros(B, dtype=torch.long),
        "partial": lambda: torch.full((B,), draw(st.integers(0, Tk))),
        "full": lambda: torch.full((B,), Tk),
        "per_sample": lambda: per_sample(0, Tk),
        "per_query": lambda: torch.tensor([[draw(st.integers(0, Tk)) for _ in range(Tq)] for _ in range(B)]),
    }[pkind]()
    skind = draw(st.sampled_from(["none", "per_sample", "per_query"]))
    kv_start = {
        "none": lambda: None,
        "per_sample": lambda: per_sample(0, filled),  # left padding, up to whole pad rows
        "per_query": lambda: torch.tensor([[draw(st.integers(0, q_offset + t)) for t in range(Tq)]
                                           for _ in range(B)]),  # packed documents
    }[skind]()
    lkind = draw(st.sampled_from(["none", "covers_queries", "any"]))
    kv_len = {
        "none": lambda: None,
        "covers_queries": lambda: per_sample(filled, Tk),  # a static cache's unused tail
        "any": lambda: per_sample(0, Tk),  # may hide queries' own keys: rows that see nothing
    }[lkind]()
    scale = draw(st.sampled_from([None, None, 0.05, 0.7]))
    temp = draw(st.sampled_from([1.0, 4.0]))  # 4: peaky softmax, large running-max updates
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(B=B, n=n, g=g, d=d, Tq=Tq, Tk=Tk, q_offset=q_offset, causal=causal, prefix_len=prefix_len,
                kv_start=kv_start, kv_len=kv_len, scale=scale, temp=temp, seed=seed)


def mask_kw(p: dict) -> dict:
    return dict(causal=p["causal"], prefix_len=p["prefix_len"], kv_start=p["kv_start"], kv_len=p["kv_len"],
                q_offset=p["q_offset"])


def describe(p: dict) -> str:
    return "[" + ", ".join(f"{k}={v.tolist() if torch.is_tensor(v) else v}" for k, v in p.items()) + "]"


def problem(B=1, n=1, g=1, d=8, Tq=1, Tk=1, q_offset=0, causal=True, prefix_len=None, kv_start=None,
            kv_len=None, scale=None, temp=1.0, seed=0) -> dict:
    """An explicit problem, for @example."""
    t = lambda x: None if x is None else torch.tensor(x)  # noqa: E731
    return dict(B=B, n=n, g=g, d=d, Tq=Tq, Tk=Tk, q_offset=q_offset, causal=causal, prefix_len=t(prefix_len),
                kv_start=t(kv_start), kv_len=t(kv_len), scale=scale, temp=temp, seed=seed)


# Tile edges: 128-key tiles, 128/(n/g)-row query blocks (several -> packed keys), 64-row backward tiles.
EDGES = [
    problem(B=2, n=4, g=2, d=40, Tq=129, Tk=129, prefix_len=[70, 0], kv_start=[0, 3]),
    problem(B=1, n=2, g=2, d=128, Tq=65, Tk=150, q_offset=85, causal=True, prefix_len=[140], kv_len=[150]),
    problem(B=3, n=8, g=2, d=64, Tq=33, Tk=128, q_offset=95, prefix_len=[128, 10, 97], kv_start=[0, 128, 40],
            kv_len=[128, 128, 100]),
    problem(B=2, n=1, g=1, d=8, Tq=1, Tk=131, q_offset=130, kv_start=[129, 0], kv_len=[131, 64]),
]


# Peaky softmax, logits up to ~100: the backward must recompute the probabilities as accurately as
# plain autograd does (see the module docstring).
LARGE_LOGITS = problem(B=1, n=1, g=1, d=128, Tq=4, Tk=50, q_offset=46, causal=False, scale=0.7, temp=4.0)


# ------------------------------------------------------------------------------------------------
# 1. Forward (out and lse) against the oracle


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@settings(max_examples=25, **SETTINGS)
@given(p=problems())
@example(p=EDGES[0]).via("tile edges")
@example(p=EDGES[1]).via("tile edges")
@example(p=EDGES[2]).via("tile edges")
@example(p=EDGES[3]).via("tile edges")
def test_forward_matches_oracle(dtype, p):
    check_forward(p, dtype)


def check_forward(p: dict, dtype: torch.dtype, device: str = "cpu") -> None:
    """The forward and decode ops on ``device`` against the oracle (computed on the CPU)."""
    q, k, v = make_qkv(p["B"], p["n"], p["g"], p["Tq"], p["Tk"], p["d"], p["seed"], dtype, p["temp"])
    kw = mask_kw(p)
    mask = scores_mask(q, k, **kw)
    empty = ~mask.any(-1)  # [B, 1, Tq]
    keep_o, keep_l = ~empty[..., None], ~empty
    ref_o, ref_l = truth(q, k, v, mask, p["scale"])
    # In fp32 the plain math is glm.attention's oracle (on the rows where that one is defined).
    proj, fp32_o = reference_attention(q.float(), k.float(), v.float(), scale=p["scale"], **kw), oracle(
        q, k, v, mask, p["scale"])[0]
    assert max_err(proj, fp32_o, keep_o) <= 1e-6 * max(1.0, fp32_o.abs().max().item())
    plain_o, plain_l = dense_attention(q, k, v, mask, p["scale"])

    scale = 1.0 / math.sqrt(p["d"]) if p["scale"] is None else p["scale"]
    n, g = p["n"], p["g"]
    logits = (q.double() @ k.double().repeat_interleave(n // g, dim=1).transpose(-1, -2)).abs() * scale
    max_logit = logits.masked_select(mask.expand_as(logits)).max().item() if mask.any() else 0.0
    qd, kd, vd = (t.to(device) for t in (q, k, v))
    args = fused_ops_args(qd, kd, p["prefix_len"], p["kv_start"], p["kv_len"])
    ops = [("attention_fwd", torch.ops.glm.attention_fwd)]
    if p["Tq"] <= kernels.DECODE_MAX_Q:
        ops.append(("attention_decode", torch.ops.glm.attention_decode))
    for name, op in ops:
        out, lse, stats = (t.cpu() for t in op(qd, kd, vd, *args, p["causal"], p["q_offset"], scale))
        assert stats.shape == (*q.shape[:3], 2) and stats.dtype == torch.float32
        assert out.shape == q.shape and out.dtype == dtype
        assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
        ctx = f"({name}, {dtype}, {device}) {describe(p)}"
        assert torch.isfinite(out).all(), f"non-finite output {ctx}"
        assert_within_oracle_tolerance(f"{name} out", out, ref_o, plain_o, keep_o, ctx, max_logit=max_logit)
        assert_within_oracle_tolerance(f"{name} lse", lse, ref_l, plain_l, keep_l, ctx, max_logit=max_logit)
        # Rows that see no key: exactly 0 and -inf.
        e = empty.expand_as(lse)
        assert (out[e.unsqueeze(-1).expand_as(out)] == 0).all(), f"empty rows not zero {ctx}"
        assert (lse[e] == float("-inf")).all(), f"empty rows' lse not -inf {ctx}"
        assert torch.isfinite(lse[~e]).all(), f"non-finite lse on a row that sees keys {ctx}"


@needs_kernels
def test_forward_hand_checked_values():
    """One case small enough to check by hand, so the oracle is not the only statement of the rule."""
    q = torch.zeros(1, 1, 3, 4)
    k = torch.zeros(1, 1, 3, 4)
    v = torch.arange(12, dtype=torch.float32).view(1, 1, 3, 4)
    # Zero scores: the output is the mean of the visible value rows, lse = log(#visible).
    out, lse = kernels.attention_with_lse(q, k, v, causal=True, prefix_len=torch.tensor([2]))
    want = torch.stack([v[0, 0, :2].mean(0), v[0, 0, :2].mean(0), v[0, 0].mean(0)])
    torch.testing.assert_close(out[0, 0], want)
    torch.testing.assert_close(lse[0, 0], torch.tensor([2.0, 2.0, 3.0]).log())


# ------------------------------------------------------------------------------------------------
# 2. Gradients


def _grads(fn, q, k, v, go, gl):
    """Gradients of sum(out * go) [+ sum(lse * gl)] wrt q, k, v, with fn(q, k, v) -> (out, lse)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    loss = (out * go).sum()
    if gl is not None:
        loss = loss + (torch.where(torch.isfinite(lse), lse, 0.0) * gl).sum()
    loss.backward()
    return out, q.grad, k.grad, v.grad


def _check_grads(p, dtype, through_lse: bool, device: str = "cpu"):
    """Gradients of the fused op on ``device`` (through lse too if asked) against the oracle's."""
    q, k, v = make_qkv(p["B"], p["n"], p["g"], p["Tq"], p["Tk"], p["d"], p["seed"], dtype, p["temp"])
    kw = mask_kw(p)
    mask = scores_mask(q, k, **kw)
    empty = ~mask.any(-1)  # [B, 1, Tq]
    gen = torch.Generator().manual_seed(p["seed"] + 1)
    go = torch.randn(q.shape, generator=gen).masked_fill(empty[..., None], 0.0).to(dtype)
    gl = torch.randn(q.shape[:3], generator=gen).masked_fill(empty, 0.0) if through_lse else None

    def fused(q_, k_, v_):
        out, lse = kernels.attention_with_lse(q_.to(device), k_.to(device), v_.to(device), scale=p["scale"], **kw)
        return out.cpu(), lse.cpu()

    _, dq, dk, dv = _grads(fused, q, k, v, go, gl)
    _, rq, rk, rv = _grads(lambda *t: truth(*t, mask, p["scale"]), q.double(), k.double(), v.double(), go.double(),
                           None if gl is None else gl.double())
    _, pq, pk, pv = _grads(lambda *t: dense_attention(*t, mask, p["scale"]), q, k, v, go, gl)
    ctx = f"({dtype}, {device}, through_lse={through_lse}) {describe(p)}"
    everything = torch.ones((), dtype=torch.bool)
    mags = grad_magnitudes(q, k, v, mask, p["scale"], go, gl)
    for name, got, ref, plain, mag in zip(("dq", "dk", "dv"), (dq, dk, dv), (rq, rk, rv), (pq, pk, pv), mags):
        assert got.shape == ref.shape and got.dtype == dtype, name
        assert torch.isfinite(got).all(), f"non-finite {name} {ctx}"
        assert_within_oracle_tolerance(name, got, ref, plain, everything, ctx, magnitude=mag)
    assert (dq[empty[..., None].expand_as(dq)] == 0).all(), f"dq of rows that see no key is not 0 {ctx}"


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@settings(max_examples=12, **SETTINGS)
@given(p=problems())
@example(p=EDGES[0]).via("tile edges")
@example(p=EDGES[2]).via("tile edges")
@example(p=LARGE_LOGITS).via("fp32 backward precision at large logits")
def test_gradients_match_oracle(dtype, p):
    _check_grads(p, dtype, through_lse=False)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@settings(max_examples=8, **SETTINGS)
@given(p=problems(max_t=80))
@example(p=EDGES[1]).via("tile edges")
@example(p=LARGE_LOGITS).via("fp32 backward precision at large logits")
def test_gradient_through_lse_matches_oracle(dtype, p):
    """loss = sum(out * g) + sum(lse * h): the lse gradient enters the backward too."""
    _check_grads(p, dtype, through_lse=True)


@needs_kernels
def test_gradient_through_lse_alone():
    """Only lse in the loss: d lse / d s = softmax, so dv is 0 and dq, dk match the oracle's."""
    q, k, v = make_qkv(2, 4, 2, 7, 9, 16, seed=11)
    kw = dict(causal=True, prefix_len=torch.tensor([4, 0]), kv_start=torch.tensor([0, 2]), q_offset=2)
    mask = scores_mask(q, k, **kw)
    h = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(3))
    grads = []
    for fn in (lambda *t: kernels.attention_with_lse(*t, **kw), lambda *t: oracle(*t, mask)):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        (fn(qq, kk, vv)[1] * h).sum().backward()
        grads.append((qq.grad, kk.grad, vv.grad))
    (dq, dk, dv), (rq, rk, rv) = grads
    assert (dv == 0).all()
    torch.testing.assert_close(dq, rq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dk, rk, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# 3. Decode against a long static cache


class OpRecorder(TorchDispatchMode):
    """Records the names of the aten/custom ops that run inside it."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def eight_threads():
    """The decode kernel sizes its key chunks from the thread count: 8 threads -> 4 to 12 chunks of
    the 1500-key caches below on any machine (2 CI cores would give one chunk for a batch of 4)."""
    before = torch.get_num_threads()
    torch.set_num_threads(8)
    yield
    torch.set_num_threads(before)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,n,g,d", [(1, 4, 1, 64), (4, 8, 2, 40)])
@pytest.mark.parametrize("Tq", [1, 2, 3, 4])
def test_decode_matches_forward_and_oracle_on_long_cache(eight_threads, dtype, B, n, g, d, Tq):
    Tk = 1500  # the cache's capacity: split into several key chunks
    L = 1300  # tokens already in the cache; the new ones sit at [L, L + Tq)
    q, k, v = make_qkv(B, n, g, Tq, Tk, d, seed=100 + Tq, dtype=dtype)
    # Per sample: a static cache whose tail is unused, one that exposes stale slots past the queries,
    # heavy left padding (whole chunks of it), and a row that sees no key at all (all padding).
    kv_len = torch.tensor([L + Tq, Tk, L + Tq, 3][:B])
    kv_start = torch.tensor([0, 700, 1290, 3][:B])
    prefix_len = torch.tensor([37, 0, 1295, L][:B])
    kw = dict(causal=True, prefix_len=prefix_len, kv_start=kv_start, kv_len=kv_len, q_offset=L)
    args = fused_ops_args(q, k, prefix_len, kv_start, kv_len)
    scale = 1.0 / math.sqrt(d)
    dec_o, dec_l, _ = torch.ops.glm.attention_decode(q, k, v, *args, True, L, scale)
    fwd_o, fwd_l, _ = torch.ops.glm.attention_fwd(q, k, v, *args, True, L, scale)

    mask = scores_mask(q, k, **kw)
    empty = ~mask.any(-1)
    ref_o, ref_l = truth(q, k, v, mask)
    plain_o, plain_l = dense_attention(q, k, v, mask, None)
    for name, o, lse in (("decode", dec_o, dec_l), ("fwd", fwd_o, fwd_l)):
        assert_within_oracle_tolerance(f"{name} out", o, ref_o, plain_o, ~empty[..., None])
        assert_within_oracle_tolerance(f"{name} lse", lse, ref_l, plain_l, ~empty)
    if B == 4:
        assert empty[3].all() and (dec_o[3] == 0).all() and (dec_l[3] == float("-inf")).all()
    # Decode and forward: the same math, only the order of the key chunks' merge differs.
    keep = ~empty
    torch.testing.assert_close(dec_l[keep.expand_as(dec_l)], fwd_l[keep.expand_as(fwd_l)], atol=1e-5, rtol=1e-5)
    atol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps * max(1.0, ref_o.abs().max().item())
    torch.testing.assert_close(dec_o.float(), fwd_o.float(), atol=atol, rtol=0)


@needs_kernels
def test_attention_with_lse_takes_the_decode_path_for_inference():
    B, n, g, d, Tk, L = 2, 4, 2, 32, 700, 650
    q, k, v = make_qkv(B, n, g, 1, Tk, d, seed=7)
    kw = dict(causal=True, prefix_len=torch.tensor([10, 0]), kv_start=torch.tensor([0, 300]),
              kv_len=torch.tensor([L + 1, L + 1]), q_offset=L)
    with torch.no_grad(), OpRecorder() as rec:
        out, lse = kernels.attention_with_lse(q, k, v, **kw)
    assert "glm::attention_decode" in rec.names and "glm::attention_fwd" not in rec.names
    ref = torch.ops.glm.attention_decode(q, k, v, *fused_ops_args(q, k, kw["prefix_len"], kw["kv_start"],
                                                                  kw["kv_len"]), True, L, 1 / math.sqrt(d))
    assert torch.equal(out, ref[0]) and torch.equal(lse, ref[1])
    mask = scores_mask(q, k, **kw)
    torch.testing.assert_close(out, oracle(q, k, v, mask)[0], atol=1e-5, rtol=1e-5)
    # With a gradient to compute, or too many query rows, it is the forward kernel.
    with OpRecorder() as rec:
        kernels.attention_with_lse(q.clone().requires_grad_(), k, v, **kw)
    assert "glm::attention_fwd" in rec.names and "glm::attention_decode" not in rec.names
    q17 = make_qkv(B, n, g, kernels.DECODE_MAX_Q + 1, Tk, d, seed=8)[0]
    with torch.no_grad(), OpRecorder() as rec:
        kernels.attention_with_lse(q17, k, v, causal=True, q_offset=L)
    assert "glm::attention_fwd" in rec.names and "glm::attention_decode" not in rec.names


# ------------------------------------------------------------------------------------------------
# 4. Non-contiguous inputs


@needs_kernels
@pytest.mark.parametrize("Tq", [1, 40], ids=["decode", "prefill"])
def test_non_contiguous_inputs_give_the_contiguous_result(Tq):
    B, n, g, d, Tmax, L = 2, 4, 2, 40, 200, 60
    Tk = L + Tq
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(B, Tq, (n + 2) * d, generator=gen)  # a fused qkv projection's output, [B, T, (n+2g)d]
    q = x[..., :n * d].view(B, Tq, n, d).transpose(1, 2)  # [B, n, Tq, d] view, as glm.model makes it
    cache_k = torch.randn(B, g, Tmax, d, generator=gen)
    cache_v = torch.randn(B, g, Tmax, d, generator=gen)
    k, v = cache_k[:, :, :Tk], cache_v[:, :, :Tk]  # slices of a static cache
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    kw = dict(causal=True, prefix_len=torch.tensor([20, 0]), kv_start=torch.tensor([0, 5]), q_offset=L)
    args = (*fused_ops_args(q, k, kw["prefix_len"], kw["kv_start"], None), True, L, 1 / math.sqrt(d))
    # Non-contiguous q, k, v; k and v with different strides; a last dim that is not unit-stride.
    v_other = torch.randn(B, g, d, Tk, generator=gen).transpose(2, 3)
    v_other.copy_(v)
    q_strided = torch.randn(B, n, Tq, 2 * d, generator=gen)[..., ::2]
    q_strided.copy_(q)
    for op in (torch.ops.glm.attention_fwd, torch.ops.glm.attention_decode):
        want = op(q.contiguous(), k.contiguous(), v.contiguous(), *args)
        for qq, kk, vv in ((q, k, v), (q, k, v_other), (q_strided, k, v)):
            got = op(qq, kk, vv, *args)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), op
    # Backward through non-contiguous views (of leaves laid out as [B, T, n, d] and as a static cache).
    go = torch.randn(B, Tq, n, d, generator=gen).transpose(1, 2)
    x_leaf, ck_leaf, cv_leaf = (t.clone().requires_grad_() for t in (x, cache_k, cache_v))
    q_view = x_leaf[..., :n * d].view(B, Tq, n, d).transpose(1, 2)
    out = kernels.attention_with_lse(q_view, ck_leaf[:, :, :Tk], cv_leaf[:, :, :Tk], **kw)[0]
    (out * go).sum().backward()
    leaves = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    out = kernels.attention_with_lse(*leaves, **kw)[0]
    (out * go.contiguous()).sum().backward()
    assert torch.equal(x_leaf.grad[..., :n * d].view(B, Tq, n, d).transpose(1, 2), leaves[0].grad)
    assert (x_leaf.grad[..., n * d:] == 0).all()
    assert torch.equal(ck_leaf.grad[:, :, :Tk], leaves[1].grad) and (ck_leaf.grad[:, :, Tk:] == 0).all()
    assert torch.equal(cv_leaf.grad[:, :, :Tk], leaves[2].grad) and (cv_leaf.grad[:, :, Tk:] == 0).all()


# ------------------------------------------------------------------------------------------------
# 5. opcheck


def _opcheck_sample(Tq=5, requires_grad=False):
    B, n, g, Tk, d = 2, 4, 2, 7, 8
    q, k, v = make_qkv(B, n, g, Tq, Tk, d, seed=9)
    if requires_grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    pl, ks, kl = kernels.structure(q, k, torch.tensor([3, 0]), torch.tensor([0, 1]), torch.tensor([7, 6]))
    return q, k, v, pl, ks, kl, True, Tk - Tq, 1 / math.sqrt(d)


@needs_kernels
def test_opcheck_attention_fwd():
    torch.library.opcheck(torch.ops.glm.attention_fwd.default, _opcheck_sample(requires_grad=True))


@needs_kernels
def test_opcheck_attention_bwd():
    q, k, v, pl, ks, kl, causal, off, scale = _opcheck_sample()
    out, lse, stats = torch.ops.glm.attention_fwd(q, k, v, pl, ks, kl, causal, off, scale)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    torch.library.opcheck(torch.ops.glm.attention_bwd.default,
                          (go, gl, q, k, v, out, stats, pl, ks, kl, causal, off, scale))


@needs_kernels
def test_opcheck_attention_decode():
    torch.library.opcheck(torch.ops.glm.attention_decode.default, _opcheck_sample(Tq=2))


# ------------------------------------------------------------------------------------------------
# 6. torch.compile: fake impls + autograd registration


@needs_kernels
def test_torch_compile_aot_eager_fullgraph_forward_and_backward():
    def fn(q, k, v, prefix_len, kv_start):
        out = kernels.fused_attention(q, k, v, causal=True, prefix_len=prefix_len, kv_start=kv_start, q_offset=2)
        return out.square().sum(), out

    q, k, v = make_qkv(2, 4, 2, 6, 8, 16, seed=12)
    pl, ks = torch.tensor([5, 0]), torch.tensor([0, 2])
    results = []
    for f in (fn, torch.compile(fn, backend="aot_eager", fullgraph=True)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        loss, out = f(*leaves, pl, ks)
        loss.backward()
        results.append((out.detach(), *[t.grad for t in leaves]))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# 7. Model level


def _tiny_model(name: str, std: float = 0.1) -> glm.GLM:
    model = glm.GLM(glm.preset(name)).eval()
    model.init_weights(std=std, seed=0)
    return model


@needs_kernels
@pytest.mark.parametrize("name", ["tiny-glm", "tiny-chatglm", "tiny-glm4-hf", "tiny-chatglm3"])
def test_model_fused_matches_reference_logits_and_grads(name):
    model = _tiny_model(name)
    gen = torch.Generator().manual_seed(0)
    B, T = 2, 24
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=gen)
    kw = dict(pad_left=torch.tensor([0, 5]))
    if model.config.position_streams == 2:  # GLM / ChatGLM-6B: a bidirectional prefix
        kw["prefix_len"] = torch.tensor([10, 17])
    with torch.no_grad():
        ref = model(ids, backend="reference", **kw)
        fused = model(ids, backend="fused", **kw)
    real = torch.arange(T)[None, :] >= kw["pad_left"][:, None]  # left-pad rows are garbage by design
    torch.testing.assert_close(fused[real], ref[real], atol=1e-4, rtol=0)
    # Training: gradients of the loss through the fused backward.
    grads = {}
    for backend in ("reference", "fused"):
        model.zero_grad()
        logits = model(ids, backend=backend, **kw)
        glm.lm_loss(logits[:, :-1], ids[:, 1:].masked_fill(~real[:, 1:], -100)).backward()
        grads[backend] = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    for k, g_ref in grads["reference"].items():
        torch.testing.assert_close(grads["fused"][k], g_ref, atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")


@needs_kernels
@pytest.mark.parametrize("folder", FIXTURE_FAMILIES)
def test_golden_fixtures_pass_with_fused_backend(folder):
    d = reference_dir(folder)
    results = run_parity(glm.from_pretrained(d), cases=d, backend="fused")
    assert len(results) >= 2
    for r in results:
        assert r.passed, f"{folder}: {r.line()}"


@needs_kernels
@pytest.mark.parametrize("name", ["tiny-chatglm3", "tiny-glm"])
def test_greedy_generation_fused_equals_sdpa(name):
    model = _tiny_model(name, std=0.3)
    prompts = [[4, 8, 15, 16, 23, 42, 7, 9, 11, 30, 31, 12, 60, 61, 62, 63, 64, 65, 66], [7, 7, 100], [100, 3, 9, 5]]
    ids, pad = left_pad(prompts, pad_id=0)
    kw = dict(pad_left=pad, max_new_tokens=12)
    if model.config.position_streams == 2:
        kw["prefix_len"] = torch.full((len(prompts),), ids.shape[1])
    tokens = {}
    for backend in ("sdpa", "fused"):
        model.backend = backend
        tokens[backend] = generate(model, ids, **kw)
    assert torch.equal(tokens["fused"], tokens["sdpa"])


# ------------------------------------------------------------------------------------------------
# 8. Backend selection


@needs_kernels
def test_auto_backend_is_fused_on_cpu():
    assert resolve_backend("auto", "cpu") is BACKENDS["fused"] is kernels.fused_attention
    assert "cpu" in kernels.devices()


@needs_kernels
def test_backend_limited_to_another_device_raises(monkeypatch):
    monkeypatch.setattr(attention_module, "BACKENDS", dict(attention_module.BACKENDS))
    monkeypatch.setattr(attention_module, "BACKEND_DEVICES",
                        {k: set(v) for k, v in attention_module.BACKEND_DEVICES.items()})
    monkeypatch.setattr(attention_module, "BACKEND_SUPPORTS", dict(attention_module.BACKEND_SUPPORTS))

    def cuda_only(q, k, v, **kw):
        raise AssertionError("must not run on CPU")

    attention_module.register_backend("cuda_only", cuda_only, devices={"cuda"})
    assert attention_module.resolve_backend("cuda_only", "cuda") is cuda_only
    with pytest.raises(ValueError, match=r"'cuda_only'.*cpu"):
        attention_module.resolve_backend("cuda_only", "cpu")
    q = torch.zeros(1, 2, 3, 8)
    with pytest.raises(ValueError, match=r"'cuda_only'.*cpu"):
        attention_module.attention(q, q, q, backend="cuda_only")
    # A fused backend built for CUDA only: auto falls back to sdpa on CPU.
    attention_module.register_backend("fused", kernels.fused_attention, devices={"cuda"})
    assert attention_module.resolve_backend("auto", "cpu") is attention_module.BACKENDS["sdpa"]
    assert attention_module.resolve_backend("auto", "cuda") is kernels.fused_attention


@needs_kernels
def test_float64_stays_off_the_kernels():
    """The kernels compute in fp32: float64 goes to sdpa under auto; asking for fused is a clear error."""
    assert resolve_backend("auto", "cpu", torch.float64) is BACKENDS["sdpa"]
    assert resolve_backend("auto", "cpu", torch.bfloat16) is BACKENDS["fused"]
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # Float64 all the way: the oracle computes in float64 here, so float64 tolerances apply.
    torch.testing.assert_close(glm.attention(q, q, q), reference_attention(q, q, q, causal=True))
    with pytest.raises(ValueError, match=r"'fused' does not take float64"):
        glm.attention(q, q, q, backend="fused")
    with pytest.raises(RuntimeError, match=r"float32, bfloat16 or float16"):
        torch.ops.glm.attention_fwd(q, q, q, *kernels.structure(q, q, None, None, None), True, 0, 0.3)


@needs_kernels
def test_backend_registry_restored():
    """The monkeypatching above left the real registry alone."""
    assert "cuda_only" not in BACKENDS and BACKENDS is attention_module.BACKENDS
    assert attention_module.BACKEND_DEVICES.get("fused") == kernels.devices()
    assert attention_module.BACKEND_SUPPORTS.get("fused") is kernels.supports


def test_cuda_limits_are_stated():
    """What the CUDA kernels cannot take goes to sdpa under auto (checked without a GPU: the limits
    are a table, whatever this machine has)."""
    assert kernels.supports("cuda", torch.bfloat16, 128) is None
    assert kernels.supports("cuda", torch.float16, 64) is None
    assert "float32" in kernels.supports("cuda", torch.float32, 64)
    assert "multiples of 8" in kernels.supports("cuda", torch.bfloat16, 36)
    assert "128" in kernels.supports("cuda", torch.bfloat16, 256)
    assert kernels.supports("cpu", torch.float32, 40) is None  # the CPU kernels take any head dim
    if "fused" in BACKENDS and "cuda" in attention_module.BACKEND_DEVICES.get("fused", ()):
        assert resolve_backend("auto", "cuda", torch.float32, 64) is BACKENDS["sdpa"]
        assert resolve_backend("auto", "cuda", torch.bfloat16, 64) is BACKENDS["fused"]


# ------------------------------------------------------------------------------------------------
# 9. Without the extension (runs whether or not it is built)


FALLBACK_SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["glm.kernels._C"] = None  # as if the extension were not built
    import torch
    import glm
    from glm import kernels
    from glm.attention import BACKENDS, attention, resolve_backend

    assert not kernels.available()
    assert kernels.devices() == set()
    err = kernels.load_error()
    assert err and "build" in err.lower() and "pip install" in err, err  # says how to (re)build
    assert "fused" not in BACKENDS
    assert resolve_backend("auto", "cpu") is BACKENDS["sdpa"]
    model = glm.GLM(glm.preset("tiny-chatglm3")).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7, 8]]), backend="auto")
    assert logits.shape == (1, 4, 160) and torch.isfinite(logits).all()
    q = torch.zeros(1, 2, 3, 8)
    try:
        attention(q, q, q, backend="fused")
    except ValueError as e:
        assert err in str(e), str(e)
    else:
        raise AssertionError("backend 'fused' did not raise")
    try:
        kernels.fused_attention(q, q, q)
    except RuntimeError as e:
        assert err in str(e)
    else:
        raise AssertionError("fused_attention did not raise")
    print("FALLBACK OK")
""")


def test_fallback_without_the_extension(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    res = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and "FALLBACK OK" in res.stdout, res.stdout + res.stderr


# ------------------------------------------------------------------------------------------------
# 10. Small-batch linear (decode's weight-streaming products)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@settings(max_examples=30, **SETTINGS)
@given(M=st.integers(1, kernels.SMALL_LINEAR_MAX_ROWS), K=st.integers(1, 300), N=st.integers(1, 200),
       bias=st.booleans(), transposed=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_small_linear_matches_linear(dtype, M, K, N, bias, transposed, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen).to(dtype)
    w = torch.randn(N, K, generator=gen).to(dtype)
    if transposed:  # a weight that is a transposed view (copied to rows inside the op)
        w = w.t().contiguous().t()
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    got = torch.ops.glm.small_linear(x, w, b)
    exact = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    plain = torch.nn.functional.linear(x, w, b)
    assert got.shape == (M, N) and got.dtype == dtype
    # Oracle-derived like the attention tests: 3x torch's own error, plus one rounding of the result.
    magnitude = (x.double().abs() @ w.double().abs().t()).max().item() + (0 if b is None else b.abs().max().item())
    assert_within_oracle_tolerance("small_linear", got, exact, plain, torch.ones((), dtype=torch.bool),
                                   magnitude=max(1.0, magnitude))


@needs_kernels
def test_linear_routes_few_rows_without_grad_to_the_kernel_where_measured_faster():
    from glm import tuning
    from glm.kernels.ops import linear_calibration_key

    w, b = torch.randn(64, 32), torch.randn(64)
    for winner in ("small_linear", "torch"):
        tuning.forget()
        tuning.inject({linear_calibration_key(r, w): winner for r in range(1, kernels.SMALL_LINEAR_MAX_ROWS + 1)})
        for rows, expect_kernel in ((1, winner == "small_linear"), (kernels.SMALL_LINEAR_MAX_ROWS, winner ==
                                                                      "small_linear"),
                                    (kernels.SMALL_LINEAR_MAX_ROWS + 1, False)):
            x = torch.randn(1, rows, 32)
            with torch.no_grad(), OpRecorder() as rec:
                y = kernels.linear(x, w, b)
            assert ("glm::small_linear" in rec.names) == expect_kernel, (winner, rows)
            torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), atol=1e-5, rtol=1e-5)
    # Nothing measured (GLM_TUNING=off in the suite, nothing injected): torch's linear, never the kernel.
    tuning.forget()
    with torch.no_grad(), OpRecorder() as rec:
        kernels.linear(torch.randn(1, 1, 32), w, b)
    assert "glm::small_linear" not in rec.names
    tuning.inject({linear_calibration_key(1, w): "small_linear"})
    # A gradient to compute: torch's linear, differentiable, whatever was measured.
    wg = w.clone().requires_grad_()
    with OpRecorder() as rec:
        y = kernels.linear(torch.randn(1, 1, 32), wg, b)
    assert "glm::small_linear" not in rec.names
    y.sum().backward()
    assert wg.grad is not None
    tuning.forget()
    torch.library.opcheck(torch.ops.glm.small_linear.default, (torch.randn(3, 40), torch.randn(24, 40), None))
    torch.library.opcheck(torch.ops.glm.small_linear.default, (torch.randn(1, 40), torch.randn(24, 40),
                                                               torch.randn(24)))


@needs_kernels
def test_linear_measures_once_per_bucket_and_keeps_the_choice():
    from glm import tuning
    from glm.kernels.ops import _measure_linear, linear_calibration_key

    w, x = torch.randn(48, 40), torch.randn(2, 40)
    times = _measure_linear(x, w, None, repeats=2)
    assert set(times) == {"small_linear", "torch"} and all(t > 0 for t in times.values())
    tuning.forget()
    tuning.set_enabled(True)
    try:
        with torch.no_grad():
            kernels.linear(x, w)
        choice = tuning.lookup(linear_calibration_key(2, w))
        assert choice in ("small_linear", "torch")
        with torch.no_grad(), OpRecorder() as rec:  # the same bucket again: no new measurement, the same path
            kernels.linear(x, w)
        assert ("glm::small_linear" in rec.names) == (choice == "small_linear")
        assert rec.names.count("glm::small_linear") <= 1
    finally:
        tuning.set_enabled(None)
        tuning.forget()


@needs_kernels
def test_small_linear_rejects_bad_input():
    with pytest.raises(RuntimeError, match="at most 8 rows"):
        torch.ops.glm.small_linear(torch.randn(9, 4), torch.randn(3, 4), None)
    with pytest.raises(RuntimeError, match=r"x must be \[M, K\] and weight \[N, K\]"):
        torch.ops.glm.small_linear(torch.randn(2, 4), torch.randn(3, 5), None)


def test_top_level_kernels_name_is_inert_or_the_installed_package():
    """From the repository root the kernels/ folder is also importable as `kernels`, the name of a PyPI package
    that transformers imports (and requires from 5.25). Under that name it never loads glm's ops or a second
    'fused' backend (which once replaced glm.kernels' own in the registry): it is the installed package where
    there is one, else an inert module without a version (so transformers sees no usable package)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = textwrap.dedent("""
        import importlib.metadata, os, sys
        import kernels, glm
        from glm.attention import BACKENDS
        try:
            importlib.metadata.version("kernels")
            installed = True
        except importlib.metadata.PackageNotFoundError:
            installed = False
        ours = os.path.dirname(os.path.abspath(kernels.__file__)) == os.path.join(os.getcwd(), "kernels")
        if installed:
            assert not ours, kernels.__file__
            try:
                import transformers
            except ImportError:
                transformers = None
            if transformers is not None:
                transformers.GlmForCausalLM  # imports transformers' hub kernels, which import `kernels`
        else:
            assert ours and not hasattr(kernels, "__version__") and not hasattr(kernels, "available"), dir(kernels)
        if glm.kernels.available():
            assert BACKENDS["fused"] is glm.kernels.fused_attention
        print("KERNELS NAME OK")
    """)
    res = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "KERNELS NAME OK" in res.stdout, res.stdout + res.stderr


def test_top_level_kernels_name_goes_to_an_installed_package(tmp_path):
    # A stand-in for PyPI's `kernels` beside the repository root on sys.path: the name, and its submodules,
    # are that package's.
    site = tmp_path / "site" / "kernels"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text('__version__ = "0.0-stand-in"\n', encoding="utf-8")
    (site / "layer.py").write_text("WHO = 'stand-in'\n", encoding="utf-8")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = ("import kernels, kernels.layer, glm\n"
              "assert kernels.__version__ == '0.0-stand-in' and kernels.layer.WHO == 'stand-in'\n"
              "assert glm.kernels.__name__ == 'glm.kernels' and hasattr(glm.kernels, 'available')\n"
              "print('HANDED OVER')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    res = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "HANDED OVER" in res.stdout, res.stdout + res.stderr


# ---------------------------------------------------------------------------------------------
# What the fused op refuses rather than getting silently wrong

@needs_kernels
def test_double_backward_is_an_error_not_zeros():
    q, k, v = (torch.randn(1, 2, 12, 8, generator=torch.Generator().manual_seed(i), requires_grad=True)
               for i in range(3))
    for backend in ("reference", "fused"):
        out = glm.attention(q, k, v, backend=backend)
        dq, = torch.autograd.grad(out.square().sum(), q, create_graph=True)
        if backend == "reference":
            assert torch.autograd.grad(dq.sum(), v)[0].abs().max() > 0  # there is a second derivative
        else:
            with pytest.raises(RuntimeError, match="differentiable once"):
                torch.autograd.grad(dq.sum(), v)


@needs_kernels
@pytest.mark.parametrize("field", ["prefix_len", "kv_start", "kv_len"])
def test_structure_values_beyond_int32_mean_their_bound(field):
    # 2**32 + 1 as int64 must mean "all keys" (prefix_len, kv_len) or "no key" (kv_start) on every
    # backend; cast to the kernels' int32 without clamping it would wrap to 1.
    q, k, v = make_qkv(2, 4, 2, 8, 8, 16, seed=0)
    kw = {field: torch.tensor([2 ** 32 + 1, 3])}
    ref = glm.attention(q, k, v, backend="reference", **kw)
    for backend in ("sdpa", "fused"):
        got = glm.attention(q, k, v, backend=backend, **kw)
        rows = ref.isfinite() & got.isfinite()
        assert float((got - ref)[rows].abs().max()) < 1e-5, backend


def test_float_structure_tensors_are_refused():
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, seed=0)
    with pytest.raises(ValueError, match="prefix_len must be an integer tensor"):
        glm.attention(q, k, v, prefix_len=torch.tensor([2.5]))


@needs_kernels
@pytest.mark.parametrize("where", ["q", "k"])
@pytest.mark.parametrize("Tq", [1, 40])  # the decode kernel (few rows) and the forward
def test_nan_poisons_the_rows_the_reference_poisons(where, Tq):
    # A NaN (an fp16 overflow upstream, say) must show as NaN in the rows that see it, as in the
    # reference, not turn into zeros that generation would carry on from.
    q, k, v = make_qkv(1, 2, 2, Tq, 40, 16, seed=1)
    (q if where == "q" else k)[0, :, min(4, (q if where == "q" else k).shape[2] - 1)] = float("nan")
    for x in (q, k, v):
        x.requires_grad_(True)
    kw = dict(q_offset=40 - Tq)
    ref = glm.attention(q, k, v, backend="reference", **kw)
    got, lse = kernels.attention_with_lse(q, k, v, **kw)
    assert torch.equal(ref.isnan().any(-1), got.isnan().any(-1)) and ref.isnan().any()
    assert torch.equal(lse.isnan(), got.isnan().any(-1))
    if Tq > 1:
        dq, dk, dv = torch.autograd.grad(got.sum(), (q, k, v))
        assert dq.isnan().any() and dk.isnan().any() and dv.isnan().any()
