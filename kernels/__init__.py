"""Fused prefix-LM attention and decode kernels, the model's elementwise layers in one pass each, and the
weight-only INT8 / INT4 linears, registered as torch ops (see docs/kernels.md and :mod:`glm.kernels.ops`)."""
# This folder installs as the subpackage glm.kernels. Run from the repository root, it is also
# visible as a top-level `kernels`, the name of a PyPI package that transformers probes by importing
# it; imported under that name it must stay inert (no ops loaded, no backend registered, and no
# __version__, so transformers sees no usable package).
if __name__ == "glm.kernels":
    from glm.kernels.ops import (
        CUDA_DTYPES,
        CUDA_MAX_HEAD_DIM,
        DECODE_MAX_Q,
        DTYPES,
        QUANT_LINEAR_MAX_ROWS,
        SMALL_LINEAR_MAX_ROWS,
        attention_with_lse,
        available,
        cuda_load_error,
        dequantize_weight,
        devices,
        fused_attention,
        int4_linear,
        int4_linear_reference,
        int8_linear,
        int8_linear_reference,
        linear,
        load_error,
        pack_int4,
        rms_norm,
        rms_norm_reference,
        rope,
        rope_reference,
        set_fused_elementwise,
        structure,
        supports,
        swiglu,
        swiglu_reference,
        unpack_int4,
    )

    __all__ = ["available", "load_error", "cuda_load_error", "devices", "supports", "structure", "attention_with_lse",
               "fused_attention", "linear", "rms_norm", "rope", "swiglu", "rms_norm_reference", "rope_reference",
               "swiglu_reference", "set_fused_elementwise", "DTYPES", "CUDA_DTYPES", "CUDA_MAX_HEAD_DIM",
               "DECODE_MAX_Q", "SMALL_LINEAR_MAX_ROWS", "int8_linear", "int4_linear", "int8_linear_reference",
               "int4_linear_reference", "dequantize_weight", "pack_int4", "unpack_int4", "QUANT_LINEAR_MAX_ROWS"]
