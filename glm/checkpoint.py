"""Lazy, shard-aware reading of checkpoint folders (safetensors or pytorch ``.bin``, single or sharded).

`CheckpointReader` maps tensor names to the file holding them and opens a file only when one of its
tensors is asked for (safetensors through ``safe_open``; ``.bin`` through
``torch.load(mmap=True, weights_only=True)``), so converting or loading touches one shard at a time.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Iterator, Optional

import torch
from torch import Tensor

from .config import ConfigError


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be read as it is; the message names the file and the fix."""


INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")


def _read_safetensors_header(path: str) -> dict:
    """Parse the header ourselves first so a truncated file gets a clear error, not a Rust panic."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes); re-download or re-convert it")
        n = int.from_bytes(raw, "little")
        if n <= 0 or 8 + n > size:
            raise CheckpointError(f"{path}: corrupt safetensors header (declares {n} header bytes in a "
                                  f"{size}-byte file); re-download or re-convert it")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header (not JSON); re-download it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object); re-download it")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry {name!r}; re-download it") from None
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file: tensors need {8 + n + end} bytes, the "
                              f"file has {size}; re-download or re-convert it")
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

    def _read_index(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8") as f:
                wm = json.load(f)["weight_map"]
            if not isinstance(wm, dict):
                raise TypeError
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{path}: not a valid index (needs a JSON object with a 'weight_map' "
                                  f"of tensor name -> shard file); restore it from the release") from None
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
        if file in self._open_files:
            self._open_files.move_to_end(file)
            return self._open_files[file]
        path = os.path.join(self.folder, file)
        if file.endswith(".safetensors"):
            from safetensors import safe_open
            _read_safetensors_header(path)
            handle = safe_open(path, framework="pt", device="cpu")
        else:
            handle = self._load_bin(path)
        self._open_files[file] = handle
        while len(self._open_files) > keep:
            self._open_files.popitem(last=False)
        return handle

    def get(self, name: str) -> Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.folder}: tensor {name!r} is not in the checkpoint")
        file = self.weight_map[name]
        f = self._open(file)
        try:
            return f.get_tensor(name) if file.endswith(".safetensors") else f[name]
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
    if dtype not in names:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(names)}")
    return names[dtype]


def from_pretrained(folder: "str | os.PathLike[str]", dtype: "torch.dtype | str | None" = torch.float32,
                    device: "torch.device | str" = "cpu", backend: str = "auto"):
    """Load a checkpoint folder in a release's Hugging Face format as a `glm.GLM`.

    The family is recognised from config.json; foreign layouts (per-head or separate QKV,
    interleaved RoPE) are converted to glm's one layout as the tensors stream in, one shard at a
    time. ``dtype=None`` keeps each tensor's stored dtype; the default upcasts to float32, the
    precision the parity fixtures were made in.
    """
    from .config import GLMConfig
    from .convert import check_keys, convert, hf_format
    from .model import GLM

    folder = os.fspath(folder)
    dtype = _as_dtype(dtype)
    if dtype is not None and dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16")
    cfg = GLMConfig.from_hf(folder)
    with CheckpointReader(folder) as reader:
        keys = reader.keys()
        mappings = hf_format(cfg, keys=keys)
        check_keys(mappings, keys, "hf", folder)
        with torch.device("meta"):
            model = GLM(cfg)
        expected = {n: p for n, p in model.state_dict().items()}
        state: dict[str, Tensor] = {}
        # Read in shard order so every shard is opened once.
        order = lambda mp: min((reader.file_of(n) for n in mp.hf), default="")  # noqa: E731
        for name, t in convert(mappings, reader.get, "to_glm", order=order):
            if t.dtype not in _FLOAT_DTYPES:
                raise CheckpointError(f"{folder}: tensor for {name!r} has dtype {t.dtype}; only float32/"
                                      f"float16/bfloat16 weights load (quantised checkpoints are not supported)")
            want = expected[name].shape
            if t.shape != want:
                src = next(mp.hf for mp in mappings if name in mp.glm)
                raise CheckpointError(f"{folder}: tensor {', '.join(src)} has shape {tuple(t.shape)}, but "
                                      f"config.json implies {tuple(want)} (glm name {name!r}); the config "
                                      f"and weights do not belong together")
            state[name] = t.to(device=device, dtype=dtype or t.dtype)
    model.load_state_dict(state, assign=True, strict=True)
    model.reset_buffers(device)
    model.backend = backend
    return model.eval()
