"""Attention on one stored part: the C kernel where one reads the part's codes directly, the part's torch
reference (`Part.scores` / `Part.mix`) otherwise. Both give the same result up to float rounding, in the dtype of
the queries or weights (the kernels accumulate in float32 whatever it is).

q (B, H, M, d) query rows of each KV head -> scores (B, H, M, T); p (B, H, M, T) weights -> (B, H, M, d).
`quantize_widths` encodes a tensor at several widths the same way: the C pass where it applies, the torch
reference otherwise.
"""

from __future__ import annotations

import torch

from ..parts import Part, Quantized, QuantizedLowRankPart, QuantizedPart, RopeFn, check_quantize
from ..parts import quantize_widths as reference_quantize_widths
from . import library, mix_rows, quantize_rows, scores_cols, usable


def scores(part: Part, q: torch.Tensor, start: int, end: int, rope: RopeFn | None) -> torch.Tensor:
    """Logits of the query rows against the part's keys."""
    if isinstance(part, QuantizedPart) and part.q.axis == 2 and usable(part.q.codes, q):  # keys per channel
        c = part.q
        return scores_cols(c.codes, c.scales, c.mins, q, c.bits, c.group_size, c.shape[2]).to(q.dtype)
    if isinstance(part, QuantizedLowRankPart) and part.positions is None and usable(part.coeffs.codes, q):
        basis = part.basis_as(torch.float32)  # (B, r, D): keys factored after RoPE are scored in the basis
        b, h, m, _ = q.shape
        r = basis.shape[1]
        qt = q.to(torch.float32) @ basis.view(b, r, h, -1).permute(0, 2, 3, 1)  # (B, H, M, r) queries in the basis
        c = part.coeffs
        out = scores_cols(c.codes, c.scales, c.mins, qt.reshape(b, h * m, r), c.bits, c.group_size, c.shape[1])
        return out.view(b, h, m, -1).to(q.dtype)  # (B, H, M, T), summed in float32
    return part.scores(q, start, end, rope)


def mix(part: Part, p: torch.Tensor) -> torch.Tensor:
    """The weights' mix of the part's values."""
    if isinstance(part, QuantizedPart) and part.q.axis == 3 and usable(part.q.codes, p):  # values per token
        c = part.q
        return mix_rows(c.codes, c.scales, c.mins, p, c.bits, c.group_size, c.shape[3]).to(p.dtype)
    return part.mix(p)


def quantize_widths(x: torch.Tensor, widths: tuple[int, ...], group_size: int, axis: int = -1) -> dict[int, Quantized]:
    """`parts.quantize_widths` (same arguments, same result up to the sign of a zero minimum) through one C pass
    over the rows for float32, float16 and bfloat16 CPU tensors: the budget encodes every prompt span at every
    width, and the torch reference spends most of that time launching small operations."""
    axis = check_quantize(x, widths, group_size, axis)
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or library() is None:
        return reference_quantize_widths(x, widths, group_size, axis)
    rows = x.movedim(axis, -1).to(torch.float32).contiguous()  # (*rest, L): the quantized axis last
    done = quantize_rows(rows, widths, group_size)
    if done is None:  # a non-finite or out-of-range group: the reference names the problem
        return reference_quantize_widths(x, widths, group_size, axis)
    codes, mins = done
    g = min(group_size, x.shape[axis])
    shape = tuple(x.shape)
    return {b: Quantized(codes[b][0], codes[b][1], mins, shape, x.dtype, axis, g, b) for b in widths}
