"""One config dataclass for every GLM family.

A family is a checkpoint format plus the architecture it implies. Everything the model does
differently per family is a field here; `glm/model.py` never branches on the family name. The
families themselves are registered by their release formats (glm.formats), which also read a
release's config.json for `GLMConfig.from_hf`; the released shapes are in glm.presets.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, get_args

from .errors import ConfigError
from .files import read_json

# family -> what it is, filled by glm.formats as each release format registers (`register_family`).
FAMILIES: dict[str, str] = {}

PositionEncoding = Literal["learned_2d", "rope_2d", "rope"]
Norm = Literal["layernorm", "rmsnorm"]
MLP = Literal["gelu", "gelu_tanh", "swiglu", "geglu"]
RoundingDtype = Literal["float16", "bfloat16"]
POSITION_ENCODINGS: tuple[str, ...] = get_args(PositionEncoding)
NORMS: tuple[str, ...] = get_args(Norm)
MLPS: tuple[str, ...] = get_args(MLP)
ROUNDING_DTYPES: tuple[str, ...] = get_args(RoundingDtype)

# Reads a parsed release config.json (and the file's name, for errors) into a GLMConfig: glm.formats
# registers its reader, which recognises the release format and reads its fields.
_hf_reader: Optional[Callable[[dict[str, Any], str], "GLMConfig"]] = None


def register_family(family: str, description: str) -> None:
    """Make ``family`` a valid `GLMConfig.family` (a release format calls this as it registers)."""
    FAMILIES[family] = description


def register_hf_reader(reader: Callable[[dict[str, Any], str], "GLMConfig"]) -> None:
    """Set the function `GLMConfig.from_hf` hands a parsed config.json to (glm.formats sets it)."""
    global _hf_reader
    _hf_reader = reader


@dataclass
class GLMConfig:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    # Number of distinct position ids: ids must lie in [0, max_positions).
    max_positions: int
    position_encoding: PositionEncoding = "rope"
    # Share of each head's dims that RoPE rotates (the rest pass through); 1D "rope" only.
    rotary_fraction: float = 0.5
    rope_base: float = 10000.0
    # Positions are divided by this before the angles are formed (positional interpolation):
    # ChatGLM2-6B-32k's rope_ratio. ChatGLM3 and GLM-4 read the same config key as a base multiplier.
    rope_position_scale: float = 1.0
    # Round RoPE inverse frequencies through this dtype ("float16" / "bfloat16"), as the reference
    # model held in memory had them. ChatGLM-6B always stores them in fp16. For transformers' Glm/Glm4
    # it depends on how the model was made: from_pretrained keeps the buffer fp32 (exact), while a
    # model cast with .to(bfloat16) rounds it and a later .float() keeps the rounding. The golden
    # fixtures were made the second way, so a bf16 Glm/Glm4 checkpoint loads rounded (matching them);
    # pass rope_inv_freq_dtype=None to from_pretrained to match a fresh transformers from_pretrained.
    rope_inv_freq_dtype: Optional[RoundingDtype] = None
    norm: Norm = "rmsnorm"
    norm_eps: float = 1e-5
    mlp: MLP = "swiglu"
    # If set, each sub-block's residual is alpha * normed input instead of the raw stream (ChatGLM-6B).
    residual_alpha: Optional[float] = None
    # Extra RMSNorms on the attention and MLP outputs before the residual add (Glm4).
    sandwich_norm: bool = False
    qkv_bias: bool = True
    out_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()
    # Named special tokens of the release ([MASK], [gMASK], sop, eop, ...), name -> id.
    special_tokens: dict[str, int] = field(default_factory=dict)
    # Free-form provenance (e.g. the HF config's _name_or_path); not used by the model.
    name: str = ""

    def __post_init__(self) -> None:
        eos = self.eos_token_ids
        if not isinstance(eos, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in eos):
            raise ConfigError(f"GLMConfig.eos_token_ids: must be a list of integer token ids, got {eos!r}")
        self.eos_token_ids = tuple(int(t) for t in eos)
        self.validate()

    # ----------------------------------------------------------------------------------------
    def validate(self) -> None:
        def bad(fld: str, why: str) -> ConfigError:
            return ConfigError(f"GLMConfig.{fld}: {why}")

        if not isinstance(self.family, str) or self.family not in FAMILIES:
            raise bad("family", f"unknown family {self.family!r}; supported: {', '.join(FAMILIES)}")
        for fld in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                    "head_dim", "ffn_hidden_size", "max_positions"):
            v = getattr(self, fld)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise bad(fld, f"must be a positive integer, got {v!r}")
        # residual_alpha is checked whenever it is set: 0 (or false) would silently zero every residual.
        numbers = ("rotary_fraction", "rope_base", "rope_position_scale", "norm_eps") + \
            (("residual_alpha",) if self.residual_alpha is not None else ())
        for fld in numbers:
            v = getattr(self, fld)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise bad(fld, f"must be a finite number, got {v!r}")
        for fld in ("sandwich_norm", "qkv_bias", "out_bias", "mlp_bias", "tie_word_embeddings"):
            if not isinstance(getattr(self, fld), bool):
                raise bad(fld, f"must be true or false, got {getattr(self, fld)!r}")
        for fld in ("pad_token_id", "bos_token_id"):
            v = getattr(self, fld)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise bad(fld, f"must be an integer token id or null, got {v!r}")
        if not isinstance(self.special_tokens, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                for k, v in self.special_tokens.items()):
            raise bad("special_tokens", f"must map token strings to integer ids, got {self.special_tokens!r}")
        if not isinstance(self.name, str):
            raise bad("name", f"must be a string, got {self.name!r}")
        if self.num_heads % self.num_kv_heads:
            raise bad("num_kv_heads", f"{self.num_kv_heads} must divide num_heads={self.num_heads}")
        if not isinstance(self.position_encoding, str) or self.position_encoding not in POSITION_ENCODINGS:
            raise bad("position_encoding", f"{self.position_encoding!r} is not one of {POSITION_ENCODINGS}")
        if not isinstance(self.norm, str) or self.norm not in NORMS:
            raise bad("norm", f"{self.norm!r} is not one of {NORMS}")
        if not isinstance(self.mlp, str) or self.mlp not in MLPS:
            raise bad("mlp", f"{self.mlp!r} is not one of {MLPS}")
        if self.position_encoding == "rope_2d" and self.head_dim % 4:
            raise bad("head_dim", f"2D RoPE needs head_dim divisible by 4, got {self.head_dim}")
        if self.position_encoding == "rope":
            if not 0.0 < self.rotary_fraction <= 1.0:
                raise bad("rotary_fraction", f"must be in (0, 1], got {self.rotary_fraction}")
            if self.rotary_dim % 2 or self.rotary_dim == 0:
                raise bad("rotary_fraction", f"rotates {self.rotary_dim} dims of head_dim "
                          f"{self.head_dim}; that must be an even number of at least 2")
        if not (self.rope_inv_freq_dtype is None or isinstance(self.rope_inv_freq_dtype, str)) or \
                self.rope_inv_freq_dtype not in (None, *ROUNDING_DTYPES):
            raise bad("rope_inv_freq_dtype", f"{self.rope_inv_freq_dtype!r} is not None, 'float16' or 'bfloat16'")
        if not self.norm_eps > 0:
            raise bad("norm_eps", f"must be positive, got {self.norm_eps}")
        if not self.rope_base > 1:
            raise bad("rope_base", f"must be > 1, got {self.rope_base}")
        if not self.rope_position_scale > 0:
            raise bad("rope_position_scale", f"must be positive, got {self.rope_position_scale}")
        if self.residual_alpha is not None and not self.residual_alpha > 0:
            raise bad("residual_alpha", f"must be positive or null, got {self.residual_alpha}")

    # ----------------------------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        """Dims of a head that RoPE rotates (both halves together for 2D RoPE)."""
        if self.position_encoding == "rope_2d":
            return self.head_dim
        if self.position_encoding == "rope":
            return int(self.head_dim * self.rotary_fraction)
        return 0

    @property
    def position_streams(self) -> int:
        """1 for plain positions ([B, T]); 2 for (position, block position) ([B, 2, T])."""
        return 2 if self.position_encoding in ("learned_2d", "rope_2d") else 1

    @property
    def glu(self) -> bool:
        return self.mlp in ("swiglu", "geglu")

    @property
    def num_parameters(self) -> int:
        H, d = self.hidden_size, self.head_dim
        qkv = H * (self.num_heads + 2 * self.num_kv_heads) * d
        qkv += (self.num_heads + 2 * self.num_kv_heads) * d if self.qkv_bias else 0
        out = self.num_heads * d * H + (H if self.out_bias else 0)
        f_in = self.ffn_hidden_size * (2 if self.glu else 1)
        mlp = H * f_in + self.ffn_hidden_size * H + ((f_in + H) if self.mlp_bias else 0)
        norm_p = H * (2 if self.norm == "layernorm" else 1)
        norms = norm_p * (4 if self.sandwich_norm else 2)
        per_layer = qkv + out + mlp + norms
        emb = self.vocab_size * H
        pos = 2 * self.max_positions * H if self.position_encoding == "learned_2d" else 0
        head = 0 if self.tie_word_embeddings else self.vocab_size * H
        return emb + pos + self.num_layers * per_layer + norm_p + head

    def replace(self, **changes: Any) -> "GLMConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        if d["rope_position_scale"] == 1.0:
            # Left out at its default, so folders without it stay readable by glm versions before it.
            del d["rope_position_scale"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "GLMConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object of GLMConfig fields, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown GLMConfig fields {unknown}; known fields: {sorted(known)}")
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except (TypeError, ValueError, ArithmeticError) as e:  # missing required fields, odd types
            raise ConfigError(f"{source}: {e}; fix that field of the config") from None

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, config: "str | os.PathLike[str] | dict[str, Any]", source: str = "config") -> "GLMConfig":
        """Read a release's config.json (a path to the file or its folder, or the parsed dict;
        ``source`` names a dict's file in error messages), in whichever registered format it is."""
        if not isinstance(config, dict):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            source = path
            config = read_json(path)
        if not isinstance(config, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(config).__name__}")
        if _hf_reader is None:
            raise ConfigError("no release formats are registered; import glm (or glm.formats) first")
        return _hf_reader(config, source)
