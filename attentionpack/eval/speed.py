"""Speed: prefill time (compression included) and median decode ms/token of each configuration at several context
lengths, with repeats interleaved between configurations (A B C A B C ...) so that a slow spell of a shared machine
hits every configuration alike. Reported as ratios to DynamicCache measured in the same rounds."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import torch


@torch.inference_mode()
def time_one(model, ids: torch.Tensor, context: int, decode_steps: int, make_cache: Callable[[int], object]) -> dict:
    """Prefill `context` tokens of `ids` through a fresh cache (`make_cache(tokens it will hold)`: a StaticCache
    preallocates them), then teacher-force `decode_steps` tokens one at a time. Returns prefill seconds, the median
    decode milliseconds per token and, for a PackedCache, which attention path its decoding
    steps took (layer calls per path, `PackedCache.stats()["attention_paths"]`)."""
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.shape[1] < context + decode_steps:
        raise ValueError(f"speed at context {context} needs {context + decode_steps} tokens, got {ids.shape[1]}")
    cache = make_cache(context + decode_steps)
    t0 = clock(ids)
    model(input_ids=ids[:, :context], past_key_values=cache, use_cache=True, logits_to_keep=1)
    prefill_s = clock(ids) - t0
    before = _paths(cache)
    times = []
    for i in range(decode_steps):
        t1 = clock(ids)
        model(input_ids=ids[:, context + i : context + i + 1], past_key_values=cache, use_cache=True)
        times.append(clock(ids) - t1)
    after = _paths(cache)
    del cache
    gc.collect()
    out: dict = {"prefill_s": prefill_s, "decode_ms": 1000 * statistics.median(times)}
    if after is not None and before is not None:
        out["decode_paths"] = {k: n - before.get(k, 0) for k, n in after.items() if n - before.get(k, 0)}
    return out


def clock(on: torch.Tensor) -> float:
    """time.perf_counter() once the device of `on` has finished its queued work (CUDA runs asynchronously)."""
    if on.is_cuda:
        torch.cuda.synchronize(on.device)
    return time.perf_counter()


def _paths(cache: object) -> dict | None:
    stats = getattr(cache, "stats", None)
    return dict(stats()["attention_paths"]) if callable(stats) else None


def speed_round(
    model,
    ids: torch.Tensor,
    makers: Mapping[str, Callable[[int], object]],
    contexts: Sequence[int],
    decode_steps: int,
    progress: Callable[[str, int, bool], None] | None = None,
) -> dict:
    """One interleaved round: for each context length, every configuration once, in order. `progress(name,
    context, finished)` is called before and after each measurement.
    Returns {config: {context: {"prefill_s", "decode_ms"}}}."""
    out: dict = {name: {} for name in makers}
    for context in contexts:
        for name, make in makers.items():
            if progress:
                progress(name, context, False)
            out[name][context] = time_one(model, ids, context, decode_steps, make)
            if progress:
                progress(name, context, True)
    return out


def warm_up(model, ids: torch.Tensor, make_cache: Callable[[int], object]) -> None:
    """A short run so that the first measured configuration does not pay for first-call allocations."""
    time_one(model, ids, min(128, ids.numel() - 4), 3, make_cache)


def summarize(rounds: Sequence[dict], reference: str = "dynamic", second: str = "static") -> dict:
    """Median over rounds per (config, context), and ratios to `reference` (ratio > 1: slower than reference) and,
    when the rounds timed it, to `second` (transformers' StaticCache: no copy of the history per step).
    Returns {config: {context: {prefill_s, decode_ms, prefill_ratio, decode_ratio, repeats}}}, plus
    prefill_ratio_static / decode_ratio_static with the second reference."""
    merged: dict = {}
    for rnd in rounds:
        for name, by_ctx in rnd.items():
            for ctx, m in by_ctx.items():
                cell = merged.setdefault(name, {}).setdefault(int(ctx), {"prefill_s": [], "decode_ms": [], "paths": {}})
                cell["prefill_s"].append(m["prefill_s"])
                cell["decode_ms"].append(m["decode_ms"])
                for path, n in m.get("decode_paths", {}).items():
                    cell["paths"][path] = cell["paths"].get(path, 0) + n
    out: dict = {}
    for name, by_ctx in merged.items():
        for ctx, cell in by_ctx.items():
            row = {
                "prefill_s": statistics.median(cell["prefill_s"]),
                "decode_ms": statistics.median(cell["decode_ms"]),
                "repeats": len(cell["decode_ms"]),
            }
            if cell["paths"]:
                row["decode_paths"] = cell["paths"]
            for base, suffix in ((reference, ""), (second, f"_{second}")):
                ref = merged.get(base, {}).get(ctx)
                if ref:
                    row[f"prefill_ratio{suffix}"] = row["prefill_s"] / statistics.median(ref["prefill_s"])
                    row[f"decode_ratio{suffix}"] = row["decode_ms"] / statistics.median(ref["decode_ms"])
            out.setdefault(name, {})[ctx] = row
    return out


def measure_speed(
    model,
    ids: torch.Tensor,
    makers: Mapping[str, Callable[[int], object]],
    contexts: Sequence[int] = (1024, 2048, 4096),
    decode_steps: int = 16,
    repeats: int = 2,
    progress: Callable[[str, int, bool], None] | None = None,
) -> dict:
    """Interleaved speed of every configuration in `makers` (which should include "dynamic" for the ratios)."""
    if repeats < 1 or decode_steps < 1:
        raise ValueError("repeats and decode_steps must be >= 1")
    warm_up(model, ids, next(iter(makers.values())))
    rounds = [speed_round(model, ids, makers, contexts, decode_steps, progress) for _ in range(repeats)]
    return summarize(rounds)
