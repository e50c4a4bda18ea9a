"""Loading, saving and converting checkpoint folders: the weights file layer (glm.checkpoint) driven by the
release formats' weight tables (glm.formats).

    model = glm.from_pretrained(folder)                       # any release format, or glm's own
    model.save_pretrained(dst, format="hf")                   # a folder the reference code loads
    convert_checkpoint(src, dst, to="glm")                    # folder -> folder, one tensor at a time
    glm.from_pretrained(folder, quantize="int4", group_size=32)   # quantized as the weights stream in
    quantize_checkpoint(src, dst, bits=4)                       # folder -> quantized folder

Everything streams: a `Source` yields glm-layout tensors one mapping at a time (from a folder or a model in
memory) and `write_from` writes them as they come, so converting holds about one tensor in memory.

Quantized models (glm.quant) load and save through the same path: glm's format keeps the quantized state dict
as it is (``qweight`` int8, ``scales`` in their own dtype) with the scheme in config.json, and a release whose
format has THUDM's quantized layout (``quantization_bit``) reads and writes it through `glm.formats.quantized`.
Integers and scales are never cast: ``dtype`` applies to the float tensors only.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from . import formats, lora, quant
from .checkpoint import (
    CheckpointReader,
    FileSlice,
    check_destination,
    clear_stale_temps,
    verify_checksums,
    write_checkpoint,
)
from .config import GLMConfig
from .devices import FLOAT_DTYPES, as_dtype, check_device
from .errors import (
    ArgumentError,
    CheckpointError,
    ConfigError,
    FileKindError,
    FormatError,
    InputError,
    KeyMismatchError,
)
from .files import parse_size, read_bounded, read_json
from .formats import native, peft, ptuning_checkpoint, quantized
from .formats.layout import DTYPE_NAMES, Mapping, rename
from .model import GLM
from .tokenizer.load import MODEL_FILES

# ---------------------------------------------------------------------------------------------
# Applying a format

def check_keys(mappings: Sequence[Mapping], available: Iterable[str], side: str, source: str) -> None:
    """Raise one error listing every missing and unexpected tensor name on ``side`` ('hf' or 'glm')."""
    want = [n for mp in mappings for n in getattr(mp, side)]
    have = set(available)
    missing = [n for n in want if n not in have]
    unexpected = sorted(have - set(want))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:12])}"
                         + (" ..." if len(missing) > 12 else ""))
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:12])}"
                         + (" ..." if len(unexpected) > 12 else ""))
        raise KeyMismatchError(f"{source}: the tensors do not match the expected layout ({'; '.join(parts)}). "
                               f"Check that config.json belongs to these weights")


def _lossy(src: torch.dtype, dst: torch.dtype) -> bool:
    return src != dst and not (dst == torch.float32 and src in (torch.float16, torch.bfloat16))


@dataclass
class Source:
    """Where glm-layout tensors come from: a release folder, a glm folder, or a model in memory."""
    cfg: GLMConfig
    hf_config: Optional[dict]  # the release config.json this model came from, carried along
    mappings: list[Mapping]  # source names (mp.hf) -> glm names (mp.glm)
    get: Callable[[str], Tensor]
    meta: Callable[[str], Tensor]
    file_of: Callable[[str], str] = lambda name: ""
    names: list[str] = field(default_factory=list)
    # Where a source tensor's bytes lie in its file, for copying them unread (None: read it with `get`).
    slice: Callable[[str], Optional[FileSlice]] = lambda name: None
    # The quantization scheme of the glm tensors it yields (glm.quant.scheme), None for a float model.
    quantization: Optional[dict] = None

    def first_file(self, mp: Mapping) -> str:
        """The shard a mapping's first source tensor lives in: sorting by it reads each shard once."""
        return min((self.file_of(n) for n in mp.hf), default="")

    def float_dtype(self) -> torch.dtype:
        """The stored dtype of the model's float tensors: its embedding's, or its final norm's where the
        embedding is quantized (the dtype a release's config.json names)."""
        producer = {g: mp for mp in self.mappings for g in mp.glm}
        anchor = "embed.weight" if "embed.weight" in producer else "final_norm.weight"
        return self.meta(producer[anchor].hf[0]).dtype


