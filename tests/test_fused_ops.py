"""The fused elementwise ops (glm::rms_norm, glm::rope, glm::swiglu) against their plain-PyTorch references.

Tolerance from the oracle (docs STYLE): the float64 reference is the oracle; the fp32 op passes when its
error is at most ~3x the error of the fp32 reference on the same inputs (plus a floor of a few ulps,
for inputs where the reference happens to be exact)."""
from __future__ import annotations

import pytest
import torch

import glm
from glm import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the C++ kernels are not built")


def close_to_oracle(got: torch.Tensor, plain: torch.Tensor, oracle: torch.Tensor, what: str) -> None:
    err = (got.double() - oracle).abs().max().item()
    base = (plain.double() - oracle).abs().max().item()
    floor = 4 * torch.finfo(torch.float32).eps * max(1.0, oracle.abs().max().item())
    assert err <= 3 * base + floor, f"{what}: fused error {err:.3e} vs plain fp32 {base:.3e}"


def grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def check(fused, reference, inputs, grad_shape=None):
    """Forward and input gradients of ``fused`` (fp32) against ``reference`` in fp32 and in float64."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        shape = reference(*inputs).shape if grad_shape is None else grad_shape
    grad_out = torch.randn(shape, generator=g, dtype=torch.float64)
    got, got_g = grads(fused, inputs, grad_out)
    plain, plain_g = grads(reference, inputs, grad_out)
    oracle, oracle_g = grads(reference, [t.double() for t in inputs], grad_out)
    assert got.dtype == torch.float32 and got.shape == oracle.shape
    close_to_oracle(got, plain, oracle, "forward")
    for i, (a, b, c) in enumerate(zip(got_g, plain_g, oracle_g)):
        close_to_oracle(a, b, c, f"gradient of input {i}")


@pytest.mark.parametrize("shape", [(2, 5, 64), (7, 37), (1, 1, 3, 128)])
def test_rms_norm_matches_reference(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3
    w = 1 + 0.1 * torch.randn(shape[-1], generator=g)
    check(lambda a, b: kernels.rms_norm(a, b, 1e-5), lambda a, b: kernels.rms_norm_reference(a, b, 1e-5), [x, w])
    # The op really ran (not the reference path): its autograd node is the C++ one.
    assert kernels.rms_norm(x.requires_grad_(), w, 1e-5).grad_fn.name().endswith("RmsNormFunction>")


def rope_inputs(B=2, heads=3, T=5, d=16, segments=1, rot=8, cos_batch=None, seed=0):
    """x as the model has it: a strided view of a QKV projection; cos/sin [B|1, 1, T, S, half]."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, 2 * heads * d, generator=g)
    x = qkv[..., :heads * d].view(B, T, heads, d).transpose(1, 2)
    half = rot // segments // 2
    ang = torch.randn(cos_batch or B, 1, T, segments, half, generator=g) * 3
    return x, ang.cos(), ang.sin()


@pytest.mark.parametrize("segments,rot,cos_batch", [(1, 8, None), (1, 16, None), (2, 16, None), (1, 8, 1)])
def test_rope_matches_reference(segments, rot, cos_batch):
    x, cos, sin = rope_inputs(segments=segments, rot=rot, cos_batch=cos_batch)
    assert not x.is_contiguous()
    check(lambda a: kernels.rope(a, cos, sin, segments), lambda a: kernels.rope_reference(a, cos, sin, segments), [x])
    y = kernels.rope(x, cos, sin, segments)
    assert y.is_contiguous() and y.shape == x.shape
    assert kernels.rope(x.detach().requires_grad_(), cos, sin, segments).grad_fn.name().endswith("RopeFunction>")
    # The pass-through dims are copied bit for bit.
    assert torch.equal(y[..., rot:], x[..., rot:])


@pytest.mark.parametrize("shape", [(3, 4, 2 * 37), (5, 2 * 64)])
def test_swiglu_matches_reference(shape):
    h = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 4
    h[0, 0] = 90.0  # saturated sigmoid: silu(x) = x, its slope 1
    h.view(-1)[1] = -90.0  # silu -> -0
    check(kernels.swiglu, kernels.swiglu_reference, [h])
    assert kernels.swiglu(h.requires_grad_()).grad_fn.name().endswith("SwigluFunction>")


