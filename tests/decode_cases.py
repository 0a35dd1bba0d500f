"""Stored pieces of every form the one-call decoding steps take (C: kernels/decode.c, Triton:
kernels/triton_decode.py) and the float64 dense attention they are checked against."""

from __future__ import annotations

import torch

from attentionpack.kernels.plan import DecodePlan
from attentionpack.parts import ExactPart, Factors, QuantizedLowRankPart, QuantizedPart, Segment

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton's device (CPU: its interpreter, tests/conftest.py)


def Piece(k, v, start, end):  # noqa: N802  (a stored run, as the tests build them)
    return Segment(start, end, k, v, "span")


B, H, G, D = 3, 2, 3, 64  # samples, KV heads, query heads per KV head, head dim


def states(gen, t, d=D, dtype=torch.float32):
    return torch.randn(B, H, t, d, generator=gen).to(dtype)


def keys(kind, gen, t, d=D, dtype=torch.float32):
    if kind == "exact":  # a slice of a wider buffer, as the exact tail hands it over
        return ExactPart(states(gen, t + 10, d, dtype)[:, :, 3 : 3 + t])
    if kind.startswith("channel"):  # "channel4": 4 bits in groups of 32 tokens; "channel2g128": of 128
        bits, _, group = kind[7:].partition("g")
        return QuantizedPart.keys(states(gen, t, d, dtype), int(bits), int(group or 32))
    # factors of keys after RoPE, of a rank no vector width or register block divides
    coeffs = torch.randn(B, t, 19, generator=gen).to(dtype)
    basis = torch.linalg.qr(torch.randn(B, H * d, 19, generator=gen)).Q.transpose(1, 2).contiguous().to(dtype)
    basis_form, coeff_bits = kind[len("factors") :].split("-")
    return QuantizedLowRankPart.from_factors(
        Factors(coeffs, basis), H, coeff_bits=int(coeff_bits), basis_bits={"16": 16, "32": None, "8": 8}[basis_form]
    )


def values(kind, gen, t, d=D, dtype=torch.float32):
    if kind == "exact":
        return ExactPart(states(gen, t, d, dtype))
    if kind.startswith("factors"):  # low-rank values: same factor forms as keys after RoPE
        return keys(kind, gen, t, d, dtype)
    bits, _, group = kind[5:].partition("g")  # "quant4": groups of 32 channels; "quant2g64": of 64
    return QuantizedPart.values(states(gen, t, d, dtype), int(bits), int(group or 32))


def layer_pieces(gen, key_kind, value_kind, lengths, d=D, dtype=torch.float32):
    pieces, at = [], 0
    for i, t in enumerate(lengths):  # sink and tail exact, the middle in the forms under test
        middle = 0 < i < len(lengths) - 1
        pieces.append(
            Piece(
                keys(key_kind if middle else "exact", gen, t, d, dtype),
                values(value_kind if middle else "exact", gen, t, d, dtype),
                at,
                at + t,
            )
        )
        at += t
    return pieces


def reference(pieces, query, allowed, scale, softcap):
    keys = torch.cat([p.keys.materialize(p.start, p.end, None) for p in pieces], 2).double()  # (B, H, N, d)
    values = torch.cat([p.values.materialize(p.start, p.end, None) for p in pieces], 2).double()
    b, hq, _, d = query.shape
    qg = query.double().view(b, H, hq // H, d) * scale
    s = qg @ keys.transpose(-1, -2)  # (B, H, g, N)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if allowed is not None:
        s = s.masked_fill(~allowed.view(allowed.shape[0], 1, 1, -1), float("-inf"))
    out = torch.softmax(s, -1) @ values  # (B, H, g, d)
    return out.reshape(b, 1, hq, d).float()


def c_step(pieces, first, query, allowed, scale, softcap):
    """The C one-call step over `pieces`: all but the last planned as frozen segments, the last as the exact tail;
    None when the plan says the kernel cannot take it."""
    plan = DecodePlan(H, query.shape[-1], pieces[:-1])
    tail = pieces[-1]
    t = (tail.keys.data, tail.values.data, tail.start)
    if plan.why_not(query, t[0], plan.count):
        return None
    return plan.run(plan.count, t, first, query, allowed, scale, softcap)


def triton_step(pieces, first, query, allowed, scale, softcap):
    """The Triton step over `pieces` on DEVICE (every tensor moved there), the output back on CPU."""
    from attentionpack.kernels import triton_decode

    for p in pieces:
        p.map_batch(lambda t: t.to(DEVICE))
    query = query.to(DEVICE)
    allowed = None if allowed is None else allowed.to(DEVICE)
    why = triton_decode.why_not(pieces, query)
    assert why == "", why
    return triton_decode.decode(pieces, H, first, query, allowed, scale, softcap).cpu()
