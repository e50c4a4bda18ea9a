"""P-tuning v2 (glm.ptuning, glm.kv_cache.PrefixKV) and THUDM's P-tuning checkpoints
(glm.formats.ptuning_checkpoint).

Oracles: the base model attending over a KV cache that already holds the prefix (an explicit past, the
way the references feed their prefix), on the fp32 `reference` backend; and, for the interleaved-RoPE
layout, a ChatGLM2 forward written here over the release's own tensors with THUDM's prefix layout."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import reference_dir, snapshot

import glm
from glm import ptuning
from glm.attention import BACKENDS
from glm.checkpoint import CheckpointReader
from glm.errors import (
    ArgumentError,
    CacheFullError,
    CheckpointError,
    FormatError,
    InputError,
    KeyMismatchError,
)
from glm.formats import config_to_hf
from glm.formats import ptuning_checkpoint as pc
from glm.presets import preset

FAMILIES = ["tiny-chatglm", "tiny-chatglm2", "tiny-chatglm3", "tiny-glm4-chatglm"]
BACKEND_NAMES = [b for b in ("reference", "sdpa", "fused") if b in BACKENDS]


def model_with_prefix(name: str, P: int = 5, projection: bool = False, seed: int = 0, **kw) -> glm.GLM:
    torch.manual_seed(seed)
    model = glm.GLM(preset(name)).eval()
    model.init_weights(std=0.2, seed=seed)  # O(1) activations, so that the prefix moves the logits visibly
    ptuning.apply(model, ptuning.PrefixConfig(pre_seq_len=P, prefix_projection=projection, **kw))
    with torch.no_grad():  # an O(1) prefix whatever the init, so that it visibly moves the logits
        for p in model.prefix_encoder.parameters():
            p.normal_(0, 1.0 / math.sqrt(max(p.shape[-1], 1)) if p.dim() == 2 and projection else 1.0)
    return model


def positions_for(model: glm.GLM, B: int, T: int, start: int = 0) -> torch.Tensor:
    pos = torch.arange(start, start + T).expand(B, T)
    return torch.stack((pos, torch.zeros_like(pos)), 1) if model.config.position_streams == 2 else pos


@torch.no_grad()
def explicit_past(model: glm.GLM, ids: torch.Tensor, position_ids: torch.Tensor, prefix_len=None) -> torch.Tensor:
    """Logits of the base model (prefix taken off) whose cache already holds the prefix keys/values in its
    first slots: the prefix visible to every query and never rotated, by construction."""
    encoder = model.prefix_encoder
    B, P = ids.shape[0], encoder.pre_seq_len
    k, v = encoder(B, torch.float32)
    model.prefix_encoder = None
    try:
        cache = model.new_cache(B, P + ids.shape[1])
        cache.k[:, :, :, :P], cache.v[:, :, :, :P] = k.expand(-1, B, -1, -1, -1), v.expand(-1, B, -1, -1, -1)
        cache.length = P
        pl = None if prefix_len is None else prefix_len + P
        return model(ids, position_ids, prefix_len=pl, cache=cache, backend="reference")
    finally:
        model.prefix_encoder = encoder


# ------------------------------------------------------------------------------------------------
# The forward

@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("projection", [False, True])
def test_logits_equal_attention_over_prefix_in_front(name, projection):
    model = model_with_prefix(name, projection=projection)
    ids = torch.randint(0, 150, (2, 9), generator=torch.Generator().manual_seed(1))
    want = explicit_past(model, ids, positions_for(model, 2, 9))
    with torch.no_grad():
        base = model.prefix_encoder
        model.prefix_encoder = None
        plain = model(ids, backend="reference")
        model.prefix_encoder = base
        for backend in BACKEND_NAMES:
            got = model(ids, backend=backend)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=0, msg=f"{backend}")
    assert (plain - want).abs().max() > 0.1  # the prefix moves the logits far past the tolerance


def test_bidirectional_context_counts_tokens_only():
    """ChatGLM-6B: its context (prefix_len) is visible to every query; the prefix shifts it by P slots but
    the positions are the tokens' own (no offset for the prefix)."""
    model = model_with_prefix("tiny-chatglm")
    ids = torch.randint(0, 150, (2, 8), generator=torch.Generator().manual_seed(2))
    pos = torch.tensor([[0, 1, 2, 3, 4, 4, 4, 4], [0, 1, 2, 3, 4, 5, 5, 5]])
    pos = torch.stack((pos, torch.tensor([[0] * 5 + [1, 2, 3], [0] * 6 + [1, 2]])), 1)
    prefix_len = torch.tensor([5, 6])
    want = explicit_past(model, ids, pos, prefix_len)
    with torch.no_grad():
        for backend in BACKEND_NAMES:
            got = model(ids, pos, prefix_len=prefix_len, backend=backend)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=0, msg=f"{backend}")


