"""The exact tail of a layer: the newest tokens at full precision, in a buffer that grows without copying the
history at every step.

A `DynamicCache` concatenates its whole history with each new token (a full copy per layer per step). Here the
newest tokens live in `[begin, end)` of a preallocated buffer: appending writes in place, dropping the oldest
tokens (compaction, sliding windows) only moves `begin`, and the buffer is reallocated (amortized) when full.
Capacity is rounded up to a multiple of `granule` tokens: compressing layers (granule 16) copy their few live
tokens once every 16 steps and hold at most 15 spare slots; layers that never compress (granule 1) grow exactly
like a DynamicCache, so their bytes stay equal to its bytes. A compressing layer switches to its granule only once
its compressed segments have saved more than the spare slots cost (`PackedLayer`), so a short prompt's cache is never
larger than a DynamicCache.

Positions and padding flags (needed to compress tokens later) are not stored while they follow the rule of a
left-padded text batch: token i (absolute, counted from the tail's creation) of sample b is padding when i < pad[b]
and has position i - pad[b] otherwise. `view` derives them; the first call that breaks the rule (an inner hole,
multimodal positions, a reordered batch) turns them into stored arrays. So an exact tail holds the bytes of its
keys and values only, like a DynamicCache.

Half precision (`PackConfig.tail_dtype`): `store_half()` moves the live tokens into float16 buffers, and every later
append is written there (rounded); a token outside float16's range turns the tail into bfloat16 (same bytes, the
range of float32), so nothing overflows. Readers get the stored dtype: the decode kernels read float16/bfloat16
rows as they are; the layer casts what it compresses or materializes back to the model's dtype.

Shapes: keys/values (B, H, cap, d); positions (B, cap[, 3]) int32 and valid (B, cap) bool, or None when unneeded
or derived.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

HALF_MAX = torch.finfo(torch.float16).max


class ExactTail:
    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        granule: int = 1,
    ) -> None:
        n = keys.shape[-2]
        self.granule = granule
        self.begin, self.end = 0, n
        self.dropped = 0  # tokens dropped from the old end since creation (absolute index of the oldest = dropped)
        self.pad: list[int] | None = None  # per-sample leading padding while positions/valid are derived
        if positions is not None and valid is not None:
            self.pad = _leading_padding(positions, valid, 0)
            if self.pad is not None:
                positions = valid = None
        cap = self._rounded(n)
        self.keys = _alloc_like(keys, cap)
        self.values = _alloc_like(values, cap)
        self.positions = None if positions is None else _alloc_like(positions, cap)
        self.valid = None if valid is None else _alloc_like(valid, cap)
        self._write(0, keys, values, positions, valid)

    # ---- views of the live tokens -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.end - self.begin

    @property
    def capacity(self) -> int:
        return self.keys.shape[-2]

    def states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of the live tokens, as views (what attention reads; no positions or flags derived)."""
        sl = slice(self.begin, self.end)
        return self.keys[..., sl, :], self.values[..., sl, :]

    def view(
        self, start: int = 0, stop: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(keys, values, positions, valid) of live tokens [start, stop) (relative to the oldest), as views."""
        stop = len(self) if stop is None else stop
        sl = slice(self.begin + start, self.begin + stop)
        positions: torch.Tensor | None
        valid: torch.Tensor | None
        if self.pad is not None:
            positions, valid = self._derived(start, stop)
        else:
            positions = None if self.positions is None else self.positions[:, sl]
            valid = None if self.valid is None else self.valid[:, sl]
        return self.keys[..., sl, :], self.values[..., sl, :], positions, valid

    def _derived(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, n) int32 and valid (B, n) bool of live tokens [start, stop) under the padding rule."""
        index = torch.arange(self.dropped + start, self.dropped + stop, device=self.keys.device)[None, :]
        pad = torch.tensor(self.pad, device=self.keys.device)[:, None]
        return (index - pad).clamp_min(0).to(torch.int32), index >= pad

    def _materialize_flags(self) -> None:
        """Store positions and padding flags as arrays from now on (the rule no longer holds)."""
        if self.pad is None:
            return
        positions, valid = self._derived(0, len(self))
        b, cap = self.keys.shape[0], self.capacity
        self.positions = torch.zeros(b, cap, dtype=torch.int32, device=self.keys.device)
        self.valid = torch.zeros(b, cap, dtype=torch.bool, device=self.keys.device)
        self.positions[:, self.begin : self.end], self.valid[:, self.begin : self.end] = positions, valid
        self.pad = None

    # ---- changes ------------------------------------------------------------------------------------------------
    def append(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        checked: dict | None = None,
        fits_half: bool | None = None,
    ) -> None:
        """Append k, v (B, H, q, d) with their positions and padding flags. `checked`: answers of the padding rule
        for these same positions and flags, shared by the layers of one call (they all check the same tokens at
        the same cache indices). `fits_half`: whether k and v fit float16, if the caller knows (`fits_half_states`)."""
        q = k.shape[-2]
        if self.keys.dtype == torch.float16 and k.dtype != torch.float16:
            fits = fits_half_states(k, v) if fits_half is None else fits_half
            if not fits:
                self._regrow(self.capacity, torch.bfloat16)  # float16 would overflow: same bytes, float32's range
        if self.pad is not None:
            follows = False
            if positions is not None and valid is not None:
                key = (self.dropped + len(self), tuple(self.pad))
                hit = None if checked is None else checked.get(key)
                follows = hit if hit is not None else _leading_padding(positions, valid, key[0], self.pad) == self.pad
                if checked is not None:
                    checked[key] = follows
            if follows:
                positions = valid = None  # still derived
            else:
                self._materialize_flags()
        if self.end + q > self.capacity:
            cap = self._rounded(len(self) + q)
            flags_match = (self.positions is None) == (positions is None) and (self.valid is None) == (valid is None)
            if cap == len(self) + q and flags_match:  # no spare slot (granule 1): one copy per tensor
                self._concat(k, v, positions, valid)
                return
            self._regrow(cap)
        self._write(self.end, k, v, positions, valid)
        self.end += q

    def store_half(self) -> None:
        """Keep the live tokens, and every later one, in float16 (bfloat16 where float16's range is too small).
        No-op when the buffers already hold a 16-bit float dtype."""
        if self.keys.element_size() == 2:
            return
        keys, values = self.states()
        dtype = torch.float16 if fits_half_states(keys, values) else torch.bfloat16
        self._regrow(self.capacity, dtype)

    def drop_oldest(self, n: int) -> None:
        """Forget the n oldest tokens (no copy; their storage is reused by later appends)."""
        if not 0 <= n <= len(self):
            raise ValueError(f"cannot drop {n} of {len(self)} tail tokens")
        self.begin += n
        self.dropped += n
        if self.begin == self.end:
            self.begin = self.end = 0

    def drop_newest(self, n: int) -> None:
        if not 0 <= n <= len(self):
            raise ValueError(f"cannot remove {n} of {len(self)} tail tokens")
        self.end -= n

    def shrink(self) -> None:
        """Release spare capacity (after a long prompt has been compacted away)."""
        if self.capacity > self._rounded(len(self)):
            self._regrow(self._rounded(len(self)))

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._materialize_flags()  # a reordered or selected batch keeps explicit flags
        keys, values, positions, valid = self.view()
        mapped = ExactTail(fn(keys.contiguous()), fn(values.contiguous()), None, None, self.granule)
        self.__dict__.update(mapped.__dict__)
        if positions is not None and valid is not None:
            positions, valid = fn(positions.contiguous()), fn(valid.contiguous())
            self.positions, self.valid = _alloc_like(positions, self.capacity), _alloc_like(valid, self.capacity)
            self.positions[:, : len(self)], self.valid[:, : len(self)] = positions, valid

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.keys, self.values, self.positions, self.valid) if t is not None]

    # ---- internals ----------------------------------------------------------------------------------------------
    def _write(
        self, at: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None, valid: torch.Tensor | None
    ) -> None:
        q = k.shape[-2]
        self.keys[..., at : at + q, :] = k
        self.values[..., at : at + q, :] = v
        if self.positions is not None and positions is not None:
            self.positions[:, at : at + q] = positions
        if self.valid is not None and valid is not None:
            self.valid[:, at : at + q] = valid

    def _rounded(self, n: int) -> int:
        return -(-n // self.granule) * self.granule

    def _concat(
        self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None, valid: torch.Tensor | None
    ) -> None:
        """The live tokens followed by the new ones in buffers of exactly that many slots (as DynamicCache grows):
        one concatenation per tensor instead of a new buffer, a copy of the live tokens and a write."""
        sl = slice(self.begin, self.end)
        self.keys = torch.cat([self.keys[..., sl, :], k.to(self.keys.dtype)], dim=-2)
        self.values = torch.cat([self.values[..., sl, :], v.to(self.values.dtype)], dim=-2)
        if self.positions is not None and positions is not None:
            self.positions = torch.cat([self.positions[:, sl], positions.to(self.positions.dtype)], dim=1)
        if self.valid is not None and valid is not None:
            self.valid = torch.cat([self.valid[:, sl], valid.to(self.valid.dtype)], dim=1)
        self.begin, self.end = 0, self.end - self.begin + k.shape[-2]

    def _regrow(self, cap: int, dtype: torch.dtype | None = None) -> None:
        """Move the live tokens to the front of a new buffer of `cap` slots (the stored flags, not derived ones),
        of another float dtype if given."""
        n = len(self)
        sl = slice(self.begin, self.end)
        live = (
            self.keys[..., sl, :],
            self.values[..., sl, :],
            None if self.positions is None else self.positions[:, sl],
            None if self.valid is None else self.valid[:, sl],
        )
        self.keys, self.values = _alloc_like(self.keys, cap, dtype), _alloc_like(self.values, cap, dtype)
        self.positions = None if self.positions is None else _alloc_like(self.positions, cap)
        self.valid = None if self.valid is None else _alloc_like(self.valid, cap)
        self.begin, self.end = 0, n
        self._write(0, *live)


_SMALL_CALL = 64  # tokens x samples of a call below which the padding rule is checked in Python


def _leading_padding(
    positions: torch.Tensor, valid: torch.Tensor, first: int, pad: list[int] | None = None
) -> list[int] | None:
    """Per-sample leading padding of a call's tokens at absolute indices [first, first + q) when they follow the
    rule (padding exactly the indices below pad[b], then positions index - pad[b]); None when they do not.
    `pad` given: the earlier calls' padding, which later calls must continue."""
    if positions.dim() != 2 or valid is None:
        return None
    b, q = valid.shape
    index = torch.arange(first, first + q, device=valid.device)[None, :]
    if pad is None:
        lead = torch.cumprod((~valid).to(torch.int32), dim=1).sum(dim=1)  # leading False flags per sample
        if first != 0 or bool((lead == q).any()):  # a sample of padding only: keep explicit flags
            return None
        pad = [int(x) for x in lead]
    if len(pad) != b:
        return None
    if b * q <= _SMALL_CALL:  # a decoding step: checked on Python numbers (tensor ops cost ~40 us per layer)
        rows, flags = positions.tolist(), valid.tolist()
        for pos_b, ok_b, p in zip(rows, flags, pad, strict=True):
            for j, (pos, ok) in enumerate(zip(pos_b, ok_b, strict=True)):
                if ok != (first + j >= p) or (ok and pos != first + j - p):
                    return None
        return pad
    pt = torch.tensor(pad, device=valid.device)[:, None]
    real = index >= pt
    if not torch.equal(valid, real) or not torch.equal(positions[real].long(), (index - pt).expand(b, q)[real]):
        return None
    return pad


def _alloc_like(t: torch.Tensor, cap: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty tensor like `t` (of `dtype` if given) with `cap` slots on its token axis: 2 for (B, H, T, d) states,
    1 for (B, T[, 3]) positions and flags (multimodal RoPE positions carry 3 components per token)."""
    shape = list(t.shape)
    shape[2 if t.dim() == 4 else 1] = cap
    return torch.empty(shape, dtype=t.dtype if dtype is None else dtype, device=t.device)


def fits_half_states(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Every element of k and v rounds to a finite float16 (|x| <= 65504; NaN counts as fitting: it stays NaN)."""
    for x in (k, v):
        if x.numel():
            lo, hi = torch.aminmax(x)  # one pass (a decoding step checks every layer's new token)
            if float(lo) < -HALF_MAX or float(hi) > HALF_MAX:
                return False
    return True
