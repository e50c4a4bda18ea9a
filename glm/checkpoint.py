"""Lazy, shard-aware reading of checkpoint folders (safetensors or pytorch ``.bin``, single or sharded).

`CheckpointReader` maps tensor names to the file holding them and reads a tensor only when it is
asked for (safetensors: a positioned read of its byte range, after validating the header; ``.bin``:
``torch.load(mmap=True, weights_only=True)``), so converting or loading holds one tensor at a time.

`write_checkpoint` writes safetensors shards from a stream of tensors (or of `FileSlice`s, the byte
ranges of tensors a conversion copies as they are), atomically, with a sha256 record of every file.
This module knows files, names, shapes and dtypes only: nothing of models, configs or formats.
"""
from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import queue
import re
import shutil
import signal
import socket
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Collection, Iterator, Optional

import torch
from torch import Tensor

from .errors import CheckpointError, FileKindError
from .files import (
    JSON_LIMIT,
    atomic_write,
    current_umask,
    ensure_regular,
    fsync_dir,
    open_regular,
    read_bounded,
    read_json,
    write_failed,
)

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}

INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")


# Element sizes in bits of every dtype the safetensors library (0.8) knows; a file naming another is
# refused, as the library refuses it. glm loads only the `_ST_DTYPES` among them.
_ST_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
            "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
            "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}
_ST_MAX_HEADER = 100_000_000  # the library's limit on the JSON header
_ST_MAX_DEPTH = 127  # serde_json's recursion limit: objects and arrays nested deeper are refused
_U64 = 1 << 64  # shapes and offsets are usize: sizes are computed, and overflow, in 64 bits
_SURROGATE = re.compile("[\ud800-\udfff]")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Pairs(list):
    """A JSON object as its (key, value) pairs in file order: the library refuses some repeated keys
    (a field of a tensor entry, ``__metadata__``) that a dict would silently collapse."""


def _st_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):  # serde_json: "number out of range"; Python's json would give inf
        raise ValueError(f"number {text[:20]} out of range")
    return v


def _st_int(text: str) -> "int | float":
    # serde_json reads -0 and integers outside i64/u64 as floats (so never as a size or offset).
    if text == "-0":
        return -0.0
    v = int(text)
    return v if -(1 << 63) <= v < _U64 else _st_float(text)


