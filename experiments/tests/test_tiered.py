"""Tiered low-rank factors (codecs/tiered.py): each sample's most attended tokens keep the high rank, the rest a
lower one; attention on the stored form agrees with the rebuilt states; the bytes are each tier's own."""

from __future__ import annotations

import pytest
import torch

from attentionpack.codecs.lowrank import RankRule, factorize
from attentionpack.parts import QuantizedLowRankPart, storage_nbytes
from experiments.tiered import TieredLowRankPart

H, D = 3, 16


def _block(seed, b=2, t=96):
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(b, t, 6, generator=g) @ torch.randn(b, 6, H * D, generator=g)  # rank 6 ...
    return low + 0.05 * torch.randn(b, t, H * D, generator=g)  # ... plus a small full-rank rest


def test_tiers_follow_each_samples_own_ranking():
    x = _block(0)
    factors, _, _ = factorize(x, RankRule(rank=12))
    importance = torch.rand(2, 96, generator=torch.Generator().manual_seed(1))
    importance[1] = importance[1].flip(0)  # the second sample ranks its tokens differently
    part = TieredLowRankPart.from_factors(factors, H, importance, shares=(0.25, 0.75), ranks=(12, 2), coeff_bits=8)
    top = [set(importance[i].topk(24).indices.tolist()) for i in range(2)]
    assert [set(part.index[0][i].tolist()) for i in range(2)] == top and top[0] != top[1]
    rebuilt = part.materialize(0, 96, None).transpose(1, 2).reshape(2, 96, H * D)
    err = (rebuilt - x).norm(dim=-1) / x.norm(dim=-1)  # (B, T) per token
    for i in range(2):  # high-rank tokens are rebuilt far better than the low-rank ones
        hi = part.index[0][i].long()
        lo = part.index[1][i].long()
        assert err[i, hi].max() < 0.1 < err[i, lo].mean()


@pytest.mark.parametrize("shares,ranks", [((0.25, 0.75), (12, 2)), ((0.1, 0.3, 0.6), (10, 6, 1)), ((1.0,), (8,))])
def test_attention_on_the_stored_form_matches_rebuilt_states(shares, ranks):
    x = _block(2)
    factors, _, _ = factorize(x, RankRule(rank=12))
    part = TieredLowRankPart.from_factors(factors, H, torch.randn(2, 96), shares, ranks, coeff_bits=4)
    states = part.materialize(0, 96, None)  # (B, H, T, d)
    q, p = torch.randn(2, H, 5, D), torch.softmax(torch.randn(2, H, 5, 96), -1)
    torch.testing.assert_close(part.scores(q, 0, 96, None), q @ states.transpose(-1, -2), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(part.mix(p), p @ states, atol=1e-5, rtol=1e-4)
    assert sum(i.shape[1] for i in part.index) == 96 and part.ranks == [k for k in ranks][: len(part.ranks)]


def test_bytes_are_each_tiers_own():
    x = _block(3, t=512)
    factors, _, _ = factorize(x, RankRule(rank=12))
    full = QuantizedLowRankPart.from_factors(factors, H, coeff_bits=4, basis_bits=16)
    tiered = TieredLowRankPart.from_factors(factors, H, torch.randn(2, 512), (0.25, 0.75), (12, 3), coeff_bits=4)
    held = storage_nbytes(tiered.tensors())
    coeff = sum(t.numel() * t.element_size() for q in tiered.coeffs for t in q.tensors())
    assert held == coeff + tiered.basis.numel() * 2 + 2 * 512  # codes and scales, float16 basis, a byte per token
    assert held < 0.7 * storage_nbytes(full.tensors())


def test_bad_settings_are_named():
    factors, _, _ = factorize(_block(4), RankRule(rank=8))
    imp = torch.randn(2, 96)
    with pytest.raises(ValueError, match="shares"):
        TieredLowRankPart.from_factors(factors, H, imp, (0.5, 0.4), (8, 2))
    with pytest.raises(ValueError, match="ranks"):
        TieredLowRankPart.from_factors(factors, H, imp, (0.5, 0.5), (2, 8))
    with pytest.raises(ValueError, match="importance"):
        TieredLowRankPart.from_factors(factors, H, imp[:, :10], (0.5, 0.5), (8, 2))
