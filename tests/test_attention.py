"""Unit tests of `glm.attention`: the mask rule, every backend against the fp32 oracle, GQA, errors.

Tolerances come from the oracle (STYLE.md practice 5): in dtype X a backend passes when its error
against the fp32 `reference` is at most 3x the error of plain PyTorch doing the same math in X.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glm.attention import BACKENDS, Mask, attention, reference_attention, resolve_backend, visible_mask

# Every backend but the oracle is checked against the oracle ("fused" joins once it is registered).
BACKENDS_UNDER_TEST = [name for name in BACKENDS if name != "reference"]
DTYPES = [torch.float32, torch.bfloat16]
# Keeps 3 x 0 from being a zero tolerance where plain fp32 PyTorch *is* the oracle's computation;
# relative to the output's scale (a few fp32 ulps of the largest output).
FLOOR = 1e-6

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------------
# Helpers


def loop_mask(batch: int, q_len: int, kv_size: int, *, causal: bool, prefix_len, kv_start, kv_len,
              q_offset: int) -> torch.Tensor:
    """The module docstring's rule, one (b, i, j) at a time."""
    out = torch.zeros(batch, 1, q_len, kv_size, dtype=torch.bool)
    for b in range(batch):
        for t in range(q_len):
            i = q_offset + t  # the query's index in the key sequence
            for j in range(kv_size):
                in_prefix = prefix_len is not None and j < int(prefix_len[b])
                seen = (not causal) or j <= i or in_prefix
                is_pad = kv_start is not None and j < int(kv_start[b])
                # A query always sees its own key (so a pad row is never empty)...
                visible = (seen and not is_pad) or j == i
                # ...but nothing sees a key that is not valid yet.
                if kv_len is not None and j >= int(kv_len[b]):
                    visible = False
                out[b, 0, t, j] = visible
    return out


