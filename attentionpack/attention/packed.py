"""Attention computed on the stored form of a compressed layer, registered as the transformers attention
implementation "attentionpack".

When a layer holds compressed segments, `PackedLayer.update` returns a `LayerView` instead of materialized
keys/values, and `attend` computes the attention on it along one of three paths, recorded in the view's counter
(`PackedCache.stats()["attention_paths"]`):

- "fused": a one-token step over segments the decode kernel reads — one C call per layer over the table the
  layer planned when its segments froze (`kernels.plan.DecodePlan`);
- "triton": the same step as Triton kernels (`kernels.triton_decode`), one launch per segment and a merge: the
  backend for CUDA tensors (`decode_backend`);
- "dense": a call of at least `DENSE_MIN_QUERIES` query tokens (a prefill chunk after earlier chunks were
  compacted, a second turn's prompt): every segment's states are rebuilt once, (B, H, N, d) per layer, and one
  SDPA call attends (CPU SDPA works in tiles: no (q, N) score matrix per head is built, which the per-part path
  needs; rebuilding costs O(N d) per layer against the call's O(q N d));
- "per_part": every other call (a few query tokens the fused kernel cannot take, vision-language groups, forms
  or dtypes the kernel does not take, a logit softcap): each segment is scored in its own form (`kernels.ops`:
  C kernels for quantized parts, the parts' torch reference otherwise), one softmax over all segments, each
  segment's values mixed with its share of the weights. Nothing is concatenated and no full-precision copy of the
  history is made.

With ATTENTIONPACK_STRICT=1 a one-token step that cannot take its one-call step (C or Triton) raises with the
reason.

Anything that is not a view (layers without compressed segments, other caches, the prefill of a fresh cache)
goes to transformers' SDPA unchanged, so exact paths stay bit-identical to the stock model. The mask function
registered with it is SDPA's: causal, padding and sliding-window masks arrive as boolean (B, 1, q, kv) tensors
over cache indices [first, total), which `attend` maps to the segments.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from ..kernels import ops, triton_decode
from ..kernels.plan import DecodePlan, Tail
from ..parts import Segment
from .view import LayerView

NAME = "attentionpack"


DENSE_MIN_QUERIES = 16  # query tokens from which a call attends on rebuilt states (measured: a 4,096-token prompt
# prefilled in 1,024-token chunks into budget=1/8 took 23.4 s per part against 7.5 s whole; see `_dense`)


def strict() -> bool:
    """ATTENTIONPACK_STRICT=1: a step that should run on the compressed form's fast path but cannot raises with
    the reason instead of falling back (the speed benchmarks and their tests run with it)."""
    return os.environ.get("ATTENTIONPACK_STRICT", "0") not in ("", "0")


BACKENDS = ("auto", "c", "triton")


def decode_backend(query: torch.Tensor) -> str:
    """The one-call step that serves one-token decoding steps: "c" (kernels/decode.c) or "triton"
    (kernels/triton_decode.py). ATTENTIONPACK_DECODE=c|triton names it; "auto" (the default) takes C for CPU
    queries and Triton for CUDA queries (on CPU, Triton runs only in its interpreter: tests)."""
    chosen = os.environ.get("ATTENTIONPACK_DECODE", "auto")
    if chosen not in BACKENDS:
        raise ValueError(f"ATTENTIONPACK_DECODE={chosen!r} is not a decoding backend: use one of {', '.join(BACKENDS)}")
    if chosen == "auto":
        return "c" if query.device.type == "cpu" else "triton"
    return chosen


def attend(
    view: LayerView, query: torch.Tensor, mask: torch.Tensor | None, scaling: float | None, softcap: float | None
) -> torch.Tensor:
    """query (B, Hq, q, d) rotated -> attention output (B, q, Hq, d) over the view's segments."""
    b, hq, q, d = query.shape
    scale = d**-0.5 if scaling is None else scaling
    cache_mask = _cache_mask(view, mask, q, query.device)  # (B|1, 1, q, total - first) bool or None
    backend = decode_backend(query)
    if backend == "triton":
        why = triton_decode.why_not(view.segments, query)
        if not why:
            view.paths["triton"] += 1
            segments, heads = view.segments, view.num_kv_heads
            return triton_decode.decode(segments, heads, view.first, query, cache_mask, scale, softcap)
    else:
        why = _c_why_not(view, query)
        if not why:
            view.paths["fused"] += 1
            return view.plan.run(*_c_step(view, query, cache_mask), scale, softcap)
    if q == 1 and strict():
        raise RuntimeError(f"ATTENTIONPACK_STRICT: a decoding step cannot take the {backend} one-call step: {why}")
    if q >= DENSE_MIN_QUERIES and softcap is None:
        view.paths["dense"] += 1
        return _dense(view, query, cache_mask, scale)
    view.paths["per_part"] += 1
    return _per_part(view, query, cache_mask, scale, softcap)


