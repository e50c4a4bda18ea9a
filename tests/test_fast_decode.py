"""The static decode step (whole cache buffer, device tensors only) and its CUDA-graph replay pick the
same tokens as the eager decode path.

The static step is checked on CPU without a graph; the tests marked ``cuda`` run the graph itself.
"""
import pytest
import torch

import glm
from glm import kernels, positions
from glm.errors import InputError
from glm.generate import _DECODERS, StaticDecoder, generate, infill_ids, left_pad, release_cuda_graphs
from glm.kv_cache import CacheFullError

BACKENDS = ["sdpa", pytest.param("fused", marks=pytest.mark.skipif(
    not kernels.available(), reason=f"glm.kernels not built: {kernels.load_error()}"))]
# 1D positions with GQA (GLM-4 in both formats, ChatGLM2) and the 2D families (GLM, ChatGLM-6B).
PRESETS = ["tiny-glm-hf", "tiny-glm4-hf", "tiny-chatglm2", "tiny-glm", "tiny-chatglm"]
# Original GLM's fixture ids: [MASK], [gMASK], <sop>, <eop>, [CLS].
MASK, GMASK, SOP, EOP, CLS = 153, 155, 156, 157, 158


def _model(name: str, backend: str = "auto", device: str = "cpu", dtype=torch.float32) -> glm.GLM:
    model = glm.GLM(glm.preset(name)).eval()
    model.init_weights(std=0.3, seed=0)
    model.backend = backend
    return model.to(device=device, dtype=dtype)


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    return left_pad([[4, 8, 15, 16, 23, 42, 9], [7, 7], [100, 3, 9, 11]], pad_id=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", PRESETS)
def test_static_step_generates_the_eager_tokens(name, backend):
    model = _model(name, backend)
    ids, pad = _prompts()
    eager = generate(model, ids, pad_left=pad, max_new_tokens=8, static=False)
    static = generate(model, ids, pad_left=pad, max_new_tokens=8, static=True)
    assert torch.equal(static, eager)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["tiny-glm-hf", "tiny-chatglm"])
def test_static_step_logits_equal_eager_step_logits(name, backend):
    """Step by step, to the last slot of the cache: the step that fills it is the one where attention's
    own-key exemption (j == i at q_offset = max_len - 1) applies."""
    model = _model(name, backend)
    ids, pad = _prompts()
    steps = 5
    eager_cache = model.new_cache(ids.shape[0], ids.shape[1] + steps)
    static_cache = model.new_cache(ids.shape[0], ids.shape[1] + steps)
    dec = StaticDecoder(model, static_cache)
    with torch.no_grad():
        a = model(ids, pad_left=pad, cache=eager_cache, last_only=True)[:, -1]
        b = model(ids, pad_left=pad, cache=static_cache, last_only=True)[:, -1]
        for _ in range(steps):
            tok = a.argmax(-1)
            pos = positions.next_after(static_cache.last_position_ids)
            a = model(tok[:, None], cache=eager_cache, last_only=True)[:, -1]
            b = dec.step(tok, pos)
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
            assert static_cache.length == eager_cache.length
            assert torch.equal(static_cache.last_position_ids, eager_cache.last_position_ids)
    assert static_cache.length == static_cache.max_len
    with pytest.raises(CacheFullError, match="larger max_len"):
        dec.step(tok, pos)


@pytest.mark.parametrize("backend", BACKENDS)
def test_static_infill_equals_eager_infill(backend):
    model = _model("tiny-glm", backend)
    text = [7, 139, MASK, 86, 132, 73, MASK, 112, 126]
    kw = dict(mask_ids=[MASK], gmask_id=GMASK, sop_id=SOP, eop_id=EOP, cls_id=CLS, max_span_tokens=4)
    assert infill_ids(model, text, static=True, **kw) == infill_ids(model, text, static=False, **kw)


