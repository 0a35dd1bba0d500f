"""Low-rank factors of a multi-head block (AttentionPack, arXiv 2603.23914, multi-head compaction).

A span's keys or values (B, H, T, d) are laid out as the block (B, T, D), D = H*d, all KV heads side by side, and
stored as coeffs (B, T, r) @ basis (B, r, D): one basis per sample shared by every head. Keys may be factored
before RoPE (then `positions` holds each token's rotary position and keys are rotated again when used) or after it
(attention then scores the factors directly, never rebuilding the (T, D) block).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..rope import apply_rope
from .base import BatchFn, RopeFn


@dataclass
class Factors:
    """M ≈ coeffs @ basis: coeffs (B, T, r), basis (B, r, D), in the cache dtype."""

    coeffs: torch.Tensor
    basis: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])

    def reconstruct(self) -> torch.Tensor:
        return self.coeffs @ self.basis  # (B, T, D)


@dataclass
class LowRankPart:
    """Factors of the (T, H*d) block at the cache dtype. positions (B, T) int32 (or (B, T, 3) for multimodal RoPE)
    only for keys factored before RoPE; sample_ranks: the rank each sample's rule chose (<= the stored rank)."""

    factors: Factors
    num_heads: int
    positions: torch.Tensor | None = None
    sample_ranks: tuple[int, ...] = ()

    def materialize(self, start: int, end: int, rope: RopeFn | None) -> torch.Tensor:
        b, t, _ = self.factors.coeffs.shape
        x = self.factors.reconstruct().view(b, t, self.num_heads, -1).transpose(1, 2)  # (B, H, T, d)
        if self.positions is None:
            return x
        if rope is None:
            raise ValueError("LowRankPart: keys stored before RoPE need the rope function to be rebuilt")
        cos, sin = rope(start, end, self.positions)
        return apply_rope(x, cos, sin)

    def scores(self, q: torch.Tensor, start: int, end: int, rope: RopeFn | None) -> torch.Tensor:
        if self.positions is not None:  # rotation depends on each token: rebuild the keys
            return q @ self.materialize(start, end, rope).transpose(-1, -2)
        return factor_scores(self.factors, self.num_heads, q)

    def mix(self, p: torch.Tensor) -> torch.Tensor:
        return factor_mix(self.factors, self.num_heads, p)

    def tensors(self) -> list[torch.Tensor]:
        out = [self.factors.coeffs, self.factors.basis]
        return out + ([self.positions] if self.positions is not None else [])

    def map_batch(self, fn: BatchFn) -> None:
        self.factors = Factors(fn(self.factors.coeffs), fn(self.factors.basis))
        if self.positions is not None:
            self.positions = fn(self.positions)

    def describe(self) -> dict[str, Any]:
        return {"codec": "lowrank", "rank": self.factors.rank, "sample_ranks": list(self.sample_ranks)}


def factor_scores(f: Factors, num_heads: int, q: torch.Tensor) -> torch.Tensor:
    """q · (coeffs @ basis)ᵀ without the (T, H*d) block: (q · basisᵀ_h) first, then the coefficients.
    q (B, H, M, d) -> (B, H, M, T); costs T*r per query row instead of T*r*H*d."""
    b, r, _ = f.basis.shape
    per_head = f.basis.view(b, r, num_heads, -1).permute(0, 2, 3, 1)  # (B, H, d, r)
    return (q @ per_head) @ f.coeffs.transpose(1, 2).unsqueeze(1)  # (B, H, M, r) @ (B, 1, r, T)


def factor_mix(f: Factors, num_heads: int, p: torch.Tensor) -> torch.Tensor:
    """p @ (coeffs @ basis) per head: weights times the left factor, then the right factor. p (B, H, M, T)."""
    b, r, _ = f.basis.shape
    per_head = f.basis.view(b, r, num_heads, -1).transpose(1, 2)  # (B, H, r, d)
    return (p @ f.coeffs.unsqueeze(1)) @ per_head  # (B, H, M, r) @ (B, H, r, d)
