"""How many bytes a layer of a `PackedCache` can add while decoding: the bound serving admission reserves
(`serve/engine.py`) once a prompt is prefilled and its encodings are known.

A compressing layer keeps decoded tokens in its exact tail until `window + chunk` of them wait there, then
compacts `chunk` of them into a segment in its text codec (`PackedLayer._compact`; a budget's chosen encoding).
So at any step boundary its tail holds at most `window + chunk - 1` tokens (in a buffer of at most TAIL_GRANULE
spare slots, at the tail's element size: a half-precision tail, `PackConfig.tail_dtype`, stays 2 bytes an element
even where it turns bfloat16), and the decode chunks compacted so far are each at most `codecs.nbytes_bound` of
their codec.
"""

from __future__ import annotations

from ..codecs import nbytes_bound
from ..parts import storage_nbytes
from .layer import TAIL_GRANULE, PackedLayer

META_BYTES = 13  # per token and sample in a compressing layer's tail besides K/V: int32 positions (up to 3) + bool


def decode_growth(layer: PackedLayer, tokens: int) -> int | None:
    """Most bytes `tokens` more one-token decoding steps can add to `layer` (at every step boundary on the way), or
    None when this bound does not apply: RazorAttention heads (compensation tokens per head), or a layer not yet
    filled."""
    if not layer.is_initialized or layer.tail is None:
        return None
    if layer.retrieval is not None and len(layer.retrieval) < layer.spec.num_kv_heads:
        return None
    keys = layer.tail.keys  # (B, H, capacity, d)
    b, h, _, d = keys.shape
    slot = 2 * b * h * d * keys.element_size() + (b * META_BYTES if layer.compress else 0)  # bytes per tail slot
    live = len(layer.tail)
    if not layer.compress:  # every token stays exact (a sliding-window layer drops its oldest: counted anyway)
        return slot * (tokens + TAIL_GRANULE)
    window, chunk = layer.config.window, layer.config.decode_chunk
    held = min(live + tokens, window + chunk - 1) + TAIL_GRANULE  # tail slots at a step boundary
    chunks = max(0, live + tokens - window) // chunk  # decode chunks compacted on the way
    cfg = layer.codecs["text"]
    shape = (b, h, chunk, d)
    per_chunk = nbytes_bound(cfg, shape, keys.dtype, True) + nbytes_bound(cfg, shape, keys.dtype, False)
    now = storage_nbytes(layer.tail.tensors())  # the tail's buffer now: its bound above replaces it
    return max(0, slot * held + chunks * per_chunk - now)
