"""Attention-aware ranks, stored: low-rank factors whose tokens keep a rank that depends on their attention.

A span's tokens are split, per sample, into tiers by the cumulative attention the observation window (the last
prompt queries) pays them (`scoring.observation.token_importance`): the most attended share keeps the high rank,
the rest a lower one. All tiers share one basis (tier t uses its first r_t rows) and each tier stores only its
own coefficients, so the bytes saved are real. Samples of a batch rank their tokens on their own.

Shapes: B batch, T tokens of the span, H heads, d head dim, D = H*d, r0 >= r1 >= ... ranks, n_t tokens of tier t.
For keys, the factors are of the rotated keys (attention scores them without rebuilding them) or values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from attentionpack.parts import Factors, Quantized, dequantize_native, quantize


@dataclass
class TieredLowRankPart:
    """basis (B, r0, D) float16; tier (B, T) uint8: each token's tier (one byte per token, not an index per tier);
    per tier its coefficients in position order, quantized along tokens, stored (B, r_t, ...) like
    `QuantizedLowRankPart`'s. Every sample puts the same number of tokens in a tier."""

    basis: torch.Tensor
    tier: torch.Tensor
    coeffs: list[Quantized]
    num_heads: int

    @classmethod
    def from_factors(
        cls,
        factors: Factors,
        num_heads: int,
        importance: torch.Tensor,
        shares: Sequence[float],
        ranks: Sequence[int],
        coeff_bits: int = 4,
        coeff_group: int = 32,
    ) -> TieredLowRankPart:
        """factors: coeffs (B, T, r) with r >= ranks[0], basis (B, r, D); importance (B, T) (higher = keep more
        rank; padding should score lowest); shares: fraction of each sample's tokens per tier, in tier order,
        summing to 1; ranks: each tier's rank, non-increasing."""
        b, t, r = factors.coeffs.shape
        if len(shares) != len(ranks) or not shares or abs(sum(shares) - 1) > 1e-6 or min(shares) <= 0:
            raise ValueError(
                f"shares={list(shares)} is invalid: one positive share per rank in ranks={list(ranks)}, summing to 1"
            )
        if any(not 1 <= k <= r for k in ranks) or list(ranks) != sorted(ranks, reverse=True):
            raise ValueError(f"ranks={list(ranks)} is invalid: non-increasing, each in [1, {r}] (the factors' rank)")
        if importance.shape != (b, t):
            raise ValueError(f"importance has shape {tuple(importance.shape)}; expected (B, T) = {(b, t)}")
        order = importance.float().argsort(dim=1, descending=True, stable=True)  # (B, T) most attended first
        bounds = [0, *[min(t, math.ceil(t * sum(shares[: i + 1]))) for i in range(len(shares) - 1)], t]
        tier = torch.empty(b, t, dtype=torch.uint8)
        coeffs = []
        for i, k in enumerate(ranks):
            if bounds[i + 1] <= bounds[i]:
                continue
            idx = order[:, bounds[i] : bounds[i + 1]].sort(dim=1).values  # (B, n_t) in position order
            tier.scatter_(1, idx, len(coeffs))
            c = factors.coeffs.gather(1, idx[..., None].expand(-1, -1, r))[..., :k]  # (B, n_t, r_t)
            coeffs.append(quantize(c, coeff_bits, coeff_group, axis=1))
        basis = factors.basis[:, : ranks[0]].to(torch.float16).contiguous()
        return cls(basis, tier, coeffs, num_heads)

    @property
    def length(self) -> int:
        return self.tier.shape[1]

    @property
    def index(self) -> list[torch.Tensor]:
        """Per tier, (B, n_t) positions of its tokens in the span, ascending."""
        b = self.tier.shape[0]
        return [(self.tier == i).nonzero()[:, 1].view(b, -1) for i in range(len(self.coeffs))]

    @property
    def ranks(self) -> list[int]:
        return [q.shape[2] for q in self.coeffs]

    def _per_head(self, dtype: torch.dtype) -> torch.Tensor:
        b, r, _ = self.basis.shape
        return self.basis.to(dtype).view(b, r, self.num_heads, -1).transpose(1, 2)  # (B, H, r0, d)

    def _tiers(self, dtype: torch.dtype):
        for idx, q in zip(self.index, self.coeffs):
            yield idx, dequantize_native(q, dtype).transpose(1, 2)  # (B, n_t), (B, n_t, r_t)

    def materialize(self, start: int, end: int, rope) -> torch.Tensor:
        b, r, dim = self.basis.shape
        dtype = self.coeffs[0].dtype
        out = torch.empty(b, self.length, dim, dtype=dtype)  # every token belongs to one tier
        basis = self.basis.to(dtype)
        for idx, c in self._tiers(dtype):
            out.scatter_(1, idx[..., None].expand(-1, -1, dim), c @ basis[:, : c.shape[2]])
        return out.view(b, self.length, self.num_heads, -1).transpose(1, 2)  # (B, H, T, d)

    def scores(self, q: torch.Tensor, start: int, end: int, rope) -> torch.Tensor:
        """q (B, H, M, d) -> (B, H, M, T): queries in the basis once, then each tier at its rank."""
        b, h, m, _ = q.shape
        qt = q @ self._per_head(q.dtype).transpose(-1, -2)  # (B, H, M, r0)
        out = torch.empty(b, h, m, self.length, dtype=q.dtype)
        for idx, c in self._tiers(q.dtype):
            k = c.shape[2]
            s = qt[..., :k] @ c.transpose(1, 2).unsqueeze(1)  # (B, H, M, n_t)
            out.scatter_(-1, idx[:, None, None, :].expand(b, h, m, -1), s)
        return out

    def mix(self, p: torch.Tensor) -> torch.Tensor:
        """p (B, H, M, T) -> (B, H, M, d): each tier's weights times its coefficients, summed in the basis."""
        b, h, m, _ = p.shape
        acc = p.new_zeros(b, h, m, self.basis.shape[1])  # (B, H, M, r0)
        for idx, c in self._tiers(p.dtype):
            pt = p.gather(-1, idx[:, None, None, :].expand(b, h, m, -1))  # (B, H, M, n_t)
            acc[..., : c.shape[2]] += pt @ c.unsqueeze(1)
        return acc @ self._per_head(p.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.basis, self.tier, *(t for q in self.coeffs for t in q.tensors())]

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.basis, self.tier = fn(self.basis), fn(self.tier)
        self.coeffs = [q.map_batch(fn) for q in self.coeffs]

    def describe(self) -> dict:
        return {
            "codec": "lowrank_tiered",
            "ranks": self.ranks,
            "tokens": [q.shape[1] for q in self.coeffs],
            "coeff_bits": self.coeffs[0].bits,
        }