def _st_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _json_problem(doc) -> Optional[str]:
    """What makes the parsed header JSON that the library's parser (serde_json) refuses, or None."""
    stack = [(doc, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return "with a lone UTF-16 surrogate escape in a string"
        elif isinstance(v, list):
            if depth > _ST_MAX_DEPTH:
                return f"nested more than {_ST_MAX_DEPTH} levels deep"
            for item in v:
                if isinstance(v, _Pairs):
                    key, item = item
                    if _SURROGATE.search(key):
                        return "with a lone UTF-16 surrogate escape in a key"
                stack.append((item, depth + 1))
    return None


def _short(v) -> str:
    text = repr(list(v) if isinstance(v, _Pairs) else v)
    return text if len(text) <= 80 else text[:77] + "..."


def _tensor_entry(value) -> "tuple[str, list, list] | str":
    """(dtype, shape, data_offsets) of one header entry, or what is wrong with it. The library also reads an
    entry written as the list [dtype, shape, data_offsets] and a dtype written as {"F32": null}."""
    if isinstance(value, _Pairs):
        fields: dict = {}
        for key, v in value:
            if key in ("dtype", "shape", "data_offsets"):
                if key in fields:
                    return f"has '{key}' twice"
                fields[key] = v
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in fields]
        if missing:
            return f"has no '{missing[0]}'"
        dtype, shape, offsets = fields["dtype"], fields["shape"], fields["data_offsets"]
    elif isinstance(value, list) and len(value) == 3:
        dtype, shape, offsets = value
    else:
        return f"is not an object (got {_short(value)})"
    if isinstance(dtype, _Pairs) and len(dtype) == 1 and dtype[0][1] is None:
        dtype = dtype[0][0]
    if not isinstance(dtype, str):
        return f"has no string 'dtype' (got {_short(dtype)})"
    if dtype not in _ST_BITS:
        return f"has dtype {dtype!r}, which is not a safetensors dtype"
    if (not isinstance(shape, list) or isinstance(shape, _Pairs)
            or not all(_is_int(d) and 0 <= d < _U64 for d in shape)):
        return f"has a 'shape' that is not a list of non-negative integers (got {_short(shape)})"
    if (not isinstance(offsets, list) or isinstance(offsets, _Pairs) or len(offsets) != 2
            or not all(_is_int(o) and 0 <= o < _U64 for o in offsets)):
        return (f"has 'data_offsets' that are not [begin, end] with 0 <= begin <= end "
                f"(got {_short(offsets)})")
    return dtype, list(shape), list(offsets)


def _read_safetensors_header(path: str) -> tuple[dict, int]:
    """The header of a safetensors file (tensor name -> {"dtype", "shape", "data_offsets"}, plus
    ``__metadata__`` when present) and its length in bytes, after checking it exactly as the safetensors
    library does, so that glm reads the files the library reads and refuses, with an error naming the
    file and the tensor, every file it refuses: UTF-8 JSON that serde_json accepts, known dtypes, sizes
    equal to shape x dtype (computed in 64 bits), and tensors that, sorted by offset, tile the data
    section from its first byte to the file's last, without gaps or overlaps. Two tensors sharing bytes
    would otherwise both load, one of them with the other's weights.

    Nothing is allocated from the header's claims: after this, reading a tensor reads only bytes the
    file holds."""
    fix = "re-download or re-convert it"
    try:
        f = open_regular(path, "safetensors file")
    except FileKindError as e:
        raise CheckpointError(str(e)) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes); {fix}")
        n = int.from_bytes(raw, "little")
        if n <= 0 or 8 + n > size or n > _ST_MAX_HEADER:
            raise CheckpointError(f"{path}: corrupt safetensors header (declares {n} header bytes in a "
                                  f"{size}-byte file; at most {_ST_MAX_HEADER}); {fix}")
        text = f.read(n)
    try:
        doc = json.loads(text.decode("utf-8"), object_pairs_hook=_Pairs, parse_int=_st_int,
                         parse_float=_st_float, parse_constant=_st_constant)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON); {fix}") from None
    problem = _json_problem(doc)
    if problem is not None:
        raise CheckpointError(f"{path}: corrupt safetensors header (JSON with {problem}, which safetensors "
                              f"refuses); {fix}")
    if not isinstance(doc, _Pairs):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object); {fix}")

    def corrupt(name: str, bad: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} {bad}; {fix}")

    header: dict = {}
    for name, value in doc:
        if name == "__metadata__":
            if "__metadata__" in header:
                raise CheckpointError(f"{path}: corrupt safetensors header ('__metadata__' appears twice); {fix}")
            if value is not None and not (isinstance(value, _Pairs) and all(isinstance(v, str) for _, v in value)):
                raise CheckpointError(f"{path}: corrupt safetensors header ('__metadata__' must be an object of "
                                      f"strings, got {_short(value)}); {fix}")
            header[name] = None if value is None else dict(value)
            continue
        entry = _tensor_entry(value)
        if isinstance(entry, str):
            raise corrupt(name, entry)
        # A repeated name: the last entry counts, as in the library (every one must be well formed).
        header[name] = {"dtype": entry[0], "shape": entry[1], "data_offsets": entry[2]}
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    data_size = size - 8 - n
    for name, info in tensors.items():
        (begin, end), shape, dtype = info["data_offsets"], info["shape"], info["dtype"]
        if end < begin:
            raise corrupt(name, f"has 'data_offsets' that are not [begin, end] with 0 <= begin <= end "
                                f"(got {[begin, end]})")
        count, overflow = 1, False
        for d in shape:
            count *= d
            overflow = overflow or count >= _U64
        bits = count * _ST_BITS[dtype]
        if overflow or bits >= _U64 or bits % 8 or end - begin != bits // 8:
            raise corrupt(name, f"declares {end - begin} bytes for shape {shape} {dtype} ({bits / 8:g} bytes)")
        if end > data_size:
            raise CheckpointError(f"{path}: truncated safetensors file: tensor {name!r} needs {8 + n + end} bytes, "
                                  f"the file has {size}; {fix}")
    # Sorted by (begin, end), as the library sorts them, the tensors must follow each other exactly.
    pos, prev = 0, None
    for name, info in sorted(tensors.items(), key=lambda kv: kv[1]["data_offsets"]):
        begin, end = info["data_offsets"]
        if begin < pos:
            raise corrupt(name, f"has data_offsets {[begin, end]} that overlap tensor {prev!r} (which ends at "
                                f"{pos}); two tensors may not share bytes")
        if begin > pos:
            after = f"after tensor {prev!r} (which ends at {pos})" if prev is not None else "at the start"
            raise corrupt(name, f"has data_offsets {[begin, end]} that leave {begin - pos} bytes {after} "
                                f"that no tensor covers")
        pos, prev = end, name
    if pos != data_size:
        raise CheckpointError(f"{path}: corrupt safetensors file: its last {data_size - pos} bytes belong to no "
                              f"tensor in the header; {fix}")
    return header, n


@dataclass(frozen=True)
class FileSlice:
    """A tensor's bytes as a weight file stores them, for the writer to copy into its output as they are
    (a tensor a conversion only renames) without loading the tensor: through a few reused buffers."""
    path: str
    offset: int  # from the start of the file
    nbytes: int
    shape: torch.Size
    dtype: torch.dtype


