"""`glm.positions`: every position rule, checked against values written out by hand, and the prompt
convention hook through which a family reads positions from its prompt."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import glm
from glm import positions
from glm.data import SpecialIds, infill_layout
from glm.errors import InputError


def test_plain_counts_from_each_rows_first_real_token():
    cfg1, cfg2 = glm.preset("tiny-chatglm3"), glm.preset("tiny-glm")
    got = positions.plain(cfg1, 2, 4, pad_left=torch.tensor([2, 0]))
    assert got.tolist() == [[[0, 0, 0, 1]], [[0, 1, 2, 3]]]
    # Continuing from slot 3 (a chunked prefill): the pads still count as slots.
    assert positions.plain(cfg1, 1, 2, pad_left=torch.tensor([1]), start=3).tolist() == [[[2, 3]]]
    assert positions.plain(cfg2, 1, 3).tolist() == [[[0, 1, 2], [0, 0, 0]]]


def test_next_position_counts_up_in_1d_and_inside_the_blank_in_2d():
    assert positions.next_after(torch.tensor([[4], [7]])).tolist() == [[5], [8]]
    assert positions.next_after(torch.tensor([[4, 1]])).tolist() == [[4, 2]]
    assert positions.continuing(torch.tensor([[4]]), 3).tolist() == [[[5, 6, 7]]]
    assert positions.continuing(torch.tensor([[4, 1]]), 3).tolist() == [[[4, 4, 4], [2, 3, 4]]]


def test_blank_layout_is_part_a_then_each_span_at_its_mask():
    assert positions.blank_layout(3) == ([0, 1, 2], [0, 0, 0])
    assert positions.span_layout(2, 0) == ([2], [1])
    # The worked example of docs/objective.md: spans of 3 and 1 tokens at masks 4 and 2, in that order.
    assert positions.blank_layout(5, [4, 2], [2, 1]) == ([0, 1, 2, 3, 4, 4, 4, 4, 2, 2],
                                                         [0, 0, 0, 0, 0, 1, 2, 3, 1, 2])
    with pytest.raises(InputError, match="one span length per mask slot"):
        positions.blank_layout(3, [1], [])


def test_a_span_continued_with_next_after_is_its_span_layout():
    # Generation feeds <sop> at span_layout(slot, 0) and continues with next_after; training lays the
    # whole span out at once. Both must give the same positions.
    pos, blk = positions.span_layout(6, 4)
    fed = [torch.tensor([[6, 1]])]
    for _ in range(4):
        fed.append(positions.next_after(fed[-1]))
    assert [f[0].tolist() for f in fed] == [list(x) for x in zip(pos, blk)]


def test_training_samples_use_the_shared_layout():
    special = SpecialIds(mask=1, smask=2, gmask=3, sop=4, eop=5, eos=6, pad=0, cls=7)
    s = infill_layout([10, 11, 12, 13, 14, 15, 16], spans=[(1, 3), (4, 5)], mask_id=special.mask,
                      special=special, order=[1, 0])
    pos, blk = positions.blank_layout(s.prefix_len, [3, 1], [1, 2])
    assert s.position.tolist() == pos and s.block_position.tolist() == blk
    assert s.position.dtype == s.block_position.dtype == np.int64


def test_unregistered_families_follow_the_plain_rules():
    cfg = glm.preset("tiny-chatglm3")
    assert positions.convention(cfg) == positions.PromptConvention()
    assert positions.derive(cfg, torch.tensor([[1, 2, 3]])) is None


@torch.no_grad()
def test_the_model_asks_the_family_convention_for_positions(monkeypatch):
    """A registered convention supplies position ids and prefix_len for calls that pass none."""
    model = glm.GLM(glm.preset("tiny-glm")).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    pos = torch.tensor([[[0, 1, 1, 1], [0, 0, 1, 2]]])
    seen = []

    def derive(cfg, input_ids, pad_left):
        seen.append(cfg.family)
        return pos, torch.tensor([2])

    monkeypatch.setitem(positions._CONVENTIONS, "glm", positions.PromptConvention(derive=derive))
    got = model(ids)
    assert seen == ["glm"]
    assert torch.equal(got, model(ids, pos, prefix_len=torch.tensor([2])))
    # A cache continues from the derived positions, never deriving again.
    cache = model.new_cache(1, 8)
    model(ids, cache=cache)
    assert cache.last_position_ids.tolist() == [[1, 2]] and cache.prefix_len.tolist() == [2]
    model(torch.tensor([[9]]), cache=cache)
    assert cache.last_position_ids.tolist() == [[1, 3]] and len(seen) == 2
