"""Generation on a static KV cache: greedy or sampled, batched with left padding, streamed.

One prefill forward fills the cache with the prompt, then each step feeds one token per row; the
model continues every row's position ids from the cache (1D families count up; GLM/ChatGLM-6B keep
the mask position and count the block position up, generating inside a blank).

Decode steps run eagerly (the cached keys so far, Python-int offsets) or as the *static step*
(`StaticDecoder`: the whole cache buffer, device tensors only), which a CUDA graph captures once and
replays: batch-1 decode is then bound by reading the weights, not by launching ~50 kernels per
layer from Python. On a CUDA model `generate` / `stream` use the graph by default.

`glm.generate` is the `generate` function, not this module: reach the rest with
``from glm.generate import ...`` (or ``glm.stream``, ``glm.release_cuda_graphs``, ...).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import re
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from . import positions
from .errors import InputError
from .kv_cache import KVCache
from .model import GLM, ID_DTYPES


def _int_arg(name: str, value: Any, low: int, high: Optional[int] = None, hint: str = "",
             where: Optional[str] = None) -> int:
    """``value`` as an int in ``[low, high)``; a bool, float or string is refused, not truncated."""
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        v = None
    if v is None or v < low or (high is not None and v >= high):
        where = where or (f">= {low}" if high is None else f"in [{low}, {high})")
        raise InputError(f"{name} must be {where}, an integer{hint}, got {value!r}")
    return v


def _real_arg(name: str, value: Any, low: float, *, open_low: bool, high: Optional[float] = None,
              hint: str = "") -> float:
    """``value`` as a finite float above ``low`` (or at it, unless ``open_low``) and at most ``high``:
    NaN or inf would otherwise reach the logits and sample garbage without an error."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        v = float(value)
        ok = (v > low if open_low else v >= low) and (high is None or v <= high)
    if not ok:
        where = (f"in ({low:g}, {high:g}]" if high is not None else f"{'>' if open_low else '>='} {low:g}")
        raise InputError(f"{name} must be {where}, a finite number{hint}, got {value!r}")
    return v


# What torch.Generator.manual_seed takes.
SEED_RANGE = (-2 ** 63, 2 ** 64)


@dataclass
class SamplingConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_k: Optional[int] = 0  # 0 (or None) = off; needs temperature > 0
    top_p: Optional[float] = 1.0  # 1 (or None) = off; needs temperature > 0
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already in the row
    # None = the model config's eos_token_ids; () = never stop early.
    eos_token_ids: Optional[Sequence[int]] = None
    seed: Optional[int] = None

    def validate(self) -> None:
        """Check every field's type and range up front (a bool is not a number here), and normalise:
        None top_k / top_p to off, eos_token_ids to a tuple of ints."""
        # None is "off" as well, so callers can forward unset options (e.g. argparse defaults) as they are.
        self.top_k = 0 if self.top_k is None else self.top_k
        self.top_p = 1.0 if self.top_p is None else self.top_p
        self.max_new_tokens = _int_arg("max_new_tokens", self.max_new_tokens, 1)
        self.temperature = _real_arg("temperature", self.temperature, 0.0, open_low=False, hint=" (0 = greedy)")
        self.top_k = _int_arg("top_k", self.top_k, 0, hint=" (0 = off)")
        self.top_p = _real_arg("top_p", self.top_p, 0.0, open_low=True, high=1.0, hint=" (1 = off)")
        self.repetition_penalty = _real_arg("repetition_penalty", self.repetition_penalty, 0.0, open_low=True,
                                            hint=" (1 = off)")
        if self.seed is not None:
            self.seed = _int_arg("seed", self.seed, *SEED_RANGE, hint=" (or None)", where="in [-2**63, 2**64)")
        # Greedy decoding takes the argmax, which top-k / top-p never remove: they would be ignored.
        if self.temperature == 0 and (self.top_k or self.top_p < 1.0):
            given = "top_k" if self.top_k else "top_p"
            raise InputError(f"{given} only shapes sampling, and temperature is 0 (greedy decoding); pass "
                             f"temperature > 0 (e.g. 1.0) to sample, or drop {given}")
        if self.eos_token_ids is not None:
            try:
                if isinstance(self.eos_token_ids, (str, bytes)) or any(isinstance(t, bool) for t in self.eos_token_ids):
                    raise TypeError
                self.eos_token_ids = tuple(operator.index(t) for t in self.eos_token_ids)
            except TypeError:
                raise InputError(f"eos_token_ids must be a list of token ids (e.g. [2]), or () to never stop "
                                 f"early; got {self.eos_token_ids!r}") from None


