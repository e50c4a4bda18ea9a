"""The registry of release formats: one `Format` per family, and the functions the rest of glm asks.

A release module (glm_original.py, chatglm6b.py, ...) defines its `Format` and calls `register` at import.
Registering also enters the family into glm.config.FAMILIES, so `GLMConfig(family=...)` accepts it.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ..config import GLMConfig, register_family, register_hf_reader
from ..errors import ConfigError, FormatError
from .hf_fields import architectures, as_bool
from .layout import Mapping
from .quantized import ThudmLayout


class Format:
    """One release format: how its config.json is recognised, read and written, its weight table, and
    what the rest of glm needs to know about its family. A module defines a subclass (or several
    instances of one, where releases share a schema) and registers it."""

    family: str = ""
    description: str = ""
    # The glm.tokenizer family of the release's tokenizer ("glm", "chatglm", "chatglm2", "chatglm3", "glm4").
    tokenizer_family: str = ""
    # How its config.json is recognised, for the error when no format recognises a file (formats that share
    # a schema share the words, which appear once).
    recognised_by: str = ""
    # The on/off keys of its config.json schema. glm reads some and ignores the rest, but a flag that is
    # not true/false means the file is damaged or hand-edited wrongly, so every present one is checked.
    flags: tuple[str, ...] = ()
    # The reference's loss takes labels that are already the next tokens (GLM); else it shifts by one.
    labels_are_next_tokens: bool = False
    # Other families whose models this format can also write (the same computation, another file layout).
    converts_from: tuple[str, ...] = ()
    # THUDM's quantized layout of the release (config.json quantization_bit), None where it has none: a
    # quantized model of such a family is saved in glm's own format.
    quantized_layout: Optional[ThudmLayout] = None

    def matches(self, hf: dict[str, Any]) -> bool:
        """Whether ``hf`` (a parsed config.json) is this format's. At most one registered format matches."""
        raise NotImplementedError

    def config_from_hf(self, hf: dict[str, Any]) -> GLMConfig:
        """The `GLMConfig` a config.json of this format describes (ConfigError naming the field otherwise)."""
        raise NotImplementedError

    def config_to_hf(self, cfg: GLMConfig, dtype: torch.dtype) -> dict[str, Any]:
        """The config.json this format's reference code reads for ``cfg`` (FormatError for a model it cannot
        express)."""
        raise NotImplementedError

    def mappings(self, cfg: GLMConfig, dtype: torch.dtype = torch.float32, keys: Optional[Sequence[str]] = None,
                 hf_config: Optional[dict[str, Any]] = None) -> list[Mapping]:
        """The weight table between glm's layout and this format for ``cfg``.

        ``dtype`` is that of the release file (it matters only for buffers glm regenerates on write).
        ``keys``, the tensor names of an existing file, settle variants the config does not tell apart;
        ``hf_config`` is the config.json the file is (or will be) read with."""
        raise NotImplementedError

    def quantization_from_hf(self, hf: dict[str, Any], cfg: GLMConfig, source: str) -> Optional[dict]:
        """The quantization scheme (glm.quant.scheme) of a config.json of this format, None for a float model."""
        return None if self.quantized_layout is None else self.quantized_layout.read(hf, cfg, source)

    def load_warning(self, hf_config: Optional[dict[str, Any]], source: str) -> Optional[str]:
        """A warning to show when a file of this format is read with ``hf_config`` (None: nothing to say)."""
        return None

    def adopt(self, cfg: GLMConfig, dtype: torch.dtype) -> GLMConfig:
        """``cfg``, of one of `converts_from`, as this family (checked afterwards by `config_to_hf`)."""
        return cfg.replace(family=self.family)

    def retarget(self, cfg: GLMConfig, dtype: torch.dtype) -> GLMConfig:
        """``cfg`` re-expressed as this family with the same computation, where the formats allow it;
        FormatError naming what differs otherwise."""
        if cfg.family == self.family:
            return cfg
        if cfg.family not in self.converts_from:
            raise FormatError(f"a {cfg.family} model cannot be written in the {self.family} format: the "
                              f"architectures differ (positions, norms, MLP or residual); convert to 'glm' "
                              f"format instead")
        new = self.adopt(cfg, dtype)
        self.config_to_hf(new, dtype)  # raises FormatError naming any field this format cannot express
        return new

    def require(self, cfg: GLMConfig, **fields: Any) -> None:
        """FormatError unless each named field of ``cfg`` has the given value (what the format can express)."""
        bad = [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in fields.items() if getattr(cfg, k) != v]
        if bad:
            raise FormatError(f"a {cfg.family} model cannot be written as {self.family}: {', '.join(bad)}")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.family}>"