def test_static_step_with_sampling_and_eos_equals_eager():
    """Sampling (temperature, top-k, top-p, repetition penalty) from one seeded generator draws the same
    tokens from the static step's logits as from the eager decode's, and eos stops rows the same way.
    Greedy tokens would not notice logits that are off by a scale or a shift; sampled ones do."""
    model = _model("tiny-glm4-hf")
    ids, pad = _prompts()
    kw = dict(pad_left=pad, max_new_tokens=8, temperature=0.9, top_k=40, top_p=0.9, seed=1)
    static = generate(model, ids, static=True, repetition_penalty=1.3, eos_token_ids=(), **kw)
    eager = generate(model, ids, static=False, repetition_penalty=1.3, eos_token_ids=(), **kw)
    assert torch.equal(static, eager)
    # It really sampled, and the penalty changed some draw (so both are exercised on the static path).
    greedy = generate(model, ids, pad_left=pad, max_new_tokens=8, repetition_penalty=1.3, eos_token_ids=())
    assert not torch.equal(static, greedy)
    assert not torch.equal(static, generate(model, ids, static=True, eos_token_ids=(), **kw))

    eos = int(static[0, 2])
    stop = dict(repetition_penalty=1.3, eos_token_ids=[eos], **kw)
    out = generate(model, ids, static=True, **stop)
    assert torch.equal(out, generate(model, ids, static=False, **stop))
    assert torch.equal(out[0, :3], static[0, :3]) and bool((out[0, 2:] == eos).all())


def test_compiled_static_step_generates_the_eager_tokens():
    """torch.compile'd static step (Inductor's C++ backend here, Triton on a GPU)."""
    model = _model("tiny-glm-hf", "sdpa")
    ids, pad = _prompts()
    eager = generate(model, ids, pad_left=pad, max_new_tokens=4, static=False)
    assert torch.equal(generate(model, ids, pad_left=pad, max_new_tokens=4, compile=True), eager)


def test_decode_mode_errors():
    model = _model("tiny-glm-hf")
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(InputError, match="the model on a CUDA device"):
        generate(model, ids, cuda_graphs=True)
    with pytest.raises(InputError, match="the model on a CUDA device"):
        StaticDecoder(model, model.new_cache(1, 8), cuda_graph=True)
    with pytest.raises(InputError, match="needs static=True"):
        generate(model, ids, static=False, compile=True)
    cache = model.new_cache(1, 8)
    with pytest.raises(ValueError, match="prefilled cache"):
        StaticDecoder(model, cache).step(torch.tensor([1]), torch.tensor([[0]]))
    with torch.no_grad():
        model(ids, cache=cache)
        with pytest.raises(InputError, match="needs position_ids"):
            model(ids[:, :1], cache=cache, static=True)
        with pytest.raises(InputError, match="one token per row"):
            model(ids, torch.zeros_like(ids), cache=cache, static=True)
        with pytest.raises(InputError, match="takes tokens \\[1\\]"):
            StaticDecoder(model, cache).step(torch.tensor([1, 2]), torch.tensor([[3], [3]]))


# ---------------------------------------------------------------------------------------------
# CUDA graphs (run on a GPU machine: python -m pytest -q -m cuda tests/test_fast_decode.py)

# glm's CUDA kernels take bf16/fp16 only, so the fused rows run in bf16.
CUDA_BACKENDS = ["sdpa", pytest.param("fused", marks=pytest.mark.skipif(
    "cuda" not in kernels.devices(), reason="glm.kernels has no CUDA kernels in this build"))]


def _cuda_dtype(backend: str) -> torch.dtype:
    return torch.bfloat16 if backend == "fused" else torch.float32


@pytest.mark.cuda
@pytest.mark.parametrize("name", PRESETS)
def test_cuda_graph_generates_the_eager_tokens(name):
    model = _model(name, "sdpa", device="cuda")
    ids, pad = _prompts()
    eager = generate(model, ids, pad_left=pad, max_new_tokens=12, cuda_graphs=False, static=False)
    graphed = generate(model, ids, pad_left=pad, max_new_tokens=12, cuda_graphs=True)
    assert torch.equal(graphed.cpu(), eager.cpu())
    # The default on a CUDA model is the graph, kept and reused by the next call.
    kept = _DECODERS[model]
    assert torch.equal(generate(model, ids, pad_left=pad, max_new_tokens=12).cpu(), eager.cpu())
    assert _DECODERS[model] is kept
    release_cuda_graphs(model)
    assert model not in _DECODERS


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["tiny-glm-hf", "tiny-chatglm"])
def test_compiled_cuda_graph_generates_the_eager_tokens(name):
    model = _model(name, "sdpa", device="cuda")
    ids, pad = _prompts()
    eager = generate(model, ids, pad_left=pad, max_new_tokens=12, cuda_graphs=False, static=False)
    assert torch.equal(generate(model, ids, pad_left=pad, max_new_tokens=12, compile=True).cpu(), eager.cpu())
    release_cuda_graphs(model)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("name", ["tiny-glm-hf", "tiny-chatglm"])
