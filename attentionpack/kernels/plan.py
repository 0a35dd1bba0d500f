"""A layer's one-token decoding step as one C call (kernels/decode.c), planned when segments freeze.

For one-token steps over segments whose forms the kernel knows — exact; keys quantized per channel; values
quantized per token; keys after RoPE or values as factors with 4/8-bit coefficients — the kernel takes a table
of the segments (addresses, strides, code layouts) and returns the attention output: scores, softmax (merged
across blocks with a running max, flash-decoding style) and value mix in one pass over the stored bytes.

`DecodePlan` holds that table for a layer's frozen segments: a row is built when a segment is added (the layer
calls `add` when it freezes one, `reset` when segments are replaced, dropped or reordered); per step only the row
of the exact tail is made. When a segment cannot be read by the kernel, `why_not` names the reason, and the
attention takes its per-part path and records it (no silent fallback). A gathered segment (a vision-language
modality group: per sample its own cache indices, padding slots) is read like a contiguous one, its layout and
the step's mask at its indices handed over as per-slot log weights (`gathered_slots`), the form per-head
segments use.

Every float the kernel reads (queries, exact rows, factor bases) may be float32, float16 or bfloat16, the
model's dtype: it accumulates in float32 whatever it reads, and returns the output in the queries' dtype.
"""

from __future__ import annotations

import array
import copy
from dataclasses import dataclass

import torch

from ..parts import (
    ExactPart,
    LowRankPart,
    Part,
    Quantized,
    QuantizedLowRankPart,
    QuantizedPart,
    Segment,
    dequantize,
    slot_log,
)
from . import FLOAT_CODES, library
from . import reason as library_reason

EXACT, QUANTIZED, FACTORS = 0, 1, 2  # operand kinds (decode.c: KEYS_* and VALUES_*)
DTYPES = FLOAT_CODES  # float arrays the kernel reads (common.h: DT_*)
FIELDS = 33  # int64 fields of piece_t in decode.c
_COLUMN = 3  # index of the mask-column field in a row (filled per step: start - first)
Tail = tuple[torch.Tensor, torch.Tensor, int]  # the exact tail's keys, values (B, H, n, d) and first cache index


