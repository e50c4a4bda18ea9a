"""Logits parity with the live transformers reference: ``GlmForCausalLM`` and ``Glm4ForCausalLM``.

Hypothesis draws a tiny config, builds the transformers model in float32 with weights re-initialised
large enough that activations are O(1) (the default 0.02 init would make every logit ~0 and hide any
difference), saves it with ``save_pretrained`` (safetensors) and loads that folder with
``glm.from_pretrained``. Logits must agree within 1e-4 absolute on every real (non-pad) position,
with random left padding, for both attention backends, and through glm's KV cache while decoding.

The transformers model runs with ``attn_implementation="eager"``: its masked scores are a finite
minimum rather than -inf, so its fully-padded query rows stay finite, and it is the plainest reading
of the reference.
"""
from __future__ import annotations

import json
import math
import os
import tempfile

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import glm  # noqa: E402

pytestmark = pytest.mark.transformers

ATOL = 1e-4
BACKENDS = ("reference", "sdpa")
CLASSES = {
    "glm": (transformers.GlmConfig, transformers.GlmForCausalLM, "glm-hf"),
    "glm4": (transformers.Glm4Config, transformers.Glm4ForCausalLM, "glm4-hf"),
}
# Each example builds, saves and reloads a model: ~20-60 ms on 2 CPU cores.
FORWARD_SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DECODE_SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# Configs, models and inputs

@st.composite
def tiny_configs(draw) -> dict:
    heads = draw(st.sampled_from([1, 2, 4]))
    kv_heads = draw(st.sampled_from([g for g in (1, 2, 4) if heads % g == 0]))
    head_dim = draw(st.sampled_from([8, 16, 32]))
    factor = draw(st.sampled_from([0.25, 0.5, 1.0]))
    rot = int(head_dim * factor)
    assert rot % 2 == 0 and rot > 0  # every combination above rotates an even number of dims
    return dict(
        vocab_size=draw(st.integers(64, 128)),
        hidden_size=draw(st.sampled_from([32, 48, 64])),
        intermediate_size=draw(st.sampled_from([32, 64, 96])),
        num_hidden_layers=draw(st.integers(1, 3)),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=64,
        rms_norm_eps=draw(st.sampled_from([1e-5, 1.5625e-7])),
        rope_parameters={"rope_theta": draw(st.sampled_from([10000.0, 5e6])),
                         "partial_rotary_factor": factor, "rope_type": "default"},
        attention_bias=draw(st.booleans()),
        tie_word_embeddings=draw(st.booleans()),
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


@st.composite
def padded_batches(draw, max_len: int = 20) -> tuple[int, list[int]]:
    """(T, pad_left per row): batch 1..3, rows of real lengths 1..T left-padded to a common T."""
    batch = draw(st.integers(1, 3))
    T = draw(st.integers(1, max_len))
    pads = draw(st.lists(st.integers(0, T - 1), min_size=batch, max_size=batch))
    if draw(st.booleans()):
        pads[draw(st.integers(0, batch - 1))] = 0  # usually one row is unpadded, as a tokenizer pads
    return T, pads


def make_hf(kind: str, cfg_kwargs: dict, seed: int):
    """The transformers model in float32, with O(1)-activation weights drawn from ``seed``."""
    Config, Model, _ = CLASSES[kind]
    cfg = Config(**cfg_kwargs)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Model(cfg).float().eval()
    gen = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float32)

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # RMSNorm scales: 1 +- 0.2, so a dropped or misplaced norm shows
                p.copy_(1.0 + 0.2 * randn(p.shape))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(randn(p.shape))
            elif name.endswith("lm_head.weight"):
                # Logits of std ~3: a 1e-4 tolerance is then ~3e-5 relative.
                p.copy_(randn(p.shape) * (3.0 / math.sqrt(p.shape[1])))
            elif p.dim() == 2:
                # std 1/sqrt(fan_in) (x 1.5 for q/k so attention is neither uniform nor one-hot).
                gain = 1.5 if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0
                p.copy_(randn(p.shape) * (gain / math.sqrt(p.shape[1])))
            else:  # biases
                p.copy_(0.5 * randn(p.shape))
    return model


