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
    """Keys or values of a segment."""

    def materialize(self, start: int, end: int, rope: RopeFn) -> torch.Tensor: ...  # (B, H, T, d)
    def tensors(self) -> list[torch.Tensor]: ...
    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None: ...
    def describe(self) -> dict: ...


@dataclass
class ExactPart:
    """Full-precision states as the model produced them (keys already rotated). data: (B, H, T, d)."""

    data: torch.Tensor

    def materialize(self, start, end, rope):
        return self.data

    def tensors(self):
        return [self.data]

    def map_batch(self, fn):
        self.data = fn(self.data)

    def describe(self):
        return {"codec": "exact"}


@dataclass
class LowRankPart:
    """Low-rank factors of the (T, H*d) block; keys stored before RoPE and rotated again on use.

    positions (B, T) int32 is kept only for keys (rotary angle of each token)."""

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

    def tensors(self):
        out = [self.factors.coeffs, self.factors.basis]
        return out + ([self.positions] if self.positions is not None else [])

    def map_batch(self, fn):
        self.factors = Factors(fn(self.factors.coeffs), fn(self.factors.basis))
        if self.positions is not None:
            self.positions = fn(self.positions)

    def describe(self):
        return {"codec": "lowrank", "rank": self.factors.rank, "sample_ranks": list(self.sample_ranks)}


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