class DecodePlan:
    """The decode kernel's table for one layer's frozen segments (see module doc).

    Rows hold addresses of the segments' tensors; the plan keeps a reference to every tensor it points to, so a
    stale row can never point at freed memory. `tensors()` are the storages the plan holds besides the cache's
    own (an 8-bit basis dequantized for the kernel, for example): the cache counts them in its bytes."""

    def __init__(self, num_kv_heads: int, head_dim: int, segments: list[Segment] | tuple[()] = ()) -> None:
        self.heads, self.dim = num_kv_heads, head_dim
        self.rows: list[list[int]] = []
        self.starts: list[int] = []
        self.keep: list[torch.Tensor] = []  # every tensor a row points to
        self.extra: list[torch.Tensor] = []  # tensors made for the kernel (not stored by the segments)
        self.count = 0  # segments added
        self.blocked_at: int | None = None  # index of the first segment the kernel cannot read
        self.blocker = ""  # why it cannot
        self.batch: int | None = None
        self.gathered: dict[int, Segment] = {}  # row -> gathered segment (its mask goes through the slots field)
        self._table: tuple[int, int, array.array] | None = None  # (count, first, the rows' table) of the last step
        for seg in segments:
            self.add(seg)

    def __deepcopy__(self, memo: dict) -> DecodePlan:
        """The plan of a deep-copied cache: the tensors it points to are copied through `memo` (so they are the
        copies the cache's segments hold) and every address in its rows is moved to the copy's; a plain copy would
        keep reading the original's memory."""
        new = copy.copy(self)
        memo[id(self)] = new
        new.keep = copy.deepcopy(self.keep, memo)
        new.extra = copy.deepcopy(self.extra, memo)
        moved = {old.data_ptr(): t.data_ptr() for old, t in zip(self.keep, new.keep, strict=True)}
        new.rows = [[moved.get(field, field) for field in row] for row in self.rows]
        new.starts = list(self.starts)
        new.gathered = copy.deepcopy(self.gathered, memo)
        new._table = None  # it holds the original's addresses
        return new

    def add(self, seg: Segment) -> None:
        """Append the row of a newly frozen segment (the newest: rows stay in cache order). A plan is only ever
        appended to; the layer makes a new plan when its segments are replaced, dropped or reordered, so a
        snapshot (`count` at the time) stays valid for the attention call it was taken for."""
        self.count += 1
        if self.blocked_at is None:
            why = self._row(seg)
            if why:
                self.blocked_at, self.blocker = self.count - 1, why

    def _row(self, seg: Segment) -> str:
        if seg.index is not None and seg.slots is not None:
            return f"a gathered {seg.modality} segment with per-head slots"
        device = seg.values.tensors()[0].device
        if device.type != "cpu":  # (no row, no kernel-side copies held: the Triton step serves these)
            return f"segments on {device} (the C kernel reads CPU memory)"
        b = _batch(seg.values)
        if self.batch is not None and b != self.batch:
            return f"segments of different batch sizes ({self.batch} and {b})"
        keys = _operand(seg.keys, 2, b, self.dim, self.keep, self.extra)
        values = _operand(seg.values, 3, b, self.dim, self.keep, self.extra)
        if isinstance(keys, str):
            return f"{seg.kind} segment [{seg.start}, {seg.end}) keys: {keys}"
        if isinstance(values, str):
            return f"{seg.kind} segment [{seg.start}, {seg.end}) values: {values}"
        self.batch = b
        if seg.index is not None:  # a vision-language modality group: per sample its own cache indices
            self.gathered[len(self.rows)] = seg
        self.rows.append([keys[0], values[0], seg.length, 0, *keys[1], *values[1], *self._heads(seg)])
        self.starts.append(seg.start)
        return ""

    def _heads(self, seg: Segment) -> list[int]:
        """(hmap, Hp, slots) of a row: the per-head fields (0, H, 0 for a segment of every head)."""
        hmap, held, slots = 0, self.heads, 0
        if seg.heads is not None:
            table = torch.full((self.heads,), -1, dtype=torch.int64)
            table[list(seg.heads)] = torch.arange(len(seg.heads))
            self.keep.append(table)
            self.extra.append(table)
            hmap, held = table.data_ptr(), len(seg.heads)
        if seg.slots is not None:
            log = seg.slots.to(torch.float16).contiguous()  # (B, Hp, T)
            self.keep.append(log)
            if log.data_ptr() != seg.slots.data_ptr():
                self.extra.append(log)
            slots = log.data_ptr()
        return [hmap, held, slots]

    def tensors(self) -> list[torch.Tensor]:
        return list(self.extra)

    def why_not(self, query: torch.Tensor, tail_keys: torch.Tensor | None, count: int) -> str:
        """ "" when `run` can serve this step over the first `count` segments, else the reason it cannot."""
        b, hq, q, d = query.shape
        if q != 1:
            return f"{q} query tokens (the one-call kernel serves one-token decoding steps)"
        if query.dtype not in DTYPES or query.device.type != "cpu":
            return f"queries are {query.dtype} on {query.device.type} (the kernel takes float32/16, bfloat16 on CPU)"
        if library() is None:
            return f"kernels unavailable: {library_reason()}"
        if self.blocked_at is not None and self.blocked_at < count:
            return self.blocker
        if hq % self.heads or d != self.dim:
            return f"{hq} query heads of dim {d} for {self.heads} KV heads of dim {self.dim}"
        if self.batch is not None and self.batch != b:
            return f"batch {b} but the segments hold {self.batch}"
        if tail_keys is not None and _exact(tail_keys, b, d) is None:
            return f"the exact tail is {tail_keys.dtype} with strides {tail_keys.stride()}"
        return ""

    def run(
        self,
        count: int,
        tail: Tail | None,
        first: int,
        query: torch.Tensor,
        allowed: torch.Tensor | None,
        scale: float,
        softcap: float | None,
    ) -> torch.Tensor:
        """One decoding step over the first `count` segments (call only when `why_not` is ""). tail: (keys,
        values (B, H, n, d), cache index of the first) or None; query (B, Hq, 1, d) rotated; allowed None
        or (B|1, 1, 1, N) bool over cache indices [first, ...). -> (B, 1, Hq, d) in the query's dtype."""
        step = self._step(count, tail, first, query, allowed)
        lib = library()
        assert lib is not None
        b, hq, _, d = query.shape
        addr, _ = step.table.buffer_info()
        lib.ap_decode(
            addr, step.pieces, step.query.data_ptr(), step.mask, step.mask_sb, scale, _cap(softcap),
            step.out.data_ptr(), b, self.heads, hq // self.heads, d,
        )  # fmt: skip
        return step.result()

    @staticmethod
    def run_many(
        steps: list[tuple[DecodePlan, int, Tail | None, int, torch.Tensor, torch.Tensor | None]],
        scale: float,
        softcap: float | None,
    ) -> list[torch.Tensor]:
        """Several independent one-sample steps in one C call (a serving step's sequences, each over its own
        layer): each entry is `run`'s (plan, count, tail, first, query (1, Hq, 1, d), allowed), every plan of the
        same heads and dim; the threads share the sequences instead of splitting each one's tokens. -> each
        step's output, as `run` returns it."""
        lib = library()
        assert lib is not None and steps
        plan0, query0 = steps[0][0], steps[0][4]
        _, hq, _, d = query0.shape
        prepared = [
            plan._step(count, tail, first, query, allowed) for plan, count, tail, first, query, allowed in steps
        ]
        column = lambda values: array.array("q", values)  # noqa: E731
        descs = column([step.table.buffer_info()[0] for step in prepared])  # the steps keep their tables alive
        pieces = column([step.pieces for step in prepared])
        queries = column([step.query.data_ptr() for step in prepared])
        masks = column([step.mask for step in prepared])
        mask_sbs = column([step.mask_sb for step in prepared])
        outs = column([step.out.data_ptr() for step in prepared])
        lib.ap_decode_rows(
            len(prepared), *(c.buffer_info()[0] for c in (descs, pieces, queries, masks, mask_sbs)), scale,
            _cap(softcap), outs.buffer_info()[0], plan0.heads, hq // plan0.heads, d,
        )  # fmt: skip
        return [step.result() for step in prepared]

    def _step(
        self, count: int, tail: Tail | None, first: int, query: torch.Tensor, allowed: torch.Tensor | None
    ) -> _Step:
        """The kernel's arguments for one step (see `run`): the table of the first `count` segments and the tail,
        the float32 queries, the mask and the output buffer, with every temporary they point to."""
        b, hq, _, d = query.shape
        if self._table is None or self._table[:2] != (count, first):  # rows change only when segments freeze
            rows = array.array("q")
            for row, start in zip(self.rows[:count], self.starts[:count], strict=True):
                row[_COLUMN] = start - first
                rows.extend(row)
            self._table = (count, first, rows)
        table = array.array("q", self._table[2])  # this step's copy: gathered slots and the tail row go in it
        keep: list[torch.Tensor] = []  # temporaries whose addresses the table holds
        h = self.heads
        for at, seg in self.gathered.items():  # gathered tokens: padding slots and the step's mask as slots
            if at < count:
                log = gathered_slots(seg, allowed, first, h)
                keep.append(log)
                table[at * FIELDS + FIELDS - 1] = log.data_ptr()
        if tail is not None and tail[0].shape[2]:
            tk, tv, tail_start = tail
            ek, ev = _exact(tk, b, d), _exact(tv, b, d)
            assert ek is not None and ev is not None, "why_not() must be called first"
            table.extend(
                [EXACT, EXACT, tk.shape[2], tail_start - first, *_exact_fields(ek), *_exact_fields(ev), 0, h, 0]
            )
        dtype = query.dtype
        query = query.to(torch.float32).contiguous()  # (B, Hq, 1, d) = (B, H, g, d): query head j*g + i uses KV head j
        mask, mask_sb = 0, 0
        if allowed is not None:
            m = allowed.reshape(allowed.shape[0], -1).to(torch.uint8).contiguous()  # (B|1, N)
            keep.append(m)
            mask, mask_sb = m.data_ptr(), (m.shape[1] if m.shape[0] > 1 else 0)
        out = torch.empty(b, 1, hq, d, dtype=torch.float32)
        return _Step(table, len(table) // FIELDS, query, mask, mask_sb, out, dtype, keep)


@dataclass(slots=True)
class _Step:
    """One step's kernel arguments (`DecodePlan._step`); `keep` holds the temporaries the table and mask point to."""

    table: array.array
    pieces: int
    query: torch.Tensor  # (B, Hq, 1, d) float32
    mask: int  # address of (B|1, N) uint8, or 0
    mask_sb: int
    out: torch.Tensor  # (B, 1, Hq, d) float32
    dtype: torch.dtype  # the queries' dtype
    keep: list[torch.Tensor]

    def result(self) -> torch.Tensor:
        """(B, 1, Hq, d) in the queries' dtype."""
        return self.out if self.dtype == torch.float32 else self.out.to(self.dtype)


def _cap(softcap: float | None) -> float:
    return 0.0 if softcap is None else float(softcap)


def gathered_slots(seg: Segment, allowed: torch.Tensor | None, first: int, heads: int) -> torch.Tensor:
    """(B, H, n) float16 log mask of a gathered segment's n slots for one step: 0 where the slot holds a token the
    step may attend to, -inf for a padding slot (`seg.valid` False: a sample with fewer or smaller images) and for
    a token the mask `allowed` (B|1, 1, 1, N) over cache indices [first, ...) excludes. The kernel adds it to the
    slots' logits, as it does for per-head slot segments, instead of reading the mask by column."""
    ok = seg.valid
    assert ok is not None and seg.index is not None, "a gathered segment has index and valid"
    if allowed is not None:
        rows = allowed.reshape(allowed.shape[0], -1)  # (B|1, N)
        at = (seg.index - first).clamp(0, rows.shape[1] - 1)  # (B, n) columns, as Segment.columns maps them
        ok = ok & rows.expand(ok.shape[0], -1).gather(1, at)
    return slot_log(ok)[:, None, :].expand(-1, heads, -1).contiguous()


def _batch(part: Part) -> int:
    return int(part.tensors()[0].shape[0])


def _exact(t: torch.Tensor, b: int, d: int) -> tuple[int, int, int, int] | None:
    """(address, batch stride, head stride, dtype code) of (B, H, T, d) float32, float16 or bfloat16 states with
    rows of d contiguous elements."""
    if (
        t.dtype not in DTYPES
        or t.shape[0] != b
        or t.shape[-1] != d
        or t.stride(-1) != 1
        or (t.shape[2] > 1 and t.stride(2) != d)
    ):
        return None
    return t.data_ptr(), t.stride(0), t.stride(1), DTYPES[t.dtype]


def _exact_fields(ex: tuple[int, int, int, int]) -> list[int]:
    """The 13 operand fields of exact rows: address, batch and head strides, nothing quantized, dtype last."""
    return [*ex[:3], *[0] * 9, ex[3]]


def _codes(q: Quantized, keep: list[torch.Tensor], extra: list[torch.Tensor]) -> list[int]:
    out = []
    for t in (q.codes, q.scales, q.mins):
        c = t.contiguous()
        keep.append(c)
        if c.data_ptr() != t.data_ptr():
            extra.append(c)
        out.append(c.data_ptr())
    return [*out, q.codes.shape[-1], q.scales.shape[-1], q.group_size, q.bits]


def form_reason(part: Part, axis: int, d: int) -> str:
    """ "" when a one-call decoding step (this C kernel or `triton_decode`) reads `part`'s stored form — keys
    (axis 2) or values (axis 3) of head dim d — else why not. Both backends read the same forms: exact rows of a
    float dtype the kernels read, keys quantized per channel and values per token, factors after RoPE with
    4/8-bit coefficients."""
    if isinstance(part, ExactPart):
        return "" if part.data.dtype in DTYPES else f"exact {part.data.dtype} states (the kernels read {list(DTYPES)})"
    if isinstance(part, QuantizedPart):
        if part.q.axis != axis or part.q.shape[3] != d:
            return f"quantized along axis {part.q.axis} (the kernels read keys per channel, values per token)"
        return ""
    if isinstance(part, (QuantizedLowRankPart, LowRankPart)) and part.positions is not None:
        return "low-rank keys stored before RoPE (rotated per token when read)"
    if isinstance(part, QuantizedLowRankPart):
        return ""
    if isinstance(part, LowRankPart):
        return "low-rank factors with unquantized coefficients (the kernels read 4/8-bit coefficients)"
    return f"{type(part).__name__} (no kernel reads this form)"


def _operand(
    part: Part, axis: int, b: int, d: int, keep: list[torch.Tensor], extra: list[torch.Tensor]
) -> tuple[int, list[int]] | str:
    """(kind, 13 fields) of keys or values — exact address, batch and head strides | codes, scales, mins, bytes per
    row, groups per row, group size, bits, rows R | basis address | dtype code of the exact rows or basis — or
    why the kernel cannot read the part."""
    why = form_reason(part, axis, d)
    if why:
        return why
    if isinstance(part, ExactPart):
        ex = _exact(part.data, b, d)
        if ex is None:
            return f"exact states with strides {part.data.stride()} (the kernel reads rows of d)"
        keep.append(part.data)
        return EXACT, _exact_fields(ex)
    if isinstance(part, QuantizedPart):
        return QUANTIZED, [0, 0, 0, *_codes(part.q, keep, extra), d, 0, 0]
    assert isinstance(part, QuantizedLowRankPart)  # (form_reason took every other form)
    return FACTORS, [0, 0, 0, *_codes(part.coeffs, keep, extra), part.coeffs.shape[2], *_basis(part, keep, extra)]


def _basis(part: QuantizedLowRankPart, keep: list[torch.Tensor], extra: list[torch.Tensor]) -> list[int]:
    """(address, dtype code) of the basis (B, R, H*d) as stored, or dequantized when stored at 8 bits (in the
    model's dtype: a float32, float16 or bfloat16 copy the plan holds)."""
    stored = part.basis
    basis = dequantize(stored) if isinstance(stored, Quantized) else stored
    if basis.dtype not in DTYPES:
        basis = basis.to(torch.float32)
    basis = basis.contiguous()
    keep.append(basis)
    if isinstance(stored, Quantized) or basis.data_ptr() != stored.data_ptr():
        extra.append(basis)
    return [basis.data_ptr(), DTYPES[basis.dtype]]
