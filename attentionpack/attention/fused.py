"""A decoding step of a packed layer as one C call (attentionpack/kernels/decode.c).

`PackedView.attend` runs a dozen small torch operations per layer and step (scores of each piece, concatenation,
softmax, one mix per piece); at 2k tokens they cost about as much as the kernels themselves. For one-token steps
over pieces whose forms the kernel knows — exact; keys per channel; keys after RoPE or values as factors with 4/8-bit
coefficients; values per token — `decode` hands the kernel a table of the pieces (addresses, strides, code
layouts) and gets the attention output back: scores, softmax (merged across blocks with a running max) and value
mix in one pass over the stored bytes. Anything else returns None and the view takes its general path.
"""
from __future__ import annotations

import array

import torch

from .. import kernels
from ..cache.segments import ExactPart
from ..codecs.quant import Quantized, QuantizedLowRankPart, QuantizedPart, dequantize

EXACT, QUANTIZED, FACTORS = 0, 1, 2  # operand kinds (decode.c: KEYS_* and VALUES_*)
FIELDS = 30  # int64 fields of piece_t in decode.c


def decode(pieces, first: int, query: torch.Tensor, allowed: torch.Tensor | None, scale: float,
           softcap: float | None) -> torch.Tensor | None:
    """query (B, Hq, 1, d) float32 rotated; allowed None or (B|1, 1, 1, N) bool over cache indices [first, ...).
    -> (B, 1, Hq, d), or None when a piece or an operand is not one the kernel takes."""
    b, hq, q, d = query.shape
    if q != 1 or query.dtype != torch.float32 or query.device.type != "cpu" or kernels.library() is None:
        return None
    keep: list[torch.Tensor] = []  # temporaries whose addresses the table holds
    table: list[int] = []
    h = None
    for p in pieces:
        if p.index is not None:
            return None
        row = _piece(p, b, d, first, keep)
        if row is None:
            return None
        table += row
        h = h or _heads(p)
    if h is None or hq % h:
        return None
    query = query.contiguous()  # (B, Hq, 1, d) = (B, H, g, d): query head j*g + i uses KV head j
    mask, mask_sb = 0, 0
    if allowed is not None:
        m = allowed.reshape(allowed.shape[0], -1).to(torch.uint8).contiguous()  # (B|1, N)
        keep.append(m)
        mask, mask_sb = m.data_ptr(), (m.shape[1] if m.shape[0] > 1 else 0)
    out = torch.empty(b, 1, hq, d, dtype=torch.float32)
    desc = array.array("q", table)
    addr, _ = desc.buffer_info()
    kernels.library().ap_decode(addr, len(table) // FIELDS, query.data_ptr(), mask, mask_sb, scale,
                                0.0 if softcap is None else float(softcap), out.data_ptr(), b, h, hq // h, d)
    return out


def _heads(p) -> int | None:
    part = p.values
    if isinstance(part, ExactPart):
        return part.data.shape[1]
    return part.q.shape[1] if isinstance(part, QuantizedPart) else None


def _exact(t: torch.Tensor, b: int, d: int) -> tuple[int, int, int] | None:
    """(address, batch stride, head stride) of (B, H, T, d) float32 states with rows of d contiguous floats."""
    if t.dtype != torch.float32 or t.shape[0] != b or t.shape[-1] != d or t.stride(-1) != 1 or \
            (t.shape[2] > 1 and t.stride(2) != d):
        return None
    return t.data_ptr(), t.stride(0), t.stride(1)


def _codes(q: Quantized, keep: list) -> list[int]:
    codes, scales, mins = (t.contiguous() for t in (q.codes, q.scales, q.mins))
    keep += [codes, scales, mins]
    return [codes.data_ptr(), scales.data_ptr(), mins.data_ptr(), codes.shape[-1], scales.shape[-1], q.group_size,
            q.bits]


def _piece(p, b: int, d: int, first: int, keep: list) -> list[int] | None:
    """The FIELDS fields of piece_t for piece p, or None: kinds, tokens, mask column, then the keys' and the
    values' operand fields."""
    keys = _operand(p.keys, 2, b, d, keep)  # keys quantized per channel (axis 2), values per token (axis 3)
    values = _operand(p.values, 3, b, d, keep)
    if keys is None or values is None:
        return None
    return [keys[0], values[0], p.end - p.start, p.start - first, *keys[1], *values[1]]


def _operand(part, axis: int, b: int, d: int, keep: list) -> tuple[int, list[int]] | None:
    """(kind, 13 fields) of keys or values: exact address, batch and head strides | codes, scales, mins, bytes per
    row, groups per row, group size, bits, rows R | basis address, basis is float16."""
    if isinstance(part, ExactPart):
        ex = _exact(part.data, b, d)
        return None if ex is None else (EXACT, [*ex, *[0] * 10])
    if isinstance(part, QuantizedPart) and part.q.axis == axis and part.q.shape[3] == d:
        return QUANTIZED, [0, 0, 0, *_codes(part.q, keep), d, 0, 0]
    if _factored(part):
        return FACTORS, [0, 0, 0, *_codes(part.coeffs, keep), part.coeffs.shape[2], *_basis(part, keep)]
    return None


def _factored(part) -> bool:
    """Factors attention reads as they are: no per-token rotation, float32 states."""
    return isinstance(part, QuantizedLowRankPart) and part.positions is None and part.coeffs.dtype == torch.float32


def _basis(part: QuantizedLowRankPart, keep: list) -> list[int]:
    """(address, is float16) of the basis (B, R, H*d) as float32 or float16 (an 8-bit basis is dequantized)."""
    basis = dequantize(part.basis) if isinstance(part.basis, Quantized) else part.basis
    basis = basis.to(torch.float32) if basis.dtype not in (torch.float32, torch.float16) else basis.contiguous()
    keep.append(basis)
    return [basis.data_ptr(), int(basis.dtype == torch.float16)]
