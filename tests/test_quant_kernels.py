"""The weight-only INT8 / INT4 linear kernels (``glm::int8_linear``, ``glm::int4_linear``) against the oracle.

Tolerances come from the oracle as in tests/test_kernels.py (STYLE.md practice 5): the truth is the product
with the dequantized weight in float64 (the dequantized weight is exact in fp32, so the kernel and the
reference see the same weight); the kernel passes when its error is at most 3x that of the plain-PyTorch
reference (dequantize, then F.linear in fp32, result in x's dtype) plus one rounding of the result.

Every test but the packing ones needs the compiled extension and skips cleanly when it is not built.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from glm import kernels

needs_kernels = pytest.mark.skipif(
    not kernels.available(), reason=f"glm.kernels not built: {kernels.load_error()}")

FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
OPS = {8: "int8_linear", 4: "int4_linear"}


class OpRecorder(TorchDispatchMode):
    """Records the names of the ops that run inside it."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def random_quantized(bits: int, N: int, K: int, groups: int, scale_dtype: torch.dtype, gen: torch.Generator):
    """A random (qweight, scales [N, groups]) pair; int4 values cover the whole nibble range [-8, 7]."""
    lo, hi = (-8, 8) if bits == 4 else (-128, 128)
    q = torch.randint(lo, hi, (N, K), generator=gen, dtype=torch.int8)
    scales = (torch.rand(N, groups, generator=gen) * 0.1 + 1e-3).to(scale_dtype)
    return (kernels.pack_int4(q) if bits == 4 else q), scales


def assert_within_oracle(got, x, qweight, scales, bias, bits):
    w = kernels.dequantize_weight(qweight, scales, bits).double()
    truth = torch.nn.functional.linear(x.double(), w, None if bias is None else bias.double())
    ref = kernels.int4_linear_reference if bits == 4 else kernels.int8_linear_reference
    plain = ref(x, qweight, scales, bias)
    assert got.shape == plain.shape and got.dtype == x.dtype
    magnitude = max(1.0, ((x.double().abs() @ w.abs().t()).max().item() if x.numel() and w.numel() else 0.0)
                    + (0.0 if bias is None else bias.double().abs().max().item()))
    # One rounding of the result: ~10 fp32 ulps of the largest summed term, or one ulp of a 16-bit result.
    floor = (1e-6 if x.dtype == torch.float32 else torch.finfo(x.dtype).eps) * magnitude
    err = (got.double() - truth).abs().max().item() if got.numel() else 0.0
    err_plain = (plain.double() - truth).abs().max().item() if got.numel() else 0.0
    assert err <= 3 * err_plain + floor, f"int{bits}: error {err:.3e} > 3 x {err_plain:.3e} + {floor:.1e}"


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4])
@settings(max_examples=40, **SETTINGS)
@given(M=st.integers(1, 12), N=st.integers(1, 80), group=st.sampled_from([None, 32, 64, 128, "odd"]),
       width=st.integers(1, 150), groups=st.integers(1, 4), x_dtype=st.sampled_from(list(FLOAT_DTYPES.values())),
       scale_dtype=st.sampled_from(list(FLOAT_DTYPES.values())), bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_quant_linear_matches_the_oracle(bits, M, N, group, width, groups, x_dtype, scale_dtype, bias, seed):
    # Per-row scales over K = 2 * width columns (any K, even for int4, most not a multiple of the
    # vector width), or `groups` groups of 32 / 64 / 128 columns, or of an unaligned even size.
    if group is None:
        K, G = 2 * width - (bits == 8 and width % 2), 1
    else:
        gs = 2 * (width % 40 + 1) if group == "odd" else group
        K, G = gs * groups, groups
    gen = torch.Generator().manual_seed(seed)
    qweight, scales = random_quantized(bits, N, K, G, scale_dtype, gen)
    x = torch.randn(M, K, generator=gen).to(x_dtype)
    b = torch.randn(N, generator=gen).to(x_dtype) if bias else None
    got = getattr(torch.ops.glm, OPS[bits])(x, qweight, scales, b)
    assert_within_oracle(got, x, qweight, scales, b, bits)


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4])
def test_per_row_scales_may_be_one_dimensional(bits):
    gen = torch.Generator().manual_seed(0)
    qweight, scales = random_quantized(bits, 24, 96, 1, torch.float16, gen)
    x = torch.randn(3, 96, generator=gen)
    op = getattr(torch.ops.glm, OPS[bits])
    assert torch.equal(op(x, qweight, scales.view(-1), None), op(x, qweight, scales, None))


def test_int4_packing_puts_the_even_column_in_the_high_nibble():
    q = torch.tensor([[-7, -2, 1, 7, -8, 0]], dtype=torch.int8)
    packed = kernels.pack_int4(q)
    # 0x9E: high nibble 9 = -7, low nibble E = -2; 0x17: 1 and 7; 0x80: -8 and 0.
    assert packed.tolist() == [[0x9E - 256, 0x17, 0x80 - 256]]
    assert torch.equal(kernels.unpack_int4(packed), q)


