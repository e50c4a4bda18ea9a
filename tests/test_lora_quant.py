"""Adapting a quantized base: LoRA over QuantLinear projections (QLoRA's arrangement), the refusals that keep
integer weights out of training and merging, a tied quantized head, and fine-tuning over a quantized base."""
import copy
import json
import os

import pytest
import torch
from conftest import char_model_folder

import glm
from glm import lora, ptuning, quant
from glm.errors import ArgumentError, InputError
from glm.finetune import FinetuneConfig, finetune
from glm.formats import peft
from glm.quant import QuantLinear


def tiny_model(name: str = "tiny-chatglm2", seed: int = 0) -> glm.GLM:
    m = glm.GLM(glm.preset(name))
    m.init_weights(std=0.1, seed=seed)
    return m.eval()


def dequantized_copy(qmodel: glm.GLM, float_model: glm.GLM) -> glm.GLM:
    """``float_model`` with every quantized projection of ``qmodel`` replaced by its dequantized weight."""
    out = copy.deepcopy(float_model)
    with torch.no_grad():
        for name, mod in quant.quantized_modules(qmodel).items():
            base = mod.plain() if hasattr(mod, "plain") else mod
            out.get_submodule(name).weight.copy_(base.weight)
    return out


def randomize_adapters(model: glm.GLM, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in lora.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32)])
def test_lora_on_a_quantized_base_equals_lora_on_the_dequantized_weights(bits, group_size):
    fp = tiny_model()
    q = quant.quantize(copy.deepcopy(fp), bits, group_size)
    reference = dequantized_copy(q, fp)
    x = ids(fp.config.vocab_size)
    with torch.no_grad():
        before = q(x)
    cfg = lora.LoraConfig(r=4, alpha=8, mlp=True)
    lora.apply(q, cfg, seed=3)
    lora.apply(reference, cfg, seed=3)
    assert all(isinstance(m, lora.QuantLoraLinear) for _, m in lora.lora_modules(q))
    with torch.no_grad():
        assert torch.equal(q(x), before)  # B starts at zero
    randomize_adapters(q, 1)
    randomize_adapters(reference, 1)
    with torch.no_grad():
        got, want = q(x), reference(x)
    assert not torch.allclose(got, before, atol=1e-3)  # the adapters do move the logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # The integers keep their names (the quantized state dict is the base's plus the adapters).
    names = set(q.state_dict())
    assert "layers.0.attn.qkv.qweight" in names and "layers.0.attn.qkv.lora.query_key_value.A" in names