def attend_many(
    steps: list[tuple[LayerView, torch.Tensor, torch.Tensor | None]], scaling: float | None, softcap: float | None
) -> list[torch.Tensor]:
    """Independent steps of several sequences (a serving step's rows, each over its own cache's view): per
    sequence (view, query (1, Hq, q, d) rotated, mask or None). The one-token steps the C one-call step takes run
    in one call, the threads sharing the sequences (`DecodePlan.run_many`); every other step through `attend`.
    -> each step's output (1, q, Hq, d), in order."""
    outs: list[torch.Tensor | None] = [None] * len(steps)
    fused = [
        i for i, (view, query, _) in enumerate(steps) if decode_backend(query) == "c" and not _c_why_not(view, query)
    ]
    if fused:
        d = steps[fused[0]][1].shape[-1]
        args = [
            (view.plan, *_c_step(view, query, _cache_mask(view, mask, 1, query.device)))
            for view, query, mask in (steps[i] for i in fused)
        ]
        results = DecodePlan.run_many(args, d**-0.5 if scaling is None else scaling, softcap)
        for i, out in zip(fused, results, strict=True):
            steps[i][0].paths["fused"] += 1
            outs[i] = out
    for i, (view, query, mask) in enumerate(steps):
        if outs[i] is None:
            outs[i] = attend(view, query, mask, scaling, softcap)
    return [out for out in outs if out is not None]


def _c_why_not(view: LayerView, query: torch.Tensor) -> str:
    """Why the C one-call step cannot serve this call over the view; empty when it can."""
    tail_keys = view.tail[0] if view.tail is not None else None
    return view.plan.why_not(query, tail_keys, view.plan_count)


def _c_step(
    view: LayerView, query: torch.Tensor, cache_mask: torch.Tensor | None
) -> tuple[int, Tail | None, int, torch.Tensor, torch.Tensor | None]:
    """`DecodePlan.run`'s step arguments over the view (`run_many` takes them after the plan)."""
    return view.plan_count, view.tail, view.first, query, cache_mask


def _per_part(
    view: LayerView, query: torch.Tensor, cache_mask: torch.Tensor | None, scale: float, softcap: float | None
) -> torch.Tensor:
    b, hq, q, d = query.shape
    h = view.num_kv_heads
    g = hq // h
    qg = (query * scale).reshape(b, h, g * q, d)  # query head j*g + i attends with KV head j
    scores = torch.cat([_scores(s, qg, view, softcap) for s in view.segments], dim=-1)
    n = scores.shape[-1]  # (B, H, g*q, N)
    scores = scores.view(b, h, g, q, n)
    allowed = _allowed(view, cache_mask, b, q, query.device)  # (B, 1, q, N) bool or None
    if allowed is not None:
        scores = scores.masked_fill(~allowed.unsqueeze(1), torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype).view(b, h, g * q, n)
    out = query.new_zeros(b, h, g * q, d)
    at = 0
    for s in view.segments:
        width = s.length
        p = probs[..., at : at + width]
        if s.heads is None:
            out.add_(ops.mix(s.values, p).to(query.dtype))  # (B, H, g*q, d)
        else:  # only the heads the segment holds have weight on its slots
            idx = _head_index(s, query.device)
            out.index_add_(1, idx, ops.mix(s.values, p.index_select(1, idx)).to(query.dtype))
        at += width
    return out.view(b, h, g, q, d).reshape(b, hq, q, d).transpose(1, 2).contiguous()


