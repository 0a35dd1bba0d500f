"""Per-head treatment of a span or chunk a `PackedLayer` freezes: RazorAttention's compensation tokens and
score-based eviction (SnapKV), stored as per-head segments (`parts.Segment.heads` / `slots`).

- `freeze_razor` (RazorAttention, arXiv 2407.15891): the layer's retrieval heads keep every token in the codec
  fields' form; every other head keeps one compensation token per span or decode chunk, the mean of its real keys
  and of its values, whose logit gains log(n) for the n tokens it stands for (the paper's equation 5: the dropped
  tokens' weight is n exp(q k̂)).
- `freeze_evicted` (SnapKV, arXiv 2404.14469; "demote, don't drop" as an option): per sample and KV head the
  `keep` share of the span's tokens that the prompt's last queries attend to most (`importance`), the rest dropped
  or stored at `evicted_bits`. `evicted_pieces` is the selection itself; the layer also applies it to each image
  (or video frame group) of a vision-language prompt whose modality sets `keep`, ranked by the attention the
  prompt's last (text) queries give its tokens.

Shapes: B batch, H KV heads, n tokens of the span, d head dim.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..codecs import encode_keys, encode_values
from ..parts import ExactPart, Kind, Part, QuantizedPart, Segment, gather_slots, slot_log
from ..scoring.observation import token_importance

if TYPE_CHECKING:  # the layer calls these functions
    from ..config import PackConfig
    from .layer import PackedLayer
    from .step import StepContext


def freeze_razor(
    layer: PackedLayer,
    start: int,
    end: int,
    kind: Kind,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    valid: torch.Tensor,
    ctx: StepContext,
) -> None:
    """RazorAttention: the retrieval heads keep tokens [start, end) in the codec fields' form; every other head
    keeps one compensation token, the mean of the span's real keys and values, which stands for all of them
    (its logit gains the log of their number). k, v (B, H, n, d)."""
    assert layer.retrieval is not None
    h = layer.spec.num_kv_heads
    others = tuple(i for i in range(h) if i not in layer.retrieval)
    if layer.retrieval:
        idx = torch.tensor(layer.retrieval, device=k.device)
        cfg = layer.codecs["text"]
        moments = None if layer.query_moments is None else layer.query_moments[:, idx]
        keys = encode_keys(k[:, idx], valid, cfg, ctx.rope(start, end, pos), pos, moments)
        layer.add_segment(
            Segment(start, end, keys, encode_values(v[:, idx], valid, cfg), kind, heads=layer.retrieval), 0
        )
    idx = torch.tensor(others, device=k.device)
    weight = valid.to(k.dtype)[:, None, :, None]  # (B, 1, n, 1)
    count = weight.sum(dim=2, keepdim=True)  # (B, 1, 1, 1)
    mean_k = (k[:, idx] * weight).sum(dim=2, keepdim=True) / count.clamp_min(1)  # (B, h', 1, d)
    mean_v = (v[:, idx] * weight).sum(dim=2, keepdim=True) / count.clamp_min(1)
    log_count = count[:, :, :, 0].float().log().expand(-1, len(others), 1).to(torch.float16)  # (B, h', 1)
    layer.add_segment(
        Segment(start, end, ExactPart(mean_k), ExactPart(mean_v), kind, heads=others, slots=log_count), end - start
    )


def freeze_evicted(
    layer: PackedLayer,
    start: int,
    end: int,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor,
    scored: tuple[int, torch.Tensor],
) -> None:
    """Score-based eviction: per sample and KV head the `keep` share of tokens [start, end) that the prompt's
    last queries attend to most, in the codec fields' form (keys after RoPE); the rest dropped, or stored at
    `evicted_bits` (demote). k, v (B, H, n, d), valid (B, n); scored: (cache index of column 0, (B, H, N)
    importance of the tokens from there on)."""
    first, scores = scored
    cfg = layer.codecs["text"]
    pieces = evicted_pieces(k, v, valid, scores[:, :, start - first : end - first], cfg, layer.query_moments)
    for i, (keys, values, log) in enumerate(pieces):
        layer.add_segment(
            Segment(start, end, keys, values, "span", slots=log), k.shape[2] if i == len(pieces) - 1 else 0
        )


def evicted_pieces(
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor,
    score: torch.Tensor,
    cfg: PackConfig,
    query_moments: torch.Tensor | None,
) -> list[tuple[Part, Part, torch.Tensor]]:
    """The slot parts of one evicted run of tokens: k, v (B, H, n, d) (keys after RoPE), valid (B, n), score
    (B, H, n) each token's importance. Per sample and head the `cfg.keep` share of the real tokens with the highest
    scores, in cache order, in `cfg`'s codec form; then, with `cfg.evicted_bits`, the rest at that many bits.
    Returns [(keys, values, slots (B, H, m) float16: 0 for a token, -inf for an empty slot)]."""
    b, _, n, _ = k.shape
    score = score.masked_fill(~valid[:, None, :], float("-inf"))  # (B, H, n)
    share = cfg.keep
    assert share is not None
    kept = min(n, max(1, math.ceil(share * int(valid.sum(dim=1).max()))))
    order = score.argsort(dim=-1, descending=True, stable=True)
    cfg = cfg.replace(key_pre_rope=False)  # one slot, different tokens per head: no positions
    rows_bits: list[tuple[torch.Tensor, int | None]] = [(order[..., :kept], None)]
    if cfg.evicted_bits is not None and kept < n:  # demote, don't drop
        rows_bits.append((order[..., kept:], cfg.evicted_bits))
    out: list[tuple[Part, Part, torch.Tensor]] = []
    for rows, bits in rows_bits:
        rows = rows.sort(dim=-1).values  # (B, H, m) in cache order
        real = score.gather(-1, rows) > float("-inf")  # (B, H, m): False for the empty slots of short samples
        log = slot_log(real)
        ks, vs = gather_slots(k, rows, real), gather_slots(v, rows, real)  # (B, H, m, d), empty slots zero
        keys: Part
        values: Part
        if bits is None:
            every = torch.ones(b, rows.shape[-1], dtype=torch.bool, device=k.device)
            keys = encode_keys(ks, every, cfg, None, None, query_moments)
            values = encode_values(vs, every, cfg)
        else:
            keys = QuantizedPart.keys(ks, bits, cfg.group(True))
            values = QuantizedPart.values(vs, bits, cfg.group(False))
        out.append((keys, values, log))
    return out


def importance(keys: torch.Tensor, valid: torch.Tensor, observation: tuple[torch.Tensor, float]) -> torch.Tensor:
    """(B, H, n) SnapKV importance of keys (B, H, n, d) (valid (B, n)), the newest last: attention of the call's
    last queries (B, Hq, w, d) (`observation`: with the model's scaling), pooled over 7 neighbours
    (`scoring.observation.token_importance`)."""
    queries, scaling = observation
    w = min(queries.shape[2], keys.shape[2])
    return token_importance(queries[:, :, -w:], keys, valid, pool_kernel=7, scaling=scaling).per_head
