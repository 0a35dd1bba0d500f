"""What a `PackedLayer` holds, run by run: the rows of `PackedCache.stats()` (kind, modality, codec and rank of K
and V, bytes, and what DynamicCache would hold for the same tokens)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .layer import PackedLayer


def layer_rows(layer: PackedLayer, seen: set) -> list[dict]:
    """One row per stored run of tokens: kind, modality, group, tokens (slots per sample), entries (over the
    batch), codec and rank of K and V, bytes. Storages in `seen` (shared across layers, e.g. a gathered
    segment's index) are not counted again; the ones counted here are added to it."""
    entry = (
        2 * layer.spec.num_kv_heads * layer.spec.head_dim * torch.empty((), dtype=layer.dtype).element_size()
        if layer.is_initialized
        else 0
    )
    rows = []
    for seg in layer.segments:
        rows.append(
            {
                "layer": layer.layer_idx,
                "kind": seg.kind,
                "start": seg.start,
                "tokens": seg.length,
                "entries": seg.tokens(),
                "modality": "exact" if seg.kind == "sink" else seg.modality,
                "group": seg.group,
                "keys": seg.keys.describe(),
                "values": seg.values.describe(),
                "bytes": _new_bytes(seg.tensors(), seen),
                "dynamic_bytes": seg.tokens() * entry,
            }
        )
    if layer.tail is not None and layer.tail_length:
        tail = layer.tail.tensors()
        entries = layer.tail.keys.shape[0] * layer.tail_length
        rows.append(
            {
                "layer": layer.layer_idx,
                "kind": "recent",
                "start": layer.total - layer.tail_length,
                "tokens": layer.tail_length,
                "entries": entries,
                "modality": "exact",
                "group": "",
                "keys": {"codec": "exact", "dtype": str(layer.tail.keys.dtype).removeprefix("torch.")},
                "values": {"codec": "exact", "dtype": str(layer.tail.values.dtype).removeprefix("torch.")},
                "bytes": _new_bytes(tail, seen),
                "dynamic_bytes": entries * entry,
            }
        )
    return rows


def _new_bytes(tensors: list[torch.Tensor], seen: set[int]) -> int:
    """Bytes of the storages behind `tensors` not yet in `seen` (which they are added to)."""
    total = 0
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total
