"""Attention computed on the stored form of a `PackedCache` layer, registered as a transformers attention
implementation ("attentionpack").

When a layer holds compressed segments, `PackedLayer.update` returns a `PackedView` instead of materialized
keys/values. This function then scores the queries against every stored piece in its own form (exact pieces with
a matmul; low-rank pieces factored after RoPE and low-rank values through their factors, never rebuilding the
(T, H*d) block; other codecs decoded piece by piece), takes one softmax over all pieces, and mixes each piece's
values with its share of the weights. Nothing is concatenated and no full-precision copy of the history is made.

Anything that is not a `PackedView` (layers without compressed segments, other caches, prefill of a fresh cache)
goes to transformers' SDPA unchanged, so exact paths stay bit-identical to the stock model. The mask function
registered with it is SDPA's: causal, padding and sliding-window masks arrive as boolean (B, 1, q, kv) tensors
over cache indices [first_index, total), which the view maps to its pieces.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from ..cache.segments import ExactPart, Part, RopeFn
from . import fused

NAME = "attentionpack"


@dataclass
class Piece:
    """One stored run of a layer as attention sees it: key/value parts over cache indices [start, end), or over the
    gathered cache indices `index` (B, n) with `valid` (B, n) marking real slots (per-sample modality groups)."""

    keys: Part
    values: Part
    start: int
    end: int
    index: torch.Tensor | None = None
    valid: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return self.end - self.start if self.index is None else self.index.shape[1]

    def columns(self, first: int, batch: int) -> torch.Tensor:
        """(B, n) positions of this piece's tokens in the mask's key axis."""
        if self.index is None:
            return torch.arange(self.start - first, self.end - first).expand(batch, -1)
        return (self.index - first).clamp_min(0)


class PackedView:
    """A snapshot of one layer's pieces for the attention call that follows `update` (taken before compaction,
    so the call sees the tokens exactly as they were when it was made)."""

    def __init__(self, layer, rope: RopeFn):
        self.pieces = [Piece(s.keys, s.values, s.start, s.end, getattr(s, "index", None), getattr(s, "valid", None))
                       for s in layer.segments]
        self.gathered = any(p.index is not None for p in self.pieces)
        if layer.tail_length:
            k, v, _, _ = layer.tail.view()
            self.pieces.append(Piece(ExactPart(k), ExactPart(v), layer.total - layer.tail_length, layer.total))
        self.first, self.total = layer.first_index, layer.total
        self.num_kv_heads = layer.spec.num_kv_heads
        self.rope = rope

    def attend(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float | None,
               softcap: float | None = None) -> torch.Tensor:
        """query (B, Hq, q, d) rotated -> attention output (B, q, Hq, d)."""
        b, hq, q, d = query.shape
        h = self.num_kv_heads
        g = hq // h
        scale = d ** -0.5 if scaling is None else scaling
        cache_mask = self._cache_mask(mask, q, query.device)  # (B|1, 1, q, total - first) bool or None
        if q == 1 and not self.gathered:  # a decoding step: one C call when the kernel knows every piece
            out = fused.decode(self.pieces, self.first, query, cache_mask, scale, softcap)
            if out is not None:
                return out
        qg = (query * scale).reshape(b, h, g * q, d)  # query head j*g + i attends with KV head j
        scores = torch.cat([p.keys.scores(qg, p.start, p.end, self.rope) for p in self.pieces], dim=-1)
        n = scores.shape[-1]  # (B, H, g*q, N)
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        scores = scores.view(b, h, g, q, n)
        allowed = self._allowed(cache_mask, b, q, query.device)  # (B, 1, q, N) bool or None
        if allowed is not None:
            scores = scores.masked_fill(~allowed.unsqueeze(1), torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype).view(b, h, g * q, n)
        out, at = None, 0
        for p in self.pieces:
            width = p.width
            part = p.values.mix(probs[..., at:at + width])  # (B, H, g*q, d)
            out = part if out is None else out.add_(part)
            at += width
        return out.view(b, h, g, q, d).reshape(b, hq, q, d).transpose(1, 2).contiguous()

    def _allowed(self, allowed: torch.Tensor | None, b: int, q: int, device) -> torch.Tensor | None:
        """The cache mask (over cache indices [first, total)) mapped to the pieces' columns."""
        if not self.gathered:
            return allowed
        n = self.total - self.first
        if allowed is None:
            allowed = torch.ones(1, 1, q, n, dtype=torch.bool, device=device)
        cols = torch.cat([p.columns(self.first, b).to(device) for p in self.pieces], dim=1)  # (B, N)
        ok = torch.cat([torch.ones(b, p.width, dtype=torch.bool, device=device) if p.valid is None else p.valid
                        for p in self.pieces], dim=1)
        picked = allowed.expand(b, 1, q, n).gather(-1, cols[:, None, None, :].expand(b, 1, q, -1))
        return picked & ok[:, None, None, :]

    def _cache_mask(self, mask: torch.Tensor | None, q: int, device) -> torch.Tensor | None:
        n = self.total - self.first
        if mask is None:
            if q == 1:
                return None
            rows = torch.arange(self.total - q, self.total, device=device)[:, None]
            cols = torch.arange(self.first, self.total, device=device)[None, :]
            return (cols <= rows)[None, None]
        if mask.shape[-1] != n:
            raise RuntimeError(
                f"attention mask covers {mask.shape[-1]} keys but the layer holds {n} (cache indices "
                f"{self.first}..{self.total}); the model built its mask for a different cache"
            )
        if mask.dtype != torch.bool:  # additive float mask (0 = attend)
            mask = mask == 0
        return mask


def packed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """transformers attention function: any key object with an `attend(query, mask, scaling, softcap)` method
    (a `PackedView`, or a view over several caches) computes the attention itself; plain tensors go to SDPA."""
    if not hasattr(key, "attend"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return key.attend(query, attention_mask, scaling, kwargs.get("softcap")), None


def register() -> None:
    """Make "attentionpack" a valid `attn_implementation` (idempotent)."""
    AttentionInterface.register(NAME, packed_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def enable(model) -> bool:
    """Switch a model that uses SDPA (transformers' default on CPU) to the packed attention, which behaves exactly
    like SDPA for every other cache. Returns whether the model now uses it (eager or other implementations are
    left alone: the cache then materializes keys/values for them)."""
    current = getattr(model.config, "_attn_implementation", None)
    if current == NAME:
        return True
    if current != "sdpa":
        return False
    register()
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME
