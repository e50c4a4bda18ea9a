"""LoRA adapters in peft's folder layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

peft (huggingface/peft, `PeftModel.save_pretrained`) writes one ``lora_A.weight`` ``[r, in]`` and one
``lora_B.weight`` ``[out, r]`` per adapted module, keyed ``base_model.model.<module path>.lora_{A,B}.weight``
(the adapter name "default" removed), with the module paths of the release's own model class. This module
holds each family's module names (registered into `glm.lora`), and converts B's output rows between the
release's layout and glm's: the RoPE row permutation of interleaved-RoPE releases (ChatGLM2/3, GLM-4, Glm,
Glm4) on q and k rows, and ChatGLM-6B's per-head ``[n, (q|k|v), d]`` QKV rows, exactly as the weight tables
convert the projections those adapters sit on. A's columns are the projection's inputs, which every
release orders as glm does.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Optional

import safetensors.torch
import torch
from torch import Tensor

from .. import lora
from ..config import GLMConfig
from ..errors import CheckpointError, ConfigError, FormatError, InputError
from ..files import atomic_write, current_umask, fsync_dir, read_json
from ..lora import LoraConfig, Naming, Target
from ..model import GLM
from .chatglm2 import FAMILIES as CHATGLM2_FAMILIES
from .chatglm2 import TRANSFORMERS_GLM, fused_qkv_mapping
from .layout import (
    blocks_to_per_head_qkv,
    half_to_interleaved,
    interleaved_to_half,
    per_head_qkv_to_blocks,
)
from .registry import FORMATS, retarget

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

# B rows, release layout <-> glm layout, for (target, model config).
RowMap = Callable[[Target, GLMConfig, Tensor], Tensor]


@dataclass(frozen=True)
class PeftLayout:
    family: str
    targets: tuple[Target, ...]
    to_release: RowMap
    to_glm: RowMap
    optional_prefix: str = ""  # a path prefix some files of the release have and some do not


def _same(_t: Target, _cfg: GLMConfig, b: Tensor) -> Tensor:
    return b


def _chatglm6b(to_release: bool) -> RowMap:
    def f(t: Target, cfg: GLMConfig, b: Tensor) -> Tensor:
        if t.module != "attn.qkv":
            return b
        fn = blocks_to_per_head_qkv if to_release else per_head_qkv_to_blocks
        return fn(b, cfg.num_heads, cfg.head_dim)
    return f


def _chatglm2(to_release: bool) -> RowMap:
    def f(t: Target, cfg: GLMConfig, b: Tensor) -> Tensor:
        if t.module != "attn.qkv":
            return b
        mp = fused_qkv_mapping(cfg, "", "")
        return (mp.to_hf if to_release else mp.to_glm)(b)[0]
    return f


def _separate_qkv(to_release: bool) -> RowMap:
    def f(t: Target, cfg: GLMConfig, b: Tensor) -> Tensor:
        if t.part not in ("q", "k"):
            return b
        heads = cfg.num_heads if t.part == "q" else cfg.num_kv_heads
        return (half_to_interleaved if to_release else interleaved_to_half)(b, heads, cfg.head_dim, cfg.rotary_dim)
    return f


def _targets(layer: str, names: dict[str, tuple[str, str, str]]) -> tuple[Target, ...]:
    """name -> (path under the layer, glm module, part). The MLP ones are those on mlp.*; the default ones
    those on the QKV projection, as THUDM's LoRA configs choose (ChatGLM3 finetune_demo leaves it to peft's
    chatglm default, query_key_value; GLM-4's finetune_demo names query_key_value, its finetune/ for the
    transformers-format models q_proj, k_proj, v_proj)."""
    return tuple(Target(n, f"{layer}.{sub}", mod, part, mod.startswith("mlp."), mod == "attn.qkv")
                 for n, (sub, mod, part) in names.items())


_MLP = {"dense_h_to_4h": ("mlp.dense_h_to_4h", "mlp.w_in", "all"),
        "dense_4h_to_h": ("mlp.dense_4h_to_h", "mlp.w_out", "all")}
LAYOUTS: dict[str, PeftLayout] = {}
LAYOUTS["glm"] = PeftLayout(
    "glm", _targets("glm.transformer.layers.{i}", {
        "query_key_value": ("attention.query_key_value", "attn.qkv", "all"),
        "dense": ("attention.dense", "attn.out", "all"), **_MLP}),
    _same, _same, optional_prefix="glm.")  # GLMForConditionalGeneration's paths; a bare GLMModel's lack "glm."
LAYOUTS["chatglm"] = PeftLayout(
    "chatglm", _targets("transformer.layers.{i}", {
        "query_key_value": ("attention.query_key_value", "attn.qkv", "all"),
        "dense": ("attention.dense", "attn.out", "all"), **_MLP}),
    _chatglm6b(True), _chatglm6b(False))
for _fam in CHATGLM2_FAMILIES:
    LAYOUTS[_fam] = PeftLayout(
        _fam, _targets("transformer.encoder.layers.{i}", {
            "query_key_value": ("self_attention.query_key_value", "attn.qkv", "all"),
            "dense": ("self_attention.dense", "attn.out", "all"), **_MLP}),
        _chatglm2(True), _chatglm2(False))
for _fam in TRANSFORMERS_GLM:
    LAYOUTS[_fam] = PeftLayout(
        _fam, _targets("model.layers.{i}", {
            "q_proj": ("self_attn.q_proj", "attn.qkv", "q"), "k_proj": ("self_attn.k_proj", "attn.qkv", "k"),
            "v_proj": ("self_attn.v_proj", "attn.qkv", "v"), "o_proj": ("self_attn.o_proj", "attn.out", "all"),
            "gate_up_proj": ("mlp.gate_up_proj", "mlp.w_in", "all"),
            "down_proj": ("mlp.down_proj", "mlp.w_out", "all")}),
        _separate_qkv(True), _separate_qkv(False))


def accepts(family: str) -> Callable[[GLMConfig], bool]:
    """Whether a model of a config may carry adapters named for ``family``: its own family, or one whose
    format can write it with the same computation (see `Format.retarget`)."""
    def ok(cfg: GLMConfig) -> bool:
        if cfg.family == family:
            return True
        if cfg.family not in FORMATS[family].converts_from:
            return False
        try:
            retarget(cfg, family, torch.float32)
        except (FormatError, ConfigError):
            return False
        return True
    return ok


for _layout in LAYOUTS.values():
    lora.register_naming(Naming(_layout.family, _layout.targets, accepts(_layout.family)))


# ---------------------------------------------------------------------------------------------
# Writing

def adapter_config(cfg: LoraConfig, targets: tuple[Target, ...], base_model_name_or_path: str) -> dict[str, Any]:
    """The adapter_config.json peft writes for ``cfg`` (its LoraConfig fields that glm uses; peft fills the
    rest with its defaults when it reads the file)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
            "revision": None, "inference_mode": True, "r": cfg.r, "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout, "target_modules": [t.name for t in targets], "bias": "none",
            "fan_in_fan_out": False, "use_rslora": cfg.rslora, "use_dora": False, "init_lora_weights": True,
            "layers_to_transform": None if cfg.layers is None else list(cfg.layers), "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None}