# Every registered release format, by family, in registration order.
FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> None:
    """Make ``fmt`` known: its family becomes valid in `GLMConfig`, and detection, loading, conversion and the
    tokenizer find it."""
    if not isinstance(fmt, Format) or not fmt.family:
        raise ConfigError(f"register() takes a Format with a family name, got {fmt!r}")
    if fmt.family in FORMATS:
        raise ConfigError(f"family {fmt.family!r} is registered already, by {FORMATS[fmt.family]!r}")
    FORMATS[fmt.family] = fmt
    register_family(fmt.family, fmt.description)


def get(family: str) -> Format:
    """The registered format of ``family``; ConfigError listing the known ones otherwise."""
    fmt = FORMATS.get(family) if isinstance(family, str) else None
    if fmt is None:
        raise ConfigError(f"unknown family {family!r}; known: {', '.join(FORMATS)}")
    return fmt


def detect(hf: dict[str, Any], source: str = "config") -> Format:
    """The format a config.json belongs to, recognised from its keys and names."""
    found = [fmt for fmt in FORMATS.values() if fmt.matches(hf)]
    if len(found) == 1:
        return found[0]
    if found:
        raise ConfigError(f"{source}: matches the formats of several families ({', '.join(f.family for f in found)}); "
                          f"their recognition rules overlap")
    archs = architectures(hf)
    hints = list(dict.fromkeys(f.recognised_by for f in FORMATS.values() if f.recognised_by))
    supported = ", ".join(hints[:-1]) + " and " + hints[-1] if len(hints) > 1 else "".join(hints)
    raise ConfigError(f"{source}: cannot tell which GLM family this is (model_type={hf.get('model_type')!r}, "
                      f"architectures={archs}); supported: {supported}")


def check_flags(hf: dict[str, Any]) -> None:
    """Every on/off key of any registered schema that ``hf`` holds must be true or false."""
    for key in dict.fromkeys(k for fmt in FORMATS.values() for k in fmt.flags):
        if key in hf:
            as_bool(key, hf[key])


def config_from_hf(hf: dict[str, Any], source: str = "config") -> GLMConfig:
    """The `GLMConfig` of a release's parsed config.json (``source`` names the file in errors); what
    `GLMConfig.from_hf` runs."""
    fmt = detect(hf, source)
    try:
        check_flags(hf)
        return fmt.config_from_hf(hf)
    except KeyError as e:
        raise ConfigError(f"{source}: field {e.args[0]!r} is required for family {fmt.family!r} "
                          f"({fmt.description}); add it to config.json") from None
    except (TypeError, ValueError, ArithmeticError) as e:
        if isinstance(e, ConfigError):
            raise ConfigError(f"{source}: {e}") from None
        raise ConfigError(f"{source}: a field has the wrong type or value for family {fmt.family!r}: {e}; "
                          f"fix it in config.json") from None


def config_to_hf(cfg: GLMConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The release config.json of ``cfg`` in its family's format."""
    return get(cfg.family).config_to_hf(cfg, dtype)


def mappings(cfg: GLMConfig, dtype: torch.dtype = torch.float32, keys: Optional[Sequence[str]] = None,
             hf_config: Optional[dict[str, Any]] = None) -> list[Mapping]:
    """The weight table of ``cfg``'s family (see `Format.mappings`)."""
    return get(cfg.family).mappings(cfg, dtype, keys, hf_config)


def retarget(cfg: GLMConfig, family: str, dtype: torch.dtype) -> GLMConfig:
    """``cfg`` re-expressed as ``family`` with the same computation (see `Format.retarget`)."""
    if family not in FORMATS:
        raise FormatError(f"no release format for family {family!r}; known: {', '.join(FORMATS)}")
    return FORMATS[family].retarget(cfg, dtype)


register_hf_reader(config_from_hf)
