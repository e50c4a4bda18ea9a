"""LoRA: low-rank adapters on the linear projections of a `GLM`, named as each release names its modules.

    from glm import lora
    lora.apply(model, lora.LoraConfig(r=8, alpha=16))   # base frozen, adapters added, logits unchanged
    ...train lora.trainable_parameters(model)...
    lora.merge(model); lora.unmerge(model)              # fold B @ A into the weights and back
    lora.remove(model)                                  # merged plain GLM, saves in any format

An adapter adds ``(alpha / r) · B A x`` (``alpha / sqrt(r)`` with ``rslora``) to the output rows of one
release module, as peft's LoRA layer does (dropout on ``x`` first, A Kaiming-uniform, B zero). Targets are
the release's module names, the ones peft users write for that family (``q_proj``, ``query_key_value``...).
glm fuses some of them (``q_proj``/``k_proj``/``v_proj`` are row blocks of ``attn.qkv``), so an adapter owns
a row slice ``[start, stop)`` of one glm projection, in glm's row layout; converting B's rows to and from
the release layout (the RoPE row permutation, ChatGLM-6B's per-head QKV) happens only when an adapter is
written or read (`glm.formats.peft`), never in the forward pass.

The module names of each family are registered by `glm.formats.peft` (the model layer cannot import the
formats): `register_naming` / `NAMINGS`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .config import GLMConfig
from .errors import InputError
from .model import GLM, Linear
from .quant import QuantLinear, is_quantized

Part = Literal["all", "q", "k", "v"]


@dataclass(frozen=True)
class Target:
    """One release module a LoRA adapter can sit on."""

    name: str  # as peft's target_modules holds it: the module's own name, "q_proj"
    path: str  # its full path in the release model, layer as {i}: "model.layers.{i}.self_attn.q_proj"
    module: str  # the glm projection of a layer it adapts: "attn.qkv", "attn.out", "mlp.w_in", "mlp.w_out"
    part: Part = "all"  # which output rows of that projection: all, or q / k / v of the fused qkv
    mlp: bool = False  # an MLP projection (added by LoraConfig.mlp)
    default: bool = False  # targeted when LoraConfig.targets is None


@dataclass(frozen=True)
class Naming:
    """A family's LoRA module names, and which models may carry adapters named so."""

    family: str
    targets: tuple[Target, ...]
    # Whether a model of this config computes what a model of ``family`` does, with the same projections
    # (true for its own family; e.g. a ChatGLM3 model may take Glm's q_proj/k_proj/v_proj names).
    accepts: Callable[[GLMConfig], bool]


# Every family's names, by family; filled by glm.formats.peft at import.
NAMINGS: dict[str, Naming] = {}


def register_naming(naming: Naming) -> None:
    NAMINGS[naming.family] = naming


def naming(family: str) -> Naming:
    """The registered names of ``family``; InputError listing the known families otherwise."""
    if family not in NAMINGS:
        raise InputError(f"no LoRA module names for family {family!r}; known: {', '.join(NAMINGS)}")
    return NAMINGS[family]


def rows(cfg: GLMConfig, module: "Linear", part: Part) -> tuple[int, int]:
    """The output rows ``[start, stop)`` of ``module`` that ``part`` names (q, k, v: glm's qkv blocks)."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"all": (0, module.out_features), "q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}[part]


# ---------------------------------------------------------------------------------------------
# Config

@dataclass
class LoraConfig:
    """What `apply` adds.

    targets: release module names of the family (``("q_proj", "v_proj")`` for Glm, ``("query_key_value",)``
      for the chatglm formats), or a dotted tail of one (``"self_attn.q_proj"``); None: the family's QKV
      projections, the modules THUDM's fine-tuning scripts and peft's default adapt. ``mlp`` adds the
      family's MLP projections to either.
    layers: the layer indices that get adapters (peft's ``layers_to_transform``); None: all.
    rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r`` (peft's ``use_rslora``).
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: Optional[tuple[str, ...]] = None
    mlp: bool = False
    layers: Optional[tuple[int, ...]] = None
    rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def validate(self) -> None:
        """InputError naming the first field out of range."""
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise InputError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0 \
                or not math.isfinite(self.alpha):
            raise InputError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise InputError(f"LoRA dropout must be a probability in [0, 1), got {self.dropout!r}")
        if self.targets is not None and (isinstance(self.targets, str) or not all(
                isinstance(t, str) and t for t in self.targets) or not len(self.targets)):
            raise InputError(f"LoRA targets must be a non-empty tuple of module names such as ('q_proj', "
                             f"'v_proj'), or None for the family's default; got {self.targets!r}")
        if self.layers is not None and (isinstance(self.layers, (str, int)) or not len(self.layers) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers)):
            raise InputError(f"LoRA layers must be a non-empty tuple of layer indices, or None for every layer; "
                             f"got {self.layers!r}")


def resolve_targets(cfg: LoraConfig, names: Naming) -> tuple[Target, ...]:
    """The `Target`s ``cfg`` names in ``names``'s family, in the family's table order."""
    attention = [t for t in names.targets if not t.mlp]
    mlp = [t for t in names.targets if t.mlp]
    chosen: list[Target] = []
    for want in cfg.targets if cfg.targets is not None else [t.name for t in names.targets if t.default]:
        hit = [t for t in names.targets if "{i}" not in want and (t.name == want or t.path.endswith("." + want))]
        if not hit:
            raise InputError(
                f"LoRA target {want!r} is not a module of a {names.family} model; its targets are "
                f"{', '.join(t.name for t in attention)} (attention) and {', '.join(t.name for t in mlp)} (MLP)")
        chosen += hit
    if cfg.mlp:
        chosen += mlp
    return tuple(t for t in names.targets if t in chosen)


# ---------------------------------------------------------------------------------------------
# Modules

class LoraAdapter(nn.Module):
    """``scaling · B A dropout(x)`` for the output rows ``[start, stop)`` of one projection."""

    def __init__(self, in_features: int, start: int, stop: int, r: int, scaling: float, dropout: float,
                 like: Tensor, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.start, self.stop, self.scaling = start, stop, scaling
        self.A = nn.Parameter(torch.empty(r, in_features, dtype=like.dtype, device=like.device))
        self.B = nn.Parameter(torch.zeros(stop - start, r, dtype=like.dtype, device=like.device))
        if not like.is_meta:
            # peft's default init: A as nn.Linear initialises its weight, B zero (the adapter starts as a no-op).
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5), generator=generator)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(self.dropout(x), self.A), self.B) * self.scaling

    def delta(self) -> Tensor:
        """The adapter as a weight update of its rows, ``scaling · B A``, in fp32."""
        return (self.B.detach().float() @ self.A.detach().float()) * self.scaling


def _share(src: nn.Module, dst: nn.Module, attrs: tuple[str, ...]) -> None:
    """Register ``src``'s own parameters and buffers (None entries and persistence included) on ``dst`` under
    the same names, and copy ``attrs``: both modules then hold the very same tensors."""
    for name in attrs:
        setattr(dst, name, getattr(src, name))
    for name, p in src._parameters.items():
        dst.register_parameter(name, p)
    for name, b in src._buffers.items():
        dst.register_buffer(name, b, persistent=name not in src._non_persistent_buffers_set)
    dst.train(src.training)


class _Adapted:
    """What both adapted projections share: adapters under ``lora`` on row slices of the output, added to the
    base projection's result unless folded into the weights (``merged``)."""

    lora: nn.ModuleDict
    merged: bool
    out_features: int
    # The plain projection class this one adapts, and the attributes besides tensors it carries over.
    base_class: type
    base_attrs: tuple[str, ...]

    def _adopt(self, base: nn.Module) -> None:
        """Hold ``base``'s own tensors under their own names (so state_dict keys do not change), no adapters."""
        nn.Module.__init__(self)
        self.lora = nn.ModuleDict()
        self.merged = False
        _share(base, self, self.base_attrs)  # last: it sets the training mode of the module and its children

    def plain(self) -> nn.Module:
        """A plain ``base_class`` module holding this module's tensors (the adapters left out)."""
        mod = self.base_class.__new__(self.base_class)
        nn.Module.__init__(mod)
        _share(self, mod, self.base_attrs)
        return mod

    def _with_adapters(self, y: Tensor, x: Tensor) -> Tensor:
        if self.merged or not len(self.lora):
            return y
        ads = sorted(self.lora.values(), key=lambda a: a.start)
        if len(ads) == 1 and ads[0].start == 0 and ads[0].stop == self.out_features:
            return y + ads[0](x)
        # Adapters on some row blocks (q_proj and v_proj of the fused qkv): one add of their outputs,
        # zeros between them.
        pieces, at = [], 0
        for a in ads:
            if a.start > at:
                pieces.append(y.new_zeros(*y.shape[:-1], a.start - at))
            pieces.append(a(x))
            at = a.stop
        if at < self.out_features:
            pieces.append(y.new_zeros(*y.shape[:-1], self.out_features - at))
        return y + torch.cat(pieces, dim=-1)