@pytest.mark.parametrize("name", ["tiny-chatglm", "tiny-chatglm3"])
def test_left_padded_rows_equal_rows_alone(name):
    """Left pads stay hidden and the prefix visible: a padded row's logits are the row's alone."""
    model = model_with_prefix(name)
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(4, 150, (n,), generator=g) for n in (7, 4)]
    ids = torch.zeros(2, 7, dtype=torch.long)
    ids[0], ids[1, 3:] = rows[0], rows[1]
    pad_left = torch.tensor([0, 3])
    with torch.no_grad():
        alone = [model(r[None], backend="reference")[0] for r in rows]
        for backend in BACKEND_NAMES:
            got = model(ids, pad_left=pad_left, backend=backend)
            torch.testing.assert_close(got[0], alone[0], atol=2e-5, rtol=0)
            torch.testing.assert_close(got[1, 3:], alone[1], atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_cached_decoding_equals_full_forward(name):
    """Prefill, then one token at a time (and the static step): the cache holds the prefix, so every step
    equals the full forward with the prefix (1e-5, fp32)."""
    model = model_with_prefix(name)
    B, T, steps = 2, 5, 4
    ids = torch.randint(4, 150, (B, T + steps), generator=torch.Generator().manual_seed(4))
    pad_left = torch.tensor([0, 2])
    # Positions given throughout: 2D families continue a cache inside a blank, not at plain positions.
    pos = (torch.arange(T + steps) - pad_left[:, None]).clamp(min=0)
    if model.config.position_streams == 2:
        pos = torch.stack((pos, torch.zeros_like(pos)), 1)
    with torch.no_grad():
        full = model(ids, pos, pad_left=pad_left, backend="reference")
        for static in (False, True):
            cache = model.new_cache(B, T + steps)
            assert cache.max_len == T + steps + model.prefix_slots
            logits = [model(ids[:, :T], pos[..., :T], pad_left=pad_left, cache=cache)[:, -1]]
            assert cache.length == T + model.prefix_slots
            for t in range(T, T + steps - 1):
                if static:
                    cache.begin_static_step()
                    out = model(ids[:, t:t + 1], pos[..., t:t + 1], cache=cache, static=True)
                    cache.advance(1, glm.positions.as_streams(model.config, pos)[..., t])
                else:
                    out = model(ids[:, t:t + 1], pos[..., t:t + 1], cache=cache)
                logits.append(out[:, -1])
            torch.testing.assert_close(torch.stack(logits, 1), full[:, T - 1:T + steps - 1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("static", [False, True])
def test_generate_sees_the_prefix(static):
    model = model_with_prefix("tiny-chatglm3")
    ids = torch.randint(4, 150, (1, 6), generator=torch.Generator().manual_seed(5))
    out = glm.generate(model, ids, max_new_tokens=5, eos_token_ids=(), static=static)
    seq = ids
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat((seq, model(seq)[:, -1].argmax(-1, keepdim=True)), 1)
    assert out.tolist() == seq[:, 6:].tolist()


# ------------------------------------------------------------------------------------------------
# Training

@pytest.mark.parametrize("projection", [False, True])
def test_only_the_prefix_trains_and_the_base_stays_bit_identical(projection):
    model = model_with_prefix("tiny-chatglm2", projection=projection, dropout=0.1)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("prefix_encoder.")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"prefix_encoder.{n}" for n, _ in model.prefix_encoder.named_parameters()}
    assert ptuning.prefix_parameters(model) == list(model.prefix_encoder.parameters())
    opt = torch.optim.AdamW(ptuning.prefix_parameters(model), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(4, 150, (4, 12), generator=torch.Generator().manual_seed(6))
    model.train()
    losses = []
    for _ in range(15):
        loss = glm.lm_loss(model(ids[:, :-1]), ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n in base)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ptuning.prefix_parameters(model))
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)


def test_dropout_draws_a_mask_per_row_in_training_only():
    model = model_with_prefix("tiny-chatglm3", dropout=0.5)
    ids = torch.randint(4, 150, (1, 6), generator=torch.Generator().manual_seed(7)).expand(2, 6)
    model.train()
    out = model(ids)
    assert not torch.allclose(out[0], out[1])
    model.eval()
    out = model(ids)
    torch.testing.assert_close(out[0], out[1])


def test_remove_gives_back_the_trainable_base():
    torch.manual_seed(0)
    model = glm.GLM(preset("tiny-chatglm3")).eval()
    ids = torch.randint(4, 150, (1, 6))
    with torch.no_grad():
        before = model(ids)
    ptuning.apply(model, ptuning.PrefixConfig(pre_seq_len=3))
    assert model.prefix_slots == 3
    with pytest.raises(ArgumentError, match="already has a P-tuning prefix"):
        ptuning.apply(model, ptuning.PrefixConfig())
    ptuning.remove(model)
    assert model.prefix_encoder is None and model.prefix_slots == 0
    assert all(p.requires_grad for p in model.parameters())
    assert "prefix_encoder.embed.weight" not in model.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, atol=0, rtol=0)
    with pytest.raises(ArgumentError, match="no P-tuning prefix"):
        ptuning.remove(model)