def test_adapters_over_a_quantized_base_train_and_the_integers_do_not_move():
    q = quant.quantize(tiny_model(), 4, 32)
    frozen = {k: v.clone() for k, v in q.state_dict().items() if "lora" not in k}
    lora.apply(q, lora.LoraConfig(r=4, alpha=8), seed=0)
    lora.check_trainable(q)  # adapters: allowed
    q.train()
    opt = torch.optim.AdamW([p for _, p in lora.trainable_parameters(q)], lr=1e-2)
    x = ids(q.config.vocab_size, 5)
    losses = []
    for _ in range(6):
        logits = q(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(n.split(".lora.")[0] and ".lora." in n for n, _ in lora.trainable_parameters(q))
    for k, v in q.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k


def test_merging_into_integer_weights_is_refused_and_changes_nothing():
    q = quant.quantize(tiny_model(), 8)
    lora.apply(q, lora.LoraConfig(r=2, mlp=True), seed=0)
    randomize_adapters(q, 2)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    with pytest.raises(InputError, match="quantize the result"):
        lora.merge(q)
    with pytest.raises(InputError, match="quantize the result"):
        lora.remove(q)
    assert all(torch.equal(v, before[k]) for k, v in q.state_dict().items())
    assert not lora.is_merged(q)
    # Dropping the adapters gives the quantized base back, module for module.
    x = ids(q.config.vocab_size)
    lora.discard(q)
    assert not lora.has_lora(q) and all(type(m) is QuantLinear for m in quant.quantized_modules(q).values())
    with torch.no_grad():
        torch.testing.assert_close(q(x), quant.quantize(tiny_model(), 8)(x), rtol=0, atol=0)


def test_training_a_quantized_base_needs_an_adapter_or_a_prefix():
    lora.check_trainable(tiny_model())  # a float model trains
    with pytest.raises(InputError, match="LoRA adapters"):
        lora.check_trainable(quant.quantize(tiny_model(), 8))
    prefixed = quant.quantize(tiny_model(), 8)
    ptuning.apply(prefixed, ptuning.PrefixConfig(pre_seq_len=2))
    lora.check_trainable(prefixed)


def test_quantizing_a_model_that_carries_adapters_names_the_module():
    m = lora.apply(tiny_model(), lora.LoraConfig(r=2), seed=0)
    with pytest.raises(InputError, match="layers.0.attn.qkv is a LoraLinear"):
        quant.quantize(m, 8)
    assert not quant.is_quantized(m)


def test_peft_adapter_trained_on_a_quantized_base_loads_onto_the_float_base(tmp_path):
    fp = tiny_model()
    q = quant.quantize(copy.deepcopy(fp), 8)
    lora.apply(q, lora.LoraConfig(r=4), seed=0)
    randomize_adapters(q, 4)
    peft.save_adapter(q, str(tmp_path / "adapter"))
    plain = copy.deepcopy(fp)
    peft.load_adapter(plain, str(tmp_path / "adapter"))
    for (name, a), (name2, b) in zip(lora.lora_parameters(q), lora.lora_parameters(plain)):
        assert name == name2 and torch.equal(a, b)
    # INT8 per row moves the base little: the adapted float model is close to the adapted quantized one.
    x = ids(fp.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), q(x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 16)])
def test_a_tied_quantized_embedding_is_the_head(bits, group_size):
    fp = tiny_model("tiny-glm")  # original GLM ties its output layer to the word embeddings
    assert fp.lm_head is None
    q = quant.quantize(copy.deepcopy(fp), bits, group_size, embeddings=True)
    reference = copy.deepcopy(fp)
    with torch.no_grad():
        reference.embed.weight.copy_(q.embed.weight)
        for name, mod in quant.quantized_modules(q).items():
            if name != "embed":
                reference.get_submodule(name).weight.copy_(mod.weight)
    x = ids(fp.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(q(x), reference(x), rtol=1e-4, atol=1e-4)
        # One row at a time goes through the quantized kernels' few-row path.
        h = torch.randn(1, fp.config.hidden_size, generator=torch.Generator().manual_seed(7))
        want = h.double() @ q.embed.weight.double().T
        torch.testing.assert_close(q.embed.project(h).double(), want, rtol=1e-4, atol=1e-4)


def test_finetune_trains_lora_over_a_quantized_base(tmp_path):
    # A character tokenizer over the rows' own text is enough for a few steps of SFT.
    folder, _ = char_model_folder(tmp_path, "q0 a0 q1 a1 q2 a2 " * 50, name="base")
    rows = [{"prompt": f"q{i % 3}", "response": f"a{i % 3}"} for i in range(8)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(ArgumentError, match="quantize"):
        FinetuneConfig(base=folder, data=str(data), out_dir=str(tmp_path / "x"), method="full",
                       quantize="int8").validate()
    cfg = FinetuneConfig(base=folder, data=str(data), eval_data=str(data), out_dir=str(tmp_path / "run"),
                         method="lora", quantize="int4", group_size=32, steps=6, batch_size=4, lr=2e-2,
                         max_source_len=8, max_target_len=8, progress=False, device="cpu")
    s = finetune(cfg)
    losses = [json.loads(line)["loss"] for line in open(os.path.join(cfg.out_dir, "metrics.jsonl"))
              if "loss" in json.loads(line)]
    assert losses[-1] < losses[0]
    # The adapter is saved in peft's layout against the float base, which loads it.
    loaded = glm.from_pretrained(cfg.out_dir)
    assert lora.has_lora(loaded) and not quant.is_quantized(loaded) and s["trainable_parameters"] > 0
