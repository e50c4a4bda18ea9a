"""One config dataclass for every GLM family, the released shapes as presets, and `from_hf`.

A family is a checkpoint format plus the architecture it implies. Everything the model does
differently per family is a field here; `glm/model.py` never branches on the family name.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import ConfigError
from .files import FileKindError, read_bounded

# family -> what it is. The first four are THUDM remote-code formats, the last two transformers'.
FAMILIES: dict[str, str] = {
    "glm": "original GLM (glm-large-chinese, glm-10b, glm-10b-chinese): learned 2D positions",
    "chatglm": "ChatGLM-6B: 2D RoPE, GeLU-tanh, alpha-scaled residual",
    "chatglm2": "ChatGLM2-6B: MQA, RMSNorm, SwiGLU, partial interleaved RoPE",
    "chatglm3": "ChatGLM3-6B: the ChatGLM2 architecture",
    "glm4-chatglm": "GLM-4-9B in the chatglm format: ChatGLM3 with rope_ratio",
    "glm-hf": "transformers GlmForCausalLM (glm-4-9b-chat-hf)",
    "glm4-hf": "transformers Glm4ForCausalLM (GLM-4-9B-0414): sandwich RMSNorms",
}

POSITION_ENCODINGS = ("learned_2d", "rope_2d", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "gelu_tanh", "swiglu", "geglu")

# ChatGLM-6B's GLMBlock defaults num_layers=28 and ChatGLMModel never passes it, so the residual
# scale is sqrt(2*28) for every config, including 2-layer ones.
CHATGLM6B_RESIDUAL_ALPHA = math.sqrt(2 * 28)


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
    position_encoding: str = "rope"
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
    rope_inv_freq_dtype: Optional[str] = None
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    mlp: str = "swiglu"
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
                self.rope_inv_freq_dtype not in (None, "float16", "bfloat16"):
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
        ``source`` names a dict's file in error messages)."""
        if not isinstance(config, dict):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            source = path
            config = read_json(path)
        if not isinstance(config, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(config).__name__}")
        family = detect_family(config, source)
        try:
            _check_flags(config)
            return _FROM_HF[family](config)
        except KeyError as e:
            raise ConfigError(f"{source}: field {e.args[0]!r} is required for family {family!r} "
                              f"({FAMILIES[family]}); add it to config.json") from None
        except (TypeError, ValueError, ArithmeticError) as e:
            if isinstance(e, ConfigError):
                raise ConfigError(f"{source}: {e}") from None
            raise ConfigError(f"{source}: a field has the wrong type or value for family {family!r}: {e}; "
                              f"fix it in config.json") from None


def read_json(path: str) -> Any:
    """A JSON file a user hands to glm (config.json and its kin): a regular file of bounded size, so a
    FIFO, a device or a link to /dev/zero is refused instead of blocking or filling memory."""
    try:
        data = read_bounded(path, what=os.path.basename(path) or "JSON file")
        return json.loads(data.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; a checkpoint folder needs its config.json") from None
    except FileKindError as e:
        raise ConfigError(str(e)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); restore the file from the release") from None
    except (RecursionError, ValueError) as e:
        # json raises a plain ValueError for an integer of more than 4300 digits.
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0]
        raise ConfigError(f"{path}: not usable JSON ({why}); restore the file from the release") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None


# The glm_format_version values this glm reads; glm's writer stores the last one.
GLM_FORMAT_VERSIONS = (1,)


def check_glm_format_version(value: Any, source: str) -> int:
    """``value`` (a glm-format config.json's ``glm_format_version``) when this glm reads that version;
    ConfigError naming ``source`` otherwise, since a later layout read as this one would load wrong."""
    if isinstance(value, bool) or not isinstance(value, int) or value not in GLM_FORMAT_VERSIONS:
        raise ConfigError(f"{source}: glm_format_version is {value!r}, but this glm reads only version(s) "
                          f"{', '.join(map(str, GLM_FORMAT_VERSIONS))}; open the folder with the glm that wrote "
                          f"it, or convert the release again with this one")
    return value


