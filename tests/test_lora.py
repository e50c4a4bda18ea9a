"""LoRA (glm.lora) and its peft file layout (glm.formats.peft), for every family on tiny models.

The release-layout checks go through the weight tables: a merged model written in the release format must
hold ``W_release + scaling · B_release A`` for every adapted module, where ``B_release`` is what
save_adapter wrote. That ties the adapter's row conversion (RoPE permutation, per-head QKV) to the one the
converter applies to the weights it adapts. peft itself (the test extra) checks the key names and the
computation on transformers' Glm / Glm4.
"""
from __future__ import annotations

import json
import os

import pytest
import safetensors.torch
import torch

import glm
from glm import lora
from glm.errors import CheckpointError, InputError
from glm.formats import peft as gpeft
from glm.lora import LoraConfig

FAMILIES = ["glm", "chatglm", "chatglm2", "chatglm3", "glm4-chatglm", "glm-hf", "glm4-hf"]
# The first adapted module of layer 0 as peft names it (base_model.model.<path>), per family.
FIRST_KEY = {
    "glm": "base_model.model.glm.transformer.layers.0.attention.query_key_value",
    "chatglm": "base_model.model.transformer.layers.0.attention.query_key_value",
    "chatglm2": "base_model.model.transformer.encoder.layers.0.self_attention.query_key_value",
    "chatglm3": "base_model.model.transformer.encoder.layers.0.self_attention.query_key_value",
    "glm4-chatglm": "base_model.model.transformer.encoder.layers.0.self_attention.query_key_value",
    "glm-hf": "base_model.model.model.layers.0.self_attn.q_proj",
    "glm4-hf": "base_model.model.model.layers.0.self_attn.q_proj",
}
DEFAULT_TARGETS = {f: ("query_key_value",) for f in FAMILIES[:5]}
DEFAULT_TARGETS.update({f: ("q_proj", "k_proj", "v_proj") for f in ("glm-hf", "glm4-hf")})


def tiny(family: str, seed: int = 0, std: float = 0.2) -> glm.GLM:
    """A tiny model with weights large enough that logits are O(1) (the 0.02 init leaves them ~0)."""
    m = glm.GLM(glm.preset(f"tiny-{family}")).eval()
    m.init_weights(std=std, seed=seed)
    return m


def ids(batch: int = 2, T: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 150, (batch, T), generator=torch.Generator().manual_seed(seed))


def randomise(model: glm.GLM, seed: int = 1, std: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in lora.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def base_state(model: glm.GLM) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".lora." not in k}


# ---------------------------------------------------------------------------------------------
# The adapters in the model

@pytest.mark.parametrize("family", FAMILIES)
def test_zero_b_gives_the_base_logits_and_default_targets(family):
    m = tiny(family)
    x = ids()
    want = m(x)
    lora.apply(m, LoraConfig(r=4, alpha=8, mlp=True), seed=0)
    assert torch.equal(m(x), want)
    assert m.lora_family == family
    assert m.lora_config.targets[:len(DEFAULT_TARGETS[family])] == DEFAULT_TARGETS[family]
    assert len(m.lora_config.targets) == len(DEFAULT_TARGETS[family]) + 2  # the two MLP projections
    assert all(p.abs().sum() > 0 for n, p in lora.lora_parameters(m) if n.endswith(".A"))