def meta_state(cfg: GLMConfig, where: str, quantization: Optional[dict] = None) -> dict[str, Tensor]:
    """glm tensor name -> meta tensor (shape and dtype, no memory) of a model of ``cfg``, quantized with
    ``quantization`` (a scheme read from ``where``'s config.json) if given. Sizes no tensor can have (a corrupt
    config.json: 2**31 x 2**31 embeddings, 2**70 features) are a CheckpointError, a recorded scheme the model
    cannot take (a group size that does not divide) a ConfigError."""
    try:
        with torch.device("meta"):
            model = GLM(cfg)
    except (RuntimeError, TypeError, ValueError, OverflowError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{where}: config.json implies tensors no checkpoint can hold ({reason}); "
                              f"the config does not belong to these weights, restore it from the release") from None
    if quantization is not None:
        try:
            quant.quantize_as(model, quantization)
        except InputError as e:
            raise ConfigError(f"{where}: the quantization config.json records ({quant.describe(quantization)}) "
                              f"does not fit the model: {e}") from None
    return model.state_dict()


def meta_shapes(cfg: GLMConfig, where: str, quantization: Optional[dict] = None) -> dict[str, torch.Size]:
    """glm tensor name -> shape for ``cfg`` (see `meta_state`)."""
    return {n: t.shape for n, t in meta_state(cfg, where, quantization).items()}


def check_shapes(source: Source, where: str) -> None:
    """Run the source's mappings on meta tensors and compare with the shapes ``source.cfg`` (and its
    quantization) implies, so a config that does not belong to its weights fails before anything is read or
    written. Quantized tensors are checked for their dtype too: integers int8, scales float."""
    expected = meta_state(source.cfg, where, source.quantization)
    scales = {n for n in quant.quantized_tensor_names(source.cfg, source.quantization) if n.endswith(".scales")}
    for mp in source.mappings:
        metas = [source.meta(n) for n in mp.hf]
        try:
            outs = mp.to_glm(*metas)
        except RuntimeError:  # a reshape that the stored shape cannot satisfy
            outs = [None] * len(mp.glm)
        stored = ", ".join(f"{n} {tuple(m.shape)} {m.dtype}" for n, m in zip(mp.hf, metas))
        for name, t in zip(mp.glm, outs):
            if t is None or t.shape != expected[name].shape:
                raise CheckpointError(f"{where}: tensor {stored} does not fit the shape config.json implies, "
                                      f"{tuple(expected[name].shape)} (glm name {name!r}); the config and weights "
                                      f"do not belong together")
            if expected[name].dtype == torch.int8 and t.dtype != torch.int8:
                raise CheckpointError(f"{where}: tensor {stored} holds quantized integers (glm name {name!r}), which "
                                      f"are int8; the weights are not quantized as config.json says")
            if name in scales and t.dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{where}: tensor {stored} holds quantization scales (glm name {name!r}), "
                                      f"which are float32, float16 or bfloat16; re-download or re-convert it")


def open_source(src: str, verify: bool = True) -> tuple[Source, CheckpointReader]:
    """A `Source` over a checkpoint folder in a release format or in glm's format. ``verify``: check the
    weight files against the checksum record of a folder glm wrote (after the cheap checks of config,
    names and shapes, before any tensor is read)."""
    config_path = os.path.join(src, "config.json")
    raw = read_json(config_path)
    reader = CheckpointReader(src)
    glm_format = native.is_native(raw)
    if glm_format:
        cfg, hf_cfg = native.read_config(raw, config_path)
        quantization = native.read_quantization(raw, cfg, config_path)
    else:
        cfg = GLMConfig.from_hf(raw if isinstance(raw, dict) else config_path, source=config_path)
        hf_cfg = raw
        quantization = formats.get(cfg.family).quantization_from_hf(hf_cfg, cfg, config_path)
    # Every layer has tensors of its own: a layer count beyond the number of stored tensors cannot
    # be these weights' (and would otherwise spend minutes building a layout for it).
    if cfg.num_layers > len(reader.keys()):
        raise CheckpointError(f"{src}: config.json says {cfg.num_layers} layers but the checkpoint holds only "
                              f"{len(reader.keys())} tensors; the config and weights do not belong together")
    if glm_format:
        mappings = [rename(n, n) for n in meta_shapes(cfg, src, quantization)]
    else:
        fmt = formats.get(cfg.family)
        note = fmt.load_warning(hf_cfg, config_path)
        if note:
            warnings.warn(note, stacklevel=2)
        mappings = fmt.mappings(cfg, keys=reader.keys(), hf_config=hf_cfg)
        if quantization is not None:
            mappings = fmt.quantized_layout.table(mappings, cfg, quantization)
        # Buffers glm regenerates (RoPE inv_freq) are optional: the references never read them.
        have = set(reader.keys())
        mappings = [mp for mp in mappings if mp.glm or all(n in have for n in mp.hf)]
    check_keys(mappings, reader.keys(), "hf", src)
    source = Source(cfg, hf_cfg, mappings, reader.get, reader.meta, reader.file_of, reader.keys(), reader.slice,
                    quantization)
    check_shapes(source, src)
    if verify:
        verify_checksums(src, reader.files() + ([reader.index] if reader.index else []))
    return source, reader


