"""Model-level invariants (STYLE.md practice 6) for every tiny preset, in fp32, on every backend.

- a cached decode (prefill, then one token at a time) gives the logits of the full forward;
- chunked prefill gives the logits of one prefill;
- a left-padded row in a batch gives the logits of the same row alone;
- prefix_len = 0 is plain causal;
- logits depend only on the tokens their mask lets them see;
- the backends agree.

The backends are ``reference``, ``sdpa`` and ``fused`` (glm.kernels, the CPU default under ``auto``);
the ``fused`` cases skip, saying why, where the kernels are not built.

Weights are re-initialised with std 0.1: logits are then O(1) (std ~0.8, |max| ~3), the fp32 noise
between a cached and an uncached forward is <= ~2e-6 (so 1e-5 holds with margin), and changing one
visible token moves some logit by 0.05-2, far above it. With std 0.3 the logits reach ~10 and the
fp32 noise alone reaches ~1.5e-5.
"""
from __future__ import annotations

import functools
from typing import Optional

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import glm
from glm import kernels

TINY = ["tiny-glm", "tiny-chatglm", "tiny-chatglm2", "tiny-chatglm3", "tiny-glm4-chatglm", "tiny-glm-hf",
        "tiny-glm4-hf"]
# The backends this build can run (for the hypothesis test and the agreement test's loop), and the same as
# pytest params with the fused ones present but skipped, with the reason, when glm.kernels is not built.
RUNNABLE = ["reference", "sdpa"] + (["fused"] if kernels.available() else [])
BACKENDS = ["reference", "sdpa", pytest.param("fused", marks=pytest.mark.skipif(
    not kernels.available(), reason=f"glm.kernels not built: {kernels.load_error()}"))]
STD = 0.1
ATOL = 1e-5
# A change that the mask lets through must move some logit by far more than the tolerance.
VISIBLE = 1e-3


def build(cfg: glm.GLMConfig, seed: int = 0) -> glm.GLM:
    model = glm.GLM(cfg).eval()
    model.init_weights(std=STD, seed=seed)
    return model


@functools.lru_cache(maxsize=None)
def tiny_model(name: str) -> glm.GLM:
    # Shared between tests: every test runs under no_grad and never changes the weights.
    return build(glm.preset(name))