def test_cuda_graph_follows_eager_decode_bf16(name, backend):
    """bf16, teacher-forced on the eager greedy tokens: at every step the graph picks the eager token,
    unless the two logits differ by less than the two paths' numerical difference (a tie in bf16;
    the eager and static attention split the keys differently)."""
    model = _model(name, backend, device="cuda", dtype=torch.bfloat16)
    ids, pad = _prompts()
    ids, pad = ids.cuda(), pad.cuda()
    eager_cache, graph_cache = model.new_cache(3, 32), model.new_cache(3, 32)
    dec = StaticDecoder(model, graph_cache, cuda_graph=True)
    with torch.no_grad():
        a = model(ids, pad_left=pad, cache=eager_cache, last_only=True)[:, -1].float()
        model(ids, pad_left=pad, cache=graph_cache, last_only=True)
        for _ in range(20):
            tok = a.argmax(-1)
            b = dec.step(tok, positions.next_after(graph_cache.last_position_ids)).float()
            a = model(tok[:, None], cache=eager_cache, last_only=True)[:, -1].float()
            noise = (a - b).abs().max()
            picked = b.argmax(-1)
            gap = a.gather(-1, a.argmax(-1, keepdim=True)) - a.gather(-1, picked[:, None])
            assert bool((gap[:, 0] <= 2 * noise).all()), (tok, picked, gap, noise)
            assert float(noise) < 0.05 * float(a.abs().max())


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_graph_logits_are_the_static_step_logits(backend):
    """Replaying the graph computes exactly what the same static step computes eagerly."""
    model = _model("tiny-glm-hf", backend, device="cuda", dtype=torch.bfloat16)
    ids, pad = _prompts()
    ids = ids.cuda()
    caches = [model.new_cache(3, 32), model.new_cache(3, 32)]
    decs = [StaticDecoder(model, caches[0]), StaticDecoder(model, caches[1], cuda_graph=True)]
    with torch.no_grad():
        outs = [model(ids, pad_left=pad, cache=c, last_only=True)[:, -1] for c in caches]
        for _ in range(10):
            tok = outs[0].argmax(-1)
            outs = [d.step(tok, positions.next_after(d.cache.last_position_ids)).clone() for d in decs]
            assert torch.equal(outs[1], outs[0])


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_static_step_never_synchronises(backend):
    """The step a graph captures does no host-device synchronisation (which capture would reject)."""
    model = _model("tiny-glm4-hf", backend, device="cuda", dtype=_cuda_dtype(backend))
    ids, pad = _prompts()
    cache = model.new_cache(3, 32)
    dec = StaticDecoder(model, cache)
    with torch.no_grad():
        tok = model(ids.cuda(), pad_left=pad.cuda(), cache=cache, last_only=True)[:, -1].argmax(-1)
        pos = positions.next_after(cache.last_position_ids)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            dec.step(tok, pos)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
def test_cuda_graph_infill_and_new_weights():
    model = _model("tiny-chatglm", "sdpa", device="cuda")
    text = [7, 139, MASK, 86, 132, 73, MASK, 112, 126]
    kw = dict(mask_ids=[MASK], gmask_id=GMASK, sop_id=SOP, eop_id=EOP, cls_id=CLS, max_span_tokens=4)
    assert infill_ids(model, text, cuda_graphs=True, **kw) == infill_ids(model, text, cuda_graphs=False, **kw)
    # Weights in new storage (as after a reload): the kept graph must not be replayed.
    kept = _DECODERS[model]
    for p in model.parameters():
        p.data = p.data.clone()
    ids = torch.tensor([[5, 6, 7]], device="cuda")
    eager = generate(model, ids, max_new_tokens=6, cuda_graphs=False)
    assert torch.equal(generate(model, ids, max_new_tokens=6), eager)
    assert _DECODERS[model] is not kept