def save_and_load(hf_model, folder: str, kind: str):
    hf_model.save_pretrained(folder)
    model = glm.from_pretrained(folder, dtype=torch.float32)
    assert model.config.family == CLASSES[kind][2], model.config.family
    return model


def make_inputs(vocab: int, T: int, pads: list[int], seed: int):
    gen = torch.Generator().manual_seed(seed + 1)
    B = len(pads)
    ids = torch.randint(0, vocab, (B, T), generator=gen)
    pad_left = torch.tensor(pads, dtype=torch.long)
    col = torch.arange(T).expand(B, T)
    real = col >= pad_left[:, None]  # [B, T]
    ids = ids.masked_fill(~real, 0)  # pad token id 0 (its value must not matter)
    position_ids = (col - pad_left[:, None]).clamp_min(0)
    return ids, real.long(), position_ids, pad_left, real


def hf_logits(hf_model, ids, attention_mask, position_ids):
    with torch.no_grad():
        return hf_model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False).logits.float()


def describe(kind: str, cfg_kwargs: dict, **extra) -> str:
    fields = {k: v for k, v in cfg_kwargs.items() if k not in ("pad_token_id", "bos_token_id", "eos_token_id")}
    return f"{kind}: config {json.dumps(fields, sort_keys=True)}; " + "; ".join(f"{k}={v}" for k, v in extra.items())


def check_close(got, want, real, what: str) -> float:
    """Max |got - want| over the real positions; fails with where and how much."""
    assert got.shape == want.shape, f"{what}: shapes {tuple(got.shape)} vs {tuple(want.shape)}"
    g, w = got[real], want[real]
    assert torch.isfinite(g).all(), f"{what}: glm produced non-finite logits at real positions"
    diff = (g - w).abs()
    worst = float(diff.max()) if diff.numel() else 0.0
    if worst > ATOL:
        flat = int(diff.max(dim=-1).values.argmax())
        b, t = real.nonzero()[flat].tolist()
        raise AssertionError(f"{what}: max |dlogits| {worst:.3e} > {ATOL:g} (worst at row {b}, position {t}; "
                             f"max |logit| {float(w.abs().max()):.2f})")
    return worst


# ---------------------------------------------------------------------------------------------
# Full forward with left padding

@pytest.mark.parametrize("kind", list(CLASSES))
@FORWARD_SETTINGS
@given(cfg_kwargs=tiny_configs(), batch=padded_batches(), seed=st.integers(0, 2**31 - 1),
       none_if_unpadded=st.booleans())
def test_forward_logits_match_transformers(kind, cfg_kwargs, batch, seed, none_if_unpadded):
    T, pads = batch
    hf_model = make_hf(kind, cfg_kwargs, seed)
    with tempfile.TemporaryDirectory() as folder:
        model = save_and_load(hf_model, folder, kind)
    ids, attention_mask, position_ids, pad_left, real = make_inputs(cfg_kwargs["vocab_size"], T, pads, seed)
    want = hf_logits(hf_model, ids, attention_mask, position_ids)
    # The comparison must be strict: logits spread well beyond the tolerance.
    assert float(want[real].std()) > 0.5, "re-initialised reference logits are too flat to compare"
    if none_if_unpadded and not any(pads):
        pad_left = None  # no padding: sdpa takes its is_causal path instead of a dense mask
    info = describe(kind, cfg_kwargs, T=T, pad_left=pads, seed=seed, pad_left_arg=pad_left is not None)
    for backend in BACKENDS:
        with torch.no_grad():
            got = model(ids, position_ids, pad_left=pad_left, backend=backend)
        check_close(got, want, real, f"{info}; backend {backend}")


# ---------------------------------------------------------------------------------------------
# Cached decoding: prefill, then one token at a time

