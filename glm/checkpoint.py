"""Lazy, shard-aware reading of checkpoint folders (safetensors or pytorch ``.bin``, single or sharded).

`CheckpointReader` maps tensor names to the file holding them and reads a tensor only when it is
asked for (safetensors: a positioned read of its byte range, after validating the header; ``.bin``:
``torch.load(mmap=True, weights_only=True)``), so converting or loading holds one tensor at a time.
"""
from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from typing import BinaryIO, Callable, Iterator, Optional

import torch
from torch import Tensor

from .config import ConfigError


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be read as it is; the message names the file and the fix."""


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}

INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")


_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "U64": 8, "U32": 4, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _read_safetensors_header(path: str) -> dict:
    """Parse and check the header ourselves first, so that a truncated or corrupt file gets a clear
    error naming it (not a Rust panic, a KeyError, or a huge allocation for a made-up shape).

    Every entry must have a string dtype, a shape of non-negative ints and ``data_offsets``
    ``[begin, end]`` inside the file whose length matches shape x dtype size; after this, reading a
    tensor cannot allocate more than the file holds."""
    size = os.path.getsize(path)
    fix = "re-download or re-convert it"
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes); {fix}")
        n = int.from_bytes(raw, "little")
        if n <= 0 or 8 + n > size:
            raise CheckpointError(f"{path}: corrupt safetensors header (declares {n} header bytes in a "
                                  f"{size}-byte file); {fix}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise CheckpointError(f"{path}: corrupt safetensors header (not JSON); {fix}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object); {fix}")
    data_size = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        bad = None
        if not isinstance(info, dict):
            bad = "is not an object"
        elif not isinstance(info.get("dtype"), str):
            bad = f"has no string 'dtype' (got {info.get('dtype')!r})"
        elif not isinstance(info.get("shape"), list) or not all(_is_int(d) and d >= 0 for d in info["shape"]):
            bad = f"has a 'shape' that is not a list of non-negative integers (got {info.get('shape')!r})"
        elif (not isinstance(info.get("data_offsets"), list) or len(info["data_offsets"]) != 2
              or not all(_is_int(o) for o in info["data_offsets"])
              or not 0 <= info["data_offsets"][0] <= info["data_offsets"][1]):
            bad = (f"has 'data_offsets' that are not [begin, end] with 0 <= begin <= end "
                   f"(got {info.get('data_offsets')!r})")
        elif info["dtype"] in _ST_SIZES:
            begin, end = info["data_offsets"]
            nbytes = math.prod(info["shape"]) * _ST_SIZES[info["dtype"]]
            if end - begin != nbytes:
                bad = (f"declares {end - begin} bytes for shape {info['shape']} {info['dtype']} "
                       f"({nbytes} bytes)")
        if bad is not None:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} {bad}; {fix}")
        end = info["data_offsets"][1]
        if end > data_size:
            raise CheckpointError(f"{path}: truncated safetensors file: tensor {name!r} needs {8 + n + end} bytes, "
                                  f"the file has {size}; {fix}")
    return header


class CheckpointReader:
    """Tensor names -> lazily loaded tensors, over the weight files of one checkpoint folder."""

    def __init__(self, folder: str):
        self.folder = folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise CheckpointError(f"{folder}: not a checkpoint folder (no such directory)")
        self.weight_map: dict[str, str] = {}  # tensor name -> file name inside folder
        index = next((n for n in INDEX_NAMES if os.path.exists(os.path.join(folder, n))), None)
        if index is not None:
            self._read_index(os.path.join(folder, index))
        else:
            single = next((n for n in SINGLE_NAMES if os.path.exists(os.path.join(folder, n))), None)
            if single is None:
                raise CheckpointError(
                    f"{folder}: no weights found; expected one of {', '.join(INDEX_NAMES + SINGLE_NAMES)}")
            for name in self._file_keys(single):
                self.weight_map[name] = single
        # A few recently used files stay open: a conversion rule may read tensors from two shards.
        self._open_files: "OrderedDict[str, object]" = OrderedDict()
        self._headers: dict[str, dict] = {}
        self._data_start: dict[str, int] = {}  # header length per safetensors file

    def _read_index(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8") as f:
                wm = json.load(f)["weight_map"]
            if not isinstance(wm, dict) or not all(isinstance(v, str) and v for v in wm.values()):
                raise TypeError
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
            return [k for k in _read_safetensors_header(path) if k != "__metadata__"]
        return list(self._load_bin(path).keys())

    @staticmethod
    def _load_bin(path: str) -> dict[str, Tensor]:
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
            with open(path, "rb") as f:
                f.seek(8 + self._data_start[file] + begin)
                got = f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy()))
            if got != nbytes:
                raise CheckpointError(f"{path}: truncated while reading {name!r}; re-download or re-convert it")
        return t

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
            path = os.path.join(self.folder, file)
            self._headers[file] = _read_safetensors_header(path)
            with open(path, "rb") as f:
                self._data_start[file] = int.from_bytes(f.read(8), "little")
        return self._headers[file]

    def file_of(self, name: str) -> str:
        return self.weight_map[name]

    def close(self) -> None:
        self._open_files.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["CheckpointReader", "CheckpointError", "ConfigError"]


# ---------------------------------------------------------------------------------------------
# Loading a model

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _as_dtype(dtype: "torch.dtype | str | None") -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if not isinstance(dtype, str) or dtype not in names:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(names)}")
    return names[dtype]


def check_device(device: "torch.device | str") -> torch.device:
    """``device`` as a torch.device that exists on this machine, or a ValueError saying what to pass."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cpu" or dev.type == "meta":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was requested but CUDA is not available on this machine "
                             f"(torch {torch.__version__}); use device='cpu' (--device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} was requested but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s); use cuda:0 .. "
                             f"cuda:{torch.cuda.device_count() - 1}")
        return dev
    # mps, xpu, ...: checked where torch has an is_available for it; plugin devices pass through.
    is_available = getattr(getattr(torch, dev.type, None), "is_available", None)
    if is_available is not None and not is_available():
        raise ValueError(f"device {str(device)!r} was requested but {dev.type} is not available on this machine; "
                         f"use device='cpu'")
    return dev