def adapter_tensors(model: GLM, family: Optional[str] = None) -> tuple[dict[str, Tensor], tuple[Target, ...]]:
    """peft's key -> tensor for the model's adapters, named for ``family`` (default: the names they were
    applied with), B rows in that release's layout; and the targets as ``family`` names them."""
    cfg = getattr(model, "lora_config", None)
    if cfg is None or not lora.has_lora(model):
        raise InputError("the model has no LoRA adapters to save (glm.lora.apply adds them)")
    family = family or model.lora_family
    if family not in LAYOUTS:
        raise InputError(f"no peft module names for family {family!r}; known: {', '.join(LAYOUTS)}")
    layout = LAYOUTS[family]
    if not accepts(family)(model.config):
        raise InputError(f"a {model.config.family} model's adapters cannot be written with {family} module "
                         f"names: the two compute different projections; leave family unset")
    out: dict[str, Tensor] = {}
    named = []
    layers = range(model.config.num_layers) if cfg.layers is None else cfg.layers
    for t in lora.applied_targets(model):
        same = [u for u in layout.targets if (u.module, u.part) == (t.module, t.part)]
        if not same:
            raise InputError(f"the adapters on {t.name} ({model.lora_family} names) have no single module in a "
                             f"{family} model (its targets: {', '.join(u.name for u in layout.targets)}); save "
                             f"with the family they were applied with ({model.lora_family})")
        u = same[0]
        named.append(u)
        for i in layers:
            a = lora.adapter(model, i, t)
            key = PREFIX + u.path.format(i=i)
            out[key + ".lora_A.weight"] = a.A.detach().cpu().contiguous().clone()
            out[key + ".lora_B.weight"] = layout.to_release(u, model.config, a.B.detach().cpu()).contiguous().clone()
    return out, tuple(u for u in layout.targets if u in named)