@pytest.mark.parametrize("kind", list(CLASSES))
@DECODE_SETTINGS
@given(cfg_kwargs=tiny_configs(), batch=padded_batches(max_len=16), seed=st.integers(0, 2**31 - 1),
       explicit_positions=st.booleans(), slack=st.integers(0, 4), none_if_unpadded=st.booleans())
def test_cached_decode_matches_transformers(kind, cfg_kwargs, batch, seed, explicit_positions, slack,
                                            none_if_unpadded):
    T, pads = batch
    steps = 3
    hf_model = make_hf(kind, cfg_kwargs, seed)
    with tempfile.TemporaryDirectory() as folder:
        model = save_and_load(hf_model, folder, kind)
    V = cfg_kwargs["vocab_size"]
    ids, attention_mask, position_ids, pad_left, real = make_inputs(V, T, pads, seed)
    B = ids.shape[0]
    new = torch.randint(0, V, (B, steps), generator=torch.Generator().manual_seed(seed + 2))
    # The reference sees prompt + new tokens in one forward; positions simply continue per row.
    full_ids = torch.cat((ids, new), dim=1)
    full_mask = torch.cat((attention_mask, torch.ones(B, steps, dtype=torch.long)), dim=1)
    full_pos = torch.cat((position_ids, position_ids[:, -1:] + 1 + torch.arange(steps)), dim=1)
    want = hf_logits(hf_model, full_ids, full_mask, full_pos)
    if none_if_unpadded and not any(pads):
        pad_left = None  # no padding: sdpa's plain paths (is_causal prefill, full-cache decode step)
    info = describe(kind, cfg_kwargs, T=T, pad_left=pads, seed=seed, explicit_positions=explicit_positions,
                    pad_left_arg=pad_left is not None, cache_len=T + steps + slack)

    for backend in BACKENDS:
        cache = model.new_cache(B, T + steps + slack)
        with torch.no_grad():
            got = model(ids, position_ids if explicit_positions else None, pad_left=pad_left, cache=cache,
                        backend=backend)
        check_close(got, want[:, :T], real, f"{info}; backend {backend}; prefill")
        for s in range(steps):
            with torch.no_grad():
                step = model(new[:, s, None], cache=cache, backend=backend)
            assert step.shape == (B, 1, V)
            all_rows = torch.ones(B, dtype=torch.bool)
            check_close(step[:, 0], want[:, T + s], all_rows, f"{info}; backend {backend}; decode step {s}")
        assert cache.length == T + steps
        assert torch.equal(cache.last_position_ids[:, 0], full_pos[:, -1]), \
            f"{info}: cache positions {cache.last_position_ids.tolist()} vs {full_pos[:, -1].tolist()}"


# ---------------------------------------------------------------------------------------------
# bf16 checkpoints and RoPE's inv_freq
#
# The golden fixtures were made from a reference model cast to bf16 in memory and upcast, which rounds
# RoPE's inv_freq; glm follows them by default (rope_inv_freq_dtype from config.json's dtype). A fresh
# transformers 5.24 from_pretrained(dtype=bf16) keeps inv_freq exact fp32 (a non-persistent buffer);
# glm matches that with the override rope_inv_freq_dtype=None. Both are tested, and each comparison
# can tell the two apart (they differ by ~1e-2 here).

BF16_CONFIG = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
                   rms_norm_eps=1.5625e-7,
                   rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.5, "rope_type": "default"},
                   attention_bias=True, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
BF16_T, BF16_PADS, BF16_SEED = 20, [0, 7, 13], 1234


def _bf16_inv_freq_state(ref, model) -> str:
    """Which inv_freq each side uses, for failure messages: 'bf16-rounded' or 'exact fp32'."""
    def state(inv):
        inv = inv.float()
        return "bf16-rounded" if torch.equal(inv, inv.to(torch.bfloat16).float()) else "exact fp32"
    return (f"transformers inv_freq {state(ref.model.rotary_emb.inv_freq)}, "
            f"glm inv_freq {state(model.rotary.inv_freq)}")


