"""glm's own folder format: glm's tensor names and layout as they are (an identity table), and a config.json
that holds the `GLMConfig` itself, the release config.json the model came from, a format version, and for a
quantized model its scheme (``quantization``: bits, group_size, embeddings, lm_head; the tensors are then the
quantized state dict as it is, ``...qweight`` int8 and ``...scales`` in their own dtype).

It is not a release family: a glm-format folder keeps the family of the model it holds.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..config import GLMConfig
from ..errors import ConfigError
from ..model import GLM
from ..quant import quantize_as
from . import quantized
from .layout import Mapping, rename

# The glm_format_version values this glm reads; glm's writer stores the last one.
GLM_FORMAT_VERSIONS = (1,)


def is_native(config: Any) -> bool:
    """Whether a parsed config.json is glm's own (it carries ``glm_format_version``)."""
    return isinstance(config, dict) and "glm_format_version" in config


def check_glm_format_version(value: Any, source: str) -> int:
    """``value`` (a glm-format config.json's ``glm_format_version``) when this glm reads that version;
    ConfigError naming ``source`` otherwise, since a later layout read as this one would load wrong."""
    if isinstance(value, bool) or not isinstance(value, int) or value not in GLM_FORMAT_VERSIONS:
        raise ConfigError(f"{source}: glm_format_version is {value!r}, but this glm reads only version(s) "
                          f"{', '.join(map(str, GLM_FORMAT_VERSIONS))}; open the folder with the glm that wrote "
                          f"it, or convert the release again with this one")
    return value


def read_config(raw: dict[str, Any], source: str) -> tuple[GLMConfig, Optional[dict[str, Any]]]:
    """(the model's config, the release config.json it came from or None) of a glm-format config.json."""
    check_glm_format_version(raw.get("glm_format_version"), source)
    cfg = GLMConfig.from_dict(raw.get("config", {}), source=source)
    hf_cfg = raw.get("hf_config")
    if hf_cfg is not None and not isinstance(hf_cfg, dict):
        raise ConfigError(f"{source}: 'hf_config' must be the release's config.json object or null, "
                          f"got {type(hf_cfg).__name__}; re-save the folder with glm convert")
    return cfg, hf_cfg


def read_quantization(raw: dict[str, Any], cfg: GLMConfig, source: str) -> Optional[dict[str, Any]]:
    """The quantization scheme a glm-format config.json records (None: a float model)."""
    return quantized.read_record(raw.get("quantization"), cfg, source)


def config_json(cfg: GLMConfig, hf_config: Optional[dict[str, Any]],
                quantization: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The config.json glm writes beside weights in its own format."""
    out = {"glm_format_version": GLM_FORMAT_VERSIONS[-1], "config": cfg.to_dict(), "hf_config": hf_config}
    if quantization is not None:
        out["quantization"] = quantized.record_json(quantization)
    return out


def mappings(cfg: GLMConfig, quantization: Optional[dict[str, Any]] = None) -> list[Mapping]:
    """The identity table over the tensors a `GLM` of ``cfg`` holds, quantized with ``quantization`` if given
    (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = GLM(cfg)
    if quantization is not None:
        quantize_as(model, quantization)
    return [rename(n, n) for n in model.state_dict()]
