"""Dropping a stored run's oldest tokens: what a sliding-window layer does once they have left its window.

A sliding layer forgets a segment only once all of its tokens are out of the window; until then the segment's
out-of-window tokens are masked but held. `drop_front(part, n)` stores the same part without its first n tokens
(new tensors, so the bytes are freed), and `front_granule(part)` says in steps of how many tokens a part can drop
them: 1 for exact rows, per-token values and factor coefficients at the cache dtype; a quantization group for keys
quantized per channel and for quantized factor coefficients (whole groups go). None: a form that cannot drop
tokens (the layer keeps it whole). `trim_segment` applies it to a whole `Segment` (keys and values alike).

Shapes: parts hold (B, H, T, d) states, or factors with coefficients (B, T, r) and positions (B, T[, 3]).
"""

from __future__ import annotations

import dataclasses
import math

from .base import Part, Segment
from .exact import ExactPart
from .lowrank import Factors, LowRankPart
from .lowrank_quant import QuantizedLowRankPart
from .quant import QuantizedPart

TOKENS = 2  # the token axis of (B, H, T, d) states


def front_granule(part: Part) -> int | None:
    """The steps in which `drop_front` can drop `part`'s oldest tokens, or None when it cannot."""
    if isinstance(part, (ExactPart, LowRankPart)):
        return 1
    if isinstance(part, QuantizedPart) and part.q.axis in (2, 3):
        return part.q.group_size if part.q.axis == TOKENS else 1
    if isinstance(part, QuantizedLowRankPart):
        return part.coeffs.group_size  # coefficients (B, T, r) quantized along T
    return None


def drop_front(part: Part, n: int) -> Part:
    """`part` without its first n tokens (0 < n < its tokens; a multiple of `front_granule(part)`)."""
    if isinstance(part, ExactPart):
        return ExactPart(part.data[:, :, n:].clone())
    if isinstance(part, QuantizedPart):
        return QuantizedPart(part.q.drop_front(n, TOKENS))
    if isinstance(part, (LowRankPart, QuantizedLowRankPart)):
        positions = None if part.positions is None else part.positions[:, n:].clone()  # (keys before RoPE)
        if isinstance(part, LowRankPart):
            f = part.factors
            coeffs = f.coeffs[:, n:].clone()
            return LowRankPart(Factors(coeffs, f.basis), part.num_heads, positions, part.sample_ranks)
        quantized = part.coeffs.drop_front(n, 1)
        return QuantizedLowRankPart(quantized, part.basis, part.num_heads, positions, part.sample_ranks)
    raise TypeError(f"{type(part).__name__} cannot drop tokens (front_granule is None)")


def trim_segment(segment: Segment, horizon: int, minimum: int) -> Segment | None:
    """`segment` without its tokens before cache index `horizon` (whole granules of its parts, at least `minimum`
    tokens), or None when none can go: a contiguous segment of every head whose parts can drop tokens. Called at
    every decoding step of a sliding layer: the common case (fewer than `minimum` to drop) returns at once."""
    if segment.start + minimum > horizon or segment.index is not None or segment.per_head:
        return None
    granules = [front_granule(p) for p in (segment.keys, segment.values)]
    if None in granules:
        return None
    step = math.lcm(*(g for g in granules if g is not None))
    n = (horizon - segment.start) // step * step
    if n < minimum or n >= segment.length:
        return None
    keys, values = drop_front(segment.keys, n), drop_front(segment.values, n)
    return dataclasses.replace(segment, start=segment.start + n, keys=keys, values=values)