class CheckpointReader:
    """Tensor names -> lazily loaded tensors, over the weight files of one checkpoint folder."""

    def __init__(self, folder: str):
        self.folder = folder = os.fspath(folder)
        # A few recently used files stay open: a conversion rule may read tensors from two shards.
        self._open_files: "OrderedDict[str, object]" = OrderedDict()
        self._headers: dict[str, dict] = {}
        self._data_start: dict[str, int] = {}  # header length per safetensors file
        if not os.path.isdir(folder):
            raise CheckpointError(f"{folder}: not a checkpoint folder (no such directory)")
        self.weight_map: dict[str, str] = {}  # tensor name -> file name inside folder
        self.index = index = next((n for n in INDEX_NAMES if os.path.exists(os.path.join(folder, n))), None)
        if index is not None:
            self._read_index(os.path.join(folder, index))
        else:
            single = next((n for n in SINGLE_NAMES if os.path.exists(os.path.join(folder, n))), None)
            if single is None:
                raise CheckpointError(
                    f"{folder}: no weights found; expected one of {', '.join(INDEX_NAMES + SINGLE_NAMES)}")
            for name in self._file_keys(single):
                self.weight_map[name] = single

    def _read_index(self, path: str) -> None:
        try:
            wm = json.loads(read_bounded(path, JSON_LIMIT, "shard index").decode("utf-8"))["weight_map"]
            if not isinstance(wm, dict) or not all(isinstance(v, str) and v for v in wm.values()):
                raise TypeError
        except FileKindError as e:
            raise CheckpointError(str(e)) from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError):
            raise CheckpointError(f"{path}: not a valid index (needs a JSON object with a 'weight_map' "
                                  f"of tensor name -> shard file); restore it from the release") from None
        odd = sorted({fn for fn in wm.values() if os.path.basename(fn) != fn or fn in (".", "..")})
        if odd:
            raise CheckpointError(f"{path}: shard names must be plain file names inside {self.folder}, got "
                                  f"{', '.join(map(repr, odd[:5]))}; restore the index from the release")
        missing = sorted({fn for fn in wm.values() if not os.path.exists(os.path.join(self.folder, fn))})
        if missing:
            raise CheckpointError(f"{path}: shard file(s) listed in the index are missing: "
                                  f"{', '.join(missing)}; download them into {self.folder}")
        self.weight_map = dict(wm)

    def _file_keys(self, file: str) -> list[str]:
        path = os.path.join(self.folder, file)
        if file.endswith(".safetensors"):
            return [k for k in self._header(file) if k != "__metadata__"]
        return list(self._load_bin(path).keys())

    @staticmethod
    def _load_bin(path: str) -> dict[str, Tensor]:
        try:
            ensure_regular(path, ".bin weight file")  # torch.load would block on a FIFO
        except FileKindError as e:
            raise CheckpointError(str(e)) from None
        try:
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" in str(e) or "zip" in str(e).lower():
                # Legacy (non-zip) .bin files cannot be memory-mapped; they load whole.
                try:
                    sd = torch.load(path, map_location="cpu", weights_only=True)
                except Exception as e2:
                    raise CheckpointError(f"{path}: cannot read this .bin file ({e2}); it may be truncated") from None
            else:
                raise CheckpointError(f"{path}: cannot read this .bin file ({e}); it may be truncated") from None
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read this .bin file safely ({type(e).__name__}: {e}). "
                                  f"Only tensors load (weights_only=True); re-save it as safetensors") from None
        if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
            raise CheckpointError(f"{path}: expected a flat state dict of tensors")
        return sd

    # ------------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.weight_map)

    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _open(self, file: str, keep: int = 2):
        """A ``.bin`` file's (memory-mapped) state dict, kept for the next few reads."""
        if file in self._open_files:
            self._open_files.move_to_end(file)
            return self._open_files[file]
        handle = self._load_bin(os.path.join(self.folder, file))
        self._open_files[file] = handle
        while len(self._open_files) > keep:
            self._open_files.popitem(last=False)
        return handle

    def _read_safetensors(self, file: str, name: str) -> Tensor:
        # Plain positioned reads into a fresh tensor rather than a memory map: resident memory stays
        # at the tensors in use, not at the pages of every shard touched so far.
        header = self._header(file)
        if name not in header:
            raise KeyError(name)
        info = header[name]
        dtype = _ST_DTYPES.get(info["dtype"])
        path = os.path.join(self.folder, file)
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which glm cannot load; "
                                  f"convert the checkpoint to float32, float16 or bfloat16 first")
        begin, end = info["data_offsets"]
        t = torch.empty(info["shape"], dtype=dtype)
        nbytes = t.numel() * t.element_size()
        if end - begin != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} declares {end - begin} bytes for shape "
                                  f"{info['shape']} {info['dtype']}; the file is corrupt")
        if nbytes:
            try:
                f = open_regular(path, "safetensors file")
            except FileKindError as e:
                raise CheckpointError(str(e)) from None
            with f:
                f.seek(8 + self._data_start[file] + begin)
                got = f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy()))
            if got != nbytes:
                raise CheckpointError(f"{path}: truncated while reading {name!r}; re-download or re-convert it")
        return t

    def slice(self, name: str) -> "Optional[FileSlice]":
        """Where ``name``'s bytes lie in its safetensors file, for copying them unread; None for a tensor
        in a ``.bin`` file or of a dtype glm does not load (`get` then reads it, or says why not)."""
        file = self.weight_map.get(name)
        if file is None or not file.endswith(".safetensors"):
            return None
        header = self._header(file)
        info = header.get(name)
        dtype = _ST_DTYPES.get(info["dtype"]) if info is not None else None
        if dtype is None:
            return None
        begin, end = info["data_offsets"]
        return FileSlice(os.path.join(self.folder, file), 8 + self._data_start[file] + begin, end - begin,
                         torch.Size(info["shape"]), dtype)

    def get(self, name: str) -> Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.folder}: tensor {name!r} is not in the checkpoint")
        file = self.weight_map[name]
        try:
            if file.endswith(".safetensors"):
                return self._read_safetensors(file, name)
            return self._open(file)[name]
        except CheckpointError:
            raise
        except Exception as e:  # KeyError for .bin, SafetensorError for safetensors
            if not isinstance(e, KeyError) and "does not contain" not in str(e):
                raise CheckpointError(f"{os.path.join(self.folder, file)}: cannot read tensor {name!r} "
                                      f"({e}); the file may be corrupt") from None
            raise CheckpointError(f"{os.path.join(self.folder, file)}: the index says it holds {name!r}, "
                                  f"but it does not; the index and the shards disagree") from None

    def items_by_file(self) -> Iterator[tuple[str, list[str]]]:
        """(file, names in it) in file order: read each shard once, front to back."""
        by_file: dict[str, list[str]] = {}
        for name, file in self.weight_map.items():
            by_file.setdefault(file, []).append(name)
        for file in sorted(by_file):
            yield file, by_file[file]

    def meta(self, name: str) -> Tensor:
        """A meta tensor with the stored shape and dtype, read from headers without loading data."""
        file = self.weight_map[name]
        if file.endswith(".safetensors"):
            header = self._header(file)
            if name not in header:
                raise CheckpointError(f"{os.path.join(self.folder, file)}: the index says it holds {name!r}, "
                                      f"but it does not; the index and the shards disagree")
            info = header[name]
            return torch.empty(info["shape"], dtype=_ST_DTYPES.get(info["dtype"], torch.uint8), device="meta")
        return self.get(name).to("meta")

    def _header(self, file: str) -> dict:
        if file not in self._headers:
            self._headers[file], self._data_start[file] = _read_safetensors_header(os.path.join(self.folder, file))
        return self._headers[file]

    def file_of(self, name: str) -> str:
        return self.weight_map[name]

    def close(self) -> None:
        self._open_files.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Writing checkpoints: streamed safetensors shards, committed atomically