def save_adapter(model: GLM, folder: str, base_model_name_or_path: str = "", family: Optional[str] = None) -> None:
    """Write the model's LoRA adapters to ``folder`` as peft does (``adapter_config.json`` +
    ``adapter_model.safetensors``), with the module names of ``family`` (default: those they were applied
    with). peft's ``PeftModel.from_pretrained`` loads it onto the release's model class; `load_adapter` onto
    a glm model. A new folder appears whole or not at all; in an existing one each file is replaced
    atomically, and the weights are put back as they were if the config cannot be written after them."""
    tensors, targets = adapter_tensors(model, family)
    cfg = model.lora_config
    if not isinstance(base_model_name_or_path, str):
        raise InputError(f"base_model_name_or_path must be a string (the base model's folder or name), got "
                         f"{type(base_model_name_or_path).__name__}")
    config = adapter_config(cfg, targets, base_model_name_or_path)
    files = {WEIGHTS_NAME: safetensors.torch.save(tensors, metadata={"format": "pt"}),
             CONFIG_NAME: (json.dumps(config, indent=2) + "\n").encode()}
    folder = os.path.abspath(os.fspath(folder))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise InputError(f"{folder} exists and is not a folder; give save_adapter a folder path")
    if not os.path.exists(folder):
        parent = os.path.dirname(folder)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".tmp-", dir=parent)
        try:
            for name, data in files.items():
                atomic_write(os.path.join(tmp, name), data)
            os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700
            os.rename(tmp, folder)
            fsync_dir(parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return
    weights = os.path.join(folder, WEIGHTS_NAME)
    # The weights a failed save replaced come back, so the folder's two files always belong together.
    old = open(weights, "rb").read() if os.path.isfile(weights) else None
    atomic_write(weights, files[WEIGHTS_NAME])
    try:
        atomic_write(os.path.join(folder, CONFIG_NAME), files[CONFIG_NAME])
    except BaseException:
        if old is None:
            os.unlink(weights)
        else:
            atomic_write(weights, old)
        raise


# ---------------------------------------------------------------------------------------------
# Reading

def is_adapter_folder(folder: "str | os.PathLike[str]") -> bool:
    """Whether ``folder`` holds a peft adapter (its adapter_config.json)."""
    return os.path.isfile(os.path.join(os.fspath(folder), CONFIG_NAME))


def read_adapter_config(folder: str) -> dict[str, Any]:
    """The folder's adapter_config.json, checked for what glm can load: a plain LoRA (peft_type LORA, no
    DoRA, no per-module ranks, no trained biases or extra modules)."""
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such folder; give the folder save_adapter (or peft's "
                              f"save_pretrained) wrote")
    if not os.path.exists(path):
        raise CheckpointError(f"{folder}: no {CONFIG_NAME}, so this is not a peft adapter folder; give the folder "
                              f"save_adapter (or peft's save_pretrained) wrote")
    try:
        raw = read_json(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, got {type(raw).__name__}")
    kind = raw.get("peft_type")
    if kind != "LORA":
        raise CheckpointError(f"{path}: peft_type is {kind!r}; glm loads LoRA adapters only (peft_type \"LORA\")")

    def bad(key: str, why: str) -> CheckpointError:
        return CheckpointError(f"{path}: {key}={raw.get(key)!r} {why}")

    r = raw.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise bad("r", "must be a positive integer")
    for key in ("lora_alpha", "lora_dropout"):
        v = raw.get(key, 8 if key == "lora_alpha" else 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad(key, "must be a number")
    unsupported = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False}
    for key, want in unsupported.items():
        if raw.get(key, want) != want:
            raise bad(key, f"is not supported by glm (it loads {key}={json.dumps(want)} adapters)")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "layer_replication", "target_parameters",
                "trainable_token_indices"):
        if raw.get(key):
            raise bad(key, "is not supported by glm (it loads one rank and alpha for every module, and no "
                           "extra trained modules or parameters)")
    if not isinstance(raw.get("use_rslora", False), bool):
        raise bad("use_rslora", "must be true or false")
    layers = raw.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and (not isinstance(layers, list) or not layers or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)):
        raise bad("layers_to_transform", "must be null, a layer index or a list of them")
    return raw


