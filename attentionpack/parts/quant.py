"""Asymmetric min/max group quantization (KIVI style) with real bit packing, and the stored form built on it.

A tensor is cut along one axis into groups of `group_size` elements; each group keeps a scale and a minimum and
every element becomes an integer code q in [0, 2^bits - 1] with x ≈ q * scale + min. Codes are packed into uint8
(one 8-bit, two 4-bit or four 2-bit codes per byte), so the bytes a `Quantized` holds are the bytes it costs.

Scales and minimums are stored in float16 (2 bytes each). They are rounded *outward*: the minimum down and the
scale up, so the stored grid still covers the whole group and every element is within scale/2 of its
reconstruction (the stored fp16 scale, up to float32 arithmetic). Round-to-nearest would instead let an element
fall off the grid by |min - fp16(min)| + (2^bits - 1)|scale - fp16(scale)|. Storing them in float32 instead
doubles the overhead (32 -> 64 bits per group) for almost nothing: the fp16 scale is at most ~2^-10 relative above
the exact one (tests/test_quant.py::test_fp16_params compares the two).

KIVI (arXiv 2402.02750): keys are quantized per channel (a group runs along the tokens of one channel of one head,
since key outliers live in fixed channels) and values per token (a group runs along the head dim).

Layout: the quantized axis is moved last and the other axes keep their order, so quantizing along any axis but 0
keeps the batch as the leading dim of codes, scales and minimums (what `map_batch` relies on).
Shapes: B batch, H KV heads, T tokens, d head dim, D = H*d, r rank, G groups, g group size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NoReturn

import torch

from .base import BatchFn, RopeFn

BITS = (2, 4, 8)
PARAM_DTYPE = torch.float16  # dtype of scales and minimums


@dataclass
class Quantized:
    """A group-quantized tensor.

    codes:  (*rest, n_bytes) uint8, the codes of (*rest, L_pad) packed 8 // bits per byte (low bits first), where
            *rest is the original shape without `axis` and L_pad = G * group_size
    scales: (*rest, G) float16; mins: (*rest, G) float16
    """

    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor
    shape: tuple[int, ...]  # original shape
    dtype: torch.dtype  # original dtype (what `dequantize` returns)
    axis: int  # non-negative
    group_size: int  # effective group size (<= the original length along axis)
    bits: int

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.scales, self.mins]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def drop_front(self, n: int, dim: int) -> Quantized:
        """A copy without the first n entries along `dim` of the original shape (not the batch), its tensors new so
        the dropped bytes are freed. Along the quantized axis only whole groups go (n a multiple of the group size;
        the planar codes are unpacked and packed again)."""
        if dim <= 0 or dim >= len(self.shape) or not 0 < n < self.shape[dim]:
            raise ValueError(f"Quantized.drop_front: cannot drop {n} of {self.shape} along dim {dim}")
        shape = list(self.shape)
        shape[dim] -= n
        if dim == self.axis:
            if n % self.group_size:
                raise ValueError(f"Quantized.drop_front: {n} is not a multiple of the group size {self.group_size}")
            padded = -(-self.shape[dim] // self.group_size) * self.group_size
            codes = pack(unpack(self.codes, self.bits, padded)[..., n:], self.bits)
            k = n // self.group_size
            scales, mins = self.scales[..., k:].clone(), self.mins[..., k:].clone()
        else:
            at = dim if dim < self.axis else dim - 1  # the quantized axis was moved last, the others keep their order
            codes, scales, mins = (t.narrow(at, n, t.shape[at] - n).clone() for t in self.tensors())
        return replace(self, codes=codes, scales=scales, mins=mins, shape=tuple(shape))

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Quantized:
        """A copy with `fn` (index_select / repeat_interleave / indexing on dim 0) applied to every tensor."""
        if self.axis == 0:
            raise ValueError("Quantized.map_batch: axis=0 is invalid: the batch axis must not be the quantized axis")
        codes, scales, mins = fn(self.codes), fn(self.scales), fn(self.mins)
        return replace(self, codes=codes, scales=scales, mins=mins, shape=(codes.shape[0], *self.shape[1:]))


def _bad(where: str, name: str, value: object, allowed: str) -> NoReturn:
    raise ValueError(f"{where}: {name}={value!r} is invalid: must be {allowed}")


def _check_bits_group(where: str, bits: int, group_size: int) -> None:
    if isinstance(bits, bool) or bits not in BITS:
        _bad(where, "bits", bits, f"one of {BITS}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        _bad(where, "group_size", group_size, "an integer >= 1")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (*rest, n), each < 2^bits, along the last dim into (*rest, m) uint8, m = ceil(n * bits / 8).

    Planar layout: the (padded) codes are cut into 8 // bits planes of m consecutive codes, and byte i holds code i
    of every plane, plane k in bits [k * bits, (k + 1) * bits). Unpacking is then one shift and mask per plane over
    contiguous memory, several times faster on CPU than de-interleaving neighbouring codes."""
    per = 8 // bits
    n = codes.shape[-1]
    pad = -n % per
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    codes = codes.contiguous()  # (a quantized axis moved last arrives strided)
    if per == 1:
        return codes
    planes = codes.view(*codes.shape[:-1], per, -1)  # (*rest, per, m)
    out = planes[..., 0, :].clone(memory_format=torch.contiguous_format)
    for i in range(1, per):
        out |= planes[..., i, :] << (bits * i)
    return out


