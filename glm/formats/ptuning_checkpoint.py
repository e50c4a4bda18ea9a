"""THUDM's P-tuning v2 checkpoints: a folder with ``pytorch_model.bin`` holding only
``transformer.prefix_encoder.*`` and a ``config.json`` that is the base's release config plus ``pre_seq_len``
and ``prefix_projection`` (what ChatGLM-6B/2's ``ptuning/trainer.py`` saves and ``ptuning/main.py`` loads).

    save_prefix(model, folder)            # the prefix of a glm.ptuning model, in the release's layout
    load_prefix(model, folder)            # onto a base model (replacing any prefix it has)
    is_prefix_folder(folder)              # whether a folder is such a checkpoint

Release tensors (names after ``transformer.prefix_encoder.``; kv = layers x 2 x KV heads x head dim):

| | ChatGLM-6B (``chatglm``) | ChatGLM2/3, GLM-4 chatglm format |
|---|---|---|
| no projection: ``embedding.weight`` | [P, kv] | [P, kv] |
| projection: ``embedding.weight`` | [P, hidden] | [P, kv] |
| ``trans.0.weight`` / ``.bias`` | [hidden, hidden] / [hidden] | [hidden, kv] / [hidden] |
| ``trans.2.weight`` / ``.bias`` | [kv, hidden] / [kv] | [kv, hidden] / [kv] |

The encoder's output is each layer's keys and values; in the chatglm2-format releases the key dims of
each head are in their interleaved RoPE order, so they are permuted to glm's half-split order on read
(the embedding's columns, or ``trans.2``'s rows) as the key rows of the QKV projection are.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
from torch import Tensor

from .. import ptuning
from ..checkpoint import INDEX_NAMES, SINGLE_NAMES, CheckpointReader
from ..config import GLMConfig
from ..errors import ArgumentError, CheckpointError, ConfigError, FormatError, GLMError, KeyMismatchError
from ..files import atomic_write, read_json
from ..model import GLM
from .layout import DTYPE_NAMES, Mapping, rename, rope_permutation
from .registry import FORMATS, config_to_hf, detect, retarget

PREFIX = "transformer.prefix_encoder."
WEIGHTS = "pytorch_model.bin"
# The families whose releases have P-tuning v2, and whether their key dims are RoPE-interleaved.
INTERLEAVED_KEYS = {"chatglm": False, "chatglm2": True, "chatglm3": True, "glm4-chatglm": True}
FAMILIES = tuple(INTERLEAVED_KEYS)

# ChatGLM-6B's projected prefix starts from a hidden-size embedding (ChatGLM2/3's from a kv-wide one).
ptuning.register_embed_width("chatglm", lambda cfg: cfg.hidden_size)


def key_index(cfg: GLMConfig, family: str) -> Optional[Tensor]:
    """Index over one prefix slot's flat keys/values (layer, key|value, head, dim): glm's column ``i`` is
    the release's column ``index[i]``. None where the layouts agree."""
    if not INTERLEAVED_KEYS[family]:
        return None
    L, g, d = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    index = torch.arange(L * 2 * g * d).view(L, 2, g, d)
    index[:, 0] = index[:, 0][..., rope_permutation(d, cfg.rotary_dim)]
    return index.flatten()


def mappings(cfg: GLMConfig, family: str, projection: bool) -> list[Mapping]:
    """The table between a `glm.ptuning.PrefixEncoder`'s tensors and the release's (both directions)."""
    index = key_index(cfg, family)
    inverse = None if index is None else torch.argsort(index)

    def columns(i: Optional[Tensor]):
        return lambda t: (t if i is None else t[:, i],)

    def rows(i: Optional[Tensor]):
        return lambda t: (t if i is None else t[i],)

    if not projection:
        return [Mapping(("embed.weight",), (PREFIX + "embedding.weight",), columns(index), columns(inverse))]
    return [rename("embed.weight", PREFIX + "embedding.weight"),
            rename("w_in.weight", PREFIX + "trans.0.weight"), rename("w_in.bias", PREFIX + "trans.0.bias"),
            Mapping(("w_out.weight",), (PREFIX + "trans.2.weight",), rows(index), rows(inverse)),
            Mapping(("w_out.bias",), (PREFIX + "trans.2.bias",), rows(index), rows(inverse))]