def _head_index(s: Segment, device: torch.device) -> torch.Tensor:
    assert s.heads is not None
    return torch.tensor(s.heads, dtype=torch.long, device=device)


def _scores(s: Segment, qg: torch.Tensor, view: LayerView, softcap: float | None) -> torch.Tensor:
    """qg (B, H, M, d) scaled query rows per KV head -> logits (B, H, M, n) of segment `s` (soft-capped): -inf
    for the heads it does not hold, plus its slots' log multiplicity."""
    idx = None if s.heads is None else _head_index(s, qg.device)
    held = ops.scores(s.keys, qg if idx is None else qg.index_select(1, idx), s.start, s.end, view.rope)
    if softcap is not None:
        held = softcap * torch.tanh(held / softcap)
    if s.slots is not None:
        held = held + s.slots[:, :, None, :].to(held.dtype)
    if idx is None:
        return held
    b, _, m, _ = qg.shape
    out = held.new_full((b, view.num_kv_heads, m, s.length), float("-inf"))
    out[:, idx] = held
    return out


def _dense(view: LayerView, query: torch.Tensor, cache_mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """query (B, Hq, q, d) -> (B, q, Hq, d): the segments' states rebuilt in cache order, one SDPA call."""
    b, hq, q, d = query.shape
    h = view.num_kv_heads
    keys = torch.cat([_states(s, s.keys, view, query) for s in view.segments], dim=2)  # (B, H, N, d)
    values = torch.cat([_states(s, s.values, view, query) for s in view.segments], dim=2)
    allowed = _allowed(view, cache_mask, b, q, query.device)  # (B|1, 1, q, N) bool or None
    bias = None
    if allowed is not None:  # additive: a row that sees nothing (padding) spreads evenly instead of giving NaN
        bias = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
        bias.masked_fill_(~allowed, torch.finfo(query.dtype).min)
    if any(s.per_head for s in view.segments):  # per KV head: heads a segment lacks, slots' multiplicities
        low = torch.finfo(query.dtype).min
        heads = torch.cat([_head_bias(s, b, h, query) for s in view.segments], dim=-1)  # (B, H, 1, N)
        g = hq // h
        out = query.new_empty(b, hq, q, d)
        for j in range(h):  # one call per KV head: its (B, 1, q, N) bias serves its g query heads
            bias_j = heads[:, j : j + 1] if bias is None else bias + heads[:, j : j + 1]
            out[:, j * g : (j + 1) * g] = torch.nn.functional.scaled_dot_product_attention(
                query[:, j * g : (j + 1) * g],
                keys[:, j : j + 1],
                values[:, j : j + 1],
                attn_mask=bias_j.clamp_min(low),
                scale=scale,
                enable_gqa=g > 1,
            )
    else:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, keys, values, attn_mask=bias, scale=scale, enable_gqa=hq != keys.shape[1]
        )  # (B, Hq, q, d)
    return out.transpose(1, 2).contiguous()


def _states(s: Segment, part: Any, view: LayerView, query: torch.Tensor) -> torch.Tensor:
    """A segment's keys or values rebuilt (B, H, n, d); zeros for heads it does not hold (masked by the bias)."""
    x = part.materialize(s.start, s.end, view.rope).to(query.dtype)
    if s.heads is None:
        return x
    full = x.new_zeros(x.shape[0], view.num_kv_heads, x.shape[2], x.shape[3])
    full[:, _head_index(s, query.device)] = x
    return full


def _head_bias(s: Segment, b: int, h: int, query: torch.Tensor) -> torch.Tensor:
    """(B, H, 1, n) additive logits of a segment's slots per KV head: 0, the slots' log multiplicity, -inf for a
    head the segment does not hold."""
    out = torch.zeros(b, h, 1, s.length, dtype=query.dtype, device=query.device)
    held = torch.zeros(b, len(s.heads or range(h)), 1, s.length, dtype=query.dtype, device=query.device)
    if s.slots is not None:
        held = held + s.slots[:, :, None, :].to(query.dtype)
    if s.heads is None:
        return held
    out.fill_(float("-inf"))
    out[:, _head_index(s, query.device)] = held
    return out