def test_second_derivatives_match_reference():
    # create_graph=True: the backward runs in torch ops, so a gradient penalty is exact.
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 24, generator=g, dtype=torch.float32), torch.randn(24, generator=g)
    h = torch.randn(4, 24, generator=g)
    rx, cos, sin = rope_inputs(rot=8)
    cases = [
        (lambda a: kernels.rms_norm(a, w, 1e-5), lambda a: kernels.rms_norm_reference(a, w, 1e-5), x),
        (kernels.swiglu, kernels.swiglu_reference, h),
        (lambda a: kernels.rope(a, cos, sin, 1).square(), lambda a: kernels.rope_reference(a, cos, sin, 1).square(),
         rx.contiguous()),
    ]
    for fused, reference, inp in cases:
        second = []
        for fn in (fused, reference):
            a = inp.detach().clone().requires_grad_(True)
            (ga,) = torch.autograd.grad(fn(a).pow(3).sum(), a, create_graph=True)
            (gga,) = torch.autograd.grad(ga.square().sum(), a)
            second.append(gga)
        torch.testing.assert_close(second[0], second[1], rtol=1e-4, atol=1e-5)


def test_other_dtypes_take_the_reference_path():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, generator=g).bfloat16()
    w = torch.randn(32, generator=g).bfloat16()
    assert torch.equal(kernels.rms_norm(x, w, 1e-6), kernels.rms_norm_reference(x, w, 1e-6))
    assert torch.equal(kernels.swiglu(x), kernels.swiglu_reference(x))
    xd = torch.randn(2, 3, 32, generator=g, dtype=torch.float64)
    assert torch.equal(kernels.swiglu(xd), kernels.swiglu_reference(xd))


def test_ops_refuse_what_they_cannot_compute():
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.glm.swiglu(torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="even"):
        torch.ops.glm.swiglu(torch.zeros(2, 5))
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.glm.rms_norm(torch.zeros(2, 8), torch.ones(4), 1e-5)
    with pytest.raises(RuntimeError, match="head dim"):
        torch.ops.glm.rope(torch.zeros(1, 1, 2, 4), torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), 1, False)


def test_fake_impls_give_the_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, 5, 16)
        y, rstd = torch.ops.glm.rms_norm(x, torch.empty(16), 1e-5)
        assert y.shape == x.shape and rstd.shape == (30,)
        assert torch.ops.glm.rope(x, torch.empty(2, 5, 4), torch.empty(2, 5, 4), 1, False).shape == x.shape
        assert torch.ops.glm.swiglu(x).shape == (2, 3, 5, 8)
        assert torch.ops.glm.swiglu_bwd(torch.empty(2, 3, 5, 8), x).shape == x.shape


@pytest.mark.parametrize("preset", ["tiny-glm4-chatglm", "tiny-chatglm"])
def test_model_with_fused_ops_matches_reference_layers(preset):
    """A training step's loss and gradients with the fused ops equal those of the plain-PyTorch layers."""
    cfg = glm.preset(preset)
    model = glm.GLM(cfg)
    model.init_weights(seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    out = {}
    for fused in (True, False):
        previous = kernels.set_fused_elementwise(fused)
        try:
            model.zero_grad(set_to_none=True)
            loss = glm.model.lm_loss(model(ids[:, :-1], backend="sdpa"), ids[:, 1:])
            loss.backward()
            out[fused] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
        finally:
            kernels.set_fused_elementwise(previous)
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-6)
    for name, grad in out[True][1].items():
        torch.testing.assert_close(grad, out[False][1][name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_opcheck():
    """Schema, autograd registration, fake impl and AOT dispatch of each op (torch.library.opcheck)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 8, generator=g, requires_grad=True), torch.randn(8, generator=g, requires_grad=True)
    q = torch.randn(2, 3, 5, 16, generator=g, requires_grad=True)
    cos, sin = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    for op, args in ((torch.ops.glm.rms_norm.default, (x, w, 1e-5)), (torch.ops.glm.swiglu.default, (x,)),
                     (torch.ops.glm.rope.default, (q, cos, sin, 1, False))):
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)
