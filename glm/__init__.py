"""glm: one clean PyTorch model for the GLM family (GLM, ChatGLM-6B/2/3, GLM-4, Glm, Glm4)."""
from .attention import BACKENDS, attention
from .checkpoint import CheckpointError, CheckpointReader, from_pretrained
from .config import FAMILIES, PRESETS, ConfigError, GLMConfig, preset
from .generate import generate, infill, stream
from .kv_cache import KVCache
from .model import GLM, InputError, lm_loss
from . import kernels  # noqa: E402,F401  registers the 'fused' attention backend when the kernels are built

__version__ = "0.1.0"
__all__ = ["GLM", "GLMConfig", "KVCache", "from_pretrained", "preset", "PRESETS", "FAMILIES", "attention",
           "BACKENDS", "lm_loss", "generate", "infill", "stream", "ConfigError", "CheckpointError", "CheckpointReader", "InputError"]
