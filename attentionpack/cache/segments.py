"""Stored pieces of one layer's cache: a run of tokens [start, end) whose keys and values are each kept exact or
as low-rank factors.

Shapes: B batch, H KV heads, T tokens in the segment, d head dim, D = H*d, r rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ..codecs.lowrank import Factors
from ..rope import apply_rope

RopeFn = Callable[[int, int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # (start, end, positions) -> cos, sin


class Part(Protocol):
    """Keys or values of a segment. `scores`/`mix` let attention run on the stored form (attention/packed.py):
    q and p hold the query rows of each KV head, (B, H, M, d) and (B, H, M, T)."""

    def materialize(self, start: int, end: int, rope: RopeFn) -> torch.Tensor: ...  # (B, H, T, d)
    def scores(self, q: torch.Tensor, start: int, end: int, rope: RopeFn) -> torch.Tensor: ...  # (B, H, M, T)
    def mix(self, p: torch.Tensor) -> torch.Tensor: ...  # (B, H, M, d)
    def tensors(self) -> list[torch.Tensor]: ...
    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None: ...
    def describe(self) -> dict: ...


@dataclass
class ExactPart:
    """Full-precision states as the model produced them (keys already rotated). data: (B, H, T, d)."""

    data: torch.Tensor

    def materialize(self, start, end, rope):
        return self.data

    def scores(self, q, start, end, rope):
        return q @ self.data.transpose(-1, -2)

    def mix(self, p):
        return p @ self.data

    def tensors(self):
        return [self.data]

    def map_batch(self, fn):
        self.data = fn(self.data)

    def describe(self):
        return {"codec": "exact"}


@dataclass
class LowRankPart:
    """Low-rank factors of the (T, H*d) block; keys stored before RoPE and rotated again on use.

    positions (B, T) int32 is kept only for keys factored before RoPE (rotary angle of each token); keys factored
    after RoPE (and values) have none and are attended through their factors."""

    factors: Factors
    num_heads: int
    positions: torch.Tensor | None = None
    sample_ranks: tuple[int, ...] = ()

    def materialize(self, start, end, rope):
        b, t, _ = self.factors.coeffs.shape
        x = self.factors.reconstruct().view(b, t, self.num_heads, -1).transpose(1, 2)  # (B, H, T, d)
        if self.positions is None:
            return x
        cos, sin = rope(start, end, self.positions)
        return apply_rope(x, cos, sin)

    def scores(self, q, start, end, rope):
        if self.positions is not None:  # rotation depends on each token: rebuild the keys
            return q @ self.materialize(start, end, rope).transpose(-1, -2)
        return factor_scores(self.factors, self.num_heads, q)

    def mix(self, p):
        return factor_mix(self.factors, self.num_heads, p)

    def tensors(self):
        out = [self.factors.coeffs, self.factors.basis]
        return out + ([self.positions] if self.positions is not None else [])

    def map_batch(self, fn):
        self.factors = Factors(fn(self.factors.coeffs), fn(self.factors.basis))
        if self.positions is not None:
            self.positions = fn(self.positions)

    def describe(self):
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


@dataclass
class Segment:
    """Tokens of a layer. `kind` says why it exists (sink, span, chunk, image...).

    Contiguous (index None): cache indices [start, end), the same for every sample, parts (B, H, end - start, d).
    Gathered (vision-language prompts): per sample its own set of cache indices, index (B, n) long, in the row
    order of the parts (B, H, n, d); valid (B, n) bool is False for padding slots (a sample with fewer or smaller
    images), whose index is meaningless. start/end are the min/max (+1) cache index covered. `modality` is "text",
    "image", "video" or "mixed"; `group` names the modality group ("image 1", "images", "text"...).
    """

    start: int
    end: int
    keys: Part
    values: Part
    kind: str
    index: torch.Tensor | None = None  # (B, n) long, gathered segments only
    valid: torch.Tensor | None = None  # (B, n) bool, gathered segments only
    modality: str = "text"
    group: str = ""

    @property
    def length(self) -> int:
        """Token slots per sample (end - start when contiguous)."""
        return self.end - self.start if self.index is None else self.index.shape[1]

    def tokens(self) -> int:
        """Cache entries held, summed over the batch (padding slots excluded)."""
        if self.index is None:
            return self.keys.tensors()[0].shape[0] * self.length
        return int(self.valid.sum())

    def tensors(self) -> list[torch.Tensor]:
        layout = [] if self.index is None else [self.index, self.valid]
        return self.keys.tensors() + self.values.tensors() + layout

    def map_batch(self, fn) -> None:
        self.keys.map_batch(fn)
        self.values.map_batch(fn)
        if self.index is not None:
            self.index, self.valid = fn(self.index), fn(self.valid)
