"""Continuation perplexity: prefill N context tokens through the cache under test, then teacher-force the next M
tokens one at a time. Every scored token after the first is predicted from the cache, so the number measures what
the compressed cache costs. Also reports bytes held after prefill and decode ms/token.

Caches that store decoded tokens exactly as given (DynamicCache; kvpress presses, which compress only at prefill)
may pass `timed_steps`: after that many timed one-token steps the rest of the continuation goes through the cache
in one forward call. Causal attention over an unchanged cache makes this the same computation (logits equal up
to round-off, tested) at a fraction of the time; the median ms/token comes from the timed steps."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import cache_nbytes


@dataclass
class ContinuationResult:
    ppl: float
    nll: float
    bytes_after_prefill: int
    prefill_s: float
    decode_ms: float  # median per token
    tokens_scored: int


@torch.inference_mode()
def continuation_perplexity(
    model,
    ids: torch.Tensor,
    context: int,
    continuation: int,
    make_cache: Callable[[], object],
    progress: Callable[[int], None] | None = None,
    on_logits: Callable[[torch.Tensor], None] | None = None,
    timed_steps: int | None = None,
) -> ContinuationResult:
    """ids: (L,) or (B, L) token ids with L >= context + continuation. `make_cache()` returns a fresh cache.

    `on_logits(logits)`, if given, sees the (B, V) next-token logits of each of the `continuation` scored positions in
    order (outside the timed regions), e.g. to compare them with another cache's (see `agreement.py`)."""
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.shape[1] < context + continuation:
        raise ValueError(f"need {context + continuation} tokens, got {ids.shape[1]}")
    if context < 1 or continuation < 1:
        raise ValueError(f"context ({context}) and continuation ({continuation}) must be >= 1")
    cache = make_cache()
    start = time.perf_counter()
    out = model(input_ids=ids[:, :context], past_key_values=cache, use_cache=True, logits_to_keep=1)
    prefill_s = time.perf_counter() - start
    held = cache_nbytes(cache)
    targets = ids[:, context : context + continuation]
    nll = [F.cross_entropy(out.logits[:, -1].float(), targets[:, 0], reduction="sum")]
    if on_logits:
        on_logits(out.logits[:, -1])
    times = []
    stepped = continuation - 1 if timed_steps is None else min(timed_steps, continuation - 1)
    for i in range(stepped):
        t0 = time.perf_counter()
        out = model(input_ids=targets[:, i : i + 1], past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - t0)
        nll.append(F.cross_entropy(out.logits[:, -1].float(), targets[:, i + 1], reduction="sum"))
        if on_logits:
            on_logits(out.logits[:, -1])
        if progress:
            progress(1)
    if stepped < continuation - 1:  # exact cache: the remaining tokens in one call
        out = model(input_ids=targets[:, stepped:-1], past_key_values=cache, use_cache=True)
        for j in range(out.logits.shape[1]):
            logits = out.logits[:, j]
            nll.append(F.cross_entropy(logits.float(), targets[:, stepped + 1 + j], reduction="sum"))
            if on_logits:
                on_logits(logits)
        if progress:
            progress(continuation - 1 - stepped)
    mean_nll = float(torch.stack(nll).sum()) / targets.numel()
    return ContinuationResult(
        ppl=math.exp(mean_nll),
        nll=mean_nll,
        bytes_after_prefill=held,
        prefill_s=prefill_s,
        decode_ms=1000 * statistics.median(times) if times else float("nan"),
        tokens_scored=targets.numel(),
    )


@torch.inference_mode()
def full_forward_perplexity(model, ids: torch.Tensor, context: int, continuation: int) -> float:
    """Reference: the same tokens scored by one forward pass over the whole sequence without any cache."""
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    logits = model(input_ids=ids[:, : context + continuation], use_cache=False).logits
    pred = logits[:, context - 1 : context + continuation - 1].float()
    targets = ids[:, context : context + continuation]
    return math.exp(float(F.cross_entropy(pred.reshape(-1, pred.shape[-1]), targets.reshape(-1))))