def test_targets_by_release_name_and_dotted_tail():
    m = tiny("glm-hf")
    lora.apply(m, LoraConfig(targets=("self_attn.q_proj", "v_proj")))
    assert m.lora_config.targets == ("q_proj", "v_proj")
    qkv = m.layers[0].attn.qkv
    cfg = m.config
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    assert (qkv.lora["q_proj"].start, qkv.lora["q_proj"].stop) == (0, q)
    assert (qkv.lora["v_proj"].start, qkv.lora["v_proj"].stop) == (q + kv, q + 2 * kv)
    assert not hasattr(m.layers[0].attn.out, "lora")


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_equals_unmerged_and_the_hand_computation(family):
    # Logits of O(1), where fp32 rounding of the two summation orders stays under 1e-5.
    m = tiny(family, std=0.1)
    x = ids()
    targets = ("q_proj", "v_proj", "down_proj") if family.endswith("-hf") else ("query_key_value",
                                                                                "dense_4h_to_h")
    lora.apply(m, LoraConfig(r=3, alpha=5, targets=targets))
    randomise(m)
    before = base_state(m)
    unmerged = m(x)
    assert (unmerged - tiny(family, std=0.1)(x)).abs().max() > 1e-2  # the adapters do something
    assert unmerged.abs().max() > 0.5
    lora.merge(m)
    assert lora.is_merged(m)
    assert (m(x) - unmerged).abs().max() <= 1e-5
    scaling = 5 / 3
    for i in range(m.config.num_layers):
        for module in {t.module for t in lora.applied_targets(m)}:
            name = f"layers.{i}.{module}.weight"
            hand = before[name].clone()
            touched = torch.zeros(hand.shape[0], dtype=torch.bool)
            for t in lora.applied_targets(m):
                if t.module == module:
                    a = lora.adapter(m, i, t)
                    hand[a.start:a.stop] += scaling * (a.B @ a.A).detach()
                    touched[a.start:a.stop] = True
            assert torch.allclose(m.state_dict()[name], hand, atol=1e-6, rtol=0)
            assert torch.equal(m.state_dict()[name][~touched], before[name][~touched])
    lora.merge(m)  # a no-op when merged
    assert (m(x) - unmerged).abs().max() <= 1e-5
    lora.unmerge(m)
    assert not lora.is_merged(m)
    for k, v in base_state(m).items():
        assert torch.allclose(v, before[k], atol=1e-6, rtol=0), k
    assert (m(x) - unmerged).abs().max() <= 1e-5


def test_a_q_slice_adapter_moves_only_its_rows():
    m = tiny("glm4-hf")
    lora.apply(m, LoraConfig(r=2, targets=("k_proj",)))
    randomise(m)
    before = base_state(m)
    lora.merge(m)
    w, w0 = m.layers[1].attn.qkv.weight, before["layers.1.attn.qkv.weight"]
    q = m.config.num_heads * m.config.head_dim
    kv = m.config.num_kv_heads * m.config.head_dim
    assert torch.equal(w[:q], w0[:q]) and torch.equal(w[q + kv:], w0[q + kv:])
    assert not torch.equal(w[q:q + kv], w0[q:q + kv])


@pytest.mark.parametrize("family", ["chatglm2", "glm4-chatglm", "glm-hf"])
def test_kv_cache_backends_and_logits_at_with_adapters(family):
    m = tiny(family)
    lora.apply(m, LoraConfig(r=4, mlp=True))
    randomise(m)
    x = ids(batch=2, T=10)
    full = m(x, backend="reference")
    assert (m(x, backend="sdpa") - full).abs().max() <= 1e-4
    at = torch.zeros_like(x, dtype=torch.bool)
    at[:, 6:] = True
    assert torch.allclose(m(x, logits_at=at, backend="reference"), full[at], atol=1e-5)
    cache = m.new_cache(2, 16)
    with torch.no_grad():
        pre = m(x[:, :7], cache=cache, backend="reference")
        steps = [m(x[:, t:t + 1], cache=cache, backend="reference") for t in range(7, 10)]
    got = torch.cat([pre, *steps], dim=1)
    assert (got - full).abs().max() <= 1e-4


