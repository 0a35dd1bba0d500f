"""Exact states: what the model produced (keys already rotated), kept at the cache dtype (or the half-precision
dtype of an exact tail, `PackConfig.tail_dtype`: scores and mixes are then computed in the query's dtype)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .base import BatchFn, RopeFn


@dataclass
class ExactPart:
    """data: (B, H, T, d) keys (rotated) or values."""

    data: torch.Tensor

    def materialize(self, start: int, end: int, rope: RopeFn | None) -> torch.Tensor:
        return self.data

    def scores(self, q: torch.Tensor, start: int, end: int, rope: RopeFn | None) -> torch.Tensor:
        return q @ self.data.to(q.dtype).transpose(-1, -2)  # (B, H, M, T)

    def mix(self, p: torch.Tensor) -> torch.Tensor:
        return p @ self.data.to(p.dtype)  # (B, H, M, d)

    def tensors(self) -> list[torch.Tensor]:
        return [self.data]

    def map_batch(self, fn: BatchFn) -> None:
        self.data = fn(self.data)

    def describe(self) -> dict[str, Any]:
        return {"codec": "exact"}
