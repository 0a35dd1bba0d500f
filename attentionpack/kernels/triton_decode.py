"""A layer's one-token decoding step as Triton kernels: the GPU twin of the C step (`decode.c`, `plan.py`).

For every segment (sink, compressed spans and chunks, the exact tail) one launch over a grid of (sample x held KV
head, block of `BLOCK_T` tokens) computes, flash-decoding style, the block's partial attention in on-chip tiles:
the keys' tile is read in its stored form (exact rows; 2/4/8-bit codes per channel; quantized coefficients times
a basis), scored against the query rows of that KV head, masked (cache mask, slots' log multiplicities, softcap),
exponentiated against the block's own maximum, and the values' tile (exact rows; codes per token; coefficients
times a basis) mixed with those weights. Nothing is dequantized to memory. The partials of all blocks of all
segments — (max, sum, weighted values) per query row — are then merged in torch (rescaled to the common maximum,
normalized), as `decode.c` merges its work items.

Forms taken: those the C kernel takes (`plan.form_reason`, shared). Runs on CUDA tensors; on CPU only under Triton's
interpreter (`TRITON_INTERPRET=1`, how the tests check it against a float64 reference). `attention/packed.py`
calls it for CUDA queries (or any, with ATTENTIONPACK_DECODE=triton) and records the path as "triton".

Shapes: B samples, H KV heads (Hp held by a per-head segment), M query rows per KV head (grouped-query heads for
one token), d head dim, T tokens of a segment, R rank of a factor basis.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import torch

from ..parts import ExactPart, Part, Quantized, QuantizedLowRankPart, QuantizedPart, Segment
from . import ACTIVATION_DTYPES
from .plan import EXACT, FACTORS, QUANTIZED, form_reason, gathered_slots  # operand kinds and forms: the C step's

triton: Any = None  # imported on first use (optional: pip install 'attentionpack[gpu]'); the kernel reads `tl`
tl: Any = None
_import_error = ""

BLOCK_T = 64  # tokens per program


def interpreted() -> bool:
    """Triton runs kernels in its interpreter (numpy, CPU tensors) instead of compiling them for a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _import() -> str:
    """Import Triton once; "" on success, else the import error."""
    global triton, tl, _import_error
    if triton is None and not _import_error:
        try:
            import triton as triton_module
            import triton.language as language
        except ImportError as err:
            _import_error = str(err) or type(err).__name__
        else:
            triton, tl = triton_module, language
    return _import_error


def reason(device: torch.device) -> str:
    """ "" when the kernels can run on `device`, else why not."""
    if _import():
        return f"Triton is not installed ({_import_error}; pip install 'attentionpack[gpu]')"
    if device.type == "cpu" and not interpreted():
        return "Triton runs CPU tensors only in its interpreter (set TRITON_INTERPRET=1)"
    if device.type not in ("cpu", "cuda"):
        return f"Triton kernels run on CUDA devices, not {device.type}"
    return ""


def why_not(segments: Sequence[Segment], query: torch.Tensor) -> str:
    """ "" when `decode` serves this step (query (B, Hq, q, d)), else the reason it cannot."""
    b, _, q, d = query.shape
    if q != 1:
        return f"{q} query tokens (the Triton step serves one-token decoding steps)"
    if query.dtype not in ACTIVATION_DTYPES:
        return f"queries are {query.dtype} (the Triton step takes float32, float16 or bfloat16)"
    why = reason(query.device)
    if why:
        return why
    for seg in segments:
        if seg.index is not None and seg.slots is not None:
            return f"a gathered {seg.modality} segment with per-head slots"
        for name, part, axis in (("keys", seg.keys, 2), ("values", seg.values, 3)):
            why = form_reason(part, axis, d)
            if why:
                return f"{seg.kind} segment [{seg.start}, {seg.end}) {name}: {why}"
            if part.tensors()[0].device != query.device:
                return f"{seg.kind} segment [{seg.start}, {seg.end}) is on {part.tensors()[0].device}"
    return ""