def tokens(cfg: glm.GLMConfig, B: int, T: int, seed: int) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def positions(cfg: glm.GLMConfig, B: int, T: int, prompt_len: int,
              pad_left: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The position ids a cached decode gives a prompt of ``prompt_len`` slots and the tokens after it.

    The prompt counts from 0 at each row's first real token (pads get 0). After it, 1D families
    keep counting; 2D families keep the last prompt position and count the block position 1, 2, ...
    Returns ``[B, T]`` (1D) or ``[B, 2, T]`` (2D).
    """
    t = torch.arange(T).expand(B, T)
    pad = torch.zeros(B, 1, dtype=torch.long) if pad_left is None else pad_left.view(-1, 1)
    if cfg.position_streams == 1:
        return (t - pad).clamp_min(0)
    pos = (t.clamp_max(prompt_len - 1) - pad).clamp_min(0)
    block = (t - (prompt_len - 1)).clamp_min(0)
    return torch.stack((pos, block), dim=1)


def real(pad_left: Optional[torch.Tensor], B: int, T: int) -> torch.Tensor:
    """[B, T] bool: positions that are not left padding (pad rows are garbage by design)."""
    if pad_left is None:
        return torch.ones(B, T, dtype=torch.bool)
    return torch.arange(T).view(1, T) >= pad_left.view(-1, 1)


def assert_logits_close(a: torch.Tensor, b: torch.Tensor, keep: Optional[torch.Tensor] = None,
                        atol: float = ATOL, what: str = "") -> None:
    if keep is not None:
        a, b = a[keep], b[keep]
    assert a.numel() > 0, "nothing compared"
    err = (a - b).abs().max().item()
    assert err <= atol, f"{what}: max |dlogits| {err:.3e} > {atol:.0e}"


# Structures of a 2-row batch: (pad_left, prefix_len) with prefix_len in key slots (pads included).
STRUCTURES = {
    "causal": (None, None),
    "padded": (torch.tensor([2, 0]), None),
    "padded-prefix": (torch.tensor([2, 0]), torch.tensor([2 + 3, 4])),
}


# ------------------------------------------------------------------------------------------------
# Cached decode == full forward


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", TINY)
@torch.no_grad()
def test_cached_decode_matches_full_forward(name, backend, structure):
    model = tiny_model(name)
    cfg = model.config
    pad_left, prefix_len = STRUCTURES[structure]
    B, P, T = 2, 6, 11  # a prompt of P slots (pads included), then T - P decoded tokens
    x = tokens(cfg, B, T, seed=1)
    pid = positions(cfg, B, T, P, pad_left)
    full = model(x, pid, prefix_len=prefix_len, pad_left=pad_left, backend=backend)

    cache = model.new_cache(B, T + 2)
    # Default prefill positions; every later position comes from cache.last_position_ids.
    steps = [model(x[:, :P], prefix_len=prefix_len, pad_left=pad_left, cache=cache, backend=backend)]
    for t in range(P, T):
        steps.append(model(x[:, t:t + 1], cache=cache, backend=backend))
    cached = torch.cat(steps, dim=1)
    assert cache.length == T
    assert torch.equal(cache.last_position_ids, pid.view(B, -1, T)[:, :, -1])
    assert_logits_close(cached, full, real(pad_left, B, T), what=f"{name} {backend} {structure}")


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", TINY)
@torch.no_grad()
def test_chunked_prefill_matches_one_prefill(name, backend, structure):
    """Prefill in two chunks of >1 token, then decode a 3-token chunk with continued positions."""
    model = tiny_model(name)
    cfg = model.config
    pad_left, prefix_len = STRUCTURES[structure]
    B, P, T, split = 2, 8, 11, 5  # the prefix (<= 5 slots) lies in the first chunk
    x = tokens(cfg, B, T, seed=2)
    pid = positions(cfg, B, T, P, pad_left)
    keep = real(pad_left, B, T)

    one = model.new_cache(B, T)
    whole = model(x[:, :P], pid[..., :P], prefix_len=prefix_len, pad_left=pad_left, cache=one,
                  backend=backend)
    two = model.new_cache(B, T)
    first = model(x[:, :split], pid[..., :split], prefix_len=prefix_len, pad_left=pad_left, cache=two,
                  backend=backend)
    # The second chunk takes pad_left / prefix_len from the cache; its positions are still prompt
    # positions, which a 2D family would not continue to by itself (it would count block positions).
    second = model(x[:, split:P], pid[..., split:P], cache=two, backend=backend)
    assert_logits_close(torch.cat((first, second), 1), whole, keep[:, :P], what="chunked prefill")

    # A multi-token decode chunk, positions continued by the model, against the full forward.
    full = model(x, pid, prefix_len=prefix_len, pad_left=pad_left, backend=backend)
    for cache in (one, two):
        tail = model(x[:, P:], cache=cache, backend=backend)
        assert_logits_close(tail, full[:, P:], keep[:, P:], what="decode chunk after prefill")


# ------------------------------------------------------------------------------------------------
# Left padding


def check_padded_row(model: glm.GLM, pad: int, n_real: int, prefix: Optional[int], backend: str,
                     seed: int) -> None:
    """Row 0 = ``pad`` garbage tokens then ``n_real`` real ones, next to an unpadded row 1; row 0's
    real positions must give the logits of the same tokens run alone."""
    cfg = model.config
    T = pad + n_real
    x = tokens(cfg, 2, T, seed)
    pad_left = torch.tensor([pad, 0])
    prefix_len = None if prefix is None else torch.tensor([pad + prefix, prefix])
    batch = model(x, prefix_len=prefix_len, pad_left=pad_left, backend=backend)
    alone = model(x[:1, pad:], prefix_len=None if prefix is None else torch.tensor([prefix]), backend=backend)
    assert_logits_close(batch[:1, pad:], alone, what=f"padded row (pad={pad}, prefix={prefix})")
    # Row 1, unpadded, is itself unchanged by being batched with a padded row.
    alone1 = model(x[1:], prefix_len=None if prefix is None else torch.tensor([prefix]), backend=backend)
    assert_logits_close(batch[1:], alone1, what="unpadded row next to a padded one")


@pytest.mark.parametrize("prefix", [None, 3])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", TINY)
@torch.no_grad()
def test_left_padded_row_matches_row_alone(name, backend, prefix):
    check_padded_row(tiny_model(name), pad=3, n_real=6, prefix=prefix, backend=backend, seed=3)


@pytest.mark.parametrize("name", TINY)
@torch.no_grad()
def test_pad_tokens_do_not_matter(name):
    """The padded slots hold hidden keys: changing their tokens leaves the real logits unchanged."""
    model = tiny_model(name)
    x = tokens(model.config, 2, 8, seed=4)
    pad_left = torch.tensor([3, 0])
    y = x.clone()
    y[0, :3] = (y[0, :3] + 1) % model.config.vocab_size
    keep = real(pad_left, 2, 8)
    a, b = (model(z, pad_left=pad_left, backend="reference") for z in (x, y))
    assert_logits_close(a, b, keep, what="pad tokens changed")
    c = model(y, backend="reference")  # the same change, unhidden, is visible
    assert (c - a)[keep].abs().max() > VISIBLE


# ------------------------------------------------------------------------------------------------
# The mask, seen from the logits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", TINY)
@torch.no_grad()
def test_prefix_len_zero_is_plain_causal(name, backend):
    model = tiny_model(name)
    x = tokens(model.config, 2, 7, seed=5)
    zero = model(x, prefix_len=torch.zeros(2, dtype=torch.long), backend=backend)
    none = model(x, prefix_len=None, backend=backend)
    assert_logits_close(zero, none, what="prefix_len=0 vs None")


def changed(x: torch.Tensor, at, vocab: int) -> torch.Tensor:
    y = x.clone()
    y[:, at] = (y[:, at] + 1 + torch.arange(y[:, at].numel()).view_as(y[:, at])) % vocab
    return y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", TINY)
@torch.no_grad()
def test_prefix_is_bidirectional_and_the_rest_causal(name, backend):
    model = tiny_model(name)
    V = model.config.vocab_size
    B, T, P = 2, 10, 4
    x = tokens(model.config, B, T, seed=6)
    prefix_len = torch.full((B,), P)

    def run(z: torch.Tensor) -> torch.Tensor:
        return model(z, prefix_len=prefix_len, backend=backend)

    base = run(x)

    # Tokens at and after the prefix end are invisible to the prefix.
    after = run(changed(x, slice(P, T), V))
    assert_logits_close(after[:, :P], base[:, :P], what="prefix logits after a change past the prefix")
    # A token inside the prefix is visible to the whole prefix, including the positions before it.
    inside = run(changed(x, P - 1, V))
    assert (inside[:, :P - 1] - base[:, :P - 1]).abs().amax(dim=-1).min() > VISIBLE, \
        "an earlier prefix position ignores a later prefix token: the prefix is not bidirectional"
    # After the prefix it is causal: position 6 onwards changing leaves positions < 6 alone.
    late = run(changed(x, slice(6, T), V))
    assert_logits_close(late[:, :6], base[:, :6], what="causal part sees the future")
    assert (late[:, 6:] - base[:, 6:]).abs().max() > VISIBLE


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", TINY)
@torch.no_grad()
def test_causal_logits_ignore_later_tokens(name, backend):
    model = tiny_model(name)
    V = model.config.vocab_size
    x = tokens(model.config, 2, 9, seed=7)
    base = model(x, backend=backend)
    y = model(changed(x, slice(4, 9), V), backend=backend)
    assert_logits_close(y[:, :4], base[:, :4], what="causal logits before the change")
    assert (y[:, 4:] - base[:, 4:]).abs().max() > VISIBLE
    # Without a prefix an earlier position really does not see a later one (cf. the prefix test).
    z = model(changed(x, 3, V), backend=backend)
    assert_logits_close(z[:, :3], base[:, :3], what="causal logits before position 3")


# ------------------------------------------------------------------------------------------------
# Backends agree on the model


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("name", TINY)
@torch.no_grad()
def test_backends_agree_on_the_model(name, structure):
    model = tiny_model(name)
    cfg = model.config
    pad_left, prefix_len = STRUCTURES[structure]
    B, P, T = 2, 6, 9
    x = tokens(cfg, B, T, seed=8)
    keep = real(pad_left, B, T)
    outs = {}
    for backend in RUNNABLE:
        full = model(x[:, :P], prefix_len=prefix_len, pad_left=pad_left, backend=backend)
        cache = model.new_cache(B, T)
        steps = [model(x[:, :P], prefix_len=prefix_len, pad_left=pad_left, cache=cache, backend=backend)]
        steps += [model(x[:, t:t + 1], cache=cache, backend=backend) for t in range(P, T)]
        outs[backend] = (full, torch.cat(steps, 1))
    f0, d0 = outs.pop("reference")
    for backend, (f1, d1) in outs.items():
        assert_logits_close(f1, f0, keep[:, :P], what=f"forward, {backend} vs reference")
        assert_logits_close(d1, d0, keep, what=f"cached decode, {backend} vs reference")


# ------------------------------------------------------------------------------------------------
# Hypothesis: the padded-row invariant over random shapes


@st.composite
def configs(draw):
    cfg = glm.preset(draw(st.sampled_from(TINY)))
    n = draw(st.sampled_from([1, 2, 4, 8]))
    g = draw(st.sampled_from([x for x in (1, 2, 4, 8) if n % x == 0]))
    # Multiples of 8: 2D RoPE needs multiples of 4, and 1D RoPE an even rotated count at every fraction.
    d = draw(st.sampled_from([8, 16, 24, 32]))
    return cfg.replace(num_heads=n, num_kv_heads=g, head_dim=d, num_layers=draw(st.integers(1, 3)),
                       rotary_fraction=draw(st.sampled_from([0.25, 0.5, 1.0])))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(), pad=st.integers(1, 4), n_real=st.integers(2, 7), data=st.data(),
       backend=st.sampled_from(RUNNABLE), seed=st.integers(0, 2**16))
@torch.no_grad()
def test_left_padded_row_matches_row_alone_random_configs(cfg, pad, n_real, data, backend, seed):
    prefix = data.draw(st.one_of(st.none(), st.integers(1, n_real)), label="prefix")
    check_padded_row(build(cfg, seed), pad, n_real, prefix, backend, seed)
