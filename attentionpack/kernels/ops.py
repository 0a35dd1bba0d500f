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


def scores(
    part: Part, q: torch.Tensor, start: int, end: int, rope: RopeFn | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits of the query rows against the part's keys; with `out` (float32 (B, H, M, T), each (M, T) matrix
    contiguous: a slot of a larger buffer) written there, in float32."""
    if isinstance(part, QuantizedPart) and part.q.axis == 2 and usable(part.q.codes, q):  # keys per channel
        c = part.q
        if out is not None:
            return scores_cols(c.codes, c.scales, c.mins, q, c.bits, c.group_size, c.shape[2], out=out)
        return scores_cols(c.codes, c.scales, c.mins, q, c.bits, c.group_size, c.shape[2]).to(q.dtype)
    if out is not None:
        return out.copy_(scores(part, q, start, end, rope))
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
    return quantize_groups(x, {group_size: widths}, axis)[group_size]


def quantize_groups(
    x: torch.Tensor, groups: dict[int, tuple[int, ...]], axis: int = -1
) -> dict[int, dict[int, Quantized]]:
    """`quantize_widths` at several group sizes, {group_size: widths} -> {group_size: {bits: Quantized}}: the
    quantized axis is moved last once for all of them (for keys, quantized along the tokens, that copy cost as
    much as the C pass)."""
    for group_size, widths in groups.items():
        axis = check_quantize(x, widths, group_size, axis)
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or library() is None:
        return {gs: reference_quantize_widths(x, widths, gs, axis) for gs, widths in groups.items()}
    rows = x.movedim(axis, -1).to(torch.float32).contiguous()  # (*rest, L): the quantized axis last
    shape = tuple(x.shape)
    out: dict[int, dict[int, Quantized]] = {}
    for group_size, widths in groups.items():
        done = quantize_rows(rows, widths, group_size)
        if done is None:  # a non-finite or out-of-range group: the reference names the problem
            return {gs: reference_quantize_widths(x, ws, gs, axis) for gs, ws in groups.items()}
        codes, mins = done
        g = min(group_size, x.shape[axis])
        out[group_size] = {b: Quantized(codes[b][0], codes[b][1], mins, shape, x.dtype, axis, g, b) for b in widths}
    return out
