"""Every position rule of the library, in one place: the model, the data pipeline and generation ask here.

- plain: positions count from 0 at each row's first real token (left pads get 0); 2D families
  (GLM, ChatGLM-6B) add a block-position stream of zeros;
- continuing a cache: the next position after the cached sequence's last one, then counting on;
- the next position after a token: 1D families count up; 2D families generate inside a blank, where
  the position stays the mask's and the block position counts up, as the references' generation does;
- GLM's Part A / Part B layout (GLM_SPEC §4), shared by training samples and blank infilling;
- prompt conventions: how a family reads positions (and a bidirectional prefix) from the tokens of a
  prompt given without positions. A release format registers its family's convention here; families
  without one use the plain rules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .config import GLMConfig
from .errors import InputError


@dataclass(frozen=True)
class PromptConvention:
    """How a family reads a prompt given without position ids.

    derive: ``(cfg, input_ids [B, T], pad_left [B] | None) -> (position_ids [B, 2, T], prefix_len [B])``,
      or None where the plain rules apply (also when ``derive`` itself returns None).
    infill_at_first_gmask: blank infilling generates at the first ``[gMASK]`` only (ChatGLM-6B reads
      ``[MASK]`` tokens before it as plain context), instead of at every mask.
    """

    derive: Optional[Callable[[GLMConfig, Tensor, Optional[Tensor]], Optional[tuple[Tensor, Tensor]]]] = None
    infill_at_first_gmask: bool = False


PLAIN = PromptConvention()
_CONVENTIONS: dict[str, PromptConvention] = {}


def register_convention(family: str, convention: PromptConvention) -> None:
    """Say which prompt convention ``family`` follows (its release format module calls this at import)."""
    _CONVENTIONS[family] = convention


def convention(cfg: GLMConfig) -> PromptConvention:
    """The prompt convention of ``cfg``'s family (the plain rules when none is registered)."""
    return _CONVENTIONS.get(cfg.family, PLAIN)


def derive(cfg: GLMConfig, input_ids: Tensor, pad_left: Optional[Tensor] = None) -> Optional[tuple[Tensor, Tensor]]:
    """``(position_ids, prefix_len)`` the family's convention reads from a prompt, or None (plain rules)."""
    fn = convention(cfg).derive
    return None if fn is None else fn(cfg, input_ids, pad_left)


def sop_gmask_structure(cfg: GLMConfig, input_ids: Tensor,
                        pad_left: Optional[Tensor] = None) -> Optional[tuple[Tensor, Tensor]]:
    """A prompt read the way ChatGLM-6B's reference reads it (GLM_SPEC §2.6): the context ends at the
    first bos (``<sop>``); from there on every token takes the position of the first ``[gMASK]`` (else
    the first ``[MASK]``) and block positions 1, 2, ...; the context is bidirectional (``prefix_len`` =
    the bos slot). Returns ``(position_ids [B, 2, T], prefix_len [B])``; rows without a bos or a mask
    keep the plain rule (count from 0, causal). None when the config names no bos or mask tokens.

    The model derives this on the first call into a cache only: prefill such a prompt in one call (or
    pass positions), since a first chunk that ends before the bos would be read as all context-free
    causal text."""
    masks = [cfg.special_tokens.get(k) for k in ("[gMASK]", "[MASK]")]
    if cfg.bos_token_id is None or all(m is None for m in masks):
        return None
    B, T = input_ids.shape
    if T == 0:
        return None
    slots = torch.arange(T, device=input_ids.device)

    def first(token: Optional[int]) -> Tensor:  # first slot of token per row, T when absent
        hit = input_ids == token if token is not None else torch.zeros_like(input_ids, dtype=torch.bool)
        return torch.where(hit.any(1), hit.int().argmax(1), T)

    ctx, gmask, mask = first(cfg.bos_token_id), first(masks[0]), first(masks[1])
    mask_pos = torch.where(gmask < T, gmask, mask)
    ok = (ctx < T) & (mask_pos < T)
    pad = pad_left.to(input_ids.device) if pad_left is not None else torch.zeros(B, dtype=torch.long,
                                                                                 device=input_ids.device)
    after = (slots >= ctx[:, None]) & ok[:, None]
    pos = torch.where(after, (mask_pos - pad)[:, None], (slots - pad[:, None]).clamp_min(0))
    block = torch.where(after, slots - ctx[:, None] + 1, 0)
    return torch.stack((pos, block), dim=1), torch.where(ok, ctx, 0)


