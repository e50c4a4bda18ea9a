import os
import re
import sys

import pytest
import torch
from conftest import FIXTURE_FAMILIES, reference_dir

import glm
from glm.errors import InputError
from glm.generate import SamplingConfig, generate, left_pad, next_token, stream
from glm.parity import load_cases


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static-step"])
@pytest.mark.parametrize("folder", FIXTURE_FAMILIES)
def test_greedy_reproduces_reference_decode(folder, static):
    """The golden decode cases (prefix_len, left padding and explicit positions included), through
    the eager decode and through the static step that CUDA graphs capture. The reference decoded
    without stopping at eos (chatglm2's first row passes through its eos 2), hence eos_token_ids=()."""
    d = reference_dir(folder)
    model = glm.from_pretrained(d)
    _, t = load_cases(d)
    out = generate(model, t["decode.input_ids"], position_ids=t["decode.position_ids"],
                   prefix_len=t["decode.prefix_len"], pad_left=t["decode.pad_left"],
                   max_new_tokens=t["decode.tokens"].shape[1], static=static, eos_token_ids=())
    assert torch.equal(out, t["decode.tokens"])


def _tiny(name="tiny-glm4-hf"):
    model = glm.GLM(glm.preset(name)).eval()
    model.init_weights(std=0.3, seed=0)
    return model


def test_greedy_with_cache_equals_argmax_of_full_forward():
    model = _tiny()
    prompt = torch.tensor([[5, 17, 33, 2, 90]])
    out = generate(model, prompt, max_new_tokens=8, eos_token_ids=())
    seq = prompt
    with torch.no_grad():
        for i in range(8):
            nxt = model(seq)[:, -1].argmax(-1)
            assert nxt.item() == out[0, i].item()
            seq = torch.cat((seq, nxt[:, None]), dim=1)


def test_batched_left_padded_equals_rows_alone():
    model = _tiny("tiny-chatglm3")
    prompts = [[4, 8, 15, 16, 23, 42], [7, 7], [100, 3, 9]]
    ids, pad = left_pad(prompts, pad_id=0)
    batched = generate(model, ids, pad_left=pad, max_new_tokens=6, eos_token_ids=())
    for i, p in enumerate(prompts):
        alone = generate(model, torch.tensor([p]), max_new_tokens=6, eos_token_ids=())
        assert torch.equal(batched[i], alone[0]), i


