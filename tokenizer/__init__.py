"""Tokenizers and chat formats of each GLM release.

    from glm.tokenizer import load, train
    tok = load("path/to/checkpoint")          # family from tokenizer_config.json and the file names
    ids = tok.chat_ids("你好")                 # the release's chat prompt, ready for generation

Families (GLM_SPEC §5): ``glm`` (original GLM, cog-pretrain.model), ``chatglm`` (ChatGLM-6B,
ice_text.model), ``chatglm2`` / ``chatglm3`` (tokenizer.model, SentencePiece), ``glm4`` (tokenizer.model,
tiktoken rank file; needs ``pip install tiktoken``). The model family names of glm.formats (glm4-chatglm,
glm-hf, glm4-hf) are accepted wherever a family is, and mean their release's tokenizer family (``glm4``).
Folders with transformers' files are read through the ``tokenizers`` library: a GLM-4 ``tokenizer.json``
(glm-4-9b-chat-hf, GLM-4-0414; family ``glm4``) and original GLM's English vocabularies (family ``glm``):
GPT-2 BPE vocab.json + merges.txt (glm-10b, glm-2b), RoBERTa BPE (glm-roberta-large), BERT WordPiece
vocab.txt (glm-large, glm-515m). See docs/tokenizers.md.
"""
from .base import (
    FAMILIES,
    FAMILY_NAMES,
    MODEL_TYPES,
    ModelType,
    Tokenizer,
    TokenizerError,
    canonical_family,
    model_family_aliases,
)
from .glm4 import GLM4Tokenizer
from .glm_english import GLMBertTokenizer, GLMGPT2Tokenizer, GLMRobertaTokenizer
from .hf_json import TokenizerJSONTokenizer
from .load import detect_family, load
from .sentencepiece_families import ChatGLM2Tokenizer, ChatGLM3Tokenizer, ChatGLM6BTokenizer, GLMTokenizer
from .train import train

__all__ = ["FAMILIES", "FAMILY_NAMES", "MODEL_TYPES", "ModelType", "model_family_aliases", "canonical_family",
           "Tokenizer", "TokenizerError", "load", "train", "detect_family", "GLMTokenizer", "ChatGLM6BTokenizer",
           "ChatGLM2Tokenizer", "ChatGLM3Tokenizer", "GLM4Tokenizer", "TokenizerJSONTokenizer", "GLMGPT2Tokenizer",
           "GLMRobertaTokenizer", "GLMBertTokenizer"]
