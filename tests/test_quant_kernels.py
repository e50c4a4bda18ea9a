"""The weight-only INT8 / INT4 linear kernels (``glm::int8_linear``, ``glm::int4_linear``) against the oracle, and
the measured choice between them and dequantize-then-F.linear.

Tolerances come from the oracle as in tests/test_kernels.py (STYLE.md practice 5): the truth is the product
with the dequantized weight in float64 (the dequantized weight is exact in fp32, so the kernel and the
reference see the same weight); the kernel passes when its error is at most 3x that of the plain-PyTorch
reference (dequantize, then F.linear in fp32, result in x's dtype) plus one rounding of the result.

Every test but the packing and dequantizing ones needs the compiled extension and skips cleanly when it is
not built. The suite runs with measuring off (conftest): choices are injected, and one test measures for real
and checks only what was stored.
"""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_kernels import OpRecorder

from glm import kernels, quant, tuning

needs_kernels = pytest.mark.skipif(
    not kernels.available(), reason=f"glm.kernels not built: {kernels.load_error()}")

FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
OPS = {8: "int8_linear", 4: "int4_linear"}


@pytest.fixture
def fresh_choices():
    """No choice measured, injected or remembered before or after the test."""
    tuning.forget()
    yield
    tuning.set_enabled(None)
    tuning.forget()


def random_quantized(bits: int, N: int, K: int, groups: int, scale_dtype: torch.dtype, gen: torch.Generator):
    """A random (qweight, scales [N, groups]) pair; int4 values cover the whole nibble range [-8, 7]."""
    lo, hi = (-8, 8) if bits == 4 else (-128, 128)
    q = torch.randint(lo, hi, (N, K), generator=gen, dtype=torch.int8)
    scales = (torch.rand(N, groups, generator=gen) * 0.1 + 1e-3).to(scale_dtype)
    return (kernels.pack_int4(q) if bits == 4 else q), scales


def make_case(bits: int, M: int, N: int, K: int, groups: int, *, x_dtype=torch.float32, scale_dtype=torch.float32,
              bias: bool = False, seed: int = 0):
    """(x [M, K], qweight, scales, bias or None) drawn from one seed."""
    gen = torch.Generator().manual_seed(seed)
    qweight, scales = random_quantized(bits, N, K, groups, scale_dtype, gen)
    x = torch.randn(M, K, generator=gen).to(x_dtype)
    b = torch.randn(N, generator=gen).to(x_dtype) if bias else None
    return x, qweight, scales, b


def check_op(bits: int, M: int, N: int, K: int, groups: int, **case) -> None:
    """glm::int{bits}_linear on a `make_case` case, within the oracle's tolerance."""
    x, qweight, scales, b = make_case(bits, M, N, K, groups, **case)
    got = getattr(torch.ops.glm, OPS[bits])(x, qweight, scales, b)
    assert_within_oracle(got, x, qweight, scales, b, bits)


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