def read_adapter_tensors(folder: str) -> dict[str, Tensor]:
    """The tensors of ``adapter_model.safetensors`` (or peft's older ``adapter_model.bin``)."""
    st, binary = os.path.join(folder, WEIGHTS_NAME), os.path.join(folder, BIN_NAME)
    try:
        if os.path.exists(st):
            return safetensors.torch.load_file(st)
        if os.path.exists(binary):
            sd = torch.load(binary, map_location="cpu", weights_only=True)
            if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
                raise CheckpointError(f"{binary}: not a state dict of tensors")
            return sd
    except CheckpointError:
        raise
    except Exception as e:  # safetensors and torch.load raise their own types for a damaged file
        raise CheckpointError(f"{folder}: the adapter weights cannot be read ({type(e).__name__}: {e}); save the "
                              f"adapter again") from None
    raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} (or {BIN_NAME}) beside {CONFIG_NAME}; the adapter's "
                          f"weights are missing")


def _pattern(layout: PeftLayout, t: Target) -> re.Pattern:
    path = t.path
    opt = ""
    if layout.optional_prefix and path.startswith(layout.optional_prefix):
        path, opt = path[len(layout.optional_prefix):], f"(?:{re.escape(layout.optional_prefix)})?"
    return re.compile("^" + opt + re.escape(path).replace(re.escape("{i}"), r"(\d+)") + "$")


