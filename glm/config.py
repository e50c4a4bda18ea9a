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


class ConfigError(ValueError):
    """A config.json or a GLMConfig that `glm` cannot use; the message says what to change."""


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
    # Round RoPE inverse frequencies through this dtype ("float16" / "bfloat16"), as the references
    # do: ChatGLM-6B always stores them in fp16; transformers' Glm/Glm4 cast the buffer to the
    # checkpoint's dtype when loading it (bf16 for the releases), and upcasting later keeps the rounding.
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
        self.eos_token_ids = tuple(int(t) for t in self.eos_token_ids)
        self.validate()

    # ----------------------------------------------------------------------------------------
    def validate(self) -> None:
        def bad(fld: str, why: str) -> ConfigError:
            return ConfigError(f"GLMConfig.{fld}: {why}")

        if self.family not in FAMILIES:
            raise bad("family", f"unknown family {self.family!r}; supported: {', '.join(FAMILIES)}")
        for fld in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                    "head_dim", "ffn_hidden_size", "max_positions"):
            v = getattr(self, fld)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise bad(fld, f"must be a positive integer, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise bad("num_kv_heads", f"{self.num_kv_heads} must divide num_heads={self.num_heads}")
        if self.position_encoding not in POSITION_ENCODINGS:
            raise bad("position_encoding", f"{self.position_encoding!r} is not one of {POSITION_ENCODINGS}")
        if self.norm not in NORMS:
            raise bad("norm", f"{self.norm!r} is not one of {NORMS}")
        if self.mlp not in MLPS:
            raise bad("mlp", f"{self.mlp!r} is not one of {MLPS}")
        if self.position_encoding == "rope_2d" and self.head_dim % 4:
            raise bad("head_dim", f"2D RoPE needs head_dim divisible by 4, got {self.head_dim}")
        if self.position_encoding == "rope":
            if not 0.0 < self.rotary_fraction <= 1.0:
                raise bad("rotary_fraction", f"must be in (0, 1], got {self.rotary_fraction}")
            if self.rotary_dim % 2:
                raise bad("rotary_fraction", f"rotates {self.rotary_dim} dims of head_dim "
                          f"{self.head_dim}; that must be an even number")
        if self.rope_inv_freq_dtype not in (None, "float16", "bfloat16"):
            raise bad("rope_inv_freq_dtype", f"{self.rope_inv_freq_dtype!r} is not None, 'float16' or 'bfloat16'")
        if not self.norm_eps > 0:
            raise bad("norm_eps", f"must be positive, got {self.norm_eps}")
        if not self.rope_base > 1:
            raise bad("rope_base", f"must be > 1, got {self.rope_base}")

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
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "GLMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown GLMConfig fields {unknown}; known fields: {sorted(known)}")
        try:
            return cls(**d)
        except TypeError as e:  # missing required fields
            raise ConfigError(f"{source}: {e}") from None

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, config: "str | os.PathLike[str] | dict[str, Any]") -> "GLMConfig":
        """Read a release's config.json (a path to the file or its folder, or the parsed dict)."""
        source = "config"
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
            return _FROM_HF[family](config)
        except KeyError as e:
            raise ConfigError(f"{source}: field {e.args[0]!r} is required for family {family!r} "
                              f"({FAMILIES[family]}); add it to config.json") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise ConfigError(f"{source}: {e}") from None
            raise ConfigError(f"{source}: a field has the wrong type for family {family!r}: {e}") from None


def read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; a checkpoint folder needs its config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); restore the file from the release") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None