# Group sizes by the loop of kernels/csrc/quant_cpu.cpp that takes them: None, scales per row; 32, 64 and 128
# columns (an int8 block is 32 columns; an int4 block of 64 or 128 columns holds one or several groups, spread
# by lane); 256, several blocks per group; 96 and 48, the scalar loop (96 is a multiple of 32 that int4 blocks
# of 64 or 128 columns cannot follow; 48 is no multiple of 32).
GROUP_CLASSES = [None, 32, 64, 128, 256, 96, 48]


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", GROUP_CLASSES)
def test_every_loop_matches_the_oracle(bits, group):
    # About 1100 columns: two K slices for 8 rows of x, and for per-row scales (and int4 groups of 32 on AVX2)
    # a partial block at the end. 37 weight rows: split over the threads, part of a tile. M = 1..9: one row,
    # every register block of 2..8, and 8 + 1 (two passes over a weight tile).
    K, groups = (1124, 1) if group is None else (group * (1100 // group + 1), 1100 // group + 1)
    dtypes = list(FLOAT_DTYPES.values())
    for M in range(1, 10):
        check_op(bits, M, 37, K, groups, x_dtype=dtypes[M % 3], scale_dtype=dtypes[(M // 3) % 3], bias=M % 2 == 1,
                 seed=M)


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4])
@settings(max_examples=40, **SETTINGS)
@given(M=st.integers(1, 20), N=st.integers(1, 80), group=st.sampled_from([None, 32, 64, 128, "odd"]),
       width=st.integers(1, 150), groups=st.integers(1, 4), x_dtype=st.sampled_from(list(FLOAT_DTYPES.values())),
       scale_dtype=st.sampled_from(list(FLOAT_DTYPES.values())), bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_quant_linear_matches_the_oracle(bits, M, N, group, width, groups, x_dtype, scale_dtype, bias, seed):
    # Per-row scales over K = 2 * width columns (any K, even for int4, most not a multiple of a block), or
    # `groups` groups of 32 / 64 / 128 columns, or of an unaligned even size.
    if group is None:
        K, G = 2 * width - (bits == 8 and width % 2), 1
    else:
        gs = 2 * (width % 40 + 1) if group == "odd" else group
        K, G = gs * groups, groups
    check_op(bits, M, N, K, G, x_dtype=x_dtype, scale_dtype=scale_dtype, bias=bias, seed=seed)


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4])
def test_per_row_scales_may_be_one_dimensional(bits):
    x, qweight, scales, _ = make_case(bits, 3, 24, 96, 1, scale_dtype=torch.float16)
    op = getattr(torch.ops.glm, OPS[bits])
    assert torch.equal(op(x, qweight, scales.view(-1), None), op(x, qweight, scales, None))


def test_int4_packing_puts_the_even_column_in_the_high_nibble():
    q = torch.tensor([[-7, -2, 1, 7, -8, 0]], dtype=torch.int8)
    packed = kernels.pack_int4(q)
    # 0x9E: high nibble 9 = -7, low nibble E = -2; 0x17: 1 and 7; 0x80: -8 and 0.
    assert packed.tolist() == [[0x9E - 256, 0x17, 0x80 - 256]]
    assert torch.equal(kernels.unpack_int4(packed), q)


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantize_rounds_the_product_once(bits):
    # 16-bit scales: q * scale is exact in fp32, so every dtype gets it rounded once; fp32 scales: the fp32
    # product, then the dtype. glm.quant.dequantize is the same function with the scales' dtype as default.
    gen = torch.Generator().manual_seed(1)
    for scale_dtype in FLOAT_DTYPES.values():
        qweight, scales = random_quantized(bits, 8, 64, 2, scale_dtype, gen)
        q = kernels.unpack_int4(qweight) if bits == 4 else qweight
        exact = q.double() * scales.double().repeat_interleave(32, dim=1)
        for dtype in FLOAT_DTYPES.values():
            want = (exact if scale_dtype != torch.float32 else exact.float()).to(dtype)
            assert torch.equal(kernels.dequantize_weight(qweight, scales, bits, dtype), want), (scale_dtype, dtype)
        assert torch.equal(quant.dequantize(qweight, scales, bits, 32), kernels.dequantize_weight(
            qweight, scales, bits, scale_dtype))


@needs_kernels
@pytest.mark.parametrize("K", [6, 64, 100, 128, 200])  # the scalar tail only; whole blocks (AVX2, AVX-512); both
def test_int4_kernel_reads_the_high_nibble_first(K):
    # Every byte 0x9E (-7 high, -2 low); x = 1 on even columns and 10 on odd ones: a row sums
    # K / 2 * (-7 + 10 * -2), while a swapped nibble order would give K / 2 * (-2 - 70).
    qweight = torch.full((3, K // 2), 0x9E - 256, dtype=torch.int8)
    for rows in (1, 3):
        x = torch.tensor([1.0, 10.0]).repeat(K // 2).expand(rows, K)
        for scales in (torch.ones(3, 1), torch.ones(3, K // 2)):
            y = torch.ops.glm.int4_linear(x, qweight, scales, None)
            assert y.tolist() == [[K // 2 * -27.0] * 3] * rows


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4])
def test_unmeasured_entry_points_take_the_kernel_for_few_rows_without_grad(bits, fresh_choices):
    # Measuring is off in the suite and nothing is injected: the kernel up to QUANT_LINEAR_MAX_ROWS rows.
    x, qweight, scales, bias = make_case(bits, 1, 40, 64, 2, scale_dtype=torch.bfloat16, bias=True, seed=2)
    fn = kernels.int4_linear if bits == 4 else kernels.int8_linear
    ref = kernels.int4_linear_reference if bits == 4 else kernels.int8_linear_reference
    op_name = f"glm::{OPS[bits]}"
    gen = torch.Generator().manual_seed(3)
    for rows, expect_kernel in ((1, True), (kernels.QUANT_LINEAR_MAX_ROWS, True),
                                (kernels.QUANT_LINEAR_MAX_ROWS + 1, False)):
        x = torch.randn(1, rows, 64, generator=gen)
        for entry in (lambda: fn(x, qweight, scales, bias),
                      lambda: quant.quantized_linear(x, qweight, scales, bias, bits, 32)):
            with torch.no_grad(), OpRecorder() as rec:
                y = entry()
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
def test_injected_choices_route_both_ways(bits, fresh_choices):
    op_name = f"glm::{OPS[bits]}"
    fn = kernels.int4_linear if bits == 4 else kernels.int8_linear
    for x_dtype in (torch.float32, torch.bfloat16):
        x, qweight, scales, bias = make_case(bits, 3, 40, 128, 4, x_dtype=x_dtype, bias=True, seed=4)
        key = kernels.ops.quant_linear_calibration_key(bits, x, qweight, scales)
        for choice in ("kernel", "dequantize"):
            tuning.forget()
            tuning.inject({key: choice})
            for entry in (lambda: fn(x, qweight, scales, bias),
                          lambda: quant.quantized_linear(x, qweight, scales, bias, bits, 32)):
                with torch.no_grad(), OpRecorder() as rec:
                    y = entry()
                assert (op_name in rec.names) == (choice == "kernel"), (x_dtype, choice)
                assert_within_oracle(y, x, qweight, scales, bias, bits)
    # The bucket is the call's: another row count, group size or scale dtype is not covered by the injection.
    x, qweight, scales, _ = make_case(bits, 3, 40, 128, 4)
    tuning.forget()
    tuning.inject({kernels.ops.quant_linear_calibration_key(bits, x, qweight, scales): "dequantize"})
    for other in (make_case(bits, 2, 40, 128, 4), make_case(bits, 3, 40, 128, 2),
                  make_case(bits, 3, 40, 128, 4, scale_dtype=torch.float16)):
        with torch.no_grad(), OpRecorder() as rec:
            fn(*other[:3])
        assert op_name in rec.names


@needs_kernels
def test_a_real_measurement_is_stored_once(tmp_path, monkeypatch, fresh_choices):
    monkeypatch.setenv("GLM_CACHE_DIR", str(tmp_path))
    tuning.set_enabled(True)
    x, qweight, scales, bias = make_case(4, 2, 48, 128, 4, bias=True)
    key = kernels.ops.quant_linear_calibration_key(4, x, qweight, scales)
    with torch.no_grad():
        quant.quantized_linear(x, qweight, scales, bias, 4, 32)
    choice = tuning.lookup(key)
    assert choice in ("kernel", "dequantize")
    entry = json.loads((tmp_path / tuning.FILE_NAME).read_text())["entries"][key]
    assert entry["choice"] == choice
    assert set(entry["seconds"]) == {"kernel", "dequantize"} and all(t > 0 for t in entry["seconds"].values())
    # The same bucket again (in this process, then in a new one that reads the cache): no new measurement
    # (the op runs at most once, for the call itself) and the same path.
    for forget in (False, True):
        if forget:
            tuning.forget()
        with torch.no_grad(), OpRecorder() as rec:
            quant.quantized_linear(x, qweight, scales, bias, 4, 32)
        assert rec.names.count("glm::int4_linear") == (choice == "kernel")


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4])
def test_opcheck(bits):
    op = getattr(torch.ops.glm, OPS[bits]).default
    x, qweight, scales, _ = make_case(bits, 3, 24, 64, 1, seed=3)
    torch.library.opcheck(op, (x, qweight, scales, None))
    x, qweight, scales, _ = make_case(bits, 1, 24, 64, 2, scale_dtype=torch.bfloat16, seed=4)
    torch.library.opcheck(op, (x.bfloat16(), qweight, scales, torch.randn(24)))


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