def decode(
    segments: Sequence[Segment],
    num_kv_heads: int,
    first: int,
    query: torch.Tensor,
    allowed: torch.Tensor | None,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """One decoding step over `segments` in cache order (call only when `why_not` is ""). query (B, Hq, 1, d)
    rotated; allowed None or (B|1, 1, 1, N) bool over cache indices [first, ...) -> (B, 1, Hq, d) in the query's
    dtype."""
    b, hq, _, d = query.shape
    h = num_kv_heads
    qs = (query.to(torch.float32) * scale).reshape(b, h, hq // h, d)  # (B, H, M, d): query head j*M + i, KV head j
    mask = None
    if allowed is not None:
        mask = allowed.reshape(allowed.shape[0], -1).to(torch.uint8).contiguous()  # (B|1, N)
    tops, sums, mixes = [], [], []
    for seg in segments:
        held = None if seg.heads is None else torch.tensor(seg.heads, device=query.device)
        q_held = (qs if held is None else qs.index_select(1, held)).contiguous()  # (B, Hp, M, d)
        # a gathered group (per sample its own cache indices): its padding slots and the step's mask as slots
        slots = gathered_slots(seg, allowed, first, h) if seg.index is not None else seg.slots
        top, total, mixed = _partials(seg, q_held, first, mask, slots, softcap)  # (B, Hp, M, n), ..., (B, Hp, M, n, d)
        if held is not None:  # heads the segment does not hold: no token (maximum -inf, nothing summed)
            top = top.new_full((b, h, *top.shape[2:]), float("-inf")).index_copy_(1, held, top)
            total = total.new_zeros((b, h, *total.shape[2:])).index_copy_(1, held, total)
            mixed = mixed.new_zeros((b, h, *mixed.shape[2:])).index_copy_(1, held, mixed)
        tops.append(top)
        sums.append(total)
        mixes.append(mixed)
    out = merge(torch.cat(tops, -1), torch.cat(sums, -1), torch.cat(mixes, -2))  # (B, H, M, d)
    return out.reshape(b, 1, hq, d).to(query.dtype)


def merge(top: torch.Tensor, total: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
    """Blocks' partials -> attention output: top, total (..., n) each block's maximum logit and sum of exp(logit -
    maximum), mixed (..., n, d) its values weighted by those exponentials -> (..., d); zeros for a row that no
    token may attend to."""
    best = top.amax(-1, keepdim=True)
    best = torch.where(torch.isfinite(best), best, torch.zeros_like(best))
    w = torch.exp(top - best)  # (..., n): 0 for empty blocks
    den = (w * total).sum(-1, keepdim=True)
    num = (w.unsqueeze(-1) * mixed).sum(-2)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def _operand(part: Part, d: int) -> dict[str, Any]:
    """The kernel arguments of keys or values: (kind, exact rows and strides | codes, scales, mins, bytes per
    row, groups per row, group size, bits | basis (B, R, Hp*d) and rank R)."""
    dummy = part.tensors()[0]
    if isinstance(part, ExactPart):
        x = part.data
        if x.stride(-1) != 1 or (x.shape[2] > 1 and x.stride(2) != d):
            x = x.contiguous()  # the kernel reads rows of d floats, t * d apart
        return dict(kind=EXACT, x=x, sb=x.stride(0), sh=x.stride(1), q=None, basis=dummy, rank=1)
    if isinstance(part, QuantizedPart):
        return dict(kind=QUANTIZED, x=dummy, sb=0, sh=0, q=part.q, basis=dummy, rank=1)
    assert isinstance(part, QuantizedLowRankPart)
    basis = part.basis_as(torch.float32) if isinstance(part.basis, Quantized) else part.basis
    return dict(kind=FACTORS, x=dummy, sb=0, sh=0, q=part.coeffs, basis=basis.contiguous(), rank=basis.shape[1])


def _partials(
    seg: Segment,
    qs: torch.Tensor,
    first: int,
    mask: torch.Tensor | None,
    slots: torch.Tensor | None,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch over a segment: qs (B, Hp, M, d) scaled queries of its held heads, slots (B, Hp, T) log
    multiplicities or None (the mask is then read by column) -> per block of BLOCK_T tokens (B, Hp, M, n) maxima
    and sums, (B, Hp, M, n, d) weighted values."""
    b, hp, m, d = qs.shape
    t = seg.length
    n = triton.cdiv(t, BLOCK_T)
    top = torch.empty(b, hp, m, n, dtype=torch.float32, device=qs.device)
    total = torch.empty_like(top)
    mixed = torch.empty(b, hp, m, n, d, dtype=torch.float32, device=qs.device)
    k, v = _operand(seg.keys, d), _operand(seg.values, d)
    args: list[Any] = [qs]
    for op in (k, v):
        c: Quantized | None = op["q"]
        codes = [op["x"]] * 3 + [1, 1, 1, 8]  # (unread)
        if c is not None:  # codes, scales, mins, bytes per row, groups per row, group size, bits
            codes = [c.codes.contiguous(), c.scales.contiguous(), c.mins.contiguous(), c.codes.shape[-1]]
            codes += [c.scales.shape[-1], c.group_size, c.bits]
        args += [op["x"], op["sb"], op["sh"], *codes, op["basis"], op["rank"]]
    log = slots.to(torch.float16).contiguous() if slots is not None else qs
    use_mask = mask is not None and slots is None
    mask_t = mask if mask is not None else qs
    mask_sb = mask.shape[1] if mask is not None and mask.shape[0] > 1 else 0
    args += [log, mask_t, mask_sb, seg.start - first, top, total, mixed, t, m, hp, d, n]
    args += [0.0 if softcap is None else float(softcap)]
    _kernel()[(b * hp, n)](
        *args,
        KEYS=k["kind"],
        VALUES=v["kind"],
        HAS_SLOTS=slots is not None,
        HAS_MASK=use_mask,
        HAS_SOFTCAP=softcap is not None,
        BLOCK_T=BLOCK_T,
        MP=_tile(m),
        DP=_tile(d),
        RKP=_tile(k["rank"]),
        RVP=_tile(v["rank"]),
    )
    return top, total, mixed


def _tile(n: int) -> int:
    """A tile side for n rows: a power of two, at least 16 (tl.dot's smallest)."""
    return max(16, 1 << (n - 1).bit_length())


_dequant: Any = None  # the jitted helpers, which the kernel calls by these names
_factors: Any = None


@functools.cache
def _kernel() -> Any:
    """The jitted kernel, made on first use (Triton reads TRITON_INTERPRET when a function is jitted)."""
    global _dequant, _factors
    _dequant, _factors = triton.jit(_dequant_tile), triton.jit(_factor_tiles)
    return triton.jit(_segment_partials)


def _dequant_tile(codes_ptr, scales_ptr, mins_ptr, rows, at, ok, nb, G, group, bits):  # type: ignore[no-untyped-def]
    """A tile of rows quantized along their length (`pack`'s planar layout: element i of a row sits in byte
    i % nb, bits [(i // nb) * bits, ...)): elements `at` (A,) of rows `rows` (R,) -> (A, R) float32,
    code * scale + min with scales/mins (.., G) float16 per group of `group` elements; 0 where `ok` (A, R) is
    False."""
    byte = tl.load(codes_ptr + rows[None, :] * nb + (at % nb)[:, None], mask=ok, other=0).to(tl.int32)
    code = (byte >> ((at // nb) * bits)[:, None]) & ((1 << bits) - 1)
    g = rows[None, :] * G + (at // group)[:, None]
    scale = tl.load(scales_ptr + g, mask=ok, other=0.0).to(tl.float32)
    low = tl.load(mins_ptr + g, mask=ok, other=0.0).to(tl.float32)
    return code.to(tl.float32) * scale + low


def _factor_tiles(  # type: ignore[no-untyped-def]
    codes_ptr, scales_ptr, mins_ptr, nb, G, group, bits, basis_ptr, R, b, h, Hp, d, t, t_ok, ch, c_ok, RP: tl.constexpr
):
    """The factors of sample b, head h over tokens t (BT,): coefficients (BT, RP) quantized along T (codes of
    (B, R, nb), `_dequant_tile`) and the basis rows of head h (RP, DP) of the basis (B, R, Hp * d); zero past R."""
    j = tl.arange(0, RP)
    j_ok = j < R
    coef = _dequant(codes_ptr, scales_ptr, mins_ptr, b * R + j, t, t_ok[:, None] & j_ok[None, :], nb, G, group, bits)
    basis = tl.load(
        basis_ptr + (b * R + j[:, None]) * (Hp * d) + h * d + ch[None, :], mask=j_ok[:, None] & c_ok[None, :], other=0.0
    ).to(tl.float32)
    return coef, basis


# (a Triton kernel: Triton types its arguments at launch; it is jitted in `_kernel`)
def _segment_partials(  # type: ignore[no-untyped-def]
    q_ptr,  # (B, Hp, M, d) float32 scaled queries
    k_ptr,  # exact keys: rows of d at k_ptr + b * k_sb + h * k_sh + t * d
    k_sb,
    k_sh,
    kc_ptr,  # quantized keys per channel: codes (B, Hp, d, nb) along T; factors: coefficient codes (B, R, nb)
    ks_ptr,  # scales (.., G) float16
    km_ptr,  # minimums (.., G) float16
    k_nb,
    k_G,
    k_group,
    k_bits,
    kb_ptr,  # factors: basis (B, R, Hp * d)
    k_R,
    v_ptr,  # exact values, laid out like exact keys
    v_sb,
    v_sh,
    vc_ptr,  # quantized values per token: codes (B, Hp, T, nb) along d; factors: coefficient codes (B, R, nb)
    vs_ptr,
    vm_ptr,
    v_nb,
    v_G,
    v_group,
    v_bits,
    vb_ptr,
    v_R,
    slots_ptr,  # (B, Hp, T) float16 log multiplicity per slot
    mask_ptr,  # (B|1, N) uint8 cache mask, rows mask_sb apart; column col0 is token 0 of the segment
    mask_sb,
    col0,
    top_ptr,  # out: (B, Hp, M, n) block maxima
    sum_ptr,  # out: (B, Hp, M, n) block sums of exp(logit - maximum)
    mix_ptr,  # out: (B, Hp, M, n, d) weighted values
    T,
    M,
    Hp,
    d,
    n_blocks,
    softcap,
    KEYS: tl.constexpr,
    VALUES: tl.constexpr,
    HAS_SLOTS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    MP: tl.constexpr,
    DP: tl.constexpr,
    RKP: tl.constexpr,
    RVP: tl.constexpr,
):
    bh = tl.program_id(0)  # sample b, held head h
    blk = tl.program_id(1)
    b = bh // Hp
    h = bh % Hp
    t = blk * BLOCK_T + tl.arange(0, BLOCK_T)  # (BT,) tokens of this block
    t_ok = t < T
    rows = tl.arange(0, MP)
    r_ok = rows < M
    ch = tl.arange(0, DP)
    c_ok = ch < d
    q = tl.load(q_ptr + (bh * M + rows[:, None]) * d + ch[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)

    # scores (MP, BT)
    tile = t_ok[:, None] & c_ok[None, :]  # (BT, DP) real tokens x real channels
    exact_at = t[:, None] * d + ch[None, :]  # (BT, DP) offsets in exact rows, d apart
    if KEYS == 0:
        keys = tl.load(k_ptr + b * k_sb + h * k_sh + exact_at, mask=tile, other=0.0).to(tl.float32)  # (BT, DP)
        s = tl.dot(q, tl.trans(keys), input_precision="ieee")
    elif KEYS == 1:  # per channel: row bh * d + c holds channel c's codes along T
        keys = _dequant(kc_ptr, ks_ptr, km_ptr, bh * d + ch, t, tile, k_nb, k_G, k_group, k_bits)  # (BT, DP)
        s = tl.dot(q, tl.trans(keys), input_precision="ieee")
    else:  # keys = coefficients (BT, R) x basis rows of head h (R, d): score in the basis
        coef, basis = _factors(
            kc_ptr, ks_ptr, km_ptr, k_nb, k_G, k_group, k_bits, kb_ptr, k_R, b, h, Hp, d, t, t_ok, ch, c_ok, RKP
        )
        q_in_basis = tl.dot(q, tl.trans(basis), input_precision="ieee")  # (MP, RKP)
        s = tl.dot(q_in_basis, tl.trans(coef), input_precision="ieee")

    if HAS_SOFTCAP:  # softcap * tanh(s / softcap), tanh(x) = 1 - 2 / (exp(2x) + 1)
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
    if HAS_SLOTS:
        s = s + tl.load(slots_ptr + bh * T + t, mask=t_ok, other=0.0).to(tl.float32)[None, :]
    live = t_ok
    if HAS_MASK:
        live = live & (tl.load(mask_ptr + b * mask_sb + col0 + t, mask=t_ok, other=0) != 0)
    s = tl.where(live[None, :], s, float("-inf"))
    top = tl.max(s, axis=1)  # (MP,)
    shift = tl.where(top == float("-inf"), 0.0, top)
    p = tl.exp(s - shift[:, None])  # 0 where masked
    total = tl.sum(p, axis=1)

    # weighted values (MP, DP)
    if VALUES == 0:
        vals = tl.load(v_ptr + b * v_sb + h * v_sh + exact_at, mask=tile, other=0.0).to(tl.float32)  # (BT, DP)
        mixed = tl.dot(p, vals, input_precision="ieee")
    elif VALUES == 1:  # per token: row bh * T + t holds token t's codes along d
        vals = _dequant(vc_ptr, vs_ptr, vm_ptr, bh * T + t, ch, tl.trans(tile), v_nb, v_G, v_group, v_bits)  # (DP, BT)
        mixed = tl.dot(p, tl.trans(vals), input_precision="ieee")
    else:  # weights times coefficients (MP, R), then times the basis rows of head h
        coef, basis = _factors(
            vc_ptr, vs_ptr, vm_ptr, v_nb, v_G, v_group, v_bits, vb_ptr, v_R, b, h, Hp, d, t, t_ok, ch, c_ok, RVP
        )
        w = tl.dot(p, coef, input_precision="ieee")  # (MP, RVP)
        mixed = tl.dot(w, basis, input_precision="ieee")

    at = (bh * M + rows) * n_blocks + blk  # (MP,)
    tl.store(top_ptr + at, top, mask=r_ok)
    tl.store(sum_ptr + at, total, mask=r_ok)
    tl.store(mix_ptr + at[:, None] * d + ch[None, :], mixed, mask=r_ok[:, None] & c_ok[None, :])