def parse_keys(layout: PeftLayout, keys: list[str]) -> Optional[dict[tuple[int, Target], dict[str, str]]]:
    """(layer, target) -> {"A": key, "B": key} when every key names a module of ``layout``; None otherwise."""
    pats = [(t, _pattern(layout, t)) for t in layout.targets]
    out: dict[tuple[int, Target], dict[str, str]] = {}
    for key in keys:
        m = re.match(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$", key)
        if m is None:
            return None
        for t, pat in pats:
            hit = pat.match(m.group(1))
            if hit:
                out.setdefault((int(hit.group(1)), t), {})[m.group(2)] = key
                break
        else:
            return None
    return out


def _adapter_family(model: GLM, keys: list[str], folder: str) -> tuple[PeftLayout, dict]:
    """The family whose module names the keys use, preferring the names the model's adapters have, then the
    model's own family, then any family whose names a model like this one may carry."""
    if not keys:
        raise CheckpointError(f"{folder}: the adapter weights file holds no tensors")
    order = list(dict.fromkeys([f for f in (getattr(model, "lora_family", None), model.config.family) if f]
                               + list(LAYOUTS)))
    found = [(LAYOUTS[f], parsed) for f in order if f in LAYOUTS
             for parsed in [parse_keys(LAYOUTS[f], keys)] if parsed is not None]
    for layout, parsed in found:
        if accepts(layout.family)(model.config):
            return layout, parsed
    if found:
        fams = ", ".join(layout.family for layout, _ in found)
        raise CheckpointError(f"{folder}: the adapter was made for a model of family {fams} (its module names), "
                              f"not for this {model.config.family} model; load it onto the model it was trained on")
    good = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
    own = LAYOUTS.get(model.config.family)
    for key in keys:
        if not good.match(key) or (own and parse_keys(own, [key]) is None):
            valid = "" if own is None else (f"; a {own.family} model's keys look like "
                                            f"{PREFIX}{own.targets[0].path.format(i=0)}.lora_A.weight")
            raise CheckpointError(f"{folder}: tensor {key!r} names no LoRA module glm knows{valid}")
    raise CheckpointError(f"{folder}: the adapter's module names mix families; save it again")


def load_adapter(model: GLM, folder: "str | os.PathLike[str]") -> LoraConfig:
    """Load the peft LoRA adapter in ``folder`` onto ``model`` (in place) and return its `LoraConfig`.

    Adapters the model already has are replaced (dropped unmerged); the new ones are applied unmerged. Every
    check (config, key names, family, completeness, shapes) runs before the model is touched."""
    folder = os.fspath(folder)
    raw = read_adapter_config(folder)
    tensors = read_adapter_tensors(folder)
    layout, parsed = _adapter_family(model, list(tensors), folder)
    cfg_m = model.config
    r = raw.get("r", 8)
    layers_raw = raw.get("layers_to_transform")
    layers = None if layers_raw is None else tuple(sorted({layers_raw} if isinstance(layers_raw, int)
                                                          else set(layers_raw)))
    want_layers = range(cfg_m.num_layers) if layers is None else layers
    found_layers = sorted({i for i, _ in parsed})
    if found_layers[-1] >= cfg_m.num_layers or (layers is not None and layers[-1] >= cfg_m.num_layers):
        raise CheckpointError(f"{folder}: the adapter has layer {max(found_layers[-1], (layers or [0])[-1])}, but "
                              f"the model has {cfg_m.num_layers} layers; load it onto the model it was trained on")
    targets = tuple(t for t in layout.targets if any(t == u for _, u in parsed))
    missing = [f"{PREFIX}{t.path.format(i=i)}.lora_{ab}.weight" for i in want_layers for t in targets
               for ab in "AB" if ab not in parsed.get((i, t), {})]
    extra = sorted(f"{t.path.format(i=i)}" for i, t in parsed if i not in want_layers)
    if missing or extra:
        what = f"missing {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "") if missing \
            else f"layer {extra[0]} is outside layers_to_transform {list(want_layers)}"
        raise CheckpointError(f"{folder}: the adapter's weights do not match its {CONFIG_NAME}: {what}; save the "
                              f"adapter again")
    values = {}
    for (i, t), ks in parsed.items():
        base = model.get_submodule(f"layers.{i}.{t.module}")
        start, stop = lora.rows(cfg_m, base, t.part)
        a, b = tensors[ks["A"]], tensors[ks["B"]]
        for key, got, want in ((ks["A"], a, (r, base.in_features)), (ks["B"], b, (stop - start, r))):
            if tuple(got.shape) != want:
                raise CheckpointError(f"{folder}: {key} has shape {list(got.shape)}, but r={r} on this model "
                                      f"needs {list(want)}; the adapter was made for another model size (or its "
                                      f"r in {CONFIG_NAME} is wrong)")
        if not (a.dtype.is_floating_point and b.dtype.is_floating_point):
            raise CheckpointError(f"{folder}: {ks['A']} holds {a.dtype}/{b.dtype}; LoRA weights are floats")
        values[(i, t)] = (a, layout.to_glm(t, cfg_m, b))
    cfg = LoraConfig(r=r, alpha=raw.get("lora_alpha", 8), dropout=raw.get("lora_dropout", 0.0),
                     targets=tuple(t.name for t in targets), layers=layers, rslora=raw.get("use_rslora", False))
    try:
        cfg.validate()
    except InputError as e:
        raise CheckpointError(f"{os.path.join(folder, CONFIG_NAME)}: {e}") from None
    if lora.has_lora(model):
        lora.discard(model)
    lora.apply(model, cfg, layout.family)
    with torch.no_grad():
        for (i, t), (a, b) in values.items():
            ad = lora.adapter(model, i, t)
            ad.A.copy_(a)
            ad.B.copy_(b)
    return model.lora_config


__all__ = ["save_adapter", "load_adapter", "is_adapter_folder", "read_adapter_config", "adapter_tensors",
           "adapter_config", "LAYOUTS", "PeftLayout", "CONFIG_NAME", "WEIGHTS_NAME"]