def plain_attention(q, k, v, mask: torch.Tensor) -> torch.Tensor:
    """The same math as the oracle, in the inputs' own dtype: matmul, masked softmax, matmul."""
    n, g = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(n // g, dim=1), v.repeat_interleave(n // g, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.matmul(p, v)


def real_rows(batch: int, q_len: int, q_offset: int, kv_start: Optional[torch.Tensor]) -> torch.Tensor:
    """[B, 1, Tq, 1] bool: query rows that are not left padding (pad rows are garbage by design)."""
    i = torch.arange(q_offset, q_offset + q_len).view(1, 1, q_len, 1).expand(batch, 1, q_len, 1)
    if kv_start is None:
        return torch.ones(batch, 1, q_len, 1, dtype=torch.bool)
    return i >= kv_start.view(-1, 1, 1, 1)


def max_err(x: torch.Tensor, ref: torch.Tensor, rows: torch.Tensor) -> float:
    d = (x.float() - ref.float()).abs()
    d = d.masked_select(rows.expand_as(d))
    return d.max().item() if d.numel() else 0.0


@st.composite
def structures(draw, max_batch: int = 3, max_kv: int = 12):
    """A batch of attention structure: sizes, q_offset, causal, prefix_len, kv_start, kv_len.

    Modes: prefill (Tq = Tk), decode (Tq = 1, q_offset = Tk - 1), chunk (Tq < Tk, q_offset = Tk - Tq),
    and a static cache whose tail (keys >= kv_len, or past the last query) is not written yet.
    Half the draws are plain (no prefix, padding or kv_len), the structure the backends' shortcuts take.
    """
    B = draw(st.integers(1, max_batch))
    mode = draw(st.sampled_from(["prefill", "decode", "chunk", "static"]))
    plain = draw(st.booleans())
    if mode in ("prefill", "decode"):
        Tk = draw(st.integers(1, max_kv))
        Tq = Tk if mode == "prefill" else 1
    else:
        Tk = draw(st.integers(2, max_kv))
        Tq = draw(st.one_of(st.just(1), st.integers(1, Tk - 1)))
    q_offset = Tk - Tq
    kv_len = None
    if mode == "static":
        # Queries fill slots [q_offset, q_offset + Tq); later slots hold stale garbage, hidden by
        # kv_len or, if causal, by causality alone.
        q_offset = draw(st.integers(0, Tk - Tq - 1))
        if not plain and draw(st.booleans()):
            kv_len = torch.tensor([draw(st.integers(q_offset + Tq, Tk)) for _ in range(B)])
    filled = q_offset + Tq
    causal = draw(st.booleans()) if draw(st.integers(0, 3)) == 0 else True
    pkind = "none" if plain else draw(st.sampled_from(["none", "zero", "partial", "full"]))
    prefix_len = {
        "none": None,
        "zero": torch.zeros(B, dtype=torch.long),
        "partial": torch.tensor([draw(st.integers(0, filled)) for _ in range(B)]),
        "full": torch.full((B,), filled),
    }[pkind]
    kv_start = None
    if not plain and draw(st.booleans()):
        # Left padding, up to a whole row of it (every query of that row is then a pad row).
        kv_start = torch.tensor([draw(st.integers(0, filled)) for _ in range(B)])
    return dict(B=B, Tq=Tq, Tk=Tk, q_offset=q_offset, causal=causal, prefix_len=prefix_len,
                kv_start=kv_start, kv_len=kv_len)


@st.composite
def heads(draw):
    n = draw(st.sampled_from([1, 2, 4, 8]))
    g = draw(st.sampled_from([x for x in (1, 2, 4, 8) if n % x == 0]))
    d = draw(st.sampled_from([8, 16, 64]))
    return n, g, d


def make_qkv(B, n, g, Tq, Tk, d, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, n, Tq, d, generator=gen)
    k = torch.randn(B, g, Tk, d, generator=gen)
    v = torch.randn(B, g, Tk, d, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def mask_kwargs(s: dict) -> dict:
    return dict(causal=s["causal"], prefix_len=s["prefix_len"], kv_start=s["kv_start"],
                kv_len=s["kv_len"], q_offset=s["q_offset"])


# ------------------------------------------------------------------------------------------------
# The mask rule


@SETTINGS
@given(s=structures(max_kv=9))
def test_visible_mask_matches_the_documented_rule(s):
    got = visible_mask(s["B"], s["Tq"], s["Tk"], **mask_kwargs(s))
    want = loop_mask(s["B"], s["Tq"], s["Tk"], **mask_kwargs(s))
    assert got.dtype == torch.bool and got.shape == (s["B"], 1, s["Tq"], s["Tk"])
    assert torch.equal(got, want), f"mask differs at {(got != want).nonzero().tolist()}"


@SETTINGS
@given(B=st.integers(1, 3), Tk=st.integers(1, 9), data=st.data())
def test_visible_mask_random_structure_including_out_of_range(B, Tk, data):
    """The rule holds for any structure values, including ones past the ends of the key sequence."""
    Tq = data.draw(st.integers(1, Tk))
    q_offset = data.draw(st.integers(0, Tk - Tq))
    causal = data.draw(st.booleans())
    per_sample = st.one_of(st.none(), st.lists(st.integers(0, Tk + 2), min_size=B, max_size=B).map(torch.tensor))
    prefix_len, kv_start, kv_len = (data.draw(per_sample) for _ in range(3))
    kw = dict(causal=causal, prefix_len=prefix_len, kv_start=kv_start, kv_len=kv_len, q_offset=q_offset)
    assert torch.equal(visible_mask(B, Tq, Tk, **kw), loop_mask(B, Tq, Tk, **kw))


def test_visible_mask_prefix_is_bidirectional_and_pads_are_hidden():
    """One hand-checked case, so the loop above is not the only statement of the rule."""
    m = visible_mask(1, 5, 5, causal=True, prefix_len=torch.tensor([3]), kv_start=torch.tensor([1]))[0, 0]
    want = torch.tensor([
        [1, 1, 1, 0, 0],  # pad query: itself and the real prefix (a garbage row, never compared)
        [0, 1, 1, 0, 0],  # prefix row: the whole (unpadded) prefix
        [0, 1, 1, 0, 0],
        [0, 1, 1, 1, 0],  # causal after the prefix
        [0, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(m, want)


# ------------------------------------------------------------------------------------------------
# Backends against the oracle


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@SETTINGS
@given(s=structures(), hd=heads(), seed=st.integers(0, 2**31 - 1))
def test_backend_matches_reference(backend, dtype, s, hd, seed):
    n, g, d = hd
    B, Tq, Tk = s["B"], s["Tq"], s["Tk"]
    q, k, v = make_qkv(B, n, g, Tq, Tk, d, seed, dtype)
    kw = mask_kwargs(s)
    ref = reference_attention(q.float(), k.float(), v.float(), **kw)  # the fp32 oracle
    out = attention(q, k, v, backend=backend, **kw)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all(), "NaN/inf in the output (pad rows included)"

    mask = visible_mask(B, Tq, Tk, **kw)
    rows = real_rows(B, Tq, s["q_offset"], s["kv_start"])
    # The oracle itself must be the plain math in fp32, or the tolerance below means nothing.
    oracle_err = max_err(plain_attention(q.float(), k.float(), v.float(), mask), ref, rows)
    assert oracle_err <= FLOOR * max(1.0, ref.abs().max().item()), f"reference is off by {oracle_err:.3e}"
    plain = plain_attention(q, k, v, mask)
    err, err_plain = max_err(out, ref, rows), max_err(plain, ref, rows)
    tol = 3 * err_plain + FLOOR * max(1.0, ref.abs().max().item())
    assert err <= tol, f"{backend} {dtype}: max error {err:.3e} > 3 x plain {err_plain:.3e} + floor"


@pytest.mark.parametrize("backend", ["reference", *BACKENDS_UNDER_TEST])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prefix", [None, 2, 6])
def test_fully_padded_query_rows_are_finite_and_see_only_themselves(backend, dtype, prefix):
    """Row 0 is all left padding; row 1 pads 3 of 6. No NaN anywhere, and a pad query that sees
    nothing else returns its own value row (the "sees itself" rule)."""
    B, n, g, T, d = 2, 4, 2, 6, 16
    q, k, v = make_qkv(B, n, g, T, T, d, seed=1, dtype=dtype)
    kv_start = torch.tensor([T, 3])
    prefix_len = None if prefix is None else torch.full((B,), prefix)
    out = attention(q, k, v, causal=True, prefix_len=prefix_len, kv_start=kv_start, backend=backend)
    assert torch.isfinite(out.float()).all()
    own = v.repeat_interleave(n // g, dim=1)
    # Row 0 hides every key but the query's own one.
    torch.testing.assert_close(out[0], own[0])
    if prefix is None or prefix <= 3:
        # Row 1's pad queries (i < 3) see no key but their own either (the prefix is all padding).
        torch.testing.assert_close(out[1, :, :3], own[1, :, :3])


@pytest.mark.parametrize("backend", ["reference", *BACKENDS_UNDER_TEST])
def test_decode_step_in_whole_padded_row_is_finite(backend):
    """A decode query in a row whose every cached key is padding: still finite."""
    q, k, v = make_qkv(2, 2, 1, 1, 5, 8, seed=2)
    out = attention(q, k, v, causal=True, kv_start=torch.tensor([5, 0]), q_offset=4, backend=backend)
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------
# GQA


@pytest.mark.parametrize("backend", ["reference", *BACKENDS_UNDER_TEST])
@pytest.mark.parametrize("n,g", [(4, 1), (4, 2), (8, 2), (8, 4), (6, 3)])
def test_gqa_query_head_h_reads_kv_head_h_div_group(backend, n, g):
    B, Tq, Tk, d = 2, 3, 7, 16
    q, k, v = make_qkv(B, n, g, Tq, Tk, d, seed=3)
    kw = dict(causal=True, prefix_len=torch.tensor([2, 0]), kv_start=torch.tensor([0, 1]), q_offset=Tk - Tq)
    out = attention(q, k, v, backend=backend, **kw)
    # Against repeating each KV head n/g times contiguously...
    rep = attention(q, k.repeat_interleave(n // g, 1), v.repeat_interleave(n // g, 1), backend="reference", **kw)
    torch.testing.assert_close(out, rep, atol=1e-6, rtol=1e-5)
    # ...and head by head, so that a tiled layout (head h -> KV head h % g) cannot pass.
    for h in range(n):
        kv = h // (n // g)
        one = attention(q[:, h:h + 1], k[:, kv:kv + 1], v[:, kv:kv + 1], backend="reference", **kw)
        torch.testing.assert_close(out[:, h:h + 1], one, atol=1e-6, rtol=1e-5)
    if g > 1:
        tiled = attention(q, k.repeat(1, n // g, 1, 1), v.repeat(1, n // g, 1, 1), backend="reference", **kw)
        assert (out - tiled).abs().max() > 1e-3, "the test cannot tell the two GQA layouts apart"


# ------------------------------------------------------------------------------------------------
# Plain-causal shortcuts (sdpa's is_causal / no-mask paths) and prefix_len = 0


@pytest.mark.parametrize("backend", ["reference", *BACKENDS_UNDER_TEST])
@pytest.mark.parametrize("Tq,Tk", [(5, 5), (1, 5), (2, 5)])
def test_prefix_len_zero_is_plain_causal(backend, Tq, Tk):
    q, k, v = make_qkv(2, 4, 2, Tq, Tk, 16, seed=4)
    a = attention(q, k, v, causal=True, prefix_len=torch.zeros(2, dtype=torch.long), q_offset=Tk - Tq,
                  backend=backend)
    b = attention(q, k, v, causal=True, prefix_len=None, q_offset=Tk - Tq, backend=backend)
    c = reference_attention(q, k, v, causal=True, q_offset=Tk - Tq)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b, c, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS_UNDER_TEST])
def test_non_causal_sees_every_key(backend):
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, seed=5)
    out = attention(q, k, v, causal=False, backend=backend)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    torch.testing.assert_close(out, p @ v, atol=1e-6, rtol=1e-5)


def test_auto_backend_resolves_to_fused_or_sdpa():
    assert resolve_backend("auto") is BACKENDS.get("fused", BACKENDS["sdpa"])


# ------------------------------------------------------------------------------------------------
# Bad inputs


def _t(*shape):
    return torch.zeros(*shape)


@pytest.mark.parametrize("q,k,v,match", [
    (_t(4, 5, 8), _t(1, 4, 5, 8), _t(1, 4, 5, 8), r"q \[B,n,Tq,d\]"),          # q rank 3
    (_t(1, 4, 5, 8), _t(4, 5, 8), _t(4, 5, 8), r"k, v \[B,g,Tk,d\]"),          # k/v rank 3
    (_t(1, 4, 5, 8), _t(1, 4, 5, 8), _t(1, 4, 6, 8), r"v \(1, 4, 6, 8\)"),     # v shape != k shape
    (_t(1, 4, 5, 8), _t(1, 4, 5, 16), _t(1, 4, 5, 16), r"head dim"),           # head dims differ
    (_t(1, 4, 5, 8), _t(1, 3, 5, 8), _t(1, 3, 5, 8), r"KV heads do not divide"),  # 3 does not divide 4
    (_t(2, 4, 5, 8), _t(1, 4, 5, 8), _t(1, 4, 5, 8), r"batch"),                # batch differs
])
def test_bad_shapes_raise_value_error(q, k, v, match):
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, backend="reference")


# Per-sample structure of the wrong batch, or queries past the last key, are a clear ValueError.
@pytest.mark.parametrize("backend", ["reference", *BACKENDS_UNDER_TEST])
@pytest.mark.parametrize("bad", ["prefix_len", "kv_start", "kv_len", "q_offset"])
def test_bad_structure_raises_value_error(backend, bad):
    q, k, v = make_qkv(1, 2, 2, 1, 4, 8, seed=6)
    kw = dict(q_offset=3)
    if bad == "q_offset":
        kw["q_offset"], kw["kv_start"] = 4, torch.tensor([4])  # the query sits past the last key
    else:
        kw[bad] = torch.tensor([2, 4])  # two samples' worth for a batch of one
    try:
        out = attention(q, k, v, causal=True, backend=backend, **kw)
    except ValueError:
        return
    except Exception as e:  # noqa: BLE001 - anything but a clear ValueError is the bug
        raise AssertionError(f"{bad}: raised {type(e).__name__} instead of ValueError: {e}") from None
    raise AssertionError(f"{bad}: accepted; output shape {tuple(out.shape)}, finite={bool(torch.isfinite(out).all())}")


@pytest.mark.parametrize("backend", ["reference", *BACKENDS_UNDER_TEST])
def test_mask_dataclass_is_the_structure_keywords(backend):
    # The model hands attention a Mask; direct callers pass the same structure as keywords.
    q, k, v = make_qkv(2, 4, 2, 3, 9, 8, seed=11)
    structure = dict(causal=True, prefix_len=torch.tensor([5, 0]), kv_start=torch.tensor([2, 0]),
                     kv_len=torch.tensor([9, 8]), q_offset=5)
    want = attention(q, k, v, backend=backend, **structure)
    # The keywords are ignored when a Mask is given.
    got = attention(q, k, v, backend=backend, causal=False, q_offset=0, mask=Mask(**structure))
    assert torch.equal(got, want)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Mask(**structure).causal = False


def test_unknown_backend_raises_value_error_listing_the_known_ones():
    q = _t(1, 2, 3, 8)
    with pytest.raises(ValueError, match=r"unknown attention backend 'nope'; available: auto, .*reference.*sdpa"):
        attention(q, q, q, backend="nope")