def detect_family(hf: dict[str, Any], source: str = "config") -> str:
    """Recognise which release format a config.json belongs to, from its keys and names."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    archs = [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
    name = str(hf.get("_name_or_path", "")).lower()
    if model_type == "glm4":
        return "glm4-hf"
    if model_type == "glm":
        # transformers' Glm and THUDM's original GLM both say "glm"; their schemas differ.
        if "num_hidden_layers" in hf or any(a.startswith("Glm") for a in archs):
            return "glm-hf"
        if "num_layers" in hf or any(a.startswith("GLM") for a in archs):
            return "glm"
    if model_type == "chatglm":
        if "padded_vocab_size" not in hf and ("position_encoding_2d" in hf or "inner_hidden_size" in hf):
            return "chatglm"
        if "glm-4" in name or "glm4" in name:
            return "glm4-chatglm"
        if "chatglm2" in name:
            return "chatglm2"
        if "chatglm3" in name:
            return "chatglm3"
        # Unnamed chatglm-format config: GLM-4 is the one with a 151k vocab / 1.5625e-7 eps.
        vocab, eps = hf.get("padded_vocab_size", 0), hf.get("layernorm_epsilon", 1e-5)
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        if (number(vocab) and vocab >= 150000) or (number(eps) and eps < 1e-6):
            return "glm4-chatglm"
        return "chatglm3"
    raise ConfigError(
        f"{source}: cannot tell which GLM family this is (model_type={model_type!r}, "
        f"architectures={archs}); supported: original GLM (model_type 'glm', num_layers), "
        f"ChatGLM-6B/2/3 and GLM-4 chatglm format (model_type 'chatglm'), transformers Glm "
        f"(model_type 'glm', num_hidden_layers) and Glm4 (model_type 'glm4')")


def _as_int(key: str, v: Any, positive: bool = False) -> int:
    """A config.json integer field, checked: the error names the field (the caller adds the file)."""
    if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
        raise ConfigError(f"field {key!r} must be an integer, got {v!r}; fix it in config.json")
    if positive and v <= 0:
        raise ConfigError(f"field {key!r} must be a positive integer, got {v!r}; fix it in config.json")
    return int(v)


def _as_float(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"field {key!r} must be a finite number, got {v!r}; fix it in config.json")
    return float(v)


def _eos_list(v: Any, key: str = "eos_token_id") -> tuple[int, ...]:
    if v is None:
        return ()
    return tuple(_as_int(key, x) for x in (v if isinstance(v, (list, tuple)) else [v]))


def _optional_id(hf: dict[str, Any], key: str) -> Optional[int]:
    v = hf.get(key)
    return None if v is None else _as_int(key, v)


def _int_field(hf: dict[str, Any], key: str, default: Any = KeyError, positive: bool = False) -> int:
    """``hf[key]`` (a missing required key raises KeyError, which from_hf names) as a checked integer."""
    return _as_int(key, hf[key] if default is KeyError else hf.get(key, default), positive)


def _size_field(hf: dict[str, Any], key: str, default: int) -> int:
    """An optional size (head count, width): absent or null takes ``default``, as the reference config
    class does; any value given must be a positive integer, since 0 is no size at all."""
    v = hf.get(key)
    return default if v is None else _as_int(key, v, positive=True)


def _as_bool(key: str, v: Any) -> bool:
    # Python reads the string "false" as true, so a quoted flag would silently flip; the releases
    # write JSON true/false.
    if not isinstance(v, bool):
        raise ConfigError(f"field {key!r} must be true or false, got {v!r}; fix it in config.json")
    return v


def _bool_field(hf: dict[str, Any], key: str, default: bool) -> bool:
    return _as_bool(key, hf.get(key, default))


# On/off flags of the release config.json schemas. glm reads some and ignores the rest, but a flag
# that is not true/false means the file is damaged or hand-edited wrongly, so every present one is checked.
_RELEASE_FLAGS = ("use_cache", "tie_word_embeddings", "block_position_encoding", "relative_encoding",
                  "checkpoint_activations", "parallel_output", "output_predict", "position_encoding_2d",
                  "rmsnorm", "apply_residual_connection_post_layernorm", "post_layer_norm", "add_bias_linear",
                  "add_qkv_bias", "bias_dropout_fusion", "multi_query_attention", "apply_query_key_layer_scaling",
                  "attention_softmax_in_fp32", "fp32_residual_connection", "original_rope", "attention_bias")


def _check_flags(hf: dict[str, Any]) -> None:
    for key in _RELEASE_FLAGS:
        if key in hf:
            _as_bool(key, hf[key])


def _head_dim(H: int, n: int) -> int:
    """hidden_size / num_attention_heads where a release derives the head width from them."""
    if H % n:
        raise ConfigError(f"field 'hidden_size' ({H}) must be a multiple of 'num_attention_heads' ({n}): the "
                          f"release splits the hidden size evenly among the heads; fix it in config.json")
    return H // n


def _kv_groups(hf: dict[str, Any], key: str, n: int, default: Optional[int] = None) -> int:
    """The key/value head count ``key`` (required where ``default`` is None), checked against ``n`` heads."""
    g = _int_field(hf, key, positive=True) if default is None else _size_field(hf, key, default)
    if n % g:
        raise ConfigError(f"field {key!r} ({g}) must divide 'num_attention_heads' ({n}): each key/value head "
                          f"serves an equal share of the query heads; fix it in config.json")
    return g


def _heads(hf: dict[str, Any]) -> tuple[int, int]:
    return _int_field(hf, "hidden_size", positive=True), _int_field(hf, "num_attention_heads", positive=True)


def _from_hf_glm(hf: dict[str, Any]) -> GLMConfig:
    H, n = _heads(hf)
    if not _bool_field(hf, "block_position_encoding", True):
        raise ConfigError("block_position_encoding=false (1D learned positions) is not supported; "
                          "every GLM release uses block positions")
    if _bool_field(hf, "relative_encoding", False):
        raise ConfigError("relative_encoding=true (Transformer-XL positions) is not supported")
    return GLMConfig(
        family="glm", vocab_size=_int_field(hf, "vocab_size", positive=True), hidden_size=H,
        num_layers=_int_field(hf, "num_layers", positive=True), num_heads=n, num_kv_heads=n,
        head_dim=_head_dim(H, n), ffn_hidden_size=4 * H,
        # The position tables have max_sequence_length + 1 rows.
        max_positions=_int_field(hf, "max_sequence_length", positive=True) + 1, position_encoding="learned_2d",
        norm="layernorm", norm_eps=1e-5,  # GLMStack's default; the config has no eps field
        mlp="gelu", qkv_bias=True, out_bias=True, mlp_bias=True, tie_word_embeddings=True,
        name=str(hf.get("_name_or_path", "")),
    )


def _from_hf_chatglm(hf: dict[str, Any]) -> GLMConfig:
    H, n = _heads(hf)
    if not _bool_field(hf, "position_encoding_2d", True):
        raise ConfigError("position_encoding_2d=false is not supported; ChatGLM-6B uses 2D RoPE")
    specials = {k: _int_field(hf, f"{k}_token_id") for k in ("mask", "gmask", "bos", "eos", "pad")
                if hf.get(f"{k}_token_id") is not None}
    names = {"mask": "[MASK]", "gmask": "[gMASK]", "bos": "<sop>", "eos": "<eop>"}
    special_tokens = {names[k]: v for k, v in specials.items() if k in names}
    return GLMConfig(
        family="chatglm", vocab_size=_int_field(hf, "vocab_size", positive=True), hidden_size=H,
        num_layers=_int_field(hf, "num_layers", positive=True), num_heads=n, num_kv_heads=n,
        head_dim=_head_dim(H, n), ffn_hidden_size=_size_field(hf, "inner_hidden_size", 4 * H),
        max_positions=_int_field(hf, "max_sequence_length", 2048, positive=True), position_encoding="rope_2d",
        rope_inv_freq_dtype="float16", norm="layernorm",
        norm_eps=_as_float("layernorm_epsilon", hf.get("layernorm_epsilon", 1e-5)),
        mlp="gelu_tanh", residual_alpha=CHATGLM6B_RESIDUAL_ALPHA, qkv_bias=True, out_bias=True,
        mlp_bias=True, tie_word_embeddings=True, pad_token_id=specials.get("pad"),
        bos_token_id=specials.get("bos"), eos_token_ids=_eos_list(specials.get("eos")),
        special_tokens=special_tokens, name=str(hf.get("_name_or_path", "")),
    )


def _from_hf_chatglm2(hf: dict[str, Any], family: str) -> GLMConfig:
    H, n = _heads(hf)
    mqa = _bool_field(hf, "multi_query_attention", False)
    if not _bool_field(hf, "rmsnorm", True):
        raise ConfigError("rmsnorm=false is not supported; every chatglm2-format release uses RMSNorm")
    if _bool_field(hf, "apply_residual_connection_post_layernorm", False):
        raise ConfigError("apply_residual_connection_post_layernorm=true is not supported")
    if not _bool_field(hf, "post_layer_norm", True):
        raise ConfigError("post_layer_norm=false (no final norm) is not supported")
    if not _bool_field(hf, "original_rope", True):
        raise ConfigError("original_rope=false is not supported")
    rope_ratio = _as_float("rope_ratio", hf.get("rope_ratio", 1.0))
    if not rope_ratio > 0:
        raise ConfigError(f"field 'rope_ratio' must be positive, got {rope_ratio}; fix it in config.json")
    # The reference model sizes its embedding by padded_vocab_size; vocab_size stands in where it is absent.
    if hf.get("padded_vocab_size") is None:
        vocab = _int_field(hf, "vocab_size", positive=True)
    else:
        vocab = _int_field(hf, "padded_vocab_size", positive=True)
    # multi_query_group_num is read only with multi_query_attention, as the reference model does.
    kv_heads = _kv_groups(hf, "multi_query_group_num", n) if mqa else n
    kv_channels = hf.get("kv_channels")
    return GLMConfig(
        family=family, vocab_size=vocab, hidden_size=H, num_layers=_int_field(hf, "num_layers", positive=True),
        num_heads=n, num_kv_heads=kv_heads,
        head_dim=_head_dim(H, n) if kv_channels is None else _as_int("kv_channels", kv_channels, positive=True),
        ffn_hidden_size=_int_field(hf, "ffn_hidden_size", positive=True),
        max_positions=_int_field(hf, "seq_length", positive=True), position_encoding="rope", rotary_fraction=0.5,
        # One key, two meanings: ChatGLM2-6B-32k's code divides the positions by rope_ratio
        # (interpolation), ChatGLM3-32k/128k's and GLM-4's multiply the rotary base by it.
        rope_base=10000.0 if family == "chatglm2" else 10000.0 * rope_ratio,
        rope_position_scale=rope_ratio if family == "chatglm2" else 1.0, norm="rmsnorm",
        norm_eps=_as_float("layernorm_epsilon", hf.get("layernorm_epsilon", 1e-5)),
        mlp="swiglu", qkv_bias=_bool_field(hf, "add_qkv_bias", False),
        out_bias=_bool_field(hf, "add_bias_linear", False), mlp_bias=_bool_field(hf, "add_bias_linear", False),
        tie_word_embeddings=False, pad_token_id=_optional_id(hf, "pad_token_id"),
        eos_token_ids=_eos_list(hf.get("eos_token_id")), name=str(hf.get("_name_or_path", "")),
    )


def _rope_params(hf: dict[str, Any]) -> tuple[float, float]:
    # transformers >= 5 nests these in rope_parameters; older configs keep them at the top level.
    rp = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rp, dict):
        raise ConfigError(f"field 'rope_parameters' must be an object such as {{\"rope_theta\": 10000.0}}, "
                          f"got {rp!r}; fix it in config.json")
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type not in ("default", None):
        raise ConfigError(f"rope_parameters.rope_type={rope_type!r} is not supported; only 'default'")
    theta = _as_float("rope_theta", rp.get("rope_theta", hf.get("rope_theta", 10000.0)))
    frac = _as_float("partial_rotary_factor", rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5)))
    return theta, frac


def _from_hf_glm_native(hf: dict[str, Any], family: str) -> GLMConfig:
    H, n = _heads(hf)
    theta, frac = _rope_params(hf)
    stored = hf.get("dtype", hf.get("torch_dtype"))
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act={act!r} is not supported for {family}; the releases use 'silu'")
    return GLMConfig(
        family=family, vocab_size=_int_field(hf, "vocab_size", positive=True), hidden_size=H,
        num_layers=_int_field(hf, "num_hidden_layers", positive=True), num_heads=n,
        # Absent keys take transformers' GlmConfig/Glm4Config defaults (2 KV heads, head_dim 128),
        # as transformers itself would read the file.
        num_kv_heads=_kv_groups(hf, "num_key_value_heads", n, 2), head_dim=_size_field(hf, "head_dim", 128),
        ffn_hidden_size=_int_field(hf, "intermediate_size", positive=True),
        max_positions=_int_field(hf, "max_position_embeddings", positive=True),
        position_encoding="rope", rotary_fraction=frac, rope_base=theta,
        rope_inv_freq_dtype=stored if stored in ("float16", "bfloat16") else None, norm="rmsnorm",
        norm_eps=_as_float("rms_norm_eps", hf.get("rms_norm_eps", 1.5625e-07)), mlp="swiglu",
        sandwich_norm=(family == "glm4-hf"), qkv_bias=_bool_field(hf, "attention_bias", True),
        out_bias=False, mlp_bias=False, tie_word_embeddings=_bool_field(hf, "tie_word_embeddings", False),
        pad_token_id=_optional_id(hf, "pad_token_id"), bos_token_id=_optional_id(hf, "bos_token_id"),
        eos_token_ids=_eos_list(hf.get("eos_token_id")), name=str(hf.get("_name_or_path", "")),
    )


_FROM_HF = {
    "glm": _from_hf_glm,
    "chatglm": _from_hf_chatglm,
    "chatglm2": lambda hf: _from_hf_chatglm2(hf, "chatglm2"),
    "chatglm3": lambda hf: _from_hf_chatglm2(hf, "chatglm3"),
    "glm4-chatglm": lambda hf: _from_hf_chatglm2(hf, "glm4-chatglm"),
    "glm-hf": lambda hf: _from_hf_glm_native(hf, "glm-hf"),
    "glm4-hf": lambda hf: _from_hf_glm_native(hf, "glm4-hf"),
}


# ------------------------------------------------------------------------------------------------
# Presets: the released shapes (GLM_SPEC section 1), and tiny ones for tests.

_GLM_SPECIALS_ZH = {"<|endoftext|>": 50000, "[SEP]": 50001, "[CLS]": 50002, "[MASK]": 50003,
                    "<|startofpiece|>": 50006, "<|endofpiece|>": 50007, "[sMASK]": 50008, "[gMASK]": 50009}
_CHATGLM6B_SPECIALS = {"[MASK]": 130000, "[gMASK]": 130001, "[sMASK]": 130002, "<sop>": 130004,
                       "<eop>": 130005}
_CHATGLM2_SPECIALS = {"[MASK]": 64789, "[gMASK]": 64790, "[sMASK]": 64791, "sop": 64792, "eop": 64793}
_CHATGLM3_SPECIALS = {**_CHATGLM2_SPECIALS, "<|system|>": 64794, "<|user|>": 64795,
                      "<|assistant|>": 64796, "<|observation|>": 64797}
_GLM4_SPECIALS = {"<|endoftext|>": 151329, "[MASK]": 151330, "[gMASK]": 151331, "[sMASK]": 151332,
                  "<sop>": 151333, "<eop>": 151334, "<|system|>": 151335, "<|user|>": 151336,
                  "<|assistant|>": 151337, "<|observation|>": 151338}


def _glm_original(vocab: int, H: int, L: int, n: int, specials: dict[str, int]) -> GLMConfig:
    return GLMConfig(family="glm", vocab_size=vocab, hidden_size=H, num_layers=L, num_heads=n,
                     num_kv_heads=n, head_dim=H // n, ffn_hidden_size=4 * H, max_positions=1025,
                     position_encoding="learned_2d", norm="layernorm", norm_eps=1e-5, mlp="gelu",
                     qkv_bias=True, out_bias=True, mlp_bias=True, tie_word_embeddings=True,
                     pad_token_id=specials.get("<|endoftext|>"), special_tokens=dict(specials))


def _chatglm2_like(family: str, L: int, seq: int, vocab: int, eps: float, base: float,
                   specials: dict[str, int], eos: tuple[int, ...], pad: int) -> GLMConfig:
    return GLMConfig(family=family, vocab_size=vocab, hidden_size=4096, num_layers=L, num_heads=32,
                     num_kv_heads=2, head_dim=128, ffn_hidden_size=13696, max_positions=seq,
                     position_encoding="rope", rotary_fraction=0.5, rope_base=base, norm="rmsnorm",
                     norm_eps=eps, mlp="swiglu", qkv_bias=True, tie_word_embeddings=False,
                     pad_token_id=pad, eos_token_ids=eos, special_tokens=dict(specials))


def _presets() -> dict[str, GLMConfig]:
    glm4_eos = (151329, 151336, 151338)
    p = {
        "glm-large-chinese": _glm_original(50048, 1024, 24, 16, _GLM_SPECIALS_ZH),
        "glm-10b-chinese": _glm_original(50048, 4096, 48, 64, _GLM_SPECIALS_ZH),
        # glm-10b (English, GPT-2 BPE): command-token ids after 50257 are unconfirmed; eos is 50256.
        "glm-10b": _glm_original(50304, 4096, 48, 64, {"<|endoftext|>": 50256}),
        "chatglm-6b": GLMConfig(
            family="chatglm", vocab_size=130528, hidden_size=4096, num_layers=28, num_heads=32,
            num_kv_heads=32, head_dim=128, ffn_hidden_size=16384, max_positions=2048,
            position_encoding="rope_2d", rope_inv_freq_dtype="float16", norm="layernorm", norm_eps=1e-5,
            mlp="gelu_tanh", residual_alpha=CHATGLM6B_RESIDUAL_ALPHA, qkv_bias=True, out_bias=True,
            mlp_bias=True, tie_word_embeddings=True, pad_token_id=3, bos_token_id=130004,
            eos_token_ids=(130005,), special_tokens=dict(_CHATGLM6B_SPECIALS)),
        "chatglm2-6b": _chatglm2_like("chatglm2", 28, 32768, 65024, 1e-5, 10000.0,
                                      _CHATGLM2_SPECIALS, (2,), 0),
        "chatglm3-6b": _chatglm2_like("chatglm3", 28, 8192, 65024, 1e-5, 10000.0,
                                      _CHATGLM3_SPECIALS, (2, 64795, 64797), 0),
        "glm-4-9b": _chatglm2_like("glm4-chatglm", 40, 131072, 151552, 1.5625e-07, 5e6,
                                   _GLM4_SPECIALS, glm4_eos, 151329),
    }
    p["glm-4-9b-chat"] = p["glm-4-9b"].replace()
    p["glm-4-9b-chat-hf"] = p["glm-4-9b"].replace(family="glm-hf", rope_inv_freq_dtype="bfloat16")
    # GLM-4-9B-0414's rope_theta 10000, 32768 positions and eps 1e-5 are unconfirmed (GLM_SPEC §6).
    p["glm-4-9b-0414"] = p["glm-4-9b"].replace(family="glm4-hf", sandwich_norm=True, rope_base=10000.0,
                                              rope_inv_freq_dtype="bfloat16",
                                              max_positions=32768, norm_eps=1e-5)
    # Tiny presets, the shapes of ../shared/reference/*/tiny: vocab 160, hidden 64, 4 heads, 2 layers.
    tiny = dict(vocab_size=160, hidden_size=64, num_layers=2, num_heads=4, head_dim=16, max_positions=64)
    p["tiny-glm"] = p["glm-large-chinese"].replace(**{**tiny, "max_positions": 65}, num_kv_heads=4,
                                                   ffn_hidden_size=256, special_tokens={}, pad_token_id=0)
    p["tiny-chatglm"] = p["chatglm-6b"].replace(**tiny, num_kv_heads=4, ffn_hidden_size=256, special_tokens={},
                                                pad_token_id=3, bos_token_id=156, eos_token_ids=(157,))
    for fam, base in (("chatglm2", "chatglm2-6b"), ("chatglm3", "chatglm3-6b"), ("glm4-chatglm", "glm-4-9b"),
                      ("glm-hf", "glm-4-9b-chat-hf"), ("glm4-hf", "glm-4-9b-0414")):
        # Tiny models are built and trained in fp32: no release-dtype rounding of RoPE frequencies.
        p[f"tiny-{fam}"] = p[base].replace(**tiny, num_kv_heads=2, ffn_hidden_size=96, special_tokens={},
                                           pad_token_id=0, eos_token_ids=(2,), rope_inv_freq_dtype=None)
    for name, cfg in p.items():
        cfg.name = name
    return p


PRESETS: dict[str, GLMConfig] = _presets()


def preset(name: str) -> GLMConfig:
    """A copy of a named preset (see `PRESETS`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
