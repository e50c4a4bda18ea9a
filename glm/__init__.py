"""glm: one clean PyTorch model for the GLM family (GLM, ChatGLM-6B/2/3, GLM-4, Glm, Glm4)."""
from . import kernels  # noqa: E402,F401  registers the 'fused' attention backend when the kernels are built
from . import lora as lora  # glm.lora.apply / merge / remove (the explicit re-export)
from .attention import BACKENDS, attention
from .checkpoint import CheckpointError, CheckpointReader
from .config import FAMILIES, ConfigError, GLMConfig
from .errors import InputError
from .finetune import FinetuneConfig, finetune
from .formats import ptuning_checkpoint  # noqa: F401  THUDM's P-tuning files (also loads glm.ptuning)

# `glm.generate` and `glm.finetune` are the functions (the calls used everywhere); the modules' other entry
# points are exported here too, since the names no longer reach the modules: `glm.stream`,
# `glm.FinetuneConfig`, or `from glm.generate import ...`.
from .generate import (
                       SamplingConfig,
                       generate,
                       infill,
                       infill_ids,
                       left_pad,
                       release_cuda_graphs,
                       stream,
                       stream_infill,
                       stream_text,
)
from .hub import from_pretrained
from .kv_cache import KVCache
from .model import GLM, lm_loss
from .presets import PRESETS, preset
from .quant import quantize

__version__ = "0.1.0"
__all__ = ["GLM", "GLMConfig", "KVCache", "from_pretrained", "preset", "PRESETS", "FAMILIES", "attention",
           "BACKENDS", "lm_loss", "generate", "infill", "infill_ids", "stream", "stream_infill", "stream_text",
           "release_cuda_graphs", "left_pad", "SamplingConfig", "ConfigError", "CheckpointError", "CheckpointReader",
           "InputError", "finetune", "FinetuneConfig", "lora", "quantize"]