# Written by glm's writer beside the weights (both formats): the size and sha256 of every weight file
# and of the index, checked on load, so bytes damaged after the write (a bad disk, a copy cut short
# and padded) fail loudly instead of loading as wrong weights. config.json and the tokenizer are not
# in it: they are text people edit, and their readers check them.
CHECKSUMS_NAME = "glm_checksums.json"
CHECKSUMS_VERSION = 1
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")
_WRITER_FILES = ("config.json", "model.safetensors.index.json", CHECKSUMS_NAME)


def is_glm_format(folder: str) -> bool:
    """Whether ``folder``'s config.json is glm's own format (it carries ``glm_format_version``)."""
    path = os.path.join(folder, "config.json")
    return os.path.exists(path) and isinstance(cfg := read_json(path), dict) and "glm_format_version" in cfg


def file_sha256(path: str, what: str = "weight file") -> tuple[int, str]:
    """(size, sha256 hex digest) of a regular file, streamed in 8 MiB reads."""
    digest, size = hashlib.sha256(), 0
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with open_regular(path, what) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
            size += n
    return size, digest.hexdigest()


def _read_checksums(folder: str) -> Optional[dict[str, dict]]:
    """The ``files`` of ``folder``'s checksum record (name -> {"size", "sha256"}), or None without one."""
    path = os.path.join(folder, CHECKSUMS_NAME)
    if not os.path.lexists(path):
        return None
    fix = ("delete it to load the folder unchecked (or pass verify=False / --no-verify), or re-convert the "
           "checkpoint")
    try:
        record = json.loads(read_bounded(path, JSON_LIMIT, "checksum record").decode("utf-8"))
        files = record["files"]
        if (not isinstance(files, dict) or record.get("glm_checksums_version") != CHECKSUMS_VERSION
                or not all(isinstance(v, dict) and _is_int(v.get("size")) and isinstance(v.get("sha256"), str)
                           for v in files.values())):
            raise TypeError
    except (OSError, ValueError, RecursionError, KeyError, TypeError) as e:
        reason = str(e) if isinstance(e, (OSError, FileKindError)) else "not a glm checksum record"
        raise CheckpointError(f"{path}: {reason} (expected {{\"glm_checksums_version\": {CHECKSUMS_VERSION}, "
                              f"\"files\": {{name: {{\"size\", \"sha256\"}}}}}}); {fix}") from None
    return files