def _sampling_config(sampling: Optional[SamplingConfig], overrides: dict) -> SamplingConfig:
    """``sampling`` with ``overrides`` applied, validated; an unknown keyword is named, not a TypeError."""
    if sampling is not None and not isinstance(sampling, SamplingConfig):
        raise InputError(f"sampling must be a SamplingConfig (or None; its fields may be passed as keywords), got "
                         f"{type(sampling).__name__}")
    fields = [f.name for f in dataclasses.fields(SamplingConfig)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise InputError(f"unknown argument(s) {', '.join(unknown)}; the sampling arguments are {', '.join(fields)}")
    cfg = dataclasses.replace(sampling, **overrides) if sampling is not None else SamplingConfig(**overrides)
    cfg.validate()
    return cfg


def _is_id(t: Any, vocab: int) -> bool:
    if isinstance(t, bool):
        return False
    try:
        return 0 <= operator.index(t) < vocab
    except TypeError:
        return False


def _check_token_ids(model: GLM, name: str, ids: Sequence[Any]) -> None:
    """Every id an int in the model's vocabulary: an id past it would never match (an eos that never
    stops) or fail inside the embedding."""
    vocab = model.config.vocab_size
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, set, frozenset)):
        raise InputError(f"{name} must be a list of token ids, got {ids!r}")
    bad = [t for t in ids if not _is_id(t, vocab)]
    if bad:
        raise InputError(f"{name} must be token ids in [0, {vocab}) (the model's vocabulary), got {bad[0]!r}")