def _bf16_case(kind: str, folder: str):
    hf_model = make_hf(kind, BF16_CONFIG, BF16_SEED)
    hf_model.to(torch.bfloat16).save_pretrained(folder)
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        assert json.load(f).get("dtype") == "bfloat16"
    model = glm.from_pretrained(folder, dtype=torch.float32)
    assert model.config.rope_inv_freq_dtype == "bfloat16"
    inputs = make_inputs(BF16_CONFIG["vocab_size"], BF16_T, BF16_PADS, BF16_SEED)
    info = describe(kind, BF16_CONFIG, T=BF16_T, pad_left=BF16_PADS, seed=BF16_SEED)
    return model, inputs, info


@pytest.mark.parametrize("kind", list(CLASSES))
def test_bf16_checkpoint_matches_transformers_default_load(kind):
    with tempfile.TemporaryDirectory() as folder:
        _, (ids, attention_mask, position_ids, pad_left, real), info = _bf16_case(kind, folder)
        model = glm.from_pretrained(folder, dtype=torch.float32, rope_inv_freq_dtype=None)
        # How transformers loads a bf16 checkpoint by default, then upcast to compare in fp32.
        ref = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.bfloat16, attn_implementation="eager").float().eval()
    want = hf_logits(ref, ids, attention_mask, position_ids)
    info = f"{info}; bf16 checkpoint, default load; {_bf16_inv_freq_state(ref, model)}"
    for backend in BACKENDS:
        with torch.no_grad():
            got = model(ids, position_ids, pad_left=pad_left, backend=backend)
        check_close(got, want, real, f"{info}; backend {backend}")


@pytest.mark.parametrize("kind", list(CLASSES))
def test_bf16_checkpoint_matches_transformers_cast_to_bf16(kind):
    """What glm does reproduce today: the reference after a model-wide ``.to(torch.bfloat16)``, which
    rounds inv_freq (as the golden fixtures in shared/reference evidently were made). An unrounded
    inv_freq misses it by more than the tolerance, so the comparison can tell the two apart."""
    with tempfile.TemporaryDirectory() as folder:
        model, (ids, attention_mask, position_ids, pad_left, real), info = _bf16_case(kind, folder)
        ref = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.bfloat16, attn_implementation="eager").to(torch.bfloat16).float().eval()
        # The same weights with an exact fp32 inv_freq: config.json no longer says bf16.
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            cfg_json = json.load(f)
        cfg_json["dtype"] = "float32"
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg_json, f)
        unrounded = glm.from_pretrained(folder, dtype=torch.float32)
        assert unrounded.config.rope_inv_freq_dtype is None
    r = int(BF16_CONFIG["head_dim"] * BF16_CONFIG["rope_parameters"]["partial_rotary_factor"])
    exact = 1.0 / (10000.0 ** (torch.arange(0, r, 2, dtype=torch.float32) / r))
    assert torch.equal(ref.model.rotary_emb.inv_freq, exact.to(torch.bfloat16).float())
    assert torch.equal(model.rotary.inv_freq, exact.to(torch.bfloat16).float())
    assert torch.equal(unrounded.rotary.inv_freq, exact)

    want = hf_logits(ref, ids, attention_mask, position_ids)
    info = f"{info}; bf16 checkpoint, reference cast .to(bf16)"
    for backend in BACKENDS:
        with torch.no_grad():
            got = model(ids, position_ids, pad_left=pad_left, backend=backend)
        check_close(got, want, real, f"{info}; backend {backend}")
    with torch.no_grad():
        off = unrounded(ids, position_ids, pad_left=pad_left, backend="reference")
    miss = float((off[real] - want[real]).abs().max())
    assert miss > 10 * ATOL, f"{info}: an unrounded inv_freq moved logits by only {miss:.2e}; the test cannot see it"
