"""Every error glm raises on purpose, under one base.

`GLMError` marks a problem with what the user handed glm (a file, a config, an argument, a run folder);
its message names the thing and the fix, and the CLI prints it as one line. Anything else that escapes
is a bug in glm and keeps its traceback. Subclasses that were ValueErrors (or a RuntimeError) before
there was a base still are, so ``except ValueError`` in user code keeps working.

This module imports nothing from glm: every layer may raise these.
"""
from __future__ import annotations


class GLMError(Exception):
    """A user-facing error: the message says what is wrong and what to do."""


class FileKindError(GLMError, ValueError):
    """A path that exists but is not a regular file (FIFO, socket, device, folder), or a metadata file
    larger than any real one."""


class ArgumentError(GLMError, ValueError):
    """An argument outside what glm accepts (a device, a dtype, a size, an option that does not apply)."""


class ConfigError(GLMError, ValueError):
    """A config.json or a GLMConfig that `glm` cannot use; the message says what to change."""


class CheckpointError(GLMError, ValueError):
    """A checkpoint folder or file that cannot be read as it is; the message names the file and the fix."""


class KeyMismatchError(CheckpointError):
    """The tensor names of a checkpoint are not those its format and config imply (listed in the message)."""


class FormatError(GLMError, ValueError):
    """A model that the requested release format cannot express, or a conversion option that does not apply."""


class InputError(GLMError, ValueError):
    """Tokens, positions, masks or generation options that the model cannot take; the message says what is wrong."""


class CacheFullError(InputError):
    """A KV cache without room for the tokens of a call."""


class DataError(GLMError, ValueError):
    """Input data (a document, a corpus file, an objective setting, a batch field) that cannot be used as it
    is; the message names the file (and line) or field and the fix."""


class TokenizerError(GLMError, ValueError):
    """A tokenizer file, folder, name or argument that cannot be used as it is; the message names it and the fix."""


class CorpusTooSmall(TokenizerError):
    """The corpus has fewer distinct BPE tokens than the ranks asked for; ``available`` is how many it has."""

    def __init__(self, available: int, asked: int):
        super().__init__(f"the corpus yields only {available} distinct tokens, fewer than the {asked} ranks asked "
                         f"for; ask for at most {available} or add text")
        self.available = available


class TrainingError(GLMError, RuntimeError):
    """The run cannot start or continue (a non-finite loss, a run folder in use, changed settings); the message
    says what to change."""


class KernelUnavailable(GLMError, RuntimeError):
    """A compiled kernel was asked for but did not load (not built, or built for another torch); the message
    says how to build it."""


class BenchError(GLMError):
    """A benchmark could not be run; the message says why and what to do."""