def verify_checksums(folder: str, names: "list[str]") -> None:
    """Check the files ``names`` of ``folder`` against the checksum record glm wrote there (nothing to
    check in a folder without one, such as a release). Every name must be in the record with its size
    and sha256: a weight file damaged, replaced or added after glm wrote the folder is a CheckpointError."""
    files = _read_checksums(folder)
    if files is None:
        return
    record = os.path.join(folder, CHECKSUMS_NAME)
    skip = "or pass verify=False (--no-verify) to load it unchecked"

    def sized(path: str, size: int, want: dict) -> None:
        if size != want["size"]:
            raise CheckpointError(f"{path}: {size} bytes, but glm wrote {want['size']} ({record}); the file was "
                                  f"cut short or changed: re-download or re-convert it, {skip}")

    def hashed(path: str) -> tuple[int, str]:
        try:
            return file_sha256(path)
        except FileKindError as e:
            raise CheckpointError(str(e)) from None

    # The cheap checks first, in order, up to the first failure; then the files before it are hashed
    # at once (sha256 releases the GIL), and reported in order, so the first bad file is the one named.
    jobs: list[tuple[str, dict]] = []
    problem: Optional[CheckpointError] = None
    for name in names:
        path = os.path.join(folder, name)
        want = files.get(name)
        if want is None:
            problem = CheckpointError(f"{path}: not among the files glm wrote into this folder ({record} does not "
                                      f"list it); it was added or renamed later. Re-convert the folder, delete "
                                      f"{CHECKSUMS_NAME}, {skip}")
            break
        try:
            sized(path, ensure_regular(path, "weight file").st_size, want)
        except FileKindError as e:
            problem = CheckpointError(str(e))
            break
        except CheckpointError as e:
            problem = e
            break
        jobs.append((path, want))
    if jobs:
        pool = ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1), thread_name_prefix="glm-verify")
        try:
            for (path, want), future in [(job, pool.submit(hashed, job[0])) for job in jobs]:
                size, digest = future.result()
                sized(path, size, want)
                if digest != want["sha256"]:
                    raise CheckpointError(f"{path}: its bytes differ from those glm wrote (sha256 {digest[:16]}..., "
                                          f"recorded {want['sha256'][:16]}... in {record}); the file is damaged or "
                                          f"was changed: re-download or re-convert it, {skip}")
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    if problem is not None:
        raise problem.with_traceback(None) from None


def plan_shards(entries: list[tuple[str, Tensor]], shard_size: int) -> list[list[tuple[str, Tensor]]]:
    """Cut the ordered entries into consecutive shards of at most ``shard_size`` bytes (a tensor
    larger than that gets a shard of its own)."""
    shards: list[list[tuple[str, Tensor]]] = [[]]
    size = 0
    for name, t in entries:
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += n
    return shards if shards[0] else []


class _Fanout:
    """Hands each buffer to several consumers (writing it, hashing it), each on a thread of its own, so
    that they run at once and overlap the caller producing the next buffer: file writes and sha256
    release the GIL. Buffers handed over and not yet done with by every consumer hold at most
    ``budget`` bytes (or one buffer, if larger), which bounds the memory held (small buffers may run
    ahead of a slow one); each consumer sees the buffers in order. The first
    error a consumer raises is raised to the caller at its next `put` or at `finish`, and the
    consumers skip what is left."""

    def __init__(self, consumers: "list[Callable[[memoryview], None]]", budget: int):
        self._budget = budget
        self._held = [0, 0]  # buffers, bytes handed over and not yet done with
        self._cond = threading.Condition()
        self._queues: "list[queue.SimpleQueue]" = [queue.SimpleQueue() for _ in consumers]
        self._error: Optional[BaseException] = None
        self._stop = False
        self._threads = [threading.Thread(target=self._run, args=(fn, q), daemon=True, name="glm-writer")
                         for fn, q in zip(consumers, self._queues)]
        for t in self._threads:
            t.start()

    def _run(self, fn: "Callable[[memoryview], None]", q: "queue.SimpleQueue") -> None:
        while (item := q.get()) is not None:
            if self._error is None and not self._stop:
                try:
                    fn(item[0])
                except BaseException as e:  # raised to the caller's thread
                    with self._cond:
                        self._error = self._error or e
            with self._cond:
                item[1] -= 1
                if item[1] == 0:
                    item[0] = None  # the last reference to the buffer goes with it
                    self._held[0] -= 1
                    self._held[1] -= item[2]
                    self._cond.notify_all()

    def put(self, buf: memoryview) -> None:
        n = buf.nbytes
        with self._cond:
            self._cond.wait_for(lambda: self._error is not None or not self._held[0]
                                or self._held[1] + n <= self._budget)
            if self._error is not None:
                raise self._error
            self._held[0] += 1
            self._held[1] += n
        item = [buf, len(self._queues), n]
        for q in self._queues:
            q.put(item)

    def finish(self) -> None:
        """Wait until every consumer is done with every buffer; raise the first error."""
        with self._cond:
            self._cond.wait_for(lambda: not self._held[0])
            if self._error is not None:
                raise self._error

    def close(self) -> None:
        """Stop the consumers (what is still queued is skipped) and wait for them."""
        self._stop = True
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join()