def _supported(what: str) -> str:
    return f"{what}; THUDM's P-tuning v2 layout exists for the families {', '.join(FAMILIES)}"


# ------------------------------------------------------------------------------------------------
# Writing

def _check_folder(folder: str) -> None:
    """Refuse a destination that is not a folder or that holds a model checkpoint (whose config.json the
    prefix's would replace); an earlier prefix folder may be overwritten."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ArgumentError(f"{folder}: exists and is not a folder; save the prefix into a (new) folder")
    if not os.path.isdir(folder):
        return
    present = sorted(set(os.listdir(folder)) & {"config.json", *INDEX_NAMES, *SINGLE_NAMES})
    others = [n for n in present if n not in ("config.json", WEIGHTS)]
    if others or (present and not is_prefix_folder(folder)):
        raise ArgumentError(f"{folder}: holds a model checkpoint ({', '.join(present)}), which the prefix's "
                            f"config.json and {WEIGHTS} would replace; save the prefix into an empty folder")


def save_prefix(model: GLM, folder: "str | os.PathLike[str]", family: Optional[str] = None, *,
                base_model_name_or_path: Optional[str] = None) -> str:
    """Write ``model``'s prefix as THUDM's P-tuning checkpoint of ``family`` (default: the model's),
    atomically file by file, config.json last. ``base_model_name_or_path`` is recorded in config.json (an
    extra key THUDM's code ignores) so the base can be found again. Returns the folder."""
    folder = os.fspath(folder)
    encoder = ptuning.prefix_encoder(model)
    family = model.config.family if family is None else family
    if family not in INTERLEAVED_KEYS:
        hint = " (write a GLM-4 model with family='glm4-chatglm')" if model.config.family in ("glm-hf",) else ""
        raise FormatError(_supported(f"family {family!r} has no P-tuning checkpoint format") + hint)
    dtype = model.float_probe.dtype
    if dtype not in DTYPE_NAMES:
        raise FormatError(f"the model is in {dtype}; the release config.json records float32, float16 or bfloat16")
    cfg = retarget(model.config, family, dtype)
    hf: dict[str, Any] = config_to_hf(cfg, dtype)
    projection = encoder.w_in is not None
    if projection:
        want_e, want_h = ptuning.embed_width(cfg, True), cfg.hidden_size
        e, h = encoder.embed.weight.shape[1], encoder.w_in.weight.shape[0]
        if (e, h) != (want_e, want_h):
            raise FormatError(f"the prefix MLP is {e} -> {h} -> kv wide, but THUDM's {family} encoder is {want_e} -> "
                              f"{want_h} (its hidden size) -> kv; train with prefix_hidden_size=None (the "
                              f"model's hidden size) to write this layout")
    tensors = encoder.state_dict()
    state: dict[str, Tensor] = {}
    for mp in mappings(cfg, family, projection):
        for name, t in zip(mp.hf, mp.to_hf(*[tensors[n] for n in mp.glm])):
            state[name] = t.detach().to("cpu").contiguous().clone()
    hf.update(pre_seq_len=encoder.pre_seq_len, prefix_projection=projection)
    if base_model_name_or_path is not None:
        hf["base_model_name_or_path"] = str(base_model_name_or_path)
    _check_folder(folder)
    os.makedirs(folder, exist_ok=True)
    atomic_write(os.path.join(folder, WEIGHTS), lambda f: torch.save(state, f))
    atomic_write(os.path.join(folder, "config.json"), (json.dumps(hf, indent=2) + "\n").encode("utf-8"))
    return folder


# ------------------------------------------------------------------------------------------------
# Reading

def _prefix_count(hf: Any, source: str) -> int:
    value = hf.get("pre_seq_len") if isinstance(hf, dict) else None
    if value is None:
        raise CheckpointError(f"{source}: has no pre_seq_len, so the folder is not a P-tuning checkpoint (THUDM's "
                              f"ptuning scripts save the prefix with pre_seq_len in config.json)")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{source}: pre_seq_len must be a positive integer, got {value!r}; fix config.json")
    return value


def is_prefix_folder(folder: "str | os.PathLike[str]") -> bool:
    """Whether ``folder`` is a P-tuning checkpoint: a config.json with ``pre_seq_len`` and weights that are
    all ``transformer.prefix_encoder.*`` (a folder of a whole model trained with a prefix is not)."""
    folder = os.fspath(folder)
    try:
        _prefix_count(read_json(os.path.join(folder, "config.json")), "config.json")
        with CheckpointReader(folder) as reader:
            keys = reader.keys()
    except (GLMError, OSError):
        return False
    return bool(keys) and all(k.startswith(PREFIX) for k in keys)


def base_of(folder: "str | os.PathLike[str]") -> Optional[str]:
    """The base model `save_prefix` recorded for the prefix in ``folder`` (None when it recorded none)."""
    hf = read_json(os.path.join(os.fspath(folder), "config.json"))
    base = hf.get("base_model_name_or_path") if isinstance(hf, dict) else None
    return base if isinstance(base, str) and base else None


def load_prefix(model: GLM, folder: "str | os.PathLike[str]") -> ptuning.PrefixConfig:
    """Put the prefix of the P-tuning checkpoint ``folder`` on ``model`` (a base model of the same shape;
    any prefix it has is replaced, its base weights frozen). The model is unchanged when anything does not
    fit. Returns the prefix's config."""
    folder = os.fspath(folder)
    source = os.path.join(folder, "config.json")
    hf = read_json(source)
    P = _prefix_count(hf, source)
    try:
        family = detect(hf, source).family
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    if family not in INTERLEAVED_KEYS:
        raise CheckpointError(_supported(f"{source}: is a {family} config"))
    if model.config.family != family and model.config.family not in FORMATS[family].converts_from:
        raise CheckpointError(f"{source}: the prefix was trained for a {family} model; this model is "
                              f"{model.config.family}; load it onto its base model")
    with CheckpointReader(folder) as reader:
        names = [k for k in reader.keys() if k.startswith(PREFIX)]
        projection = PREFIX + "trans.0.weight" in names
        # Decided by the tensors: some ChatGLM2 configuration files store the flag as the 1-tuple (False,),
        # which the reference reads as true; a plain true/false that contradicts the tensors is a damaged file.
        flag = hf.get("prefix_projection")
        if isinstance(flag, bool) and flag != projection:
            holds = "holds" if projection else "has no"
            raise CheckpointError(f"{source}: prefix_projection is {str(flag).lower()} but {WEIGHTS} {holds} the "
                                  f"projection MLP (trans.*); fix config.json")
        pcfg = ptuning.PrefixConfig(pre_seq_len=P, prefix_projection=projection)
        table = mappings(model.config, family, projection)
        missing = sorted({n for mp in table for n in mp.hf} - set(names))
        extra = sorted(set(names) - {n for mp in table for n in mp.hf})
        if missing or extra:
            raise KeyMismatchError(f"{folder}: the P-tuning tensors are not THUDM's {family} layout "
                                   f"(prefix_projection={str(projection).lower()}): missing {missing or 'none'}, "
                                   f"unexpected {extra or 'none'}")
        with torch.device("meta"):
            want = ptuning.PrefixEncoder(model.config, pcfg).state_dict()
        state: dict[str, Tensor] = {}
        for mp in table:
            got = [reader.get(n) for n in mp.hf]
            shapes = [tuple(t.shape) for t in mp.to_hf(*[want[n] for n in mp.glm])]
            for n, t, s in zip(mp.hf, got, shapes):
                if tuple(t.shape) != s:
                    raise CheckpointError(f"{folder}: {n} is {list(t.shape)}, but a prefix of {P} slots for this "
                                          f"model ({model.config.num_layers} layers, {model.config.num_kv_heads} KV "
                                          f"heads of {model.config.head_dim}, hidden {model.config.hidden_size}) "
                                          f"needs {list(s)}; load it onto the base model it was trained for")
                if not t.is_floating_point():
                    raise CheckpointError(f"{folder}: {n} has dtype {t.dtype}; prefix tensors are floating point")
            for name, t in zip(mp.glm, mp.to_glm(*got)):
                state[name] = t.to(torch.float32)
    if model.prefix_encoder is not None:
        ptuning.remove(model)
    ptuning.apply(model, pcfg)
    model.prefix_encoder.load_state_dict(state, strict=True)
    return pcfg