class LoraLinear(_Adapted, Linear):
    """A `glm.model.Linear` with adapters on row slices of its output. It holds the base module's own weight
    and bias, so their state_dict names do not change; the adapters sit under ``lora.<target name>``."""

    base_class, base_attrs = Linear, ("in_features", "out_features")

    def __init__(self, base: Linear):
        self._adopt(base)

    def adapter_like(self) -> Tensor:
        """An empty tensor of the dtype and device adapters on this projection take."""
        return self.weight.new_empty(0)

    def forward(self, x: Tensor) -> Tensor:
        return self._with_adapters(kernels.linear(x, self.weight, self.bias), x)

    def _fold(self, sign: int) -> None:
        with torch.no_grad():
            for a in self.lora.values():
                w = self.weight[a.start:a.stop]
                w.copy_((w.float() + sign * a.delta()).to(w.dtype))


class QuantLoraLinear(_Adapted, QuantLinear):
    """A `glm.quant.QuantLinear` with adapters (LoRA over a frozen quantized base, as QLoRA trains): the
    integers, scales and bias stay the base module's own tensors under their own names; the adapters run in
    the compute dtype beside the quantized product. They cannot be folded into integer weights."""

    base_class, base_attrs = QuantLinear, ("in_features", "out_features", "bits", "group_size")

    def __init__(self, base: QuantLinear):
        self._adopt(base)

    def adapter_like(self) -> Tensor:
        return torch.empty(0, dtype=self.compute_dtype, device=self.qweight.device)

    def forward(self, x: Tensor) -> Tensor:
        return self._with_adapters(QuantLinear.forward(self, x), x)

    def _fold(self, sign: int) -> None:
        raise InputError("the adapters sit on a quantized base, and integer weights cannot absorb them; to get one "
                         "merged model, load the full-precision base, add the adapter to it "
                         "(glm.from_pretrained(ADAPTER_FOLDER) with the float base, or glm.formats.peft.load_adapter),"
                         " merge it (glm.lora.remove), then quantize the result")


ADAPTED = (LoraLinear, QuantLoraLinear)


def check_trainable(model: nn.Module) -> None:
    """Refuse to train a quantized model's own weights: they are integers with scales, not parameters."""
    if is_quantized(model) and not has_lora(model) and getattr(model, "prefix_encoder", None) is None:
        raise InputError("the model's linear weights are quantized (integers with scales) and cannot be trained; "
                         "train LoRA adapters on it (glm.lora.apply, glm finetune --method lora) or P-tuning v2, or "
                         "fine-tune the full-precision model and quantize the result")


# ---------------------------------------------------------------------------------------------
# The model-level API

def lora_modules(model: GLM) -> Iterator[tuple[str, "LoraLinear | QuantLoraLinear"]]:
    """(name, module) of every projection that carries adapters."""
    for name, mod in model.named_modules():
        if isinstance(mod, ADAPTED):
            yield name, mod


def has_lora(model: GLM) -> bool:
    return next(lora_modules(model), None) is not None


def adapter(model: GLM, layer: int, target: Target) -> LoraAdapter:
    """The adapter of ``target`` in layer ``layer`` (KeyError if there is none)."""
    mod = model.get_submodule(f"layers.{layer}.{target.module}")
    if not isinstance(mod, ADAPTED) or target.name not in mod.lora:
        raise KeyError(f"layers.{layer}.{target.module}.lora.{target.name}")
    return mod.lora[target.name]


def applied_targets(model: GLM) -> tuple[Target, ...]:
    """The `Target`s the model's adapters were made for (empty without LoRA)."""
    cfg = getattr(model, "lora_config", None)
    if cfg is None or not has_lora(model):
        return ()
    return resolve_targets(cfg, naming(model.lora_family))