def from_pretrained(folder: "str | os.PathLike[str]", dtype: "torch.dtype | str | None" = torch.float32,
                    device: "torch.device | str" = "cpu", backend: str = "auto", **config_overrides):
    """Load a checkpoint folder — a release's Hugging Face format or glm's own — as a `glm.GLM`.

    The family is recognised from config.json; foreign layouts (per-head or separate QKV,
    interleaved RoPE) are converted to glm's one layout as the tensors stream in, one shard at a
    time. ``dtype=None`` (or ``"auto"``) keeps each tensor's stored dtype; the default upcasts to
    float32, the precision the parity fixtures were made in. ``config_overrides`` replace `GLMConfig`
    fields that do not change shapes, e.g. ``rope_inv_freq_dtype=None`` to keep RoPE frequencies exact.
    """
    import dataclasses

    from .config import GLMConfig
    from .convert import _meta_shapes, open_source
    from .model import GLM

    folder = os.fspath(folder)
    if "torch_dtype" in config_overrides:
        raise ValueError("from_pretrained takes dtype=, not transformers' torch_dtype=")
    unknown = sorted(set(config_overrides) - {f.name for f in dataclasses.fields(GLMConfig)})
    if unknown:
        raise ValueError(f"from_pretrained: {unknown} are not GLMConfig fields; keyword arguments besides dtype, "
                         f"device and backend override config fields (e.g. rope_inv_freq_dtype=None)")
    dtype = None if dtype == "auto" else _as_dtype(dtype)
    if dtype is not None and dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16")
    device = check_device(device)
    source, reader = open_source(folder)
    if config_overrides:
        new = source.cfg.replace(**config_overrides)
        changed = [k for k in config_overrides if getattr(new, k) != getattr(source.cfg, k)]
        if _meta_shapes(new, folder) != _meta_shapes(source.cfg, folder):
            raise ValueError(f"{folder}: overriding {changed} changes the model's tensor shapes, so the stored "
                             f"weights no longer fit; only overrides that keep shapes are allowed (change "
                             f"config.json, or build glm.GLM(config) and train it)")
        source.cfg = new
    with reader:
        with torch.device("meta"):
            model = GLM(source.cfg)
        state: dict[str, Tensor] = {}  # shapes were checked against the config by open_source
        for mp in sorted(source.mappings, key=source.first_file):
            for name, t in zip(mp.glm, mp.to_glm(*[reader.get(n) for n in mp.hf])):
                if t.dtype not in _FLOAT_DTYPES:
                    raise CheckpointError(f"{folder}: tensor {', '.join(mp.hf)} has dtype {t.dtype}; only float32/"
                                          f"float16/bfloat16 weights load (quantised checkpoints are not supported)")
                state[name] = t.to(device=device, dtype=dtype or t.dtype)
    model.load_state_dict(state, assign=True, strict=True)
    model.reset_buffers(device)
    model.backend = backend
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Writing checkpoints: streamed safetensors shards, committed atomically