def test_only_adapters_train_and_the_base_stays_bit_identical():
    m = tiny("chatglm3")
    before = base_state(m)
    lora.apply(m, LoraConfig(r=4, alpha=8, mlp=True, dropout=0.1), seed=0)
    m.train()
    names = {n for n, _ in lora.trainable_parameters(m)}
    assert names == {n for n, _ in lora.lora_parameters(m)} and names
    assert all(".lora." in n for n in names)
    opt = torch.optim.AdamW([p for _, p in lora.trainable_parameters(m)], lr=1e-2)
    x = ids(batch=4, T=12, seed=3)
    losses = []
    for _ in range(5):
        loss = glm.lm_loss(m(x[:, :-1]), x[:, 1:])
        opt.zero_grad()
        loss.backward()
        for n, p in m.named_parameters():
            assert (p.grad is not None) == (n in names), n
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for k, v in base_state(m).items():
        assert torch.equal(v, before[k]), k
    assert all(not torch.equal(p, torch.zeros_like(p)) for n, p in lora.lora_parameters(m) if n.endswith(".B"))


def test_remove_leaves_a_plain_model_that_saves_in_release_format(tmp_path):
    m = tiny("glm4-chatglm")
    lora.apply(m, LoraConfig(r=4, mlp=True))
    randomise(m)
    x = ids()
    want = m(x)
    lora.remove(m)
    assert not lora.has_lora(m) and m.lora_config is None
    assert all(type(mod).__name__ != "LoraLinear" for mod in m.modules())
    assert all(p.requires_grad for p in m.parameters())
    assert set(m.state_dict()) == set(glm.GLM(glm.preset("tiny-glm4-chatglm")).state_dict())
    assert (m(x) - want).abs().max() <= 1e-5
    for fmt in ("glm", "hf"):
        m.save_pretrained(str(tmp_path / fmt), format=fmt)
        back = glm.from_pretrained(str(tmp_path / fmt)).eval()
        assert (back(x) - want).abs().max() <= 1e-4


def test_discard_restores_the_base():
    m = tiny("glm")
    x = ids()
    want = m(x)
    lora.apply(m, LoraConfig(r=2))
    randomise(m)
    lora.merge(m)
    lora.discard(m)
    assert not lora.has_lora(m)
    assert (m(x) - want).abs().max() <= 1e-5


def test_layers_subset():
    m = tiny("glm-hf")
    lora.apply(m, LoraConfig(r=2, targets=("q_proj",), layers=(1,)))
    assert not hasattr(m.layers[0].attn.qkv, "lora") and "q_proj" in m.layers[1].attn.qkv.lora
    assert m.lora_config.layers == (1,)


# ---------------------------------------------------------------------------------------------
# peft's file layout

def read_folder(folder) -> dict[str, torch.Tensor]:
    out = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            out.update(safetensors.torch.load_file(os.path.join(folder, name)))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip_and_release_layout(family, tmp_path):
    m = tiny(family)
    base_folder = str(tmp_path / "base")
    m.save_pretrained(base_folder, format="hf")
    base_release = read_folder(base_folder)
    lora.apply(m, LoraConfig(r=3, alpha=6, mlp=True))
    randomise(m)
    x = ids()
    want = m(x)
    gpeft.save_adapter(m, str(tmp_path / "ad"), base_model_name_or_path=base_folder)
    assert sorted(os.listdir(tmp_path / "ad")) == ["adapter_config.json", "adapter_model.safetensors"]
    conf = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "CAUSAL_LM" and conf["bias"] == "none"
    assert (conf["r"], conf["lora_alpha"], conf["lora_dropout"]) == (3, 6, 0.0)
    assert conf["target_modules"] == list(m.lora_config.targets)
    assert conf["base_model_name_or_path"] == base_folder and conf["fan_in_fan_out"] is False
    saved = safetensors.torch.load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert FIRST_KEY[family] + ".lora_A.weight" in saved and FIRST_KEY[family] + ".lora_B.weight" in saved
    assert len(saved) == 2 * len(m.lora_config.targets) * m.config.num_layers

    # The release layout: the merged model in release format == base + scaling * B_release @ A_release.
    merged_folder = str(tmp_path / "merged")
    lora.merge(m)
    m.save_pretrained(merged_folder, format="hf")
    lora.unmerge(m)
    merged_release = read_folder(merged_folder)
    for key in [k for k in saved if k.endswith(".lora_A.weight")]:
        module = key[len("base_model.model."):-len(".lora_A.weight")]
        w = module + ".weight"
        delta = 2.0 * (saved[key.replace("lora_A", "lora_B")] @ saved[key])
        assert torch.allclose(merged_release[w], base_release[w] + delta, atol=1e-5, rtol=0), w

    fresh = tiny(family)
    cfg = gpeft.load_adapter(fresh, str(tmp_path / "ad"))
    assert cfg == m.lora_config
    assert torch.equal(fresh(x), want)
    for (n1, p1), (n2, p2) in zip(lora.lora_parameters(fresh), lora.lora_parameters(m)):
        assert n1 == n2 and torch.equal(p1, p2)
    assert gpeft.is_adapter_folder(str(tmp_path / "ad")) and not gpeft.is_adapter_folder(base_folder)


