"""Token selection from scores and the compensation token."""

from __future__ import annotations

import math

import pytest
import torch

from experiments.evict import compensation_bias, compensation_token, gather_tokens, kept_mask, select_tokens


def _reference(scores_row, valid_row, count, first, last):
    """Plain-Python choice for one row: protected real tokens, then the best real ones, then padding."""
    t = len(scores_row)
    real = [j for j in range(t) if valid_row[j]]
    protected = set(real[:first]) | {j for j in real if j >= t - last}
    rest = sorted((j for j in real if j not in protected), key=lambda j: -scores_row[j])
    chosen = list(protected) + rest
    chosen += [j for j in range(t) if not valid_row[j]]
    return sorted(chosen[:count])


@pytest.mark.parametrize("seed", range(5))
def test_matches_reference_per_row(seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(3, 40, generator=gen)
    valid = torch.ones(3, 40, dtype=torch.bool)
    valid[1, :9] = False
    valid[2, :25] = False
    idx = select_tokens(scores, keep=12, protect_first=2, protect_last=3, valid=valid)
    assert idx.shape == (3, 12)
    for b in range(3):
        assert idx[b].tolist() == _reference(scores[b].tolist(), valid[b].tolist(), 12, 2, 3)
    assert (idx[2] >= 25).sum() == 12  # 15 real tokens >= 12: no padding chosen


def test_fraction_is_per_row_share_and_rows_differ():
    scores = torch.zeros(2, 20)
    scores[0, 5] = scores[1, 13] = 1.0
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, :10] = False
    idx = select_tokens(scores, keep=0.25, protect_first=1, protect_last=2, valid=valid)
    # row 0: ceil(0.25*20)=5, row 1: ceil(0.25*10)=3 -> rectangular n = 5
    assert idx.shape == (2, 5)
    assert 5 in idx[0].tolist() and 13 not in idx[0].tolist()
    assert 13 in idx[1].tolist() and 5 not in idx[1].tolist()
    assert {0, 18, 19} <= set(idx[0].tolist()) and {10, 18, 19} <= set(idx[1].tolist())


def test_per_head_selection_and_gather():
    scores = torch.rand(2, 3, 30)
    scores[:, 1, 7] = 10.0
    idx = select_tokens(scores, keep=6, protect_first=1, protect_last=1)
    assert idx.shape == (2, 3, 6)
    assert (idx[:, 1] == 7).any(-1).all()
    assert (idx.diff(dim=-1) > 0).all()  # sorted, distinct
    x = torch.randn(2, 3, 30, 4)
    got = gather_tokens(x, idx)
    assert got.shape == (2, 3, 6, 4)
    torch.testing.assert_close(got[1, 2, 3], x[1, 2, idx[1, 2, 3]])
    shared = gather_tokens(x, idx[:, 0])
    torch.testing.assert_close(shared[0, 2], x[0, 2, idx[0, 0]])
    assert kept_mask(idx, 30).sum(-1).eq(6).all()


def test_protection_beats_scores_and_short_rows():
    scores = torch.arange(10.0).unsqueeze(0)  # the last tokens score highest
    idx = select_tokens(-scores, keep=4, protect_first=2, protect_last=2)
    assert idx.tolist() == [[0, 1, 8, 9]]
    # protection larger than keep: everything protected is kept
    assert select_tokens(scores, keep=1, protect_first=3, protect_last=0).tolist() == [[0, 1, 2]]
    assert select_tokens(scores, keep=50).shape == (1, 10)
    nan = scores.clone()
    nan[0, 4] = float("nan")
    assert 4 not in select_tokens(nan, keep=5, protect_first=0, protect_last=0).tolist()[0]


def test_compensation_exact_for_identical_dropped_keys():
    torch.manual_seed(0)
    b, h, t, d = 2, 2, 16, 8
    keys, values = torch.randn(b, h, t, d), torch.randn(b, h, t, d)
    idx = torch.tensor([[0, 1, 2, 14, 15]] * b)  # shared by heads
    dropped = ~kept_mask(idx, t)  # (B, T)
    shared_key = torch.randn(b, h, 1, d)
    keys = torch.where(dropped.view(b, 1, t, 1), shared_key, keys)
    q = torch.randn(b, h, 3, d)
    full = torch.softmax(q @ keys.transpose(-1, -2), -1) @ values  # (B, H, 3, d)
    k_c, v_c, count = compensation_token(keys, values, idx)
    assert count.eq(11).all()
    torch.testing.assert_close(v_c, values[:, :, 3:14].mean(2, keepdim=True))
    k_kept, v_kept = gather_tokens(keys, idx), gather_tokens(values, idx)
    logits = torch.cat(
        [q @ k_kept.transpose(-1, -2), q @ k_c.transpose(-1, -2) + compensation_bias(count).view(b, h, 1, 1)], -1
    )
    approx = torch.softmax(logits, -1) @ torch.cat([v_kept, v_c], 2)
    torch.testing.assert_close(approx, full, atol=1e-5, rtol=1e-5)
    without = torch.softmax(q @ k_kept.transpose(-1, -2), -1) @ v_kept
    assert (without - full).norm() > 10 * (approx - full).norm()


def test_compensation_ignores_padding_and_empty():
    keys = torch.ones(1, 1, 6, 2)
    keys[0, 0, :2] = 100.0  # padding with large values
    valid = torch.tensor([[False, False, True, True, True, True]])
    k_c, v_c, count = compensation_token(keys, keys, torch.tensor([[4, 5]]), valid)
    assert count.item() == 2 and torch.allclose(k_c, torch.ones(1, 1, 1, 2))
    _, _, none = compensation_token(keys, keys, torch.tensor([[2, 3, 4, 5]]), valid)
    assert none.item() == 0 and compensation_bias(none).item() == -math.inf


def test_bad_inputs_are_named():
    s = torch.rand(1, 10)
    for bad in (0, -1, 0.0, 1.5, True, "3"):
        with pytest.raises(ValueError, match="keep="):
            select_tokens(s, keep=bad)
    with pytest.raises(ValueError, match="protect_first"):
        select_tokens(s, keep=3, protect_first=-1)
    with pytest.raises(ValueError, match="valid"):
        select_tokens(s, keep=3, valid=torch.ones(1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="scores"):
        select_tokens(torch.rand(10), keep=3)
    with pytest.raises(ValueError, match="x must be"):
        gather_tokens(torch.rand(2, 10), torch.zeros(2, 1, dtype=torch.long))