GLM_FORMAT_VERSION = 1


def is_glm_format(folder: str) -> bool:
    from .config import read_json

    path = os.path.join(folder, "config.json")
    return os.path.exists(path) and isinstance(cfg := read_json(path), dict) and "glm_format_version" in cfg


def parse_size(text: "str | int") -> int:
    """'2GB', '500MB', '1.5GiB', or a byte count."""
    if isinstance(text, int):
        return text
    t = text.strip().upper().replace("IB", "B")
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40, "B": 1}
    for u, mult in units.items():
        if t.endswith(u):
            try:
                return int(float(t[: -len(u)]) * mult)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise ValueError(f"shard size {text!r} is not a size; write e.g. 2GB, 500MB or a byte count") from None


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


def write_failed(e: OSError, dest: str, what_now: str) -> OSError:
    """``e`` (disk full, I/O error, ...) as one OSError of the same kind whose message names ``dest``
    and what to do; ``str()`` keeps the system's reason ("No space left on device") first."""
    reason = e.strerror or str(e) or type(e).__name__
    msg = f"{reason}: writing {dest} failed; {what_now}"
    return OSError(e.errno, msg) if e.errno is not None else OSError(msg)


def fsync_dir(folder: str) -> None:
    """Make a rename or new file in ``folder`` durable (POSIX only; Windows cannot open folders)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: "bytes | Callable[[BinaryIO], None]") -> None:
    """Write ``data`` (bytes, or a function that writes to the open file) to a temp file beside
    ``path``, fsync it and rename it over ``path``: readers see the old file or the new one, never half."""
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            data(f) if callable(data) else f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_safetensors_stream(path: str, entries: list[tuple[str, Tensor]], tensors: Iterator[tuple[str, Tensor]],
                              on_tensor=None) -> None:
    """Write a safetensors file whose header is known up front (from meta tensors), then stream the
    data one tensor at a time, so at most one tensor is held in memory."""
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
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for name, m in entries:
            got_name, t = next(tensors)
            if got_name != name or t.shape != m.shape or t.dtype != m.dtype:
                raise RuntimeError(f"internal: planned {name} {tuple(m.shape)} {m.dtype}, got {got_name} "
                                   f"{tuple(t.shape)} {t.dtype}")
            t = t.detach().contiguous().cpu()
            if t.numel():
                f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
            if on_tensor is not None:
                on_tensor(name, t.numel() * t.element_size())
            del t
        f.flush()
        os.fsync(f.fileno())


def write_checkpoint(folder: str, entries: list[tuple[str, Tensor]], tensors: Iterator[tuple[str, Tensor]],
                     files: dict[str, bytes], *, shard_size: int, overwrite: bool = False, on_tensor=None) -> list[str]:
    """Write ``tensors`` (yielded in the order of the planned ``entries``) as safetensors shards plus
    the small ``files`` (config.json, ...) into ``folder``, atomically.

    Everything goes to ``folder.tmp-*`` beside it, each file fsynced, and the folder is renamed into
    place only at the end: an error or a kill leaves no half-written ``folder``.
    """
    import shutil
    import tempfile

    folder = os.path.abspath(os.fspath(folder))
    if os.path.exists(folder) and not overwrite:
        raise FileExistsError(f"{folder} already exists; choose another destination or pass --overwrite (overwrite=True)")
    parent = os.path.dirname(folder)
    if not os.path.isdir(parent):
        raise CheckpointError(f"{parent}: destination's parent folder does not exist; create it first")
    try:
        tmp = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".tmp-", dir=parent)
    except OSError as e:
        raise write_failed(e, folder, f"check that {parent} is writable and has free space") from e
    try:
        shards = plan_shards(entries, shard_size)
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        for fname, shard in zip(names, shards):
            _write_safetensors_stream(os.path.join(tmp, fname), shard, tensors, on_tensor)
        if len(shards) > 1:
            total = sum(m.numel() * m.element_size() for _, m in entries)
            index = {"metadata": {"total_size": total},
                     "weight_map": {n: f for f, shard in zip(names, shards) for n, _ in shard}}
            files = {**files, "model.safetensors.index.json": json.dumps(index, indent=2).encode()}
        for fname, data in files.items():
            atomic_write(os.path.join(tmp, fname), data)
        old = None
        if os.path.exists(folder):
            old = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".old-", dir=parent)
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
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed(e, folder, f"{folder} was left as it was (no partial output); free space or "
                                      f"choose another destination, then rerun") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
