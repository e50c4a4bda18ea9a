"""Fused prefix-LM attention and decode kernels, the model's elementwise layers in one pass each, and the
weight-only INT8 / INT4 linears, registered as torch ops (see docs/kernels.md and :mod:`glm.kernels.ops`)."""
# This folder installs as the subpackage glm.kernels. Run from the repository root (the root on sys.path), it
# is also visible as a top-level `kernels`, the name of a PyPI package that transformers imports (and, from
# 5.25, requires). Imported under that name it never loads glm's ops or registers a backend: where the PyPI
# package is installed it hands the name over to it (the branch at the end), otherwise it stays inert (no
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
else:
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    def _installed_elsewhere(name: str, root: str):
        """The spec of ``name`` on sys.path without the repository root (the real package, where installed)."""
        path = [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != root]
        return _machinery.PathFinder.find_spec(name, path)

    _spec = _installed_elsewhere(__name__, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
    if _spec is not None and _spec.loader is not None:
        # The import system returns what sys.modules holds under the name once this file has run.
        _real = _util.module_from_spec(_spec)
        _sys.modules[__name__] = _real
        _spec.loader.exec_module(_real)
