"""The exact tail of a layer: the newest tokens at full precision, in a buffer that grows without copying the
history at every step.

A `DynamicCache` concatenates its whole history with each new token (a full copy per layer per step). Here the
newest tokens live in `[begin, end)` of a preallocated buffer: appending writes in place, dropping the oldest
tokens (compaction, sliding windows) only moves `begin`, and the buffer is reallocated (amortized) when full.
Capacity is rounded up to a multiple of `granule` tokens: compressing layers (granule 16) copy their few live
tokens once every 16 steps and hold at most 15 spare slots; layers that never compress (granule 1) grow exactly
like a DynamicCache, so their bytes stay equal to its bytes.

Shapes: keys/values (B, H, cap, d); positions (B, cap[, 3]) int32 and valid (B, cap) bool, or None when unneeded.
"""
from __future__ import annotations

from typing import Callable

import torch


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

    def view(
        self, start: int = 0, stop: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(keys, values, positions, valid) of live tokens [start, stop) (relative to the oldest), as views."""
        stop = len(self) if stop is None else stop
        sl = slice(self.begin + start, self.begin + stop)
        return (self.keys[..., sl, :], self.values[..., sl, :],
                None if self.positions is None else self.positions[:, sl],
                None if self.valid is None else self.valid[:, sl])

    # ---- changes ------------------------------------------------------------------------------------------------
    def append(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> None:
        q = k.shape[-2]
        if self.end + q > self.capacity:
            self._regrow(self._rounded(len(self) + q))
        self._write(self.end, k, v, positions, valid)
        self.end += q

    def drop_oldest(self, n: int) -> None:
        """Forget the n oldest tokens (no copy; their storage is reused by later appends)."""
        if not 0 <= n <= len(self):
            raise ValueError(f"cannot drop {n} of {len(self)} tail tokens")
        self.begin += n
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
        keys, values, positions, valid = self.view()
        mapped = ExactTail(
            fn(keys.contiguous()),
            fn(values.contiguous()),
            None if positions is None else fn(positions.contiguous()),
            None if valid is None else fn(valid.contiguous()),
            self.granule,
        )
        self.__dict__.update(mapped.__dict__)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.keys, self.values, self.positions, self.valid) if t is not None]

    # ---- internals ----------------------------------------------------------------------------------------------
    def _write(
        self, at: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None, valid: torch.Tensor | None
    ) -> None:
        q = k.shape[-2]
        self.keys[..., at:at + q, :] = k
        self.values[..., at:at + q, :] = v
        if self.positions is not None and positions is not None:
            self.positions[:, at:at + q] = positions
        if self.valid is not None and valid is not None:
            self.valid[:, at:at + q] = valid

    def _rounded(self, n: int) -> int:
        return -(-n // self.granule) * self.granule

    def _regrow(self, cap: int) -> None:
        """Move the live tokens to the front of a new buffer of `cap` slots."""
        n = len(self)
        live = self.view()
        self.keys, self.values = _alloc_like(self.keys, cap), _alloc_like(self.values, cap)
        self.positions = None if self.positions is None else _alloc_like(self.positions, cap)
        self.valid = None if self.valid is None else _alloc_like(self.valid, cap)
        self.begin, self.end = 0, n
        self._write(0, *live)


def _alloc_like(t: torch.Tensor, cap: int) -> torch.Tensor:
    """An empty tensor like `t` with `cap` slots on its token axis: 2 for (B, H, T, d) states, 1 for (B, T[, 3])
    positions and flags (multimodal RoPE positions carry 3 components per token)."""
    shape = list(t.shape)
    shape[2 if t.dim() == 4 else 1] = cap
    return torch.empty(shape, dtype=t.dtype, device=t.device)