# ------------------------------------------------------------------------------------------------
# THUDM's checkpoint layout

def test_release_layout_oracle_chatglm2(tmp_path):
    """A prefix written by hand in THUDM's ChatGLM2 layout (interleaved RoPE key dims), loaded onto the
    release's tiny checkpoint: glm's logits equal a ChatGLM2 forward written here over the release
    tensors, with the prefix's keys/values concatenated in front of each layer's (not rotated)."""
    src = reference_dir("chatglm2-6b")
    with open(os.path.join(src, "config.json")) as f:
        hf = json.load(f)
    model = glm.from_pretrained(src)
    L, g, d, H = hf["num_layers"], hf["multi_query_group_num"], hf["kv_channels"], hf["hidden_size"]
    P, kv = 4, hf["num_layers"] * 2 * hf["multi_query_group_num"] * hf["kv_channels"]
    gen = torch.Generator().manual_seed(8)
    for projection in (False, True):
        if projection:
            state = {"embedding.weight": torch.randn(P, kv, generator=gen),
                     "trans.0.weight": torch.randn(H, kv, generator=gen) / kv ** 0.5,
                     "trans.0.bias": torch.randn(H, generator=gen) * 0.1,
                     "trans.2.weight": torch.randn(kv, H, generator=gen) / H ** 0.5 * 2,
                     "trans.2.bias": torch.randn(kv, generator=gen) * 0.1}
            h = torch.tanh(state["embedding.weight"] @ state["trans.0.weight"].T + state["trans.0.bias"])
            flat = h @ state["trans.2.weight"].T + state["trans.2.bias"]
        else:
            state = {"embedding.weight": torch.randn(P, kv, generator=gen)}
            flat = state["embedding.weight"]
        folder = tmp_path / f"ptuning-{projection}"
        folder.mkdir()
        torch.save({pc.PREFIX + k: v for k, v in state.items()}, folder / "pytorch_model.bin")
        (folder / "config.json").write_text(json.dumps({**hf, "pre_seq_len": P, "prefix_projection": projection}))
        assert pc.is_prefix_folder(folder)
        cfg = pc.load_prefix(model, folder)
        assert (cfg.pre_seq_len, cfg.prefix_projection) == (P, projection)
        ids = torch.randint(0, hf["padded_vocab_size"], (1, 7), generator=gen)
        with torch.no_grad():
            got = model(ids, backend="reference")[0]
        want = chatglm2_forward(src, hf, ids[0], flat.view(P, 2 * L, g, d))
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def chatglm2_forward(src: str, hf: dict, ids: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
    """ChatGLM2-6B's forward for one unpadded row over its release tensors (fp32), with ``past`` [P, 2L, g, d]
    (layer l's keys at 2l, values at 2l+1, THUDM's get_prompt order) in front of each layer's keys."""
    with CheckpointReader(src) as reader:
        w = {k: reader.get(k).float() for k in reader.keys()}
    n, g, d, eps = hf["num_attention_heads"], hf["multi_query_group_num"], hf["kv_channels"], hf["layernorm_epsilon"]
    T, P, rot = ids.shape[0], past.shape[0], hf["kv_channels"] // 2
    theta = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    angle = torch.arange(T, dtype=torch.float32)[:, None] * theta  # [T, rot/2]
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]

    def rope(x):  # [T, heads, d]: adjacent pairs of the first `rot` dims rotate together
        pairs, rest = x[..., :rot].reshape(T, x.shape[1], rot // 2, 2), x[..., rot:]
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.cat((torch.stack((a * cos - b * sin, b * cos + a * sin), -1).flatten(2), rest), -1)

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    x = w["transformer.embedding.word_embeddings.weight"][ids]
    visible = torch.ones(T, P + T, dtype=torch.bool)
    visible[:, P:] = torch.ones(T, T, dtype=torch.bool).tril()
    for layer in range(hf["num_layers"]):
        p = f"transformer.encoder.layers.{layer}."
        h = rms(x, w[p + "input_layernorm.weight"])
        qkv = h @ w[p + "self_attention.query_key_value.weight"].T + w[p + "self_attention.query_key_value.bias"]
        q, k, v = qkv.split((n * d, g * d, g * d), -1)
        q, k, v = rope(q.view(T, n, d)), rope(k.view(T, g, d)), v.view(T, g, d)
        k = torch.cat((past[:, 2 * layer], k)).repeat_interleave(n // g, 1)
        v = torch.cat((past[:, 2 * layer + 1], v)).repeat_interleave(n // g, 1)
        s = torch.einsum("tnd,snd->nts", q, k) / math.sqrt(d)
        a = torch.softmax(s.masked_fill(~visible, float("-inf")), -1)
        o = torch.einsum("nts,snd->tnd", a, v).reshape(T, n * d)
        x = x + o @ w[p + "self_attention.dense.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        gate, up = (h @ w[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, -1)
        x = x + (F.silu(gate) * up) @ w[p + "mlp.dense_4h_to_h.weight"].T
    x = rms(x, w["transformer.encoder.final_layernorm.weight"])
    return x @ w["transformer.output_layer.weight"].T


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("projection", [False, True])
def test_checkpoint_round_trip(name, projection, tmp_path):
    model = model_with_prefix(name, projection=projection)
    pc.save_prefix(model, tmp_path / "p", base_model_name_or_path="/models/base")
    assert sorted(os.listdir(tmp_path / "p")) == ["config.json", "pytorch_model.bin"]
    saved = torch.load(tmp_path / "p" / "pytorch_model.bin", weights_only=True)
    names = ["embedding.weight"] + (["trans.0.bias", "trans.0.weight", "trans.2.bias", "trans.2.weight"]
                                    if projection else [])
    assert sorted(saved) == [pc.PREFIX + n for n in names]
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    release = config_to_hf(model.config, torch.float32)
    assert cfg == {**release, "pre_seq_len": 5, "prefix_projection": projection,
                   "base_model_name_or_path": "/models/base"}
    assert pc.is_prefix_folder(tmp_path / "p") and pc.base_of(tmp_path / "p") == "/models/base"

    torch.manual_seed(1)
    other = glm.GLM(model.config).eval()
    other.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("prefix_encoder.")})
    got = pc.load_prefix(other, tmp_path / "p")
    assert (got.pre_seq_len, got.prefix_projection) == (5, projection)
    for (n, a), (_, b) in zip(model.prefix_encoder.state_dict().items(), other.prefix_encoder.state_dict().items()):
        assert torch.equal(a, b), n
    ids = torch.randint(4, 150, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(other(ids), model(ids), atol=0, rtol=0)
    # Written again over itself (an earlier prefix folder may be replaced), byte for byte the same tensors.
    pc.save_prefix(other, tmp_path / "p", base_model_name_or_path="/models/base")
    again = torch.load(tmp_path / "p" / "pytorch_model.bin", weights_only=True)
    assert all(torch.equal(saved[k], again[k]) for k in saved)


def test_interleaved_families_store_keys_in_release_order(tmp_path):
    """ChatGLM2's file holds the key dims interleaved: the saved flat vector is glm's with each key head's
    dims in the release order (values and ChatGLM-6B's keys as they are)."""
    for name, permuted in (("tiny-chatglm3", True), ("tiny-chatglm", False)):
        model = model_with_prefix(name)
        pc.save_prefix(model, tmp_path / name)
        saved = torch.load(tmp_path / name / "pytorch_model.bin", weights_only=True)[pc.PREFIX + "embedding.weight"]
        cfg = model.config
        L, g, d, r = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.rotary_dim
        mine = model.prefix_encoder.embed.weight.detach().view(-1, L, 2, g, d)
        theirs = saved.view(-1, L, 2, g, d)
        torch.testing.assert_close(theirs[:, :, 1], mine[:, :, 1], atol=0, rtol=0)
        if permuted:  # release dim 2i, 2i+1 (a rotated pair) = glm dims i, i + r/2
            torch.testing.assert_close(theirs[:, :, 0, :, 0:r:2], mine[:, :, 0, :, :r // 2], atol=0, rtol=0)
            torch.testing.assert_close(theirs[:, :, 0, :, 1:r:2], mine[:, :, 0, :, r // 2:r], atol=0, rtol=0)
            torch.testing.assert_close(theirs[:, :, 0, :, r:], mine[:, :, 0, :, r:], atol=0, rtol=0)
        else:
            torch.testing.assert_close(theirs, mine, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# Bad inputs: one clear error, nothing written, the model unchanged

@pytest.mark.parametrize("kw, field", [({"pre_seq_len": 0}, "pre_seq_len"), ({"pre_seq_len": 2.5}, "pre_seq_len"),
                                       ({"prefix_hidden_size": 0}, "prefix_hidden_size"),
                                       ({"dropout": 1.0}, "dropout"), ({"prefix_projection": "yes"}, "projection")])
def test_bad_prefix_config(kw, field):
    model = glm.GLM(preset("tiny-chatglm3"))
    with pytest.raises(ArgumentError, match=field):
        ptuning.apply(model, ptuning.PrefixConfig(**kw))
    assert model.prefix_encoder is None and all(p.requires_grad for p in model.parameters())


def test_families_without_the_layout_are_refused(tmp_path):
    for name in ("tiny-glm", "tiny-glm4-hf", "tiny-glm-hf"):
        model = model_with_prefix(name)
        with pytest.raises(FormatError, match="chatglm, chatglm2, chatglm3, glm4-chatglm"):
            pc.save_prefix(model, tmp_path / name)
        assert not (tmp_path / name).exists()
    # A GLM-4 model in transformers' form computes what the chatglm format does: it can be written as that.
    pc.save_prefix(model_with_prefix("tiny-glm-hf"), tmp_path / "as-chatglm", family="glm4-chatglm")
    assert pc.is_prefix_folder(tmp_path / "as-chatglm")


def test_save_refuses_a_model_folder_and_a_wide_mlp(tmp_path):
    model = model_with_prefix("tiny-chatglm2")
    base = tmp_path / "base"
    glm.GLM(preset("tiny-chatglm2")).save_pretrained(str(base), format="hf")
    before = snapshot(base)
    with pytest.raises(ArgumentError, match="holds a model checkpoint"):
        pc.save_prefix(model, base)
    assert snapshot(base) == before
    with pytest.raises(ArgumentError, match="no P-tuning prefix"):
        pc.save_prefix(glm.GLM(preset("tiny-chatglm2")), tmp_path / "none")
    wide = model_with_prefix("tiny-chatglm2", projection=True, prefix_hidden_size=32)
    with pytest.raises(FormatError, match="prefix_hidden_size=None"):
        pc.save_prefix(wide, tmp_path / "wide")
    assert not (tmp_path / "none").exists() and not (tmp_path / "wide").exists()
    assert not pc.is_prefix_folder(base)


def _saved(tmp_path, name="tiny-chatglm3", projection=False, **overrides) -> str:
    folder = tmp_path / f"saved-{name}-{projection}"
    pc.save_prefix(model_with_prefix(name, projection=projection, **overrides), folder)
    return str(folder)


def _edit(folder: str, fn) -> None:
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    fn(cfg)
    with open(path, "w") as f:
        json.dump(cfg, f)


def _fresh(name="tiny-chatglm3") -> glm.GLM:
    return glm.GLM(preset(name)).eval()


def test_load_errors_leave_the_model_unchanged(tmp_path):
    folder = _saved(tmp_path)
    cases = []
    bigger = _fresh().config.replace(num_layers=3)  # another base: the shapes differ
    cases.append((glm.GLM(bigger), folder, CheckpointError, "needs"))
    cases.append((_fresh("tiny-chatglm"), folder, CheckpointError, "trained for a chatglm3 model"))
    no_len = _saved(tmp_path, projection=True)
    _edit(no_len, lambda c: c.pop("pre_seq_len"))
    cases.append((_fresh(), no_len, CheckpointError, "has no pre_seq_len"))
    flag = _saved(tmp_path, "tiny-chatglm2", projection=True)
    _edit(flag, lambda c: c.update(prefix_projection=False))
    cases.append((_fresh("tiny-chatglm2"), flag, CheckpointError, "holds the projection MLP"))
    missing = _saved(tmp_path, "tiny-chatglm", projection=True)
    sd = torch.load(os.path.join(missing, "pytorch_model.bin"), weights_only=True)
    del sd[pc.PREFIX + "trans.2.bias"]
    torch.save(sd, os.path.join(missing, "pytorch_model.bin"))
    cases.append((_fresh("tiny-chatglm"), missing, KeyMismatchError, "trans.2.bias"))
    for model, path, error, words in cases:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(error, match=words):
            pc.load_prefix(model, path)
        assert model.prefix_encoder is None
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(CheckpointError, match="no pre_seq_len"):
        pc.load_prefix(_fresh("tiny-chatglm2"), reference_dir("chatglm2-6b"))
    assert not pc.is_prefix_folder(reference_dir("chatglm2-6b")) and not pc.is_prefix_folder(tmp_path / "nothing")


def test_a_prefix_replaces_the_one_a_model_has(tmp_path):
    folder = _saved(tmp_path, "tiny-chatglm3", projection=True)
    model = model_with_prefix("tiny-chatglm3", P=2)
    pc.load_prefix(model, folder)
    assert model.prefix_slots == 5 and model.prefix_encoder.w_in is not None


def test_structure_the_prefix_cannot_take():
    model = model_with_prefix("tiny-chatglm3")
    ids = torch.randint(4, 150, (1, 6))
    with pytest.raises(InputError, match="doc_start"):
        model(ids, doc_start=torch.zeros(1, 6, dtype=torch.long))
    small = glm.KVCache.for_model(model, 1, 8)  # room for the tokens but not the prefix
    with pytest.raises(CacheFullError, match="reserves the prefix's slots"):
        model(ids, cache=small)