def test_load_replaces_adapters_and_accepts_another_familys_names(tmp_path):
    # A ChatGLM3 model computes what Glm does: Glm's q_proj names fit it, and round-trip.
    m = tiny("chatglm3")
    lora.apply(m, LoraConfig(r=2, targets=("q_proj", "k_proj")), family="glm-hf")
    randomise(m)
    x = ids()
    want = m(x)
    gpeft.save_adapter(m, str(tmp_path / "ad"))
    saved = safetensors.torch.load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight" in saved
    other = tiny("chatglm3")
    lora.apply(other, LoraConfig(r=5, mlp=True))
    lora.merge(other)
    gpeft.load_adapter(other, str(tmp_path / "ad"))
    assert other.lora_family == "glm-hf" and not lora.is_merged(other)
    assert torch.equal(other(x), want)
    # Written with chatglm3's own names, q_proj alone has no module of its own.
    with pytest.raises(InputError, match="q_proj.*no single module"):
        gpeft.save_adapter(m, str(tmp_path / "ad2"), family="chatglm3")
    assert not (tmp_path / "ad2").exists()


def test_a_peft_layers_to_transform_adapter_round_trips(tmp_path):
    m = tiny("glm4-hf")
    lora.apply(m, LoraConfig(r=2, targets=("v_proj",), layers=(1,)))
    randomise(m)
    gpeft.save_adapter(m, str(tmp_path / "ad"))
    conf = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert conf["layers_to_transform"] == [1]
    fresh = tiny("glm4-hf")
    assert gpeft.load_adapter(fresh, str(tmp_path / "ad")).layers == (1,)
    x = ids()
    assert torch.equal(fresh(x), m(x))


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error, nothing written, the model untouched

def test_bad_configs_name_the_field():
    m = tiny("glm-hf")
    with pytest.raises(InputError, match=r"'query_key_value' is not a module of a glm-hf model.*q_proj, k_proj"):
        lora.apply(m, LoraConfig(targets=("query_key_value",)))
    for bad, field in ((dict(r=0), "rank r"), (dict(alpha=-1), "alpha"), (dict(dropout=1.0), "dropout"),
                       (dict(targets="q_proj"), "targets"), (dict(layers=(7,)), "layers")):
        with pytest.raises(InputError, match=field):
            lora.apply(m, LoraConfig(**bad))
    assert not lora.has_lora(m) and all(p.requires_grad for p in m.parameters())
    with pytest.raises(InputError, match="cannot take adapters named for glm-hf"):
        lora.apply(tiny("glm"), LoraConfig(), family="glm-hf")
    with pytest.raises(InputError, match="no LoRA module names for family 'nope'"):
        lora.apply(m, LoraConfig(), family="nope")
    lora.apply(m, LoraConfig())
    with pytest.raises(InputError, match="already has LoRA adapters"):
        lora.apply(m, LoraConfig())
    with pytest.raises(InputError, match="no LoRA adapters"):
        lora.merge(tiny("glm"))


