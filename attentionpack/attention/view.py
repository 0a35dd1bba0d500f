"""What one attention call over a compressed layer reads: a snapshot of the layer's segments.

`PackedLayer.update` (attentionpack/cache) returns a `LayerView` (for both keys and values) when the layer holds
compressed segments and the model runs the "attentionpack" attention implementation; `packed.py` computes the
attention on it.
The snapshot is taken before the layer compacts its tail, so the call sees the tokens exactly as they were.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from ..kernels.plan import DecodePlan
from ..parts import ExactPart, RopeFn, Segment


@dataclass
class LayerView:
    """segments: the frozen segments in cache order, then the exact tail as a "recent" segment; cache indices
    [first, total) are covered. plan / plan_count: the layer's decode plan and how many of its segments this call
    may read; tail: (keys, values (B, H, n, d), cache index of the first) of the exact tail, or None. paths: the
    cache's counter of which attention path ran (`PackedCache.stats()["attention_paths"]`). sliding: a
    sliding-window layer, whose oldest held tokens may be older than what the model's mask reaches (see
    `packed._cache_mask`)."""

    segments: list[Segment]
    first: int
    total: int
    num_kv_heads: int
    rope: RopeFn
    plan: DecodePlan
    plan_count: int
    tail: tuple[torch.Tensor, torch.Tensor, int] | None
    paths: Counter[str]
    sliding: bool = False

    @classmethod
    def of(
        cls,
        segments: list[Segment],
        tail: tuple[torch.Tensor, torch.Tensor, int] | None,
        first: int,
        total: int,
        num_kv_heads: int,
        rope: RopeFn,
        plan: DecodePlan,
        paths: Counter[str],
        sliding: bool = False,
    ) -> LayerView:
        pieces = list(segments)
        if tail is not None and tail[0].shape[2]:
            k, v, start = tail
            pieces.append(Segment(start, total, ExactPart(k), ExactPart(v), "recent"))
        return cls(pieces, first, total, num_kv_heads, rope, plan, plan.count, tail, paths, sliding)

    @property
    def gathered(self) -> bool:
        return any(s.index is not None for s in self.segments)