def _uncached_loop(model, prompt, n, cfg, seed=None):
    """The tokens after ``prompt``, each from a full forward of the whole sequence so far (no cache), with
    the repetition penalty over every token already in the row and one generator seeded once."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    seq = prompt
    with torch.no_grad():
        for _ in range(n):
            nxt = next_token(model(seq)[:, -1], cfg, gen, seen=seq)
            seq = torch.cat((seq, nxt[:, None]), dim=1)
    return seq[:, prompt.shape[1]:]


def test_stream_samples_as_an_uncached_loop_does():
    """stream (and generate, which stacks it) against an independent loop, sampled and greedy."""
    model = _tiny()
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    kw = dict(max_new_tokens=7, temperature=0.9, top_k=50, top_p=0.8, repetition_penalty=1.2)
    streamed = torch.stack(list(stream(model, prompt, seed=123, eos_token_ids=(), **kw)), dim=1)
    assert torch.equal(streamed, _uncached_loop(model, prompt, 7, SamplingConfig(**kw), seed=123))
    assert torch.equal(generate(model, prompt, seed=123, eos_token_ids=(), **kw), streamed)
    # It really sampled: greedy decoding of the same prompt picks other tokens.
    assert not torch.equal(streamed, generate(model, prompt, max_new_tokens=7, eos_token_ids=()))

    # Greedy with a repetition penalty: plain greedy repeats a generated token within 10 steps here, so
    # the penalty must cover the generated tokens too, not only the prompt.
    kw = dict(max_new_tokens=10, repetition_penalty=1.3)
    penalised = torch.stack(list(stream(model, prompt, eos_token_ids=(), **kw)), dim=1)
    assert torch.equal(penalised, _uncached_loop(model, prompt, 10, SamplingConfig(**kw)))
    plain = generate(model, prompt, max_new_tokens=10, eos_token_ids=())
    assert torch.equal(plain, _uncached_loop(model, prompt, 10, SamplingConfig(max_new_tokens=10)))
    assert not torch.equal(penalised, plain)


def test_sampling_is_seeded():
    model = _tiny()
    prompt = torch.tensor([[1, 2, 3]])
    kw = dict(max_new_tokens=10, temperature=1.5, eos_token_ids=())
    a = generate(model, prompt, seed=7, **kw)
    b = generate(model, prompt, seed=7, **kw)
    c = generate(model, prompt, seed=8, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_eos_stops_rows():
    model = _tiny()
    prompt = torch.tensor([[1, 2, 3]])
    free = generate(model, prompt, max_new_tokens=6, eos_token_ids=())
    eos = int(free[0, 2])
    out = generate(model, prompt, max_new_tokens=6, eos_token_ids=[eos])
    first = (free[0] == eos).nonzero()[0].item()
    assert out.shape[1] == first + 1 and out[0, -1].item() == eos


def test_bad_generation_inputs():
    model = _tiny()
    with pytest.raises(InputError, match="empty prompt"):
        left_pad([[1, 2], []], pad_id=0)
    with pytest.raises(InputError, match="non-empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(InputError, match="exceeds the model's 64 positions"):
        generate(model, torch.ones(1, 60, dtype=torch.long), max_new_tokens=10)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, torch.ones(1, 3, dtype=torch.long), top_p=0.0)


def test_eos_defaults_to_the_model_config():
    """eos_token_ids=None (the default) stops at model.config.eos_token_ids; () never stops early."""
    prompt = torch.tensor([[1, 2, 3]])
    free = generate(_tiny(), prompt, max_new_tokens=6, eos_token_ids=())
    eos = int(free[0, 2])
    first = (free[0] == eos).nonzero()[0].item()
    model = glm.GLM(glm.preset("tiny-glm4-hf").replace(eos_token_ids=(eos,))).eval()
    model.init_weights(std=0.3, seed=0)  # the same weights as _tiny()
    out = generate(model, prompt, max_new_tokens=6)
    assert out.shape[1] == first + 1 and out[0, -1].item() == eos
    assert torch.equal(generate(model, prompt, max_new_tokens=6, eos_token_ids=()), free)
    with pytest.raises(InputError, match="eos_token_ids must be a list of token ids"):
        generate(model, prompt, eos_token_ids=2)


def test_top_k_and_top_p_need_a_temperature():
    """Greedy decoding would ignore them; unset options (None, as argparse forwards) and a seed are fine."""
    model = _tiny()
    prompt = torch.tensor([[1, 2, 3]])
    for kw in (dict(top_k=5), dict(top_p=0.9)):
        with pytest.raises(InputError, match="temperature > 0"):
            generate(model, prompt, max_new_tokens=2, **kw)
    greedy = generate(model, prompt, max_new_tokens=2, eos_token_ids=())
    same = generate(model, prompt, max_new_tokens=2, eos_token_ids=(), top_k=None, top_p=None, seed=3)
    assert torch.equal(same, greedy)


@pytest.mark.parametrize("name", ["tiny-glm", "tiny-chatglm"])
def test_2d_generation_past_the_position_table_fails_up_front(name):
    """GLM and ChatGLM-6B count the block position up while generating: a request that would leave
    the table fails before the first token (it was an IndexError mid-stream for GLM's learned
    positions, and silent extrapolation for ChatGLM-6B's RoPE)."""
    model = _tiny(name)
    limit = model.config.max_positions
    prompt = torch.tensor([[5, 6, 7]])
    with pytest.raises(InputError, match=f"at most {limit} new tokens fit"):
        next(stream(model, prompt, max_new_tokens=limit + 1))
    # After a prompt ending in <sop> at block position 1 (the references' layout), one fewer fits.
    pos = torch.tensor([[[0, 1, 2, 2], [0, 0, 0, 1]]])
    with pytest.raises(InputError, match=f"at most {limit - 1} new tokens fit"):
        generate(model, torch.tensor([[5, 6, 7, 8]]), position_ids=pos, max_new_tokens=limit)
    # The most that fit run to the table's last block position.
    assert generate(model, prompt, max_new_tokens=limit, eos_token_ids=()).shape == (1, limit)


def test_generate_module_entry_points_are_reachable():
    """`glm.generate` is the function, so the module's entry points are exported beside it, and the
    README names none of them as attributes of it (`glm.generate.stream` is an AttributeError)."""
    module = sys.modules["glm.generate"]
    for name in ("stream", "infill", "infill_ids", "stream_infill", "stream_text", "release_cuda_graphs",
                 "left_pad", "SamplingConfig"):
        assert getattr(glm, name) is getattr(module, name), name
        assert name in glm.__all__, name
    readme = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")
    with open(readme, encoding="utf-8") as f:
        for m in re.finditer(r"\bglm\.generate\.(\w+)", f.read()):
            assert hasattr(glm.generate, m.group(1)), f"README names glm.generate.{m.group(1)}"


def test_model_save_pretrained_method(tmp_path):
    model = _tiny("tiny-glm-hf")
    model.save_pretrained(str(tmp_path / "hf"), format="hf")
    back = glm.from_pretrained(str(tmp_path / "hf"))
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.allclose(model(ids), back(ids), atol=1e-6)