# ----------------------------------------------------------------------------------------------
def plain(cfg: GLMConfig, batch: int, length: int, pad_left: Optional[Tensor] = None, start: int = 0,
          device: "torch.device | str | None" = None) -> Tensor:
    """``[B, S, T]`` position ids counting from 0 at each row's first real token (pads get 0), for
    slots ``start .. start + length - 1``; a 2D family's block positions are 0."""
    pos = torch.arange(start, start + length, device=device).expand(batch, length)
    if pad_left is not None:
        pos = (pos - pad_left.view(-1, 1).to(device)).clamp_min(0)
    ids = pos.unsqueeze(1)
    if cfg.position_streams == 2:
        ids = torch.cat((ids, torch.zeros_like(ids)), dim=1)
    return ids


def next_after(last: Tensor) -> Tensor:
    """The position ids ``[B, S]`` of the token after one with ids ``last`` ``[B, S]``.

    1D families count up. 2D families (GLM, ChatGLM-6B) generate inside a blank: the position stays
    the mask's and the block position counts up, as the references' generation does.
    """
    if last.shape[1] == 2:
        return torch.stack((last[:, 0], last[:, 1] + 1), dim=1)
    return last + 1


def continuing(last: Tensor, length: int) -> Tensor:
    """``[B, S, length]`` position ids of ``length`` tokens fed after one with ids ``last`` ``[B, S]``
    (a cache's last position ids): `next_after` it, then counting on in the stream that counts."""
    nxt = next_after(last)
    step = torch.arange(length, device=last.device)
    return nxt.unsqueeze(-1) + (step if nxt.shape[1] == 1 else torch.stack((torch.zeros_like(step), step)))


def as_streams(cfg: GLMConfig, position_ids: Tensor) -> Tensor:
    """Caller's position ids in the model's ``[B, S, T]`` form (1D families may pass ``[B, T]``)."""
    if position_ids.dim() == 2 and cfg.position_streams == 1:
        return position_ids.unsqueeze(1)
    return position_ids


def for_call(cfg: GLMConfig, input_ids: Tensor, position_ids: Optional[Tensor], prefix_len: Optional[Tensor],
             pad_left: Optional[Tensor], cache_start: int = 0,
             cache_last: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """The ``[B, S, T]`` position ids and the prefix length of one (non-static) forward call.

    Given positions are used as they are. Otherwise: continuing a cache whose last position ids are
    ``cache_last``; on a first call, the family's prompt convention where it reads the prompt (it also
    supplies ``prefix_len`` unless one is given); else the plain rule from slot ``cache_start``.
    """
    if position_ids is not None:
        return as_streams(cfg, position_ids), prefix_len
    if cache_last is not None:
        return continuing(cache_last, input_ids.shape[1]), prefix_len
    derived = derive(cfg, input_ids, pad_left) if cache_start == 0 else None
    if derived is not None:
        return derived[0], derived[1] if prefix_len is None else prefix_len
    B, T = input_ids.shape
    return plain(cfg, B, T, pad_left, cache_start, input_ids.device), prefix_len


# ----------------------------------------------------------------------------------------------
def span_layout(mask_slot: int, length: int) -> tuple[list[int], list[int]]:
    """GLM's 2D positions of one Part B span: ``<sop>`` and ``length`` tokens after it, all at the
    position of their mask, ``mask_slot`` (a Part A slot), with block positions ``1 .. length + 1``.
    Generation continues a span one token at a time with `next_after`, which agrees with this."""
    return [mask_slot] * (length + 1), list(range(1, length + 2))


def blank_layout(part_a_len: int, mask_slots: Sequence[int] = (),
                 span_lens: Sequence[int] = ()) -> tuple[list[int], list[int]]:
    """GLM's 2D positions (GLM_SPEC §4) of a Part A of ``part_a_len`` tokens followed by its Part B.

    Part A takes positions ``0 .. part_a_len - 1``, block position 0. Part B holds one span per mask in
    the order given, span ``k`` of ``span_lens[k]`` tokens after its ``<sop>`` laid out by `span_layout`
    at ``mask_slots[k]``. Returns ``(position, block_position)``, each of length
    ``part_a_len + sum(span_lens[k] + 1)``. Training samples (`glm.data`) and blank infilling
    (`glm.generate`) both lay out their tokens with it."""
    if len(mask_slots) != len(span_lens):
        raise InputError(f"blank_layout takes one span length per mask slot; got {len(mask_slots)} slots and "
                         f"{len(span_lens)} lengths")
    position, block = list(range(part_a_len)), [0] * part_a_len
    for slot, n in zip(mask_slots, span_lens):
        p, b = span_layout(slot, n)
        position += p
        block += b
    return position, block
