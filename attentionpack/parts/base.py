"""The storage contract: a `Part` is the stored keys or values of a run of tokens, a `Segment` is one stored run.

Every layer of a `PackedCache` is a list of segments in cache order (sinks, prompt spans, decode chunks, the recent
window); the cache, the attention, the budget planner, the kernels' decode plan and the file format all read
segments through this contract and nothing else.

Shapes: B batch, H KV heads, T tokens of the segment, d head dim, D = H*d, M query rows per KV head, r rank.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

# (start, end, positions (B, T) or (B, T, 3)) -> cos, sin (B, T, d) of those tokens; None where no part needs RoPE
RopeFn = Callable[[int, int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
BatchFn = Callable[[torch.Tensor], torch.Tensor]  # index_select / repeat_interleave / indexing along dim 0

# why a segment exists: attention sinks, a prompt span, the prompt's recent window (budget caches), a chunk of
# generated text, an image or video group of a vision-language prompt, the exact tail of newest tokens
Kind = Literal["sink", "span", "window", "chunk", "image", "video", "recent"]
Modality = Literal["text", "image", "video", "mixed"]


class Part(Protocol):
    """Keys or values of one segment in some stored form.

    `materialize` rebuilds the states (B, H, T, d) (keys rotated); `scores` and `mix` let attention run on the
    stored form: q (B, H, M, d) query rows of each KV head -> (B, H, M, T) logits; p (B, H, M, T) weights ->
    (B, H, M, d). These are the torch reference; `kernels.ops` runs faster equivalents where a kernel exists.
    `rope` is needed only by parts that store keys before RoPE."""

    def materialize(self, start: int, end: int, rope: RopeFn | None) -> torch.Tensor: ...

    def scores(self, q: torch.Tensor, start: int, end: int, rope: RopeFn | None) -> torch.Tensor: ...

    def mix(self, p: torch.Tensor) -> torch.Tensor: ...

    def tensors(self) -> list[torch.Tensor]: ...

    def map_batch(self, fn: BatchFn) -> None: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass
class Segment:
    """A stored run of tokens of one layer: its keys and values, and which cache indices they hold.

    Contiguous (index None): cache indices [start, end), the same for every sample, parts (B, H, end - start, d).
    Gathered (vision-language prompts): per sample its own set of cache indices, index (B, n) long, in the row
    order of the parts (B, H, n, d); valid (B, n) bool is False for padding slots (a sample with fewer or smaller
    images), whose index is meaningless. start/end are then the min/max (+1) cache index covered. `group` names
    the modality group ("image 1", "images", "text"...).

    Per-head storage (RazorAttention, eviction, tiers): `heads` names the KV heads the parts hold, ascending (the
    parts are (B, len(heads), n, d)); the other heads hold nothing of this segment. `slots` (B, h, n) float16 makes
    the n token slots per (sample, head) free of the cache indices [start, end): slot j holds a token chosen for
    that sample and head (eviction keeps a different subset per head), or a compensation token standing for
    several; its value is the log of how many tokens it stands for (0: one; -inf: an empty slot, e.g. a sample
    with fewer real tokens). Attention adds it to the slot's logits and reads no cache mask for such segments:
    their tokens precede every query of later calls.
    """

    start: int
    end: int
    keys: Part
    values: Part
    kind: Kind
    index: torch.Tensor | None = None  # (B, n) long, gathered segments only
    valid: torch.Tensor | None = None  # (B, n) bool, gathered segments only
    modality: Modality = "text"
    group: str = ""
    heads: tuple[int, ...] | None = None  # KV heads held (None: all)
    slots: torch.Tensor | None = None  # (B, h, n) float16 log multiplicity per slot (slot segments only)

    @property
    def length(self) -> int:
        """Token slots per sample (end - start when contiguous, per head for slot segments)."""
        if self.slots is not None:
            return int(self.slots.shape[-1])
        return self.end - self.start if self.index is None else self.index.shape[1]

    def tokens(self) -> int:
        """Cache entries held, summed over the batch (padding slots excluded); per held head for slot segments."""
        if self.slots is not None:
            return int(torch.isfinite(self.slots).sum()) // self.slots.shape[1]
        if self.valid is None:
            return self.keys.tensors()[0].shape[0] * self.length
        return int(self.valid.sum())

    @property
    def per_head(self) -> bool:
        """The segment holds some heads only, or slots chosen per head (attention treats heads apart)."""
        return self.heads is not None or self.slots is not None

    def columns(self, first: int, batch: int) -> torch.Tensor:
        """(B, n) positions of this segment's tokens on a mask's key axis that starts at cache index `first`."""
        if self.index is None:
            return torch.arange(self.start - first, self.end - first).expand(batch, -1)
        return (self.index - first).clamp_min(0)

    def tensors(self) -> list[torch.Tensor]:
        layout = [] if self.index is None or self.valid is None else [self.index, self.valid]
        slots = [] if self.slots is None else [self.slots]
        return self.keys.tensors() + self.values.tensors() + layout + slots

    def map_batch(self, fn: BatchFn) -> None:
        self.keys.map_batch(fn)
        self.values.map_batch(fn)
        if self.index is not None and self.valid is not None:
            self.index, self.valid = fn(self.index), fn(self.valid)
        if self.slots is not None:
            self.slots = fn(self.slots)


def slot_log(real: torch.Tensor) -> torch.Tensor:
    """A slot segment's `slots` for real (B, h, m) bool: float16 log multiplicity 0 for a token, -inf for an empty
    slot."""
    return torch.zeros(real.shape, dtype=torch.float16, device=real.device).masked_fill_(~real, float("-inf"))


def gather_slots(x: torch.Tensor, rows: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The slots of x (B, H, n, d) at rows (B, H, m) (per sample and head its own tokens), (B, H, m, d), zero where
    real (B, H, m) is False (an empty slot)."""
    b, h, m = rows.shape
    return x.gather(2, rows[..., None].expand(b, h, m, x.shape[-1])) * real[..., None].to(x.dtype)


def storage_nbytes(
    tensors: list[torch.Tensor], seen: set[int] | None = None, counted: AbstractSet[int] = frozenset()
) -> int:
    """Bytes of the storages behind `tensors`, each storage counted once and whole (a view costs its storage),
    leaving out those whose address is in `counted`; `seen` collects the addresses counted."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen and storage.data_ptr() not in counted:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total