def model_source(model: GLM) -> Source:
    sd = model.state_dict()
    q = getattr(model, "quantization", None)
    return Source(model.config, None, native.mappings(model.config, q), sd.__getitem__,
                  lambda n: sd[n].to("meta"), names=list(sd), quantization=q)


# ---------------------------------------------------------------------------------------------
# Loading a model

def resolve_model_folder(path: "str | os.PathLike[str]") -> str:
    """The folder to load for ``path``: ``path`` itself when it holds a model (a config.json, or a LoRA
    adapter), else its ``model/`` subfolder when that exists: where `glm train` and `glm finetune` put
    their result, so a run folder loads as its model."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "config.json")) or peft.is_adapter_folder(path):
        return path
    inner = os.path.join(path, "model")
    return inner if os.path.isdir(inner) else path


def adapter_base(folder: str, named: object, field_name: str) -> str:
    """The base model folder an adapter or prefix folder names (peft's ``base_model_name_or_path``,
    THUDM's ``_name_or_path``): absolute, or relative to ``folder``; an ArgumentError when it is not a
    folder here (a hub id, or moved), saying how to load the two parts by hand."""
    if isinstance(named, str) and named:
        path = named if os.path.isabs(named) else os.path.join(folder, named)
        if os.path.isdir(path):
            return path
    raise ArgumentError(f"{folder}: its {field_name} is {named!r}, which is not a model folder on this machine; "
                        f"load the base yourself and add this folder to it: model = glm.from_pretrained(BASE), "
                        f"then glm.formats.peft.load_adapter(model, {folder!r}) (LoRA) or "
                        f"glm.formats.ptuning_checkpoint.load_prefix(model, {folder!r}) (P-tuning)")


def tokenizer_folder(path: "str | os.PathLike[str]") -> str:
    """Where the tokenizer of the model at ``path`` is: the model folder (`resolve_model_folder`) when it
    holds tokenizer files, else, for an adapter or prefix folder saved without them, its base's."""
    folder = resolve_model_folder(path)
    if os.path.isfile(os.path.join(folder, "tokenizer_config.json")) or any(
            os.path.isfile(os.path.join(folder, name)) for name in MODEL_FILES):
        return folder
    if peft.is_adapter_folder(folder):
        cfg = read_json(os.path.join(folder, peft.CONFIG_NAME))
        return adapter_base(folder, cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None,
                            "adapter_config.json base_model_name_or_path")
    if ptuning_checkpoint.is_prefix_folder(folder):
        base = ptuning_checkpoint.base_of(folder)
        return adapter_base(folder, base, "config.json base_model_name_or_path")
    return folder


def _with_adapter(folder: str, **load_args) -> Optional[GLM]:
    """A LoRA adapter folder (peft's layout) or a P-tuning folder (THUDM's) loaded onto the base model it
    names; None when ``folder`` is neither."""
    if peft.is_adapter_folder(folder):
        cfg = read_json(os.path.join(folder, peft.CONFIG_NAME))
        base = adapter_base(folder, cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None,
                            "adapter_config.json base_model_name_or_path")
        model = from_pretrained(base, **load_args)
        peft.load_adapter(model, folder)
        return model.eval()
    if ptuning_checkpoint.is_prefix_folder(folder):
        # glm records the base as base_model_name_or_path; THUDM's trainer leaves it in _name_or_path.
        cfg = read_json(os.path.join(folder, "config.json"))
        named = ptuning_checkpoint.base_of(folder) or (cfg.get("_name_or_path") if isinstance(cfg, dict) else None)
        base = adapter_base(folder, named, "config.json base_model_name_or_path (or _name_or_path)")
        model = from_pretrained(base, **load_args)
        ptuning_checkpoint.load_prefix(model, folder)
        return model.eval()
    return None


def _scale_dtype(scale_dtype: "torch.dtype | str | None", optional: bool) -> Optional[torch.dtype]:
    """A scale_dtype argument as a torch dtype, refused unless float32, float16 or bfloat16 (or None where
    ``optional``: the format's own)."""
    scale_dtype = as_dtype(scale_dtype)
    if not (optional and scale_dtype is None) and scale_dtype not in FLOAT_DTYPES:
        raise ArgumentError(f"scale_dtype {scale_dtype} is not supported; use float32, float16 or bfloat16")
    return scale_dtype


def _already_quantized(source: Source, folder: str, instead: str) -> InputError:
    """The error for quantizing the quantized checkpoint ``source`` again; ``instead`` opens the advice."""
    return InputError(f"{folder} is a quantized checkpoint already ({quant.describe(source.quantization)}); "
                      f"{instead}quantize its full-precision original")


def _quantize_request(quantize: Optional[str], group_size: Optional[int], quantize_embeddings: bool,
                      quantize_lm_head: bool, scale_dtype: "torch.dtype | str") -> tuple[Optional[int], torch.dtype]:
    """(bits or None, scale dtype) of from_pretrained's quantize arguments, each checked before anything is read."""
    scale_dtype = _scale_dtype(scale_dtype, optional=False)
    if quantize is None:
        given = [name for name, v in (("group_size", group_size), ("quantize_embeddings", quantize_embeddings),
                                      ("quantize_lm_head", quantize_lm_head)) if v not in (None, False)]
        if given:
            raise ArgumentError(f"from_pretrained: {', '.join(given)} apply only with quantize='int8' or 'int4'")
        return None, scale_dtype
    if not isinstance(quantize, str) or quantize not in quant.SCHEME_BITS:
        raise ArgumentError(f"quantize= must be one of {', '.join(map(repr, quant.SCHEME_BITS))} or None, "
                            f"got {quantize!r}")
    bits = quant.SCHEME_BITS[quantize]
    quant.check_scheme(bits, group_size)
    return bits, scale_dtype


def from_pretrained(folder: "str | os.PathLike[str]", dtype: "torch.dtype | str | None" = torch.float32,
                    device: "torch.device | str" = "cpu", backend: str = "auto", verify: bool = True, *,
                    quantize: Optional[str] = None, group_size: Optional[int] = None,
                    quantize_embeddings: bool = False, quantize_lm_head: bool = False,
                    scale_dtype: "torch.dtype | str" = torch.float32, **config_overrides) -> GLM:
    """Load a checkpoint folder — a release's Hugging Face format or glm's own — as a `glm.GLM`.

    The family is recognised from config.json; foreign layouts (per-head or separate QKV,
    interleaved RoPE) are converted to glm's one layout as the tensors stream in, one shard at a
    time. ``dtype=None`` (or ``"auto"``) keeps each tensor's stored dtype; the default upcasts to
    float32, the precision the parity fixtures were made in. ``config_overrides`` replace `GLMConfig`
    fields that do not change shapes, e.g. ``rope_inv_freq_dtype=None`` to keep RoPE frequencies exact.
    A folder glm wrote has its weight files checked against the sha256 record written with them
    (``glm_checksums.json``); ``verify=False`` skips that pass over the bytes.

    A quantized checkpoint (glm's format with a ``quantization`` record, or THUDM's ``quantization_bit``
    releases) loads as a quantized model: integers and scales exactly as stored, ``dtype`` applying to the
    float tensors (biases, norms, unquantized embeddings) and the compute dtype only.

    ``quantize="int8"`` or ``"int4"`` quantizes a float checkpoint as it loads, each weight as its shard
    streams in (peak memory about the quantized model plus one float tensor and the quantizer's working
    memory, not the float model), bit for bit what
    ``glm.quantize(glm.from_pretrained(folder, dtype, device), bits, group_size, embeddings=quantize_embeddings,
    lm_head=quantize_lm_head, scale_dtype=scale_dtype)`` gives. ``group_size``: None for one scale per output row,
    or a divisor of every quantized layer's input width; ``quantize_embeddings`` quantizes the token embedding
    row-wise, ``quantize_lm_head`` an untied output head; ``scale_dtype`` is the scales' dtype.

    A LoRA adapter folder (peft's files) or a P-tuning folder (THUDM's) loads as the base model it names
    with the adapter or prefix applied; a run folder of `glm train` / `glm finetune` loads as its
    ``model/`` (`resolve_model_folder`).
    """
    folder = resolve_model_folder(folder)
    adapted = _with_adapter(folder, dtype=dtype, device=device, backend=backend, verify=verify, quantize=quantize,
                            group_size=group_size, quantize_embeddings=quantize_embeddings,
                            quantize_lm_head=quantize_lm_head, scale_dtype=scale_dtype, **config_overrides)
    if adapted is not None:
        return adapted
    if "torch_dtype" in config_overrides:
        raise ArgumentError("from_pretrained takes dtype=, not transformers' torch_dtype=")
    unknown = sorted(set(config_overrides) - {f.name for f in dataclasses.fields(GLMConfig)})
    if unknown:
        raise ArgumentError(f"from_pretrained: {unknown} are not GLMConfig fields; keyword arguments besides dtype, "
                            f"device, backend, verify and the quantize ones override config fields (e.g. "
                            f"rope_inv_freq_dtype=None)")
    dtype = None if dtype == "auto" else as_dtype(dtype)
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ArgumentError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16")
    device = check_device(device)
    bits, scale_dtype = _quantize_request(quantize, group_size, quantize_embeddings, quantize_lm_head, scale_dtype)
    source, reader = open_source(folder, verify=verify)
    if bits is not None and source.quantization is not None:
        reader.close()
        raise _already_quantized(source, folder, "load it without quantize=, or ")
    if config_overrides:
        new = source.cfg.replace(**config_overrides)
        changed = [k for k in config_overrides if getattr(new, k) != getattr(source.cfg, k)]
        if meta_shapes(new, folder, source.quantization) != meta_shapes(source.cfg, folder, source.quantization):
            raise ConfigError(f"{folder}: overriding {changed} changes the model's tensor shapes, so the stored "
                              f"weights no longer fit; only overrides that keep shapes are allowed (change "
                              f"config.json, or build glm.GLM(config) and train it)")
        source.cfg = new
    with reader:
        with torch.device("meta"):
            model = GLM(source.cfg)
        mappings = source.mappings
        weight_dtypes: dict[str, torch.dtype] = {}  # quantized module -> dtype of the float weight it replaced
        if source.quantization is not None:
            quant.quantize_as(model, source.quantization)
        elif bits is not None:
            # On the meta model first: a group size that does not divide a layer fails before anything is read.
            quant.quantize(model, bits, group_size, embeddings=quantize_embeddings, lm_head=quantize_lm_head,
                           scale_dtype=scale_dtype)
            mappings = quantized.quantizing_table(mappings, source.cfg, model.quantization, scale_dtype,
                                                  lambda t: t.to(device=device, dtype=dtype or t.dtype),
                                                  weight_dtypes)
        scheme = getattr(model, "quantization", None)
        kept = quant.quantized_tensor_names(source.cfg, scheme)
        state: dict[str, Tensor] = {}  # shapes were checked against the config by open_source
        for mp in sorted(mappings, key=source.first_file):
            for name, t in zip(mp.glm, mp.to_glm(*[reader.get(n) for n in mp.hf])):
                if name in kept:  # integers and scales keep their dtype
                    state[name] = t.to(device)
                    continue
                if t.dtype not in FLOAT_DTYPES:
                    raise CheckpointError(f"{folder}: tensor {', '.join(mp.hf)} has dtype {t.dtype}; only float32/"
                                          f"float16/bfloat16 weights load, and integer weights only in a quantized "
                                          f"checkpoint whose config.json says so (THUDM's quantization_bit, or glm's "
                                          f"quantization record)")
                state[name] = t.to(device=device, dtype=dtype or t.dtype)
    if scheme is not None:
        quant.load_quantized_state_dict(model, state)
        quant.set_compute_dtypes(model, device, weight_dtypes, state["final_norm.weight"].dtype)
    else:
        model.load_state_dict(state, assign=True, strict=True)
    model.reset_buffers(device)
    model.backend = backend
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Streaming conversion between folders (and saving a model)

@dataclass
class ConvertSummary:
    dst: str
    format: str
    family: str
    tensors: int
    bytes: int
    seconds: float
    peak_rss_bytes: int
    files: list[str]

    def line(self) -> str:
        return (f"wrote {self.dst} ({self.format}, {self.family}): {self.tensors} tensors, "
                f"{self.bytes / 1e9:.3f} GB in {len(self.files)} shard(s), {self.seconds:.1f} s "
                f"({self.bytes / 1e9 / max(self.seconds, 1e-9):.2f} GB/s), peak RSS {self.peak_rss_bytes / 1e9:.2f} GB")


def peak_rss() -> int:
    """High-water resident memory of this process (Linux VmHWM; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # POSIX only; reached only where /proc is missing
    import sys

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def write_from(source: Source, dst: str, *, to: str = "glm", family: Optional[str] = None,
               dtype: "torch.dtype | str | None" = None, allow_lossy: bool = False,
               shard_size: "int | str" = "2GB", overwrite: bool = False, progress: bool = False,
               extra_files: Optional[dict[str, bytes]] = None) -> ConvertSummary:
    """Write ``source`` to ``dst`` in glm's format (``to="glm"``) or a release format (``to="hf"``,
    ``family`` defaults to the source's). Streams one mapping at a time; atomic. ``extra_files``
    (name -> bytes, e.g. the tokenizer) are written into the folder with the weights.

    A quantized source keeps its integers and scales as they are (``dtype`` casts the float tensors only). In a
    release format it needs the release's quantized layout (`glm.formats.quantized.ThudmLayout`), and what that
    layout cannot hold is refused with a FormatError before anything is written."""
    t0 = time.time()
    if to not in ("glm", "hf"):
        raise ArgumentError(f"to= (--to) must be 'glm' or 'hf', got {to!r}")
    if to == "glm" and family is not None and family != source.cfg.family:
        raise FormatError(f"family {family!r} picks the release format of an hf output (to='hf', --to hf); glm's "
                          f"format keeps the source's family ({source.cfg.family})")
    dtype = as_dtype(dtype)
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ArgumentError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16")
    shard_bytes = parse_size(shard_size)
    dst = os.path.abspath(os.fspath(dst))
    clear_stale_temps(dst, CARRIED_FILES)
    check_destination(dst, overwrite, CARRIED_FILES)

    cfg, scheme = source.cfg, source.quantization
    # Integers and scales (glm names): copied as they are, never cast.
    kept = quant.quantized_tensor_names(cfg, scheme)
    src_dtypes = {source.meta(n).dtype for mp in source.mappings if not kept & set(mp.glm) for n in mp.hf}
    if dtype is not None and not allow_lossy:
        lossy = sorted(str(s) for s in src_dtypes if _lossy(s, dtype))
        if lossy:
            raise ArgumentError(f"casting {', '.join(lossy)} weights to {dtype} loses precision; pass "
                                f"--allow-lossy (allow_lossy=True) to do it anyway")
    out_dtype = dtype or source.float_dtype()

    if to == "glm":
        tcfg, targets = cfg, native.mappings(cfg, scheme)
        config_json = native.config_json(cfg, source.hf_config, scheme)
    else:
        tcfg = formats.retarget(cfg, family or cfg.family, out_dtype)
        config_json = formats.config_to_hf(tcfg, out_dtype)
        if source.hf_config is not None and tcfg.family == cfg.family:
            # Same release format: keep its own config.json (all its keys), with the dtype updated.
            config_json = dict(source.hf_config)
            keys = [k for k in ("torch_dtype", "dtype") if k in config_json] or ["torch_dtype"]
            config_json.update({k: DTYPE_NAMES[out_dtype] for k in keys})
        layout = formats.get(tcfg.family).quantized_layout
        if scheme is not None and layout is None:
            with_layout = [f for f, fmt in formats.FORMATS.items() if fmt.quantized_layout is not None]
            raise FormatError(f"the {tcfg.family} release format has no quantized layout (THUDM's quantization_bit "
                              f"layout exists for {', '.join(with_layout)}); save the quantized model in glm format "
                              f"(format='glm', --to glm)")
        if layout is not None:
            layout.write_config(config_json, scheme)
        # The rows must be laid out the way the config.json written beside them makes the reference read them.
        targets = formats.mappings(tcfg, dtype=out_dtype, hf_config=config_json)
        if scheme is not None:
            scale_dtypes = {t.dtype for mp in source.mappings if kept & set(mp.glm)
                            for g, t in zip(mp.glm, mp.to_glm(*map(source.meta, mp.hf))) if g.endswith(".scales")}
            layout.check_writable(tcfg, scheme, scale_dtypes, out_dtype)
            targets = layout.table(targets, tcfg, scheme)

    producer = {g: mp for mp in source.mappings for g in mp.glm}
    # The same tensors by their names in the output.
    kept_out = {h for mp in targets if kept & set(mp.glm) for h in mp.hf}
    # Order target mappings by the shard their first glm tensor comes from: each shard read once.
    targets = sorted(targets, key=lambda mp: min((source.first_file(producer[g]) for g in mp.glm), default=""))

    def copied(mp: Mapping) -> Optional[FileSlice]:
        """The source bytes of target ``mp`` when they are its output bytes as they are: the source and
        target mappings only rename one tensor (tried on its meta tensor), and the dtype stays."""
        src = producer[mp.glm[0]] if len(mp.glm) == 1 and len(mp.hf) == 1 else None
        if src is None or len(src.glm) != 1 or len(src.hf) != 1:
            return None
        m = source.meta(src.hf[0])
        if src.to_glm(m)[0] is not m or mp.to_hf(m)[0] is not m:
            return None
        piece = source.slice(src.hf[0])
        return piece if piece is not None and (dtype in (None, piece.dtype) or mp.hf[0] in kept_out) else None

    def stream(get_src: Callable[[str], Tensor], copy: bool = False) -> Iterator[tuple[str, "Tensor | FileSlice"]]:
        pending: dict[str, Tensor] = {}

        def get_glm(name: str) -> Tensor:
            if name not in pending:
                mp = producer[name]
                pending.update(zip(mp.glm, mp.to_glm(*[get_src(n) for n in mp.hf])))
            return pending.pop(name)

        for mp in targets:
            piece = copied(mp) if copy else None
            if piece is not None:
                yield mp.hf[0], piece
                continue
            outs = mp.to_hf(*[get_glm(n) for n in mp.glm])
            for name, t in zip(mp.hf, outs):
                yield name, t if dtype is None or name in kept_out else t.to(dtype)

    entries = list(stream(source.meta))
    total = sum(m.numel() * m.element_size() for _, m in entries)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"convert -> {os.path.basename(dst)}")
    on_tensor = (lambda _n, nbytes: bar.update(nbytes)) if bar is not None else None
    files = {**(extra_files or {}),
             "config.json": (json.dumps(config_json, indent=2, ensure_ascii=False) + "\n").encode()}
    try:
        names = write_checkpoint(dst, entries, stream(source.get, copy=True), files, shard_size=shard_bytes,
                                 overwrite=overwrite, on_tensor=on_tensor, carried=CARRIED_FILES)
    finally:
        if bar is not None:
            bar.close()
    return ConvertSummary(dst, to, tcfg.family, len(entries), total, time.time() - t0, peak_rss(), names)


# Files a checkpoint folder carries besides weights and config.json that stay valid whatever the
# weight format: the tokenizer (what glm.tokenizer.load and the references read) and generation
# defaults. Remote-code .py files are not copied: they belong to one release format.
CARRIED_FILES = (*MODEL_FILES, "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 "tokenizer.json", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                 "generation_config.json")


# Far above any real tokenizer file (GLM-4's tokenizer.json is ~7 MB); a larger one is not such a file.
CARRIED_LIMIT = 512 * 1024 * 1024


def carried_files(src: str) -> dict[str, bytes]:
    """The `CARRIED_FILES` present in ``src``, name -> bytes. One that is not a regular file (a FIFO would
    block the copy forever) or is larger than any tokenizer file is a CheckpointError."""
    out = {}
    for name in CARRIED_FILES:
        path = os.path.join(src, name)
        if os.path.exists(path):
            try:
                out[name] = read_bounded(path, CARRIED_LIMIT, "tokenizer file")
            except FileKindError as e:
                raise CheckpointError(str(e)) from None
    return out


def _is_or_holds(folder: str, path: str) -> bool:
    """Whether ``folder`` is ``path`` or one of its ancestors, by file identity (links, bind mounts)."""
    here = os.path.realpath(path)
    while True:
        if os.path.exists(here) and os.path.samefile(here, folder):
            return True
        up = os.path.dirname(here)
        if up == here:
            return False
        here = up


def convert_checkpoint(src: str, dst: str, *, verify: bool = True, **kwargs) -> ConvertSummary:
    """Convert the checkpoint folder ``src`` (any release format or glm's) into ``dst``; see `write_from`.
    The tokenizer and generation_config.json come along (`CARRIED_FILES`). ``verify``: check a
    glm-written source against its checksum record first (see `glm.from_pretrained`)."""
    src = os.fspath(src)
    if os.path.exists(dst) and _is_or_holds(os.fspath(dst), src):
        raise ArgumentError(f"{dst} is the source folder or holds it; write to another folder (the conversion "
                            f"replaces the destination, which would delete the source's own files)")
    parse_size(kwargs.get("shard_size", "2GB"))  # a bad size fails before the source is read
    source, reader = open_source(src, verify=verify)
    try:
        return write_from(source, dst, extra_files=carried_files(src), **kwargs)
    finally:
        reader.close()


def quantize_checkpoint(src: "str | os.PathLike[str]", dst: "str | os.PathLike[str]", bits: int,
                        group_size: Optional[int] = None, *, embeddings: bool = False, lm_head: bool = False,
                        format: str = "glm", scale_dtype: "torch.dtype | str | None" = None,
                        shard_size: "int | str" = "2GB", overwrite: bool = False, progress: bool = False,
                        verify: bool = True) -> ConvertSummary:
    """Quantize the float checkpoint folder ``src`` into ``dst``, one tensor in memory at a time: each weight
    `glm.quantize` would replace (``bits`` 8 or 4, ``group_size`` None for one scale per output row;
    ``embeddings``, ``lm_head`` as there) is quantized as it streams from its shard, everything else is copied
    in its stored dtype. Atomic, and the tokenizer comes along, as `convert_checkpoint`.

    ``format="glm"`` writes glm's format (any scheme); ``"hf"`` the source release's own format in THUDM's
    quantized layout, where the release has one (per-row scales only). ``scale_dtype`` (None: the one the output
    stores: float32 in glm's format, fp16 for ChatGLM-6B, the weights' dtype for the ChatGLM2-format releases).
    The result equals ``glm.quantize(glm.from_pretrained(src, dtype=None), ...)`` saved, bit for bit."""
    src, dst = os.fspath(src), os.fspath(dst)
    if format not in ("glm", "hf"):
        raise ArgumentError(f"format= (--to) must be 'glm' or 'hf', got {format!r}")
    quant.check_scheme(bits, group_size)
    scale_dtype = _scale_dtype(scale_dtype, optional=True)
    if os.path.exists(dst) and _is_or_holds(dst, src):
        raise ArgumentError(f"{dst} is the source folder or holds it; write to another folder (the conversion "
                            f"replaces the destination, which would delete the source's own files)")
    parse_size(shard_size)  # a bad size fails before the source is read
    source, reader = open_source(src, verify=verify)
    try:
        if source.quantization is not None:
            raise _already_quantized(source, src, "")
        with torch.device("meta"):
            model = GLM(source.cfg)
        # On the meta model: a group size that does not divide a layer fails before anything is read or written.
        scheme = quant.quantize(model, bits, group_size, embeddings=embeddings, lm_head=lm_head).quantization
        if scale_dtype is None:
            layout = formats.get(source.cfg.family).quantized_layout if format == "hf" else None
            scale_dtype = torch.float32 if layout is None else layout.stored_scale_dtype(source.float_dtype())
        source.mappings = quantized.quantizing_table(source.mappings, source.cfg, scheme, scale_dtype,
                                                     lambda t: t, {})
        source.quantization = scheme
        return write_from(source, dst, to=format, shard_size=shard_size, overwrite=overwrite, progress=progress,
                          extra_files=carried_files(src))
    finally:
        reader.close()


def save_pretrained(model: GLM, dst: str, *, format: str = "glm", family: Optional[str] = None,
                    **kwargs) -> ConvertSummary:
    """Save a `glm.GLM` as a checkpoint folder: glm's format, or a release format the reference code
    and transformers load (``format="hf"``; ``family`` picks e.g. ``glm-hf`` for a GLM-4 model).

    A model carrying unmerged LoRA adapters or a P-tuning prefix is refused: a checkpoint holds the base
    weights only, so saving would drop them without a word (merged adapters are in the weights)."""
    if lora.has_lora(model) and not lora.is_merged(model):
        raise ArgumentError("the model carries LoRA adapters, which a checkpoint cannot hold: fold them in first "
                            "(glm.lora.remove(model), or glm merge-lora) or save them on their own "
                            "(glm.formats.peft.save_adapter)")
    if model.prefix_encoder is not None:
        raise ArgumentError("the model carries a P-tuning prefix, which a checkpoint cannot hold: save it on its "
                            "own (glm.formats.ptuning_checkpoint.save_prefix), or glm.ptuning.remove(model) first")
    return write_from(model_source(model), dst, to=format, family=family, **kwargs)


# `GLM.save_pretrained` calls this (the model layer cannot import the hub).
GLM.saver = save_pretrained