def unpack_planes(packed: torch.Tensor, bits: int, dtype: torch.dtype = torch.uint8) -> list[torch.Tensor]:
    """The 8 // bits planes of `pack`'s layout, each (*rest, m) contiguous, as `dtype` (a float dtype saves the
    caller a conversion pass). Plane k holds codes [k*m, (k+1)*m) of the padded row."""
    per = 8 // bits
    if per == 1:
        return [packed.to(dtype)]
    mask = (1 << bits) - 1
    planes = []
    for i in range(per):
        plane = packed & mask if i == 0 else (packed >> (bits * i)) if i == per - 1 else (packed >> (bits * i)) & mask
        planes.append(plane.to(dtype))
    return planes


def unpack(packed: torch.Tensor, bits: int, n: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Inverse of `pack`: (*rest, m) uint8 -> the first n codes (*rest, n) as `dtype`."""
    planes = unpack_planes(packed, bits, dtype)
    return (planes[0] if len(planes) == 1 else torch.cat(planes, dim=-1))[..., :n]


def _round_outward(x: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """x rounded to `dtype`, up (toward +inf) or down, so the result is >= x (up) or <= x (down)."""
    r = x.to(dtype)
    off = r.to(x.dtype) < x if up else r.to(x.dtype) > x
    limit = torch.full_like(r, float("inf") if up else float("-inf"))
    return torch.where(off, torch.nextafter(r, limit), r)


def quantize(x: torch.Tensor, bits: int, group_size: int, axis: int = -1) -> Quantized:
    """Group-quantize a float tensor along `axis` (groups of `group_size` consecutive elements) to `bits` bits.

    A length not divisible by the group size is padded by repeating the last element (the padding costs its codes,
    not accuracy); a group size beyond the length is cut to the length. Constant groups get scale 0 and are exact
    (when their value is representable in float16)."""
    return quantize_widths(x, (bits,), group_size, axis)[bits]


def check_quantize(x: torch.Tensor, widths: tuple[int, ...], group_size: int, axis: int) -> int:
    """Validate `quantize_widths`'s arguments (a ValueError naming the problem); returns the axis made positive."""
    where = "quantize"
    for bits in widths:
        _check_bits_group(where, bits, group_size)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        _bad(where, "x", type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype, "a floating-point tensor")
    if x.ndim == 0 or x.numel() == 0:
        _bad(where, "x.shape", tuple(x.shape), "non-empty with at least one dim")
    if isinstance(axis, bool) or not isinstance(axis, int) or not -x.ndim <= axis < x.ndim:
        _bad(where, "axis", axis, f"an integer in [{-x.ndim}, {x.ndim - 1}] for a {x.ndim}-dim tensor")
    return axis % x.ndim


def quantize_widths(x: torch.Tensor, widths: tuple[int, ...], group_size: int, axis: int = -1) -> dict[int, Quantized]:
    """`quantize` at several bit widths at once: the groups, their ranges and their offsets from the minimum are
    found once (a budget weighs every width of the same tensor); each width then only divides by its scale.
    The torch reference; `kernels.ops.quantize_widths` computes the same in one C pass where it can."""
    where = "quantize"
    axis = check_quantize(x, widths, group_size, axis)
    length = x.shape[axis]
    g = min(group_size, length)
    n_groups = -(-length // g)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xt = x.movedim(axis, -1).to(work)  # (*rest, L)
    if n_groups * g != length:  # repeat the last element: leaves every group's min/max unchanged
        xt = torch.cat([xt, xt[..., -1:].expand(*xt.shape[:-1], n_groups * g - length)], dim=-1)
    xg = xt.reshape(*xt.shape[:-1], n_groups, g)  # (*rest, G, g)
    lo, hi = _group_range(xg)  # (*rest, G)
    mins = _round_outward(lo, PARAM_DTYPE, up=False)
    finite_mins = bool(torch.isfinite(mins).all())
    span = hi - mins.to(work)
    shifted = xg - mins.to(work).unsqueeze(-1)  # (*rest, G, g): every width's codes are round(shifted / scale)
    out = {}
    for bits in widths:
        levels = (1 << bits) - 1
        scales = _round_outward(span / levels, PARAM_DTYPE, up=True)
        if not (finite_mins and torch.isfinite(scales).all()):
            _bad(
                where,
                "x",
                "<non-finite or beyond float16 range>",
                "finite, with groups inside the float16 range (|x| < 65504)",
            )
        s = scales.to(work).unsqueeze(-1)  # (*rest, G, 1)
        q = (shifted / torch.where(s > 0, s, torch.ones_like(s))).round_().clamp_(0, levels)  # (*rest, G, g)
        codes = pack(q.to(torch.uint8).flatten(-2), bits)  # (*rest, n_bytes)
        out[bits] = Quantized(codes, scales, mins, tuple(x.shape), x.dtype, axis, g, bits)
    return out


def _group_range(xg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's (min, max) along the last dim of xg (*rest, G, g) -> (*rest, G) each.

    `amin` and `amax` apart are several times faster on CPU than `torch.aminmax` over groups of 32, and give the
    same values; only where a group's extreme is a zero may they pick the other sign of zero among ±0 ties, so
    there `aminmax` decides, as it always did (the stored minimums and scales keep their exact bits)."""
    lo, hi = xg.amin(-1), xg.amax(-1)
    if bool((lo == 0).any()) or bool((hi == 0).any()):
        lo, hi = torch.aminmax(xg, dim=-1)
    return lo, hi


def dequantize(q: Quantized) -> torch.Tensor:
    """Rebuild the tensor: original shape and dtype, contiguous."""
    return dequantize_native(q).movedim(-1, q.axis).contiguous()


def dequantize_native(q: Quantized, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensor in the storage layout, quantized axis last: (*rest, L), as `dtype` (default: the original).
    Attention uses this layout directly (per-channel keys and token-grouped coefficients arrive transposed, (.., T)
    last, which is what a score matmul wants)."""
    n_groups = q.scales.shape[-1]
    dtype = q.dtype if dtype is None else dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    codes = unpack(q.codes, q.bits, n_groups * q.group_size, dtype=work)  # (*rest, L_pad)
    x = codes.view(*codes.shape[:-1], n_groups, q.group_size)  # (*rest, G, g)
    x = x.mul_(q.scales.to(work).unsqueeze(-1)).add_(q.mins.to(work).unsqueeze(-1)).flatten(-2)
    return x[..., : q.shape[q.axis]].to(dtype)


def mix_per_token(q: Quantized, p: torch.Tensor) -> torch.Tensor:
    """p @ values for values quantized per token (axis 3 of (B, H, T, d)) without rebuilding the (T, d) float block:
    the codes are read plane by plane (`pack`'s layout) and a per-token scale is folded into the attention weights,
    (p * s_j) @ codes + (p @ m_j), whenever a plane lies inside one group (4-bit codes with groups of d/2, for
    example); otherwise the plane's codes are scaled in place first. p (B, H, M, T) -> (B, H, M, d)."""
    g = q.group_size
    scales, mins = q.scales.to(p.dtype), q.mins.to(p.dtype)  # (B, H, T, G)
    outs, at = [], 0
    for x in unpack_planes(q.codes, q.bits, p.dtype):  # (B, H, T, m) codes as floats
        width = x.shape[-1]
        first, last = at // g, (at + width - 1) // g  # groups this plane's columns [at, at + width) fall into
        if first == last:
            outs.append((p * scales[..., first].unsqueeze(-2)) @ x)
        else:  # plane spans several groups (at most a partial one at each end): scale the codes per column
            col_scale = scales.repeat_interleave(g, dim=-1)[..., at : at + width]  # (B, H, T, m)
            outs.append(p @ x.mul_(col_scale))
        at += width
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)  # (B, H, M, L_pad)
    out = out[..., : q.shape[3]]
    return out.add_((p @ mins).repeat_interleave(g, dim=-1)[..., : q.shape[3]])


def error_bound(q: Quantized) -> torch.Tensor:
    """Per-element bound on |x - dequantize(q)|: half the group's stored scale, broadcast to the original shape."""
    half = (q.scales.to(torch.float32) / 2).repeat_interleave(q.group_size, dim=-1)[..., : q.shape[q.axis]]
    return half.movedim(-1, q.axis)


# ---- KIVI layouts ----------------------------------------------------------------------------------------------
def _check_bhtd(where: str, name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        _bad(where, f"{name}.shape", tuple(getattr(x, "shape", ())), "(B, H, T, d)")


def quantize_keys(k: torch.Tensor, bits: int = 4, group: int = 32) -> Quantized:
    """Keys (B, H, T, d) per channel: each channel of each head gets a scale per `group` tokens.

    codes (B, H, d, T_pad * bits / 8), scales/mins (B, H, d, ceil(T / group))."""
    _check_bhtd("quantize_keys", "k", k)
    return quantize(k, bits, group, axis=2)


def quantize_values(v: torch.Tensor, bits: int = 4, group: int = 32) -> Quantized:
    """Values (B, H, T, d) per token: each token of each head gets a scale per `group` channels.

    codes (B, H, T, d_pad * bits / 8), scales/mins (B, H, T, ceil(d / group))."""
    _check_bhtd("quantize_values", "v", v)
    return quantize(v, bits, group, axis=3)


# ---- the stored form ------------------------------------------------------------------------------------------
@dataclass
class QuantizedPart:
    """Quantized full states (B, H, T, d). Keys are stored after RoPE (as the model produced them), like KIVI, so
    materializing only dequantizes."""

    q: Quantized

    @classmethod
    def keys(cls, k: torch.Tensor, bits: int = 4, group: int = 32) -> QuantizedPart:
        return cls(quantize_keys(k, bits, group))

    @classmethod
    def values(cls, v: torch.Tensor, bits: int = 4, group: int = 32) -> QuantizedPart:
        return cls(quantize_values(v, bits, group))

    def materialize(self, start: int, end: int, rope: RopeFn | None) -> torch.Tensor:
        return dequantize(self.q)  # (B, H, T, d)

    def scores(self, q: torch.Tensor, start: int, end: int, rope: RopeFn | None) -> torch.Tensor:
        if self.q.axis == 2:  # per-channel keys are stored (B, H, d, T): already the transposed keys
            return q @ dequantize_native(self.q, q.dtype)
        return q @ dequantize(self.q).transpose(-1, -2)

    def mix(self, p: torch.Tensor) -> torch.Tensor:
        if self.q.axis == 3:  # per-token values
            return mix_per_token(self.q, p)
        return p @ dequantize(self.q)

    def tensors(self) -> list[torch.Tensor]:
        return self.q.tensors()

    def map_batch(self, fn: BatchFn) -> None:
        self.q = self.q.map_batch(fn)

    def describe(self) -> dict[str, Any]:
        layout = {2: "per_channel", 3: "per_token"}.get(self.q.axis, f"axis{self.q.axis}")
        return {"codec": "quant", "bits": self.q.bits, "group": self.q.group_size, "layout": layout}
