"""The exact tail's padding rule (cache/tail.py): a call's positions and padding flags are recognized as following
the rule of a left-padded batch, or not, the same way on the small-call path (Python numbers, decoding steps) as
on the tensor path; a tail whose calls follow the rule stores no flags, one that breaks it stores them."""

from __future__ import annotations

import pytest
import torch

from attentionpack.cache import tail as tail_module
from attentionpack.cache.tail import ExactTail, _leading_padding


def _call(pad: list[int], first: int, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.arange(first, first + q)[None, :]
    pt = torch.tensor(pad)[:, None]
    return (index - pt).clamp_min(0).to(torch.int32), index >= pt


def _cases():
    pad = [0, 3, 5]
    yield "follows", pad, 6, *_call(pad, 6, 1)
    yield "prompt continues", pad, 2, *_call(pad, 2, 5)
    pos, ok = _call(pad, 6, 2)
    ok[1, 1] = False
    yield "inner hole", pad, 6, pos, ok
    pos, ok = _call(pad, 6, 1)
    pos[2, 0] += 1
    yield "position off by one", pad, 6, pos, ok
    pos, ok = _call(pad, 2, 3)
    ok[2, 0] = True
    yield "padding flagged real", pad, 2, pos, ok


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c[0])
def test_small_calls_and_tensor_path_agree(case, monkeypatch):
    name, pad, first, pos, ok = case
    small = _leading_padding(pos, ok, first, pad)
    monkeypatch.setattr(tail_module, "_SMALL_CALL", 0)
    assert _leading_padding(pos, ok, first, pad) == small
    assert (small == pad) == (name in ("follows", "prompt continues"))


def test_tail_keeps_flags_derived_until_a_step_breaks_the_rule():
    pad = [0, 2]
    k = torch.randn(2, 1, 4, 8)
    tail = ExactTail(k, k, *_call(pad, 0, 4))
    assert tail.pad == pad and tail.positions is None
    tail.append(k[:, :, :1], k[:, :, :1], *_call(pad, 4, 1))
    assert tail.pad == pad and tail.positions is None  # a decoding step that follows the rule
    pos, ok = _call(pad, 5, 1)
    ok[0, 0] = False  # a hole: flags become stored arrays
    tail.append(k[:, :, :1], k[:, :, :1], pos, ok)
    assert tail.pad is None
    _, _, positions, valid = tail.view()
    assert valid is not None and valid.tolist() == [[True] * 5 + [False], [False, False, True, True, True, True]]
    assert positions is not None and positions[1].tolist() == [0, 0, 0, 1, 2, 3]
    keys, values = tail.states()
    assert keys.shape[-2] == values.shape[-2] == 6