def _allowed(
    view: LayerView, allowed: torch.Tensor | None, b: int, q: int, device: torch.device
) -> torch.Tensor | None:
    """The cache mask (over cache indices [first, total)) mapped to the segments' columns; slot segments' tokens
    precede every query (their empty slots are -inf in their logits)."""
    if not view.gathered and not any(s.slots is not None for s in view.segments):
        return allowed
    n = view.total - view.first
    if allowed is None:
        allowed = torch.ones(1, 1, q, n, dtype=torch.bool, device=device)
    full = allowed.expand(b, 1, q, n)
    pieces = []
    for s in view.segments:
        if s.slots is not None:
            pieces.append(torch.ones(b, 1, q, s.length, dtype=torch.bool, device=device))
        elif s.index is None:
            pieces.append(full[..., s.start - view.first : s.end - view.first])
        else:
            cols = s.columns(view.first, b).to(device)  # (B, n)
            picked = full.gather(-1, cols[:, None, None, :].expand(b, 1, q, -1))
            ok = s.valid if s.valid is not None else torch.ones(b, s.length, dtype=torch.bool, device=device)
            pieces.append(picked & ok[:, None, None, :])
    return torch.cat(pieces, dim=-1)


def _cache_mask(view: LayerView, mask: torch.Tensor | None, q: int, device: torch.device) -> torch.Tensor | None:
    n = view.total - view.first
    if mask is None:
        if q == 1:
            return None
        rows = torch.arange(view.total - q, view.total, device=device)[:, None]
        cols = torch.arange(view.first, view.total, device=device)[None, :]
        return (cols <= rows)[None, None]
    if mask.dtype != torch.bool:  # additive float mask (0 = attend)
        mask = mask == 0
    extra = mask.shape[-1] - n  # masks end at the newest token; sliding layers may have freed different old ones
    if extra > 0 and view.sliding and not bool(mask[..., :extra].any()):
        return mask[..., extra:]  # it reaches back to tokens this layer freed: none of them visible
    if extra < 0 and view.sliding:
        return torch.nn.functional.pad(mask, (-extra, 0), value=False)  # older held tokens, out of the window
    if extra:
        raise RuntimeError(
            f"attention mask covers {mask.shape[-1]} keys but the layer holds {n} (cache indices "
            f"{view.first}..{view.total}); the model built its mask for a different cache"
        )
    return mask


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: Any,
    value: Any,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: `attend` for a `LayerView`; any other key object with an
    `attend(query, mask, scaling, softcap)` method (a view over several caches) attends itself; plain tensors go
    to SDPA."""
    if isinstance(key, LayerView):
        return attend(key, query, attention_mask, scaling, kwargs.get("softcap")), None
    if hasattr(key, "attend"):
        return key.attend(query, attention_mask, scaling, kwargs.get("softcap")), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def register() -> None:
    """Make "attentionpack" a valid `attn_implementation` (idempotent)."""
    AttentionInterface.register(NAME, packed_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def enable(model: Any) -> str:
    """Switch a model that uses SDPA (transformers' default on CPU) to the packed attention, which behaves exactly
    like SDPA for every other cache. Returns "" when the model now uses it, else why it cannot (eager or other
    implementations are left alone: the cache then rebuilds keys/values for them)."""
    current = getattr(model.config, "_attn_implementation", None)
    if current == NAME:
        return ""
    if current != "sdpa":
        return f"the model runs attn_implementation={current!r} (load it with 'sdpa' to attend on the stored form)"
    register()
    model.set_attn_implementation(NAME)
    if model.config._attn_implementation != NAME:
        return "transformers refused attn_implementation='attentionpack' for this model"
    return ""


def disable(model: Any) -> None:
    """Switch a model back from the packed attention to SDPA (what `enable` replaced)."""
    if getattr(model.config, "_attn_implementation", None) == NAME:
        model.set_attn_implementation("sdpa")
