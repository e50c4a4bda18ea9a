"""Reading a release's config.json field by field, each value checked, so an error names the field and the
fix. The caller (glm.formats.config_from_hf) adds the file's name; a missing required key raises KeyError,
which it reports as a required field of the family."""
from __future__ import annotations

import math
from typing import Any, Optional

from ..errors import ConfigError


def as_int(key: str, v: Any, positive: bool = False) -> int:
    """A config.json integer field, checked: the error names the field (the caller adds the file)."""
    if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
        raise ConfigError(f"field {key!r} must be an integer, got {v!r}; fix it in config.json")
    if positive and v <= 0:
        raise ConfigError(f"field {key!r} must be a positive integer, got {v!r}; fix it in config.json")
    return int(v)


def as_float(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"field {key!r} must be a finite number, got {v!r}; fix it in config.json")
    return float(v)


def as_bool(key: str, v: Any) -> bool:
    # Python reads the string "false" as true, so a quoted flag would silently flip; the releases
    # write JSON true/false.
    if not isinstance(v, bool):
        raise ConfigError(f"field {key!r} must be true or false, got {v!r}; fix it in config.json")
    return v


def int_field(hf: dict[str, Any], key: str, default: Any = KeyError, positive: bool = False) -> int:
    """``hf[key]`` (a missing required key raises KeyError, which from_hf names) as a checked integer."""
    return as_int(key, hf[key] if default is KeyError else hf.get(key, default), positive)


def float_field(hf: dict[str, Any], key: str, default: float) -> float:
    return as_float(key, hf.get(key, default))


def bool_field(hf: dict[str, Any], key: str, default: bool) -> bool:
    return as_bool(key, hf.get(key, default))


def size_field(hf: dict[str, Any], key: str, default: int) -> int:
    """An optional size (head count, width): absent or null takes ``default``, as the reference config
    class does; any value given must be a positive integer, since 0 is no size at all."""
    v = hf.get(key)
    return default if v is None else as_int(key, v, positive=True)


def optional_id(hf: dict[str, Any], key: str) -> Optional[int]:
    v = hf.get(key)
    return None if v is None else as_int(key, v)


def eos_list(v: Any, key: str = "eos_token_id") -> tuple[int, ...]:
    """An eos id or a list of them (the releases write both) as a tuple of ids."""
    if v is None:
        return ()
    return tuple(as_int(key, x) for x in (v if isinstance(v, (list, tuple)) else [v]))


def architectures(hf: dict[str, Any]) -> list[str]:
    """The class names in ``architectures`` (the strings of it, when it is a list)."""
    archs = hf.get("architectures") or []
    return [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []


def name_or_path(hf: dict[str, Any]) -> str:
    """The release's own name for itself (provenance only)."""
    return str(hf.get("_name_or_path", ""))


def heads(hf: dict[str, Any]) -> tuple[int, int]:
    """(hidden_size, num_attention_heads), the two keys every release schema shares."""
    return int_field(hf, "hidden_size", positive=True), int_field(hf, "num_attention_heads", positive=True)


def head_dim(H: int, n: int) -> int:
    """hidden_size / num_attention_heads where a release derives the head width from them."""
    if H % n:
        raise ConfigError(f"field 'hidden_size' ({H}) must be a multiple of 'num_attention_heads' ({n}): the "
                          f"release splits the hidden size evenly among the heads; fix it in config.json")
    return H // n


def kv_groups(hf: dict[str, Any], key: str, n: int, default: Optional[int] = None) -> int:
    """The key/value head count ``key`` (required where ``default`` is None), checked against ``n`` heads."""
    g = int_field(hf, key, positive=True) if default is None else size_field(hf, key, default)
    if n % g:
        raise ConfigError(f"field {key!r} ({g}) must divide 'num_attention_heads' ({n}): each key/value head "
                          f"serves an equal share of the query heads; fix it in config.json")
    return g