def apply(model: GLM, cfg: LoraConfig, family: Optional[str] = None, *, seed: Optional[int] = None) -> GLM:
    """Add LoRA adapters to ``model`` in place and freeze every other parameter; returns the model.

    ``family`` names the release whose module names ``cfg.targets`` uses (default: the model's own; another
    family's names are accepted where that release computes the same projections, e.g. Glm's q_proj on a
    ChatGLM3 model). B starts at zero, so the logits are those of the base until training moves it.
    ``seed`` fixes A's random init. Records ``model.lora_config`` (targets resolved, MLP ones listed) and
    ``model.lora_family``.
    """
    if not isinstance(model, GLM):
        raise InputError(f"lora.apply takes a glm.GLM model, got {type(model).__name__}")
    if not isinstance(cfg, LoraConfig):
        raise InputError(f"lora.apply takes a glm.lora.LoraConfig, got {type(cfg).__name__}")
    cfg.validate()
    if has_lora(model):
        raise InputError("the model already has LoRA adapters; call glm.lora.remove(model) (merge them into the "
                         "weights) or glm.lora.discard(model) (drop them) before applying new ones")
    family = family or model.config.family
    names = naming(family)
    if not names.accepts(model.config):
        raise InputError(f"a {model.config.family} model cannot take adapters named for {family}: the two "
                         f"compute different projections; leave family unset to use the model's own names")
    targets = resolve_targets(cfg, names)
    layers = tuple(range(model.config.num_layers)) if cfg.layers is None else tuple(sorted(set(cfg.layers)))
    if layers[-1] >= model.config.num_layers:
        raise InputError(f"LoRA layers {list(layers)} include {layers[-1]}, but the model has "
                         f"{model.config.num_layers} layers (0..{model.config.num_layers - 1})")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    model._lora_trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for p in model.parameters():
        p.requires_grad_(False)
    for i in layers:
        for t in targets:
            path = f"layers.{i}.{t.module}"
            mod = model.get_submodule(path)
            if not isinstance(mod, ADAPTED):
                parent, child = path.rsplit(".", 1)
                mod = QuantLoraLinear(mod) if isinstance(mod, QuantLinear) else LoraLinear(mod)
                setattr(model.get_submodule(parent), child, mod)
            start, stop = rows(model.config, mod, t.part)
            # A seeded init draws on the CPU (a CPU generator), then moves to the weight's device.
            w = mod.adapter_like()
            like = torch.empty(0, dtype=w.dtype, device="cpu" if gen is not None and not w.is_meta else w.device)
            a = LoraAdapter(mod.in_features, start, stop, cfg.r, cfg.scaling, cfg.dropout, like, gen)
            mod.lora[t.name] = a.to(w.device)
    # Recorded resolved: the targets listed (MLP ones included), so equal adapters have equal configs.
    model.lora_config = replace(cfg, targets=tuple(t.name for t in targets), mlp=False,
                                layers=None if cfg.layers is None else layers)
    model.lora_family = family
    return model


def _require(model: GLM, what: str) -> list["LoraLinear | QuantLoraLinear"]:
    mods = [m for _, m in lora_modules(model)]
    if not mods:
        raise InputError(f"{what}: the model has no LoRA adapters (glm.lora.apply or "
                         f"glm.formats.peft.load_adapter adds them)")
    return mods


def merge(model: GLM) -> GLM:
    """Fold every adapter's ``scaling · B A`` into its base weight rows; the forward then runs no adapter.
    A no-op on a merged model."""
    mods = _require(model, "merge")
    for m in mods:
        if isinstance(m, QuantLoraLinear):
            m._fold(+1)  # refuses, before any float projection is changed
    for m in mods:
        if not m.merged:
            m._fold(+1)
            m.merged = True
    return model


def unmerge(model: GLM) -> GLM:
    """Undo `merge` (the base weights come back within fp32 rounding); a no-op on an unmerged model."""
    for m in _require(model, "unmerge"):
        if m.merged:
            m._fold(-1)
            m.merged = False
    return model


def is_merged(model: GLM) -> bool:
    """Whether the model's adapters are folded into its weights (False without adapters)."""
    mods = [m for _, m in lora_modules(model)]
    return bool(mods) and all(m.merged for m in mods)


def _strip(model: GLM) -> GLM:
    for name, mod in list(lora_modules(model)):
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, mod.plain())
    trainable = getattr(model, "_lora_trainable", None)
    for n, p in model.named_parameters():
        p.requires_grad_(trainable is None or n in trainable)
    model.lora_config = model.lora_family = model._lora_trainable = None
    return model


def remove(model: GLM) -> GLM:
    """Merge the adapters and drop them: a plain GLM computing the adapted function, which saves in any format
    glm writes. The parameters that were trainable before `apply` are trainable again."""
    merge(model)
    return _strip(model)


def discard(model: GLM) -> GLM:
    """Drop the adapters without keeping what they learned (unmerged first where merged): the base model."""
    unmerge(model)
    return _strip(model)


def lora_parameters(model: GLM) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every adapter matrix, A and B, in module order."""
    return [(f"{name}.lora.{n}", p) for name, mod in lora_modules(model) for n, p in mod.lora.named_parameters()]


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter that requires a gradient: after `apply`, the adapters only."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


__all__ = ["LoraConfig", "Target", "Naming", "NAMINGS", "register_naming", "naming", "apply", "merge", "unmerge",
           "is_merged", "remove", "discard", "lora_parameters", "trainable_parameters", "has_lora", "adapter",
           "applied_targets", "lora_modules", "LoraLinear", "QuantLoraLinear", "LoraAdapter", "check_trainable",
           "resolve_targets", "rows"]