def test_save_errors_write_nothing(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="no LoRA adapters to save"):
        gpeft.save_adapter(tiny("glm"), str(tmp_path / "none"))
    assert not (tmp_path / "none").exists()
    m = tiny("chatglm")
    lora.apply(m, LoraConfig(r=2))
    with pytest.raises(InputError, match="chatglm model's adapters cannot be written with glm-hf"):
        gpeft.save_adapter(m, str(tmp_path / "x"), family="glm-hf")
    assert not (tmp_path / "x").exists()
    # A write that fails half way leaves neither a new folder nor, in an existing one, the weights file.
    calls = []

    def failing(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(path, data)

    real = gpeft.atomic_write
    monkeypatch.setattr(gpeft, "atomic_write", failing)
    with pytest.raises(OSError):
        gpeft.save_adapter(m, str(tmp_path / "new"))
    assert not (tmp_path / "new").exists() and not [p for p in os.listdir(tmp_path) if "new" in p]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("x")
    calls.clear()
    with pytest.raises(OSError):
        gpeft.save_adapter(m, str(tmp_path / "old"))
    assert sorted(os.listdir(tmp_path / "old")) == ["keep.txt"]
    # Over an earlier adapter: both of its files stay as they were.
    monkeypatch.setattr(gpeft, "atomic_write", real)
    gpeft.save_adapter(m, str(tmp_path / "old"))
    earlier = {n: (tmp_path / "old" / n).read_bytes() for n in os.listdir(tmp_path / "old")}
    randomise(m)
    monkeypatch.setattr(gpeft, "atomic_write", failing)
    calls.clear()
    with pytest.raises(OSError):
        gpeft.save_adapter(m, str(tmp_path / "old"))
    assert {n: (tmp_path / "old" / n).read_bytes() for n in os.listdir(tmp_path / "old")} == earlier


@pytest.fixture
def saved_adapter(tmp_path):
    m = tiny("glm-hf")
    lora.apply(m, LoraConfig(r=2, targets=("q_proj", "v_proj")))
    randomise(m)
    folder = tmp_path / "ad"
    gpeft.save_adapter(m, str(folder))
    return folder


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    conf = json.loads(path.read_text())
    conf.update(changes)
    path.write_text(json.dumps(conf))


def edit_tensors(folder, fn):
    path = str(folder / "adapter_model.safetensors")
    sd = safetensors.torch.load_file(path)
    safetensors.torch.save_file(fn(sd), path)


LOAD_ERRORS = {
    "no folder": (lambda f: f.rename(f.parent / "gone"), "no such folder"),
    "no config": (lambda f: (f / "adapter_config.json").unlink(), "no adapter_config.json"),
    "bad json": (lambda f: (f / "adapter_config.json").write_text("{"), "not valid JSON"),
    "not lora": (lambda f: edit_config(f, peft_type="PREFIX_TUNING"), "peft_type is 'PREFIX_TUNING'"),
    "dora": (lambda f: edit_config(f, use_dora=True), "use_dora=True is not supported"),
    "rank pattern": (lambda f: edit_config(f, rank_pattern={"q_proj": 4}), "rank_pattern"),
    "no weights": (lambda f: (f / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
    "damaged weights": (lambda f: (f / "adapter_model.safetensors").write_bytes(b"xx"), "cannot be read"),
    "unknown module": (lambda f: edit_tensors(f, lambda sd: {
        **sd, "base_model.model.model.layers.0.self_attn.w_proj.lora_A.weight": torch.zeros(2, 64)}),
        "'base_model.model.model.layers.0.self_attn.w_proj.lora_A.weight' names no LoRA module"),
    "missing B": (lambda f: edit_tensors(f, lambda sd: {
        k: v for k, v in sd.items() if k != "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"}),
        "missing base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"),
    "wrong r": (lambda f: edit_config(f, r=4), r"has shape \[2, 64\], but r=4"),
    "wrong size": (lambda f: edit_tensors(f, lambda sd: {
        k: (torch.zeros(2, 32) if k.endswith("0.self_attn.q_proj.lora_A.weight") else v) for k, v in sd.items()}),
        r"q_proj.lora_A.weight has shape \[2, 32\].*another model size"),
    "bad alpha": (lambda f: edit_config(f, lora_alpha=-3), "alpha must be a positive number"),
    "extra layer": (lambda f: edit_tensors(f, lambda sd: {
        **sd, "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64),
        "base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight": torch.zeros(64, 2)}),
        "has layer 7, but the model has 2 layers"),
}


@pytest.mark.parametrize("case", list(LOAD_ERRORS))
def test_load_errors_are_clear_and_leave_the_model_untouched(case, saved_adapter):
    breaker, message = LOAD_ERRORS[case]
    breaker(saved_adapter)
    m = tiny("glm-hf")
    before = base_state(m)
    with pytest.raises(CheckpointError, match=message):
        gpeft.load_adapter(m, str(saved_adapter))
    assert not lora.has_lora(m) and all(p.requires_grad for p in m.parameters())
    assert all(torch.equal(v, before[k]) for k, v in base_state(m).items())


def test_an_adapter_of_another_family_is_refused(saved_adapter):
    m = tiny("chatglm")
    with pytest.raises(CheckpointError, match="made for a model of family glm-hf.*not for this chatglm model"):
        gpeft.load_adapter(m, str(saved_adapter))
    assert not lora.has_lora(m)


# ---------------------------------------------------------------------------------------------
# peft itself (the test extra): glm's adapter on transformers' Glm / Glm4, and peft's on glm

@pytest.mark.transformers
@pytest.mark.parametrize("family", ["glm-hf", "glm4-hf"])
def test_peft_loads_glms_adapter_and_glm_loads_pefts(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cls = {"glm-hf": transformers.GlmForCausalLM, "glm4-hf": transformers.Glm4ForCausalLM}[family]
    m = tiny(family)
    base = str(tmp_path / "base")
    m.save_pretrained(base, format="hf")
    x = ids()

    lora.apply(m, LoraConfig(r=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj"), mlp=True))
    randomise(m)
    ours = m(x)
    gpeft.save_adapter(m, str(tmp_path / "ours"), base_model_name_or_path=base)
    hf = cls.from_pretrained(base, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours")).eval()(input_ids=x).logits
    assert (ours - theirs).abs().max() <= 1e-4

    hf = cls.from_pretrained(base, dtype=torch.float32, attn_implementation="eager").eval()
    torch.manual_seed(0)
    # init_lora_weights=False: B random too, so every adapter changes the logits.
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "k_proj", "down_proj"],
                                                 init_lora_weights=False)).eval()
    pm.save_pretrained(str(tmp_path / "theirs"))
    with torch.no_grad():
        theirs = pm(input_ids=x).logits
    g = glm.from_pretrained(base).eval()
    assert (g(x) - theirs).abs().max() > 1e-2
    cfg = gpeft.load_adapter(g, str(tmp_path / "theirs"))
    assert cfg.targets == ("q_proj", "k_proj", "down_proj") and (cfg.r, cfg.alpha) == (3, 5)
    assert (g(x) - theirs).abs().max() <= 1e-4


def test_peft_older_bin_weights_load(saved_adapter):
    sd = safetensors.torch.load_file(str(saved_adapter / "adapter_model.safetensors"))
    torch.save(sd, str(saved_adapter / "adapter_model.bin"))
    (saved_adapter / "adapter_model.safetensors").unlink()
    m = tiny("glm-hf")
    assert gpeft.load_adapter(m, str(saved_adapter)).targets == ("q_proj", "v_proj")
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    assert torch.equal(lora.adapter(m, 0, lora.naming("glm-hf").targets[2]).B, sd[key])
