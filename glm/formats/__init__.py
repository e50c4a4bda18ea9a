"""Release formats: everything about one release (recognising its config.json, reading and writing it, its
weight table, its tokenizer family, its prompt convention) in one module, behind one registry.

    from glm import formats
    fmt = formats.detect(config_json_dict)      # the Format of a release's config.json
    fmt = formats.get("chatglm3")               # by family
    formats.FORMATS                             # every registered format, by family

Modules: `registry` (Format, register, get, detect), `layout` (Mapping and the tensor transforms tables are
built from), `hf_fields` (checked config.json field readers), one module per release (`glm_original`,
`chatglm6b`, `chatglm2`, `transformers_glm`), `native` (glm's own folder format) and `quantized` (quantized
checkpoints: glm's scheme record, THUDM's quantization_bit layout). docs/architecture.md, "Adding a family",
walks through adding one.
"""
# isort: off
# Release order: the order FORMATS (so glm.FAMILIES, the CLI's --family choices, the messages) lists them in.
from . import glm_original
from . import chatglm6b
from . import chatglm2
from . import transformers_glm
# isort: on
from . import native, peft, quantized
from .layout import Mapping
from .registry import (
    FORMATS,
    Format,
    config_from_hf,
    config_to_hf,
    detect,
    get,
    mappings,
    register,
    retarget,
)

__all__ = ["FORMATS", "Format", "Mapping", "register", "get", "detect", "config_from_hf", "config_to_hf",
           "mappings", "retarget", "glm_original", "chatglm6b", "chatglm2", "transformers_glm", "native", "peft",
           "quantized"]