def detect_family(hf: dict[str, Any], source: str = "config") -> str:
    """Recognise which release format a config.json belongs to, from its keys and names."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    archs = archs if isinstance(archs, list) else []
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
        if hf.get("padded_vocab_size", 0) >= 150000 or hf.get("layernorm_epsilon", 1e-5) < 1e-6:
            return "glm4-chatglm"
        return "chatglm3"
    raise ConfigError(
        f"{source}: cannot tell which GLM family this is (model_type={model_type!r}, "
        f"architectures={archs}); supported: original GLM (model_type 'glm', num_layers), "
        f"ChatGLM-6B/2/3 and GLM-4 chatglm format (model_type 'chatglm'), transformers Glm "
        f"(model_type 'glm', num_hidden_layers) and Glm4 (model_type 'glm4')")


def _eos_list(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    return tuple(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]))


def _from_hf_glm(hf: dict[str, Any]) -> GLMConfig:
    H, n = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    if hf.get("block_position_encoding", True) is not True:
        raise ConfigError("block_position_encoding=false (1D learned positions) is not supported; "
                          "every GLM release uses block positions")
    if hf.get("relative_encoding", False):
        raise ConfigError("relative_encoding=true (Transformer-XL positions) is not supported")
    return GLMConfig(
        family="glm", vocab_size=int(hf["vocab_size"]), hidden_size=H, num_layers=int(hf["num_layers"]),
        num_heads=n, num_kv_heads=n, head_dim=H // n, ffn_hidden_size=4 * H,
        # The position tables have max_sequence_length + 1 rows.
        max_positions=int(hf["max_sequence_length"]) + 1, position_encoding="learned_2d",
        norm="layernorm", norm_eps=1e-5,  # GLMStack's default; the config has no eps field
        mlp="gelu", qkv_bias=True, out_bias=True, mlp_bias=True, tie_word_embeddings=True,
        name=str(hf.get("_name_or_path", "")),
    )


def _from_hf_chatglm(hf: dict[str, Any]) -> GLMConfig:
    H, n = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    if hf.get("position_encoding_2d", True) is not True:
        raise ConfigError("position_encoding_2d=false is not supported; ChatGLM-6B uses 2D RoPE")
    specials = {k: int(hf[f"{k}_token_id"]) for k in ("mask", "gmask", "bos", "eos", "pad")
                if hf.get(f"{k}_token_id") is not None}
    names = {"mask": "[MASK]", "gmask": "[gMASK]", "bos": "<sop>", "eos": "<eop>"}
    special_tokens = {names[k]: v for k, v in specials.items() if k in names}
    return GLMConfig(
        family="chatglm", vocab_size=int(hf["vocab_size"]), hidden_size=H, num_layers=int(hf["num_layers"]),
        num_heads=n, num_kv_heads=n, head_dim=H // n,
        ffn_hidden_size=int(hf.get("inner_hidden_size") or 4 * H),
        max_positions=int(hf.get("max_sequence_length", 2048)), position_encoding="rope_2d",
        rope_inv_freq_dtype="float16", norm="layernorm", norm_eps=float(hf.get("layernorm_epsilon", 1e-5)),
        mlp="gelu_tanh", residual_alpha=CHATGLM6B_RESIDUAL_ALPHA, qkv_bias=True, out_bias=True,
        mlp_bias=True, tie_word_embeddings=True, pad_token_id=specials.get("pad"),
        bos_token_id=specials.get("bos"), eos_token_ids=_eos_list(specials.get("eos")),
        special_tokens=special_tokens, name=str(hf.get("_name_or_path", "")),
    )


def _from_hf_chatglm2(hf: dict[str, Any], family: str) -> GLMConfig:
    H, n = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    mqa = bool(hf.get("multi_query_attention", False))
    if not hf.get("rmsnorm", True):
        raise ConfigError("rmsnorm=false is not supported; every chatglm2-format release uses RMSNorm")
    if hf.get("apply_residual_connection_post_layernorm", False):
        raise ConfigError("apply_residual_connection_post_layernorm=true is not supported")
    if not hf.get("post_layer_norm", True):
        raise ConfigError("post_layer_norm=false (no final norm) is not supported")
    if not hf.get("original_rope", True):
        raise ConfigError("original_rope=false is not supported")
    rope_ratio = float(hf.get("rope_ratio", 1.0))
    vocab = int(hf.get("padded_vocab_size") or hf["vocab_size"])
    return GLMConfig(
        family=family, vocab_size=vocab, hidden_size=H, num_layers=int(hf["num_layers"]), num_heads=n,
        num_kv_heads=int(hf["multi_query_group_num"]) if mqa else n,
        head_dim=int(hf.get("kv_channels") or H // n), ffn_hidden_size=int(hf["ffn_hidden_size"]),
        max_positions=int(hf["seq_length"]), position_encoding="rope", rotary_fraction=0.5,
        # GLM-4's rope_ratio scales the base, not the positions.
        rope_base=10000.0 * rope_ratio, norm="rmsnorm", norm_eps=float(hf.get("layernorm_epsilon", 1e-5)),
        mlp="swiglu", qkv_bias=bool(hf.get("add_qkv_bias", False)),
        out_bias=bool(hf.get("add_bias_linear", False)), mlp_bias=bool(hf.get("add_bias_linear", False)),
        tie_word_embeddings=False, pad_token_id=hf.get("pad_token_id"),
        eos_token_ids=_eos_list(hf.get("eos_token_id")), name=str(hf.get("_name_or_path", "")),
    )


def _rope_params(hf: dict[str, Any]) -> tuple[float, float]:
    # transformers >= 5 nests these in rope_parameters; older configs keep them at the top level.
    rp = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type not in ("default", None):
        raise ConfigError(f"rope_parameters.rope_type={rope_type!r} is not supported; only 'default'")
    theta = float(rp.get("rope_theta", hf.get("rope_theta", 10000.0)))
    frac = float(rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5)))
    return theta, frac


def _from_hf_glm_native(hf: dict[str, Any], family: str) -> GLMConfig:
    H, n = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    theta, frac = _rope_params(hf)
    stored = hf.get("dtype", hf.get("torch_dtype"))
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act={act!r} is not supported for {family}; the releases use 'silu'")
    return GLMConfig(
        family=family, vocab_size=int(hf["vocab_size"]), hidden_size=H,
        num_layers=int(hf["num_hidden_layers"]), num_heads=n,
        num_kv_heads=int(hf.get("num_key_value_heads") or n), head_dim=int(hf.get("head_dim") or H // n),
        ffn_hidden_size=int(hf["intermediate_size"]), max_positions=int(hf["max_position_embeddings"]),
        position_encoding="rope", rotary_fraction=frac, rope_base=theta,
        rope_inv_freq_dtype=stored if stored in ("float16", "bfloat16") else None, norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1.5625e-07)), mlp="swiglu",
        sandwich_norm=(family == "glm4-hf"), qkv_bias=bool(hf.get("attention_bias", True)),
        out_bias=False, mlp_bias=False, tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        pad_token_id=hf.get("pad_token_id"), bos_token_id=hf.get("bos_token_id"),
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
