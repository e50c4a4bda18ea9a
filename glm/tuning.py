"""Machine-local calibration: choices measured once per machine (which of two kernels is faster for a
shape bucket) and kept in a small JSON cache, so later processes reuse them without measuring.

The cache is ``$GLM_CACHE_DIR/tuning.json`` (default ``~/.cache/glm/tuning.json``). It records the
machine it was measured on: the CPU model, the core count, the torch version and the builds that
registered themselves (`register_build`: the compiled kernels' file). A cache from another machine
or build, or one that does not parse, is ignored and rewritten at the next measurement; reading or
writing it never raises (a read-only home only means measuring again in the next process). Writes
are atomic, and merge with what another process wrote meanwhile.

Within a process a choice, once made, never changes (`choose` remembers it), so a run is deterministic
even if the cache file changes underneath it. ``GLM_TUNING=off`` (or `set_enabled(False)`) turns
measuring off: callers then use their static rule. `inject` sets choices by hand (tests, or pinning a
choice on a machine).
"""
from __future__ import annotations

import json
import os
import platform
import threading
from typing import Callable, Optional

import torch

from .files import atomic_write, read_bounded

FORMAT = 1
FILE_NAME = "tuning.json"
# Entries a cache may hold: far above the few shape buckets a machine meets, and a bound on what a
# corrupted or hostile file can make a process hold.
MAX_ENTRIES = 4096

_lock = threading.RLock()
_memo: dict[str, str] = {}  # key -> choice made in this process
_disk: Optional[dict[str, dict]] = None  # the cache file's entries for this machine, read once
_generation = 0  # bumped by inject / forget (see generation)
_builds: dict[str, str] = {}
_enabled: Optional[bool] = None  # None: follow GLM_TUNING


def cache_dir() -> str:
    """Where the calibration cache lives: ``$GLM_CACHE_DIR``, else ``~/.cache/glm``."""
    return os.environ.get("GLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "glm")


def cache_path() -> str:
    return os.path.join(cache_dir(), FILE_NAME)


def enabled() -> bool:
    """Whether choices may be measured (``GLM_TUNING`` is not off, unless `set_enabled` said otherwise)."""
    if _enabled is not None:
        return _enabled
    return os.environ.get("GLM_TUNING", "on").strip().lower() not in ("0", "off", "false", "no")


def set_enabled(on: Optional[bool]) -> None:
    """Turn measuring on or off for this process; ``None`` follows ``GLM_TUNING`` again."""
    global _enabled
    _enabled = on


def register_build(name: str, ident: str) -> None:
    """Make ``ident`` (e.g. a compiled library's size and modification time) part of the machine key:
    a rebuilt library invalidates what was measured with the old one."""
    global _disk
    with _lock:
        if _builds.get(name) != ident:
            _builds[name] = ident
            _disk = None  # re-read against the new key


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What a measurement depends on besides the shape: the machine key of the cache."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "builds": dict(sorted(_builds.items()))}


def _read() -> dict[str, dict]:
    """This machine's entries in the cache file; {} when it is absent, unreadable, corrupt or foreign."""
    try:
        data = json.loads(read_bounded(cache_path(), limit=4 * 1024 * 1024, what="tuning cache"))
    except Exception:  # absent, not a file, not JSON, too big: all mean "nothing measured yet"
        return {}
    if not (isinstance(data, dict) and data.get("format") == FORMAT and data.get("machine") == machine()
            and isinstance(data.get("entries"), dict)):
        return {}
    return {k: v for k, v in list(data["entries"].items())[:MAX_ENTRIES]
            if isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("choice"), str)}


def _entries() -> dict[str, dict]:
    global _disk
    if _disk is None:
        _disk = _read()
    return _disk


def _write(key: str, entry: dict) -> None:
    """Add ``entry`` to the cache file (merged with what is there for this machine), atomically."""
    global _disk
    try:
        os.makedirs(cache_dir(), exist_ok=True)
        entries = _read()
        entries[key] = entry
        if len(entries) > MAX_ENTRIES:
            entries = dict(list(entries.items())[-MAX_ENTRIES:])
        record = {"format": FORMAT, "machine": machine(), "entries": entries}
        atomic_write(cache_path(), (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
        _disk = entries
    except OSError:
        pass  # a read-only or full disk: the choice still holds for this process


def lookup(key: str) -> Optional[str]:
    """The choice for ``key`` made in this process or found in the cache, without measuring."""
    with _lock:
        if key in _memo:
            return _memo[key] or None
        entry = _entries().get(key)
        return None if entry is None else entry["choice"] or None


def choose(key: str, measure: Callable[[], dict[str, float]]) -> Optional[str]:
    """The option that `measure` found fastest for ``key``: remembered in this process, else read from
    the cache, else measured now (``measure()`` returns seconds per option) and written to the cache.
    None when measuring is off and nothing is known, or when measuring failed."""
    with _lock:
        if key in _memo:
            return _memo[key] or None  # "": measuring failed earlier in this process
        found = lookup(key)
        if found is not None:
            _memo[key] = found
            return found
        if not enabled():
            return None
        try:
            seconds = measure()
        except Exception:  # an option that cannot run this shape: the caller's static rule decides
            seconds = {}
        if not seconds:
            _memo[key] = ""  # not again in this process
            return None
        choice = min(seconds, key=seconds.get)
        _memo[key] = choice
        _write(key, {"choice": choice, "seconds": {k: float(v) for k, v in seconds.items()}})
        return choice


def inject(table: dict[str, str]) -> None:
    """Set choices by hand for this process (they win over the cache and are never measured)."""
    global _generation
    with _lock:
        _memo.update(table)
        _generation += 1


def forget() -> None:
    """Drop this process's choices and its copy of the cache (tests)."""
    global _disk, _generation
    with _lock:
        _memo.clear()
        _disk = None
        _generation += 1


def generation() -> int:
    """A number that changes whenever `inject` or `forget` changes the choices: a caller that keeps its own
    copy of choices for speed drops it when this moves."""
    return _generation