class _Writeback:
    """Asks the kernel, from a thread of its own, to start writing a file's pages to disk every
    `EVERY` bytes written, so the disk works while the file is still being produced and the fsync at
    its end waits for the last stretch only. Advice only: where it is not available, or fails, the
    fsync does all the work as before."""

    EVERY = 64 << 20

    def __init__(self, fd: int):
        self._fd, self._upto, self._done, self._closed = fd, 0, 0, False
        self._cond = threading.Condition()
        self._thread = None
        if hasattr(os, "posix_fadvise"):
            self._thread = threading.Thread(target=self._run, daemon=True, name="glm-writeback")
            self._thread.start()

    def wrote(self, upto: int) -> None:
        with self._cond:
            self._upto = upto
            if upto - self._done >= self.EVERY:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._upto - self._done >= self.EVERY)
                if self._closed:
                    return
                start, end = self._done, self._upto
            try:
                # DONTNEED starts writeback of the dirty range (and drops the pages already on disk).
                os.posix_fadvise(self._fd, start, end - start, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
            with self._cond:
                self._done = end

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()


# A `FileSlice` is handed to the writer in windows of this size, each mapped from its file on its own;
# one window is written and hashed while the next is mapped.
_COPY_WINDOW = 32 << 20


def _copy_slice(piece: FileSlice, out: _Fanout) -> None:
    """Hand ``piece``'s bytes to ``out`` as read-only memory maps of its file, window by window: the
    writer and the hasher read the page cache directly (copying through a buffer of this process
    measured 2-4x slower), and a window is unmapped once both are done with it."""
    try:
        f = open_regular(piece.path, "safetensors file")
    except FileKindError as e:
        raise CheckpointError(str(e)) from None
    with f:
        for start in range(0, piece.nbytes, _COPY_WINDOW):
            pos, n = piece.offset + start, min(_COPY_WINDOW, piece.nbytes - start)
            base = pos - pos % mmap.ALLOCATIONGRANULARITY
            # Mapped pages cannot be read past the file's end (SIGBUS): a file cut short is refused first.
            if os.fstat(f.fileno()).st_size < pos + n:
                raise CheckpointError(f"{piece.path}: truncated while reading; re-download or re-convert it")
            # Not MAP_POPULATE: write() from a prefaulted window measured 2-4x slower than from one it faults in.
            window = mmap.mmap(f.fileno(), pos + n - base, access=mmap.ACCESS_READ, offset=base)
            out.put(memoryview(window)[pos - base:])
            del window  # the view handed over keeps the mapping until the writer is done with it


def _write_safetensors_stream(path: str, entries: list[tuple[str, Tensor]],
                              tensors: "Iterator[tuple[str, Tensor | FileSlice]]", on_tensor=None) -> tuple[int, str]:
    """Write a safetensors file whose header is known up front (from meta tensors), then stream the
    data one tensor at a time (a `FileSlice` is copied from its file, window by window), so at most two
    tensors are held in memory: the one being written and hashed, on threads of their own, and the next
    one being produced. Returns the file's (size, sha256), hashed as it is written (no second read)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, m in entries:
        if m.dtype not in _ST_NAMES:
            raise CheckpointError(f"tensor {name!r} has dtype {m.dtype}, which safetensors cannot store")
        n = m.numel() * m.element_size()
        header[name] = {"dtype": _ST_NAMES[m.dtype], "shape": list(m.shape), "data_offsets": [offset, offset + n]}
        offset += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)  # data starts 8-byte aligned
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        written = 0
        writeback = _Writeback(f.fileno())

        def write(b: memoryview) -> None:
            nonlocal written
            f.write(b)
            written += b.nbytes
            writeback.wrote(written)

        out = _Fanout([write, digest.update], budget=_COPY_WINDOW)
        try:
            out.put(memoryview(len(hb).to_bytes(8, "little") + hb))
            for name, m in entries:
                got_name, t = next(tensors)
                if got_name != name or t.shape != m.shape or t.dtype != m.dtype:
                    raise RuntimeError(f"internal: planned {name} {tuple(m.shape)} {m.dtype}, got {got_name} "
                                       f"{tuple(t.shape)} {t.dtype}")
                if isinstance(t, FileSlice):
                    nbytes = t.nbytes
                    _copy_slice(t, out)
                else:
                    t = t.detach().contiguous().cpu()
                    nbytes = t.numel() * t.element_size()
                    if nbytes:
                        out.put(memoryview(t.view(-1).view(torch.uint8).numpy()))
                if on_tensor is not None:
                    on_tensor(name, nbytes)
                del t
            out.finish()
        finally:
            out.close()
            writeback.close()
        f.flush()
        os.fsync(f.fileno())
    return written, digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# The destination: what --overwrite may replace, temp folders of dead writers, SIGTERM

class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while a checkpoint was being written; the writer removed its temporary output.
    A KeyboardInterrupt, so that code which cleans up on Ctrl-C cleans up on SIGTERM too."""


@contextmanager
def _sigterm_cleans_up():
    """While writing, turn SIGTERM (``kill``, a job scheduler's stop) into `Terminated` in the main thread,
    so the writer's cleanup runs as on Ctrl-C instead of the process dying with DST.tmp-* left behind.
    Only where SIGTERM has its default action (a program's own handler, or ignoring it, stays in charge)
    and only in the main thread (Python runs handlers there); the previous handler is restored after."""
    if (not hasattr(signal, "SIGTERM") or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def on_term(signum, frame):
        raise Terminated(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _writer_file(name: str, carried: Collection[str]) -> bool:
    """Whether glm's checkpoint writer writes files called ``name`` (or it is one's temp file, NAME.tmp-*)."""
    base = name.split(".tmp-", 1)[0]
    return base in _WRITER_FILES or base in carried or _WEIGHT_FILE.fullmatch(base) is not None


def foreign_files(folder: str, carried: Collection[str] = ()) -> list[str]:
    """What in ``folder`` glm's checkpoint writer does not write (a sub-folder ends in '/'): weight
    shards, the index, config.json, the checksum record and the ``carried`` tokenizer files are glm's."""
    out = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            out.append(name + "/")
        elif not _writer_file(name, carried):
            out.append(name)
    return out


def written_by_glm(folder: str) -> bool:
    """Whether glm's writer wrote ``folder``: it holds glm's checksum record, or (glm-format folders
    written before the record existed) a config.json with ``glm_format_version``."""
    if os.path.isfile(os.path.join(folder, CHECKSUMS_NAME)):
        return True
    try:
        cfg = json.loads(read_bounded(os.path.join(folder, "config.json"), JSON_LIMIT, "config.json"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(cfg, dict) and "glm_format_version" in cfg


def check_destination(folder: str, overwrite: bool, carried: Collection[str] = ()) -> None:
    """Refuse a destination the writer may not replace, before anything is written. It may write to a
    path that does not exist or an empty folder; ``overwrite`` lets it replace a folder glm wrote that
    holds only files glm writes (a user's other model, or notes beside glm's files, are never deleted)."""
    folder = os.path.abspath(os.fspath(folder))
    if os.path.islink(folder):
        raise FileExistsError(f"{folder} is a symbolic link (to {os.path.realpath(folder)}); give the folder "
                              f"itself as the destination")
    if not os.path.lexists(folder):
        return
    if not os.path.isdir(folder):
        raise FileExistsError(f"{folder} exists and is not a folder; choose another destination")
    if not os.listdir(folder):
        return
    if not overwrite:
        raise FileExistsError(f"{folder} already exists; choose another destination or pass --overwrite "
                              f"(overwrite=True)")
    if not written_by_glm(folder):
        raise FileExistsError(f"{folder} was not written by glm (it has no {CHECKSUMS_NAME}, and no config.json "
                              f"with glm_format_version); --overwrite (overwrite=True) replaces only glm's own "
                              f"output: choose another destination, or delete the folder yourself")
    foreign = foreign_files(folder, carried)
    if foreign:
        raise FileExistsError(f"{folder} holds {len(foreign)} file(s) glm did not write: {', '.join(foreign[:10])}"
                              f"{' ...' if len(foreign) > 10 else ''}; --overwrite replaces the whole folder, so it "
                              f"refuses: move them out, or choose another destination")


_HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _temp_prefix(folder: str, kind: str) -> str:
    # The writer's pid and host in the name tell a later run whether the writer is gone.
    return f"{os.path.basename(folder)}.{kind}-{os.getpid()}-{_HOST_TAG}-"


def _writer_gone(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: alive, another user's process
        return False
    return False


def clear_stale_temps(folder: str, carried: Collection[str] = ()) -> list[str]:
    """Remove what killed writers (kill -9, power loss) left beside ``folder``: ``FOLDER.tmp-*`` and
    ``FOLDER.old-*`` folders whose writer ran on this machine and is gone, and that hold only files
    glm's writer writes. A previous version left in ``FOLDER.old-*/x`` by a kill between the two final
    renames is moved back to ``folder`` when ``folder`` is missing. Returns the paths removed."""
    folder = os.path.abspath(os.fspath(folder))
    parent, base = os.path.split(folder)
    pattern = re.compile(re.escape(base) + r"\.(tmp|old)-(\d+)-([0-9a-f]{8})-.+")
    try:
        names = sorted(os.listdir(parent), key=lambda n: ".old-" not in n)  # restore before deleting
    except OSError:
        return []
    removed = []
    for name in names:
        m = pattern.fullmatch(name)
        path = os.path.join(parent, name)
        if (m is None or m.group(3) != _HOST_TAG or not _writer_gone(int(m.group(2)))
                or os.path.islink(path) or not os.path.isdir(path)):
            continue
        try:
            if m.group(1) == "tmp":
                if foreign_files(path, carried):
                    continue
            else:
                inner = os.path.join(path, "x")
                if set(os.listdir(path)) - {"x"}:
                    continue
                if os.path.isdir(inner) and not os.path.islink(inner):
                    if foreign_files(inner, carried):
                        continue
                    if not os.path.lexists(folder):
                        os.rename(inner, folder)
            shutil.rmtree(path)
            removed.append(path)
        except OSError:
            continue  # another run got there first, or no permission: leave it
    return removed


def write_checkpoint(folder: str, entries: list[tuple[str, Tensor]],
                     tensors: "Iterator[tuple[str, Tensor | FileSlice]]", files: dict[str, bytes], *,
                     shard_size: int, overwrite: bool = False, on_tensor=None,
                     carried: Collection[str] = ()) -> list[str]:
    """Write ``tensors`` (yielded in the order of the planned ``entries``; a `FileSlice` is copied from
    its file) as safetensors shards plus the small ``files`` (config.json, ...) and the checksum record
    into ``folder``, atomically. Each shard is written and hashed on threads of their own while the
    next tensor is produced, and its pages are handed to the disk as they are written.

    Everything goes to ``folder.tmp-*`` beside it, each file fsynced, and the folder is renamed into
    place only at the end: an error, Ctrl-C or SIGTERM leaves no half-written ``folder`` and no temp
    folder; a kill -9 leaves the temp folder, which the next write to ``folder`` removes. An existing
    ``folder`` is replaced only as `check_destination` allows (``carried``: tokenizer file names that
    count as glm's). Missing parent folders are created; the result gets the umask's permissions.
    """
    import tempfile

    folder = os.path.abspath(os.fspath(folder))
    parent = os.path.dirname(folder)
    clear_stale_temps(folder, carried)
    check_destination(folder, overwrite, carried)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=_temp_prefix(folder, "tmp"), dir=parent)
    except OSError as e:
        raise write_failed(e, folder, f"check that {parent} is writable and has free space") from e
    try:
        with _sigterm_cleans_up():
            shards = plan_shards(entries, shard_size)
            names = (["model.safetensors"] if len(shards) == 1 else
                     [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
            sums = {}
            for fname, shard in zip(names, shards):
                size, digest = _write_safetensors_stream(os.path.join(tmp, fname), shard, tensors, on_tensor)
                sums[fname] = {"size": size, "sha256": digest}
            if len(shards) > 1:
                total = sum(m.numel() * m.element_size() for _, m in entries)
                index = {"metadata": {"total_size": total},
                         "weight_map": {n: f for f, shard in zip(names, shards) for n, _ in shard}}
                files = {**files, "model.safetensors.index.json": json.dumps(index, indent=2).encode()}
                data = files["model.safetensors.index.json"]
                sums["model.safetensors.index.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            record = {"glm_checksums_version": CHECKSUMS_VERSION, "files": sums}
            files = {**files, CHECKSUMS_NAME: (json.dumps(record, indent=2) + "\n").encode()}
            for fname, data in files.items():
                atomic_write(os.path.join(tmp, fname), data)
            os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp made it 0700
            check_destination(folder, overwrite, carried)  # again: the folder may have changed meanwhile
            old = None
            if os.path.lexists(folder):
                old = tempfile.mkdtemp(prefix=_temp_prefix(folder, "old"), dir=parent)
                os.rename(folder, os.path.join(old, "x"))
            try:
                os.rename(tmp, folder)
            except BaseException:
                if old is not None:  # put the previous output back where it was
                    os.rename(os.path.join(old, "x"), folder)
                    shutil.rmtree(old, ignore_errors=True)
                raise
            fsync_dir(parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            return names
    except FileExistsError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed(e, folder, f"{folder} was left as it was (no partial output); free space or "
                                      f"choose another destination, then rerun") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