def _apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    # CTRL-style: positive logits are divided, negative multiplied, for tokens already present.
    picked = logits.gather(-1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(-1, seen, picked)


def next_token(logits: Tensor, cfg: SamplingConfig, generator: Optional[torch.Generator],
               seen: Optional[Tensor] = None) -> Tensor:
    """Pick one token per row from ``logits`` ``[B, V]``."""
    logits = logits.float()
    if seen is not None and cfg.repetition_penalty != 1.0:
        logits = _apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return logits.argmax(-1)
    # Shifted so the largest logit is 0 first: softmax is unchanged, and a tiny temperature then sends
    # the others to -inf instead of the largest to inf (inf - inf = NaN probabilities).
    logits = (logits - logits.amax(-1, keepdim=True)) / cfg.temperature
    if cfg.top_k:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop = probs.cumsum(-1) - probs >= cfg.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token lists -> ``[B, T]`` left-padded ids and ``pad_left`` ``[B]``."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("every prompt needs at least one token (got an empty prompt)")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
    return ids, torch.tensor([T - len(p) for p in prompts], dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# The static decode step, eager or replayed from a CUDA graph

class StaticDecoder:
    """Decode steps against a prefilled `KVCache` in device tensors only (``GLM.forward(static=True)``),
    replayed from a CUDA graph when ``cuda_graph``, compiled with `torch.compile` when ``compile``.

    Per step, the host writes the tokens and position ids into fixed input tensors and the cache's
    slot / kv_len tensors (kernel launches with the values as arguments, no synchronisation), runs
    the step (one graph replay), and advances ``cache.length``. The graph is captured at the first
    step, so it sees the cache after prefill; it stays valid for this cache and these weights.
    """

    def __init__(self, model: GLM, cache: KVCache, *, cuda_graph: bool = False, compile: bool = False,
                 backend: Optional[str] = None):
        model.check_cache(cache)
        for name, value in (("cuda_graph", cuda_graph), ("compile", compile)):
            if not isinstance(value, bool):
                raise InputError(f"{name} must be True or False, got {value!r}")
        device = cache.k.device
        if cuda_graph and device.type != "cuda":
            raise InputError(f"CUDA graphs need the model on a CUDA device; it is on {device}. Use "
                             f"cuda_graphs=False (the static step still runs eagerly)")
        # No strong reference to the model: the decoders `_decoder` keeps for reuse, keyed weakly by
        # their model, must not keep that model alive.
        self._model = weakref.ref(model)
        self.cache, self.cuda_graph, self.backend = cache, cuda_graph, backend
        self.streams = model.config.position_streams
        self.tokens = torch.zeros(cache.batch, 1, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(cache.batch, self.streams, 1, dtype=torch.long, device=device)
        self.graph: Optional["torch.cuda.CUDAGraph"] = None
        self.logits: Optional[Tensor] = None  # the graph's output buffer
        self.weights = _weight_pointers(model)
        self.in_use = False
        self.compiled = compile
        # A graph removes the launches but not the kernels: each of the step's ~50 small kernels per
        # layer (norms, RoPE, SwiGLU, residuals) still costs its start and tail on the GPU. Inductor
        # fuses them into a few, and the graph then replays the compiled step like any other.
        # Compiled as a plain function taking the decoder: a bound method kept on self would be a
        # reference cycle, and the graph's memory would then wait for the garbage collector.
        self._compiled = torch.compile(StaticDecoder._forward, dynamic=False) if compile else None

    @property
    def model(self) -> GLM:
        model = self._model()
        if model is None:
            raise InputError("the model of this StaticDecoder no longer exists; make a new decoder for a live model")
        return model

    def _forward(self) -> Tensor:
        return self.model(self.tokens, self.position_ids, cache=self.cache, backend=self.backend, static=True,
                          last_only=True)[:, -1]

    def _run(self) -> Tensor:
        return self._forward() if self._compiled is None else self._compiled(self)

    def _capture(self, warmup: int = 2) -> None:
        # PyTorch's recipe: run the step a few times on a side stream first, so one-time work (cuBLAS
        # handles and workspaces, allocator growth, lazy init) happens outside the capture. The
        # warm-up steps write this step's own keys into the slot it is about to fill anyway.
        side = torch.cuda.Stream(self.tokens.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.logits = self._run()
        except RuntimeError as e:
            raise RuntimeError(f"capturing the decode step in a CUDA graph failed ({e}); usually an op in the "
                               f"step (e.g. an attention backend) synchronises with the host. Pass cuda_graphs=False "
                               f"to decode without a graph") from e
        self.graph = graph

    @torch.no_grad()
    def step(self, tokens: Tensor, position_ids: Tensor) -> Tensor:
        """Feed one token per row, ``tokens`` ``[B]`` at ``position_ids`` ``[B, S]``, and return the
        logits ``[B, V]``. With a CUDA graph they live in its output buffer, which the next step
        overwrites: use (or copy) them before stepping again."""
        B, S = self.cache.batch, self.streams
        for name, t in (("tokens", tokens), ("position_ids", position_ids)):
            # copy_ into the int64 input buffers would silently truncate float ids.
            if not isinstance(t, Tensor) or t.dtype not in ID_DTYPES:
                raise InputError(f"a decode step's {name} must be an int64 or int32 tensor, got "
                                 f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
        if tokens.shape != (B,) or position_ids.shape != (B, S):
            raise InputError(f"a decode step takes tokens [{B}] and position_ids [{B}, {S}]; got "
                             f"{tuple(tokens.shape)} and {tuple(position_ids.shape)}")
        self.cache.begin_static_step()
        self.tokens.copy_(tokens.reshape(B, 1))
        self.position_ids.copy_(position_ids.reshape(B, S, 1))
        if not self.cuda_graph:
            logits = self._run()
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            logits = self.logits
        self.cache.advance(1, position_ids.to(self.tokens.device))
        return logits


def _weight_pointers(model: GLM) -> tuple[int, ...]:
    # A captured graph reads the weights at these addresses; a model moved or reloaded since then
    # (new storage) needs a new graph.
    return tuple(p.data_ptr() for p in model.parameters())


# One kept CUDA-graph decoder per model: capturing costs a few eager steps, so later calls with the
# same batch and a cache of the same (rounded-up) size reuse it.
_DECODERS: "weakref.WeakKeyDictionary[GLM, StaticDecoder]" = weakref.WeakKeyDictionary()
CACHE_ROUND = 256  # cache sizes of graph decoders are rounded up to a multiple of this, for reuse


def release_cuda_graphs(model: GLM) -> None:
    """Free the CUDA graph and KV cache that `generate` / `stream` keep for ``model``."""
    _DECODERS.pop(model, None)


def _decoder(model: GLM, batch: int, need: int, cuda_graph: bool, compile: bool = False) -> StaticDecoder:
    """A StaticDecoder over an empty cache of at least ``need`` slots."""
    if not cuda_graph:
        return StaticDecoder(model, model.new_cache(batch, need), compile=compile)
    max_len = -(-need // CACHE_ROUND) * CACHE_ROUND
    dtype = next(model.parameters()).dtype
    kept = _DECODERS.get(model)
    if (kept is not None and not kept.in_use and kept.cache.batch == batch and kept.cache.max_len == max_len
            and kept.cache.k.dtype == dtype and kept.backend == model.backend and kept.compiled == compile
            and kept.weights == _weight_pointers(model)):
        kept.cache.reset()
        return kept
    if kept is not None and not kept.in_use:
        del _DECODERS[model]  # free its cache and graph memory before allocating the new ones
        del kept
    dec = StaticDecoder(model, model.new_cache(batch, max_len), cuda_graph=True, compile=compile,
                        backend=model.backend)
    if model not in _DECODERS:
        _DECODERS[model] = dec
    return dec


def _decode_mode(device: torch.device, cuda_graphs: Optional[bool], static: Optional[bool],
                 compile: bool = False) -> tuple[bool, bool]:
    """(cuda_graphs, static) from the caller's choices; None = CUDA graphs on a CUDA model."""
    for name, value, optional in (("cuda_graphs", cuda_graphs, True), ("static", static, True),
                                  ("compile", compile, False)):
        # bool("no") is True: anything but a bool (or None where it means "default") is refused.
        if not (isinstance(value, bool) or (optional and value is None)):
            raise InputError(f"{name} must be True or False{' (or None: the default)' if optional else ''}, "
                             f"got {value!r}")
    graphs = device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
    if graphs and device.type != "cuda":
        raise InputError(f"cuda_graphs=True needs the model on a CUDA device; it is on {device}. Leave "
                         f"cuda_graphs unset (or pass static=True to run the static step eagerly)")
    static = (graphs or compile) if static is None else bool(static)
    if graphs and not static:
        raise InputError("CUDA graphs replay the static decode step; cuda_graphs=True needs static=True (or unset)")
    if compile and not static:
        raise InputError("compile=True compiles the static decode step; it needs static=True (or unset)")
    return graphs, static


def _eos_ids(model: GLM, cfg: SamplingConfig) -> tuple[int, ...]:
    return tuple(model.config.eos_token_ids if cfg.eos_token_ids is None else cfg.eos_token_ids)


def room_for_new_tokens(model: GLM, prompt_len: int) -> int:
    """How many tokens can be generated after a ``prompt_len``-token prompt before the positions leave
    the model's table: 1D families count positions up from the prompt; GLM and ChatGLM-6B generate
    a span inside a fresh blank, ``<sop>`` at block position 1 and its tokens fed at 2, 3, ..., so
    ``max_positions - 2`` fit whatever the prompt's length."""
    limit = model.config.max_positions
    return limit - 2 if model.config.position_streams == 2 else limit - prompt_len


def _check_positions(model: GLM, prompt_len: int, max_new_tokens: int, position_ids: Optional[Tensor],
                     input_ids: Optional[Tensor] = None, pad_left: Optional[Tensor] = None) -> None:
    """Refuse up front a generation whose positions would leave the model's table, instead of an
    IndexError (learned positions) or silent extrapolation (RoPE) after part of the output."""
    limit = model.config.max_positions
    if model.config.position_streams == 1:
        if prompt_len + max_new_tokens > limit:
            raise InputError(f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} exceeds the "
                             f"model's {limit} positions; shorten the prompt or lower max_new_tokens")
        return
    # 2D families generate inside a blank: the position stays put and the block position counts up from
    # the prompt's last one; the last token chosen is never fed, so it reaches last + max_new_tokens - 1.
    last = 0
    if position_ids is None and input_ids is not None:
        derived = positions.derive(model.config, input_ids, pad_left)  # e.g. ChatGLM-6B reads its own positions
        position_ids = derived[0] if derived is not None else None
    if position_ids is not None and position_ids.dim() == 3 and position_ids.shape[1] == 2 and position_ids.numel():
        last = int(position_ids[:, 1, -1].max())
    if last + max_new_tokens - 1 >= limit:
        raise InputError(f"max_new_tokens {max_new_tokens} takes the block position to {last + max_new_tokens - 1}, "
                         f"outside the model's {limit} positions (family {model.config.family} counts it up "
                         f"inside the blank); at most {max(limit - last, 0)} new tokens fit")


def _seen_tokens(input_ids: Tensor, pad_left: Optional[Tensor]) -> Tensor:
    """The prompt's tokens per row for the repetition penalty, int64 (gather's index dtype). Left pads
    are no part of a row: each is replaced by the row's first real token, a repeat that changes
    nothing, so a padded row is penalised as it would be alone."""
    ids = input_ids.long()
    if pad_left is None:
        return ids
    pad = pad_left.to(ids.device).long().clamp(0, ids.shape[1] - 1)
    first = ids.gather(1, pad[:, None])
    slots = torch.arange(ids.shape[1], device=ids.device)
    return torch.where(slots < pad[:, None], first, ids)


@torch.no_grad()
def stream(model: GLM, input_ids: Tensor, *, position_ids: Optional[Tensor] = None,
           prefix_len: Optional[Tensor] = None, pad_left: Optional[Tensor] = None,
           sampling: Optional[SamplingConfig] = None, cuda_graphs: Optional[bool] = None,
           static: Optional[bool] = None, compile: bool = False, **overrides) -> Iterator[Tensor]:
    """Yield the next token of every row, ``[B]``, as soon as it is chosen.

    ``overrides`` set `SamplingConfig` fields. A row stops at any of ``eos_token_ids`` (default
    None: ``model.config.eos_token_ids``; pass ``()`` to always generate ``max_new_tokens``); rows
    that produced an eos keep yielding that eos until every row has.
    ``cuda_graphs``: replay each decode step from a CUDA graph (default: when the model is on CUDA);
    ``static``: run the static step (the graph's) without a graph, e.g. on CPU (default: as
    ``cuda_graphs``). ``compile``: `torch.compile` the static step first (slow to start, once per
    batch size and cache size; fewer kernels per step). Every mode picks the same greedy tokens, up to
    ties within rounding.
    """
    cfg = _sampling_config(sampling, overrides)
    model.check_input_types(input_ids, position_ids, prefix_len=prefix_len, pad_left=pad_left)
    if input_ids.shape[1] == 0:
        raise InputError(f"input_ids must be a non-empty [batch, seq] tensor, got shape {tuple(input_ids.shape)}")
    B, P = input_ids.shape
    eos_ids = _eos_ids(model, cfg)
    _check_token_ids(model, "eos_token_ids", eos_ids)
    device = next(model.parameters()).device
    graphs, static = _decode_mode(device, cuda_graphs, static, compile)
    _check_positions(model, P, cfg.max_new_tokens, position_ids, input_ids, pad_left)
    gen = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    decoder = _decoder(model, B, P + cfg.max_new_tokens, graphs, compile) if static else None
    cache = decoder.cache if decoder is not None else model.new_cache(B, P + cfg.max_new_tokens)
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    seen = _seen_tokens(input_ids.to(device), pad_left) if cfg.repetition_penalty != 1.0 else None
    if decoder is not None:
        decoder.in_use = True  # a second stream on this model meanwhile gets its own decoder
    try:
        logits = model(input_ids.to(device), position_ids, prefix_len=prefix_len, pad_left=pad_left, cache=cache,
                       last_only=True)[:, -1]
        for step in range(cfg.max_new_tokens):
            tok = next_token(logits, cfg, gen, seen)
            if eos.numel():
                tok = torch.where(done, eos[0], tok)
                done |= torch.isin(tok, eos)
            yield tok
            if step + 1 == cfg.max_new_tokens or (eos.numel() and bool(done.all())):
                return
            if seen is not None:
                seen = torch.cat((seen, tok[:, None]), dim=1)
            if decoder is None:
                logits = model(tok[:, None], cache=cache, last_only=True, check_inputs=False)[:, -1]
            else:
                logits = decoder.step(tok, positions.next_after(cache.last_position_ids))
    finally:
        if decoder is not None:
            decoder.in_use = False


def generate(model: GLM, input_ids: Tensor, **kwargs) -> Tensor:
    """The new tokens ``[B, N]`` (N <= max_new_tokens; stops early once every row hit an eos).
    Takes the arguments of `stream`: ``eos_token_ids`` defaults to ``model.config.eos_token_ids``,
    and ``eos_token_ids=()`` never stops early."""
    toks = list(stream(model, input_ids, **kwargs))
    return torch.stack(toks, dim=1)


# ---------------------------------------------------------------------------------------------
# Blank infilling (GLM, ChatGLM-6B): Part A with masks, then each blank generated after <sop>

@dataclass
class InfillResult:
    tokens: list[int]  # Part A with every generated blank replaced by its span (no [CLS], no sop/eop)
    spans: list[list[int]]  # the generated span of each blank, in order
    complete: list[bool]  # whether each span ended (<eop> or an eos id; False: hit max_span_tokens)


def _infill_layout(tokens: Sequence[int], masks: set[int], cls_id: Optional[int], gmask_id: Optional[int],
                   eos_ids: Sequence[int] = (), gmask_first: bool = False) -> tuple[list[int], list[int]]:
    """Part A and the indices of its blanks (the masks generated, in order)."""
    part_a = ([cls_id] if cls_id is not None and tokens[0] != cls_id else []) + [int(t) for t in tokens]
    if not any(t in masks or t == gmask_id for t in part_a):
        if gmask_id is None:
            raise InputError("the text has no mask token ([MASK], [sMASK] or [gMASK]) to fill")
        # THUDM generate_samples.py appends [gMASK] to the text and then adds no eos (training's
        # [gMASK] samples have none before it either: the eos ends the generated suffix), so a
        # trailing eos, e.g. from GLM's build_inputs ([CLS] text <|endoftext|>), gives way to [gMASK].
        if len(part_a) > 1 and part_a[-1] in eos_ids:
            part_a.pop()
        part_a.append(gmask_id)
    if gmask_first and gmask_id in part_a:
        # A family that generates at one mask (ChatGLM-6B's get_position_ids) takes the first [gMASK] if
        # there is one, else the first [MASK]; [MASK]s before that [gMASK] are plain Part A tokens.
        return part_a, [part_a.index(gmask_id)]
    return part_a, [i for i, t in enumerate(part_a) if t in masks or t == gmask_id]


@dataclass
class _InfillPlan:
    part_a: list[int]
    blanks: list[int]  # indices into part_a
    cfg: SamplingConfig
    ends: frozenset[int]  # <eop> and the eos ids: any of them ends a span


def _plan_infill(model: GLM, tokens: Sequence[int], mask_ids: Sequence[int], sop_id: int, eop_id: int,
                 cls_id: Optional[int], gmask_id: Optional[int], max_span_tokens: int,
                 sampling: Optional[SamplingConfig], overrides: dict) -> _InfillPlan:
    """Every check of an infill call, before any forward."""
    model.check_runnable()
    if model.config.position_streams != 2:
        raise InputError(f"blank infilling needs a model with 2D positions (GLM, ChatGLM-6B); family "
                         f"{model.config.family} generates left to right only (use generate)")
    if isinstance(tokens, Tensor) and tokens.dim() == 1 and tokens.dtype in ID_DTYPES:
        tokens = tokens.tolist()
    if isinstance(tokens, (str, bytes, Tensor)) or not isinstance(tokens, Sequence):
        raise InputError(f"tokens must be a list of token ids (encode the text first, or call infill with the "
                         f"tokenizer), got {type(tokens).__name__}")
    if not tokens:
        raise InputError("infill needs a non-empty text")
    _check_token_ids(model, "tokens", tokens)
    _check_token_ids(model, "mask_ids", mask_ids)
    _check_token_ids(model, "sop_id / cls_id / gmask_id", [t for t in (sop_id, cls_id, gmask_id) if t is not None])
    # <eop> and the eos ids only end spans (compared, never fed), so any int will do.
    _int_arg("eop_id", eop_id, 0)
    if "max_new_tokens" in overrides:
        raise InputError(f"infill limits each blank with max_span_tokens (got max_new_tokens="
                         f"{overrides['max_new_tokens']}); pass max_span_tokens={overrides['max_new_tokens']}")
    max_span_tokens = _int_arg("max_span_tokens", max_span_tokens, 1)
    limit = model.config.max_positions
    room = room_for_new_tokens(model, len(tokens))
    if max_span_tokens > room:
        raise InputError(f"max_span_tokens {max_span_tokens} takes a blank's block position to "
                         f"{max_span_tokens + 1}, outside the model's {limit} positions; at most "
                         f"{room} tokens per blank fit")
    cfg = _sampling_config(sampling, overrides)
    eos = _eos_ids(model, cfg)
    part_a, blanks = _infill_layout(tokens, set(int(m) for m in mask_ids), cls_id, gmask_id, eos,
                                    gmask_first=positions.convention(model.config).infill_at_first_gmask)
    if len(part_a) > limit:
        raise InputError(f"the text is {len(part_a)} tokens; the model has {limit} positions")
    return _InfillPlan(part_a, blanks, cfg, frozenset((int(eop_id), *eos)))


@torch.no_grad()
def _run_infill(model: GLM, plan: _InfillPlan, sop_id: int, max_span_tokens: int, cuda_graphs: Optional[bool],
                static: Optional[bool], compile: bool) -> Iterator[tuple[int, Optional[int]]]:
    part_a, blanks, cfg = plan.part_a, plan.blanks, plan.cfg
    A = len(part_a)
    device = next(model.parameters()).device
    graphs, static = _decode_mode(device, cuda_graphs, static, compile)
    gen = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    need = A + len(blanks) * (max_span_tokens + 1)
    decoder = _decoder(model, 1, need, graphs, compile) if static else None
    cache = decoder.cache if decoder is not None else model.new_cache(1, need)

    def step(tok: int, pos: Optional[Tensor] = None) -> Tensor:
        # pos [1, 2, 1] for <sop> (the blank's position); None continues inside the blank.
        ids = torch.tensor([[tok]], device=device)
        if decoder is None:
            return model(ids, pos, cache=cache, last_only=True, check_inputs=pos is not None)[:, -1]
        pos = positions.next_after(cache.last_position_ids) if pos is None else pos[..., 0]
        return decoder.step(ids[:, 0], pos)

    if decoder is not None:
        decoder.in_use = True
    try:
        pos = torch.tensor([positions.blank_layout(A)], device=device)
        model(torch.tensor([part_a], device=device), pos, prefix_len=torch.tensor([A], device=device),
              cache=cache, last_only=True)
        for b, m in enumerate(blanks):
            logits = step(sop_id, torch.tensor([positions.span_layout(m, 0)], device=device))
            for n in range(max_span_tokens + 1):
                tok = int(next_token(logits, cfg, gen))
                if tok in plan.ends or n == max_span_tokens:
                    yield b, (None if tok in plan.ends else -1)
                    break
                yield b, tok
                logits = step(tok)
    finally:
        if decoder is not None:
            decoder.in_use = False


def stream_infill(model: GLM, tokens: Sequence[int], *, mask_ids: Sequence[int], sop_id: int, eop_id: int,
                  cls_id: Optional[int] = None, gmask_id: Optional[int] = None, max_span_tokens: int = 32,
                  sampling: Optional[SamplingConfig] = None, cuda_graphs: Optional[bool] = None,
                  static: Optional[bool] = None, compile: bool = False,
                  **overrides) -> Iterator[tuple[int, Optional[int]]]:
    """Yield ``(blank, token)`` as each blank's span is generated, then ``(blank, None)`` when that
    span ends (``<eop>`` or any of ``eos_token_ids``) or ``(blank, -1)`` when it hits
    ``max_span_tokens``. See `infill_ids` for the layout; ``cuda_graphs``, ``static`` and ``compile``
    as in `stream`. The arguments are checked when this is called, before any output."""
    plan = _plan_infill(model, tokens, mask_ids, sop_id, eop_id, cls_id, gmask_id, max_span_tokens, sampling, overrides)
    return _run_infill(model, plan, sop_id, max_span_tokens, cuda_graphs, static, compile)


def infill_ids(model: GLM, tokens: Sequence[int], *, mask_ids: Sequence[int], sop_id: int, eop_id: int,
               cls_id: Optional[int] = None, gmask_id: Optional[int] = None, max_span_tokens: int = 32,
               sampling: Optional[SamplingConfig] = None, cuda_graphs: Optional[bool] = None,
               static: Optional[bool] = None, compile: bool = False, **overrides) -> InfillResult:
    """Fill every blank of ``tokens`` (ids with mask tokens in them) with the GLM objective.

    Part A = ``[CLS]`` (when given) + tokens, attended bidirectionally (``prefix_len = |A|``), at
    positions ``0..|A|-1`` with block position 0. Blanks are filled left to right: each span is fed
    ``<sop>`` at its mask's position with block position 1, and generates (same position, block
    positions 2, 3, ...) until ``<eop>`` or an eos id, as THUDM's generate_samples.py ends a span
    (glm.data's direct [gMASK] samples end with the eos and no ``<eop>``). ``eos_token_ids``
    defaults to ``model.config.eos_token_ids``; ``()`` ends spans at ``<eop>`` only. Earlier spans
    stay in the cache, as earlier spans of Part B are visible in training.

    Without any mask token, ``[gMASK]`` is appended (generation), replacing a trailing eos:
    ``[CLS] text [gMASK]``. Where the family's prompt convention says ``infill_at_first_gmask``
    (ChatGLM-6B, whose reference picks the first ``[gMASK]``, else the first ``[MASK]``), that one
    blank is the only one generated (`glm.positions`).
    ``max_span_tokens`` caps each span (``max_new_tokens`` is refused: it would read as a total);
    other keyword arguments are `SamplingConfig` fields.
    """
    plan = _plan_infill(model, tokens, mask_ids, sop_id, eop_id, cls_id, gmask_id, max_span_tokens, sampling, overrides)
    spans: list[list[int]] = []
    complete: list[bool] = []
    for b, tok in _run_infill(model, plan, sop_id, max_span_tokens, cuda_graphs, static, compile):
        if b == len(spans):
            spans.append([])
        if tok is None or tok == -1:
            complete.append(tok is None)
        else:
            spans[b].append(tok)
    out: list[int] = []
    fills = dict(zip(plan.blanks, spans))
    for i, t in enumerate(plan.part_a):
        if i in fills:
            out.extend(fills[i])
        elif not (i == 0 and cls_id is not None and t == cls_id):
            out.append(t)
    return InfillResult(out, spans, complete)


def tokenizer_infill_args(tokenizer) -> dict:
    """The special-token arguments of `infill_ids` / `stream_infill` for ``tokenizer``'s vocabulary."""
    masks = tokenizer.mask_ids
    return dict(mask_ids=[v for k, v in masks.items() if k != "gMASK"], gmask_id=masks.get("gMASK"),
                sop_id=tokenizer.sop_id, eop_id=tokenizer.eop_id, cls_id=tokenizer.cls_id,
                eos_token_ids=tokenizer.eos_ids)


def encode_blank_text(tokenizer, text: str) -> list[int]:
    """Token ids of a text with blanks, tokenised the way training saw it.

    In training a blank replaces whole tokens of the tokenised document: the word after a blank
    keeps its word-start piece, text glued to the blank ("[MASK].") continues without one, and no
    stray whitespace token sits beside the mask. Encoding the pieces between masks on their own
    would instead put SentencePiece's dummy-prefix "▁" before each of them, so whitespace around a
    mask is dropped and glued text is encoded as a continuation.
    """
    masks = "|".join(re.escape(m) for m in ("[MASK]", "[sMASK]", "[gMASK]"))
    parts = re.split(rf"({masks})", text)
    ids: list[int] = []
    for i, part in enumerate(parts):
        if i % 2:  # a mask token
            ids.extend(tokenizer.encode_with_specials(part))
            continue
        if i + 1 < len(parts):
            part = part.rstrip(" \t")
        glued = i > 0 and part[:1] not in ("", " ", "\t")
        part = part.lstrip(" \t") if i > 0 else part
        if not part:
            continue
        ids.extend(tokenizer.encode_with_specials(part, continuation=glued))
    return ids


def infill(model: GLM, tokenizer, text: str, **kwargs) -> str:
    """``"Paris is the [MASK] of France."`` -> the text with every blank filled (see `infill_ids`)."""
    ids = tokenizer.infill_prompt(encode_blank_text(tokenizer, text))
    res = infill_ids(model, ids, **{**tokenizer_infill_args(tokenizer), **kwargs})
    return tokenizer.decode(res.tokens, skip_special_tokens=True)


@torch.no_grad()
def eop_after_answer(model: GLM, tokenizer, text: str, answer: str) -> Optional[float]:
    """The probability ``model`` gives ``<eop>`` right after ``answer`` fills the one blank of ``text``:
    the span ``<sop> answer`` fed as `infill` feeds it (Part A as `infill` builds it, 2D positions by
    `glm.positions.blank_layout`), so greedy infill stops after a right answer exactly when this is the
    largest probability there. None when the answer is not whole tokens of the filled text as the
    tokenizer splits it: training blanks whole tokens, so the model never saw such a blank."""
    blanks = re.findall(r"\[(?:s|g)?MASK\]", text)
    if len(blanks) != 1:
        raise InputError(f"eop_after_answer takes a text with exactly one blank ([MASK], [sMASK] or [gMASK]), "
                         f"got {len(blanks)} in {text!r}")
    prompt = encode_blank_text(tokenizer, text)
    masks = set(tokenizer.mask_ids.values())
    m = next(i for i, t in enumerate(prompt) if t in masks)
    before, after = prompt[:m], prompt[m + 1:]
    full = tokenizer.encode(text.replace(blanks[0], answer, 1))
    end = len(full) - len(after)
    if end <= m or full[:m] != before or full[end:] != after:
        return None
    part_a = tokenizer.infill_prompt(prompt)
    slot = next(i for i, t in enumerate(part_a) if t in masks)
    span = full[m:end]
    pos, block = positions.blank_layout(len(part_a), [slot], [len(span)])
    device = next(model.parameters()).device
    ids = torch.tensor([part_a + [tokenizer.sop_id] + span], device=device)
    position_ids = torch.tensor([[pos, block]], device=device)
    logits = model(ids, position_ids, prefix_len=torch.tensor([len(part_a)], device=device), last_only=True)
    return float(logits[0, -1].float().softmax(-1)[tokenizer.eop_id])


def stream_text(model: GLM, tokenizer, prompt_ids: Sequence[int], *, max_new_tokens: int = 128,
                cuda_graphs: Optional[bool] = None, **sampling) -> Iterator[str]:
    """Generate after ``prompt_ids`` (already wrapped the release's way) and yield text as it grows.

    2D families (GLM, ChatGLM-6B) generate inside a blank after ``<sop>`` until ``<eop>`` or an eos,
    the way their references do: the first mask (for ChatGLM-6B the ``[gMASK]`` when there is one),
    or a ``[gMASK]`` appended in place of a trailing eos when the prompt has none. The others
    generate left to right until an eos. ``max_new_tokens`` caps the blank's span for 2D families;
    ``cuda_graphs`` as in `stream`. Arguments are checked before any text is yielded.
    """
    if isinstance(prompt_ids, Tensor) and prompt_ids.dim() == 1 and prompt_ids.dtype in ID_DTYPES:
        prompt_ids = prompt_ids.tolist()
    elif isinstance(prompt_ids, Iterable) and not isinstance(prompt_ids, (str, bytes, Tensor)):
        prompt_ids = list(prompt_ids)
    _check_token_ids(model, "prompt_ids", prompt_ids)
    if not prompt_ids:
        raise InputError("prompt_ids is empty; a prompt needs at least one token")
    # Checked here under its own name: 2D families pass it on as infill's max_span_tokens.
    max_new_tokens = _int_arg("max_new_tokens", max_new_tokens, 1)
    ids = [operator.index(t) for t in prompt_ids]
    new: list[int] = []
    shown = ""
    eos = tuple(sampling.pop("eos_token_ids", None) or tokenizer.eos_ids)
    if model.config.position_streams == 2:
        if ids and ids[-1] == tokenizer.sop_id:
            ids = ids[:-1]  # stream_infill feeds <sop> itself, at the blank's position
        args = {**tokenizer_infill_args(tokenizer), "eos_token_ids": eos}
        tokens = (t for _, t in stream_infill(model, ids, **args, max_span_tokens=max_new_tokens,
                                             cuda_graphs=cuda_graphs, **sampling))
    else:
        tokens = (int(t[0]) for t in stream(model, torch.tensor([ids]), max_new_tokens=max_new_tokens,
                                            eos_token_ids=eos, cuda_graphs=cuda_graphs, **sampling))
    for t in tokens:
        if t is None or t == -1 or t in eos or t in tokenizer.eos_ids:
            break
        new.append(t)
        text = tokenizer.decode(new, skip_special_tokens=True)
        # Print only once the text is stable: a partial multi-byte character decodes to U+FFFD.
        if not text.endswith("\ufffd") and text.startswith(shown):
            yield text[len(shown):]
            shown = text
    text = tokenizer.decode(new, skip_special_tokens=True)
    if text.startswith(shown) and len(text) > len(shown):
        yield text[len(shown):]