def test_dequantized_weight_is_exact_in_fp32():
    gen = torch.Generator().manual_seed(1)
    for bits in (8, 4):
        for dtype in (torch.float16, torch.bfloat16):
            qweight, scales = random_quantized(bits, 8, 64, 2, dtype, gen)
            q = kernels.unpack_int4(qweight) if bits == 4 else qweight
            exact = q.double() * scales.double().repeat_interleave(32, dim=1)
            assert torch.equal(kernels.dequantize_weight(qweight, scales, bits).double(), exact)


@needs_kernels
@pytest.mark.parametrize("K", [6, 64, 100])  # the scalar tail only; the vector loop on any target; both
def test_int4_kernel_reads_the_high_nibble_first(K):
    # Every byte 0x9E (-7 high, -2 low); x = 1 on even columns and 10 on odd ones: a row sums
    # K / 2 * (-7 + 10 * -2), while a swapped nibble order would give K / 2 * (-2 - 70).
    qweight = torch.full((3, K // 2), 0x9E - 256, dtype=torch.int8)
    x = torch.tensor([1.0, 10.0]).repeat(K // 2)[None]
    for scales in (torch.ones(3, 1), torch.ones(3, K // 2)):
        y = torch.ops.glm.int4_linear(x, qweight, scales, None)
        assert y.tolist() == [[K // 2 * -27.0] * 3]


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4])
def test_entry_point_takes_the_kernel_for_few_rows_without_grad(bits):
    gen = torch.Generator().manual_seed(2)
    qweight, scales = random_quantized(bits, 40, 64, 2, torch.bfloat16, gen)
    bias = torch.randn(40, generator=gen)
    fn = kernels.int4_linear if bits == 4 else kernels.int8_linear
    ref = kernels.int4_linear_reference if bits == 4 else kernels.int8_linear_reference
    op_name = f"glm::{OPS[bits]}"
    for rows, expect_kernel in ((1, True), (kernels.QUANT_LINEAR_MAX_ROWS, True),
                                (kernels.QUANT_LINEAR_MAX_ROWS + 1, False)):
        x = torch.randn(1, rows, 64, generator=gen)
        with torch.no_grad(), OpRecorder() as rec:
            y = fn(x, qweight, scales, bias)
        assert (op_name in rec.names) == expect_kernel, rows
        assert y.shape == (1, rows, 40)
        torch.testing.assert_close(y, ref(x, qweight, scales, bias), atol=1e-4, rtol=1e-5)
    # A gradient to x (an adapter trained over quantized weights): the differentiable reference.
    x = torch.randn(2, 64, generator=gen, requires_grad=True)
    with OpRecorder() as rec:
        y = fn(x, qweight, scales, bias)
    assert op_name not in rec.names
    y.sum().backward()
    w = kernels.dequantize_weight(qweight, scales, bits)
    torch.testing.assert_close(x.grad, w.sum(0).expand(2, 64))


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4])
def test_opcheck(bits):
    op = getattr(torch.ops.glm, OPS[bits]).default
    gen = torch.Generator().manual_seed(3)
    qweight, scales = random_quantized(bits, 24, 64, 1, torch.float32, gen)
    torch.library.opcheck(op, (torch.randn(3, 64), qweight, scales, None))
    qweight, scales = random_quantized(bits, 24, 64, 2, torch.bfloat16, gen)
    torch.library.opcheck(op, (torch.randn(1, 64).bfloat16(), qweight, scales, torch.randn(24)))


@needs_kernels
def test_bad_input_names_the_argument():
    x, q8, s = torch.randn(2, 64), torch.zeros(8, 64, dtype=torch.int8), torch.ones(8, 2)
    q4 = torch.zeros(8, 32, dtype=torch.int8)
    cases = [
        (torch.ops.glm.int8_linear, (x[0], q8, s, None), r"x must be \[M, K\]"),
        (torch.ops.glm.int8_linear, (x.int(), q8, s, None), "x must be float32, bfloat16 or float16"),
        (torch.ops.glm.int8_linear, (x, q8.float(), s, None), "qweight must be a 2-D int8 tensor"),
        (torch.ops.glm.int8_linear, (x, q4, s, None), r"qweight must be \[N, K\] = \[N, 64\]"),
        (torch.ops.glm.int4_linear, (x, q8, s, None), r"qweight must be \[N, K / 2\] = \[N, 32\]"),
        (torch.ops.glm.int4_linear, (torch.randn(2, 63), q4, s, None), "must be even for packed int4"),
        (torch.ops.glm.int8_linear, (x, q8, torch.ones(7, 2), None), r"scales must be \[N, G\]"),
        (torch.ops.glm.int8_linear, (x, q8, torch.ones(8, 2, dtype=torch.int32), None), "scales must be float32"),
        (torch.ops.glm.int8_linear, (x, q8, torch.ones(8, 3), None), "G = 3 must divide K = 64"),
        (torch.ops.glm.int4_linear, (x, q4, torch.ones(8, 64), None), "group size K / G = 1 must be even"),
        (torch.ops.glm.int8_linear, (x, q8, s, torch.ones(7)), r"bias must be a floating \[N\]"),
    ]
    for op, args, match in cases:
        with pytest.raises(RuntimeError, match=match):
            op(*args)
