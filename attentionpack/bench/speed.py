"""`attentionpack bench speed`: prefill time and decode ms/token of DynamicCache, StaticCache, our presets, a byte
budget and QuantizedCache (quanto 4-bit) at several contexts and batch sizes, repeats interleaved, ratios to both
transformers baselines from the same run (DynamicCache copies its history at every step, StaticCache preallocates
and writes in place: a claim holds against the stronger); and aggregate decoding throughput when every cache gets
the same KV memory budget.

Throughput at a budget: one sequence of `context` tokens is prefilled per configuration and its bytes measured
(every tensor of the cache); the largest batch whose cache fits the budget is that many copies of the sequence
(`batch_repeat_interleave`: decoding cost does not depend on what the tokens say), and `steps` one-token steps
of that batch are timed, the steps of all caches interleaved. Tokens/s = batch * steps / time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import cache_nbytes, check_device, load_model
from ..eval.configs import make_cache, parse_config
from ..eval.data import britannica_text, token_ids
from ..eval.speed import clock, measure_speed

DEFAULT_CONFIGS = ("dynamic", "static", "balanced", "max", "budget-0.125", "quanto-4")


def _ids(tokenizer, needed: int, batch: int, device: str = "cpu") -> torch.Tensor:
    ids = token_ids(tokenizer, britannica_text(), needed * batch, source="Britannica")  # (needed * batch,)
    return ids[: needed * batch].view(batch, needed).to(device)  # each row its own stretch of text


@torch.inference_mode()
def throughput_at_budget(
    model, tokenizer, specs, budget_bytes: int, context: int, steps: int = 8, max_batch: int = 256
) -> dict:
    """{config: {seq_bytes, batch, tokens_per_s}} with every cache limited to `budget_bytes` of KV.

    All caches are built first, then their steps are interleaved (A B C A B C ...), so that a slow spell of a shared
    machine hits every configuration alike; tokens/s = batch * steps / (summed time of that cache's steps)."""
    ids = _ids(tokenizer, context + steps + 1, 1, str(model.device))
    out: dict[str, dict] = {}
    live: dict[str, tuple] = {}
    for sp in specs:
        cache = make_cache(model, sp, context + steps + 1)  # a StaticCache holds what the run will write, no more
        res = model(input_ids=ids[:, :context], past_key_values=cache, use_cache=True, logits_to_keep=1)
        seq_bytes = cache_nbytes(cache)
        batch = int(min(max_batch, budget_bytes // max(1, seq_bytes)))
        row: dict = {"seq_bytes": seq_bytes, "batch": batch, "tokens_per_s": 0.0}
        if sp.kind == "quantized":  # transformers' QuantizedCache repeats its residual but not its quantized part
            row.update(batch=0, note="not measured: QuantizedCache cannot repeat its batch (batch_repeat_interleave)")
        elif batch >= 1:
            if batch > 1:
                _repeat(cache, batch)
            tok = res.logits[:, -1:].argmax(-1).expand(batch, 1).contiguous()
            model(input_ids=tok, past_key_values=cache, use_cache=True)  # warm-up step
            live[sp.name] = (cache, batch, [])
        out[sp.name] = row
        del cache, res
    for i in range(steps):
        for cache, batch, times in live.values():
            step = ids[:, context + 1 + i : context + 2 + i].expand(batch, 1).contiguous()
            t0 = clock(step)
            model(input_ids=step, past_key_values=cache, use_cache=True)
            times.append(clock(step) - t0)
    for name, (_, batch, times) in live.items():
        out[name]["tokens_per_s"] = batch * steps / sum(times)
    ref = out.get("dynamic", {}).get("tokens_per_s")
    best = max((out.get(b, {}).get("tokens_per_s") or 0.0 for b in ("dynamic", "static")), default=0.0)
    for row in out.values():
        row["vs_dynamic"] = row["tokens_per_s"] / ref if ref and row["tokens_per_s"] else None
        row["vs_best_baseline"] = row["tokens_per_s"] / best if best and row["tokens_per_s"] else None
    return out


def _repeat(cache, batch: int) -> None:
    """Repeat a one-sequence cache `batch` times along the batch dimension. transformers' StaticCache layers have
    no `batch_repeat_interleave`: their preallocated buffers are repeated here (the same tensors, batch x as
    large); every other cache repeats itself."""
    from transformers import StaticCache

    if not isinstance(cache, StaticCache):
        cache.batch_repeat_interleave(batch)
        return
    for layer in cache.layers:
        keys: Any = getattr(layer, "keys", None)
        if keys is not None:  # (1, H, max_len, d) -> (batch, H, max_len, d)
            values: Any = getattr(layer, "values")  # noqa: B009 - typed as Any: transformers' layer union
            setattr(layer, "keys", keys.repeat_interleave(batch, dim=0))  # noqa: B010
            setattr(layer, "values", values.repeat_interleave(batch, dim=0))  # noqa: B010
            setattr(layer, "batch_size", batch)  # noqa: B010


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run(
    model_path: str | None = None,
    dtype: str = "float32",
    configs: Sequence[str] = DEFAULT_CONFIGS,
    contexts: Sequence[int] = (2048, 8192),
    batches: Sequence[int] = (1, 8),
    steps: int = 8,
    repeats: int = 2,
    budget_gib: float = 1.0,
    budget_context: int = 4096,
    threads: int | None = None,
    out: Path | None = None,
    device: str = "cpu",
) -> dict:
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    check_device(device)
    specs = [parse_config(c) for c in configs]
    if "dynamic" not in [sp.name for sp in specs]:
        raise ValueError("bench speed needs 'dynamic' among the configurations (every ratio is relative to it)")
    if any(not sp.in_process for sp in specs):
        raise ValueError("bench speed runs in-process configurations only (dynamic, presets, pack:..., quanto-N)")
    from ..threads import apply_threads, choose_threads

    threads, note = choose_threads(threads)  # default: torch's, or 1 on a busy machine (attentionpack/threads.py)
    if note:
        print(f"note: {note}")
    apply_threads(threads)
    model, tokenizer = load_model(model_path, DTYPES[dtype])
    model.to(device)
    result: dict = {"dtype": dtype, "device": device, "threads": torch.get_num_threads(), "steps": steps}
    result.update(repeats=repeats, speed={})
    where = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"{result['threads']} threads"
    print(f"model dtype {dtype}, {device} ({where})")
    for batch in batches:
        ids = _ids(tokenizer, max(contexts) + steps, batch, device)
        makers = {sp.name: (lambda n, sp=sp: make_cache(model, sp, n)) for sp in specs}
        summary = measure_speed(model, ids, makers, contexts=contexts, decode_steps=steps, repeats=repeats)
        result["speed"][batch] = summary
        _print_speed(batch, summary)
    if budget_gib > 0:
        tp = throughput_at_budget(model, tokenizer, specs, int(budget_gib * 2**30), budget_context, steps)
        result["throughput"] = {"budget_gib": budget_gib, "context": budget_context, "rows": tp}
        print(f"\nthroughput with {budget_gib:g} GiB of KV cache at {budget_context} tokens per sequence")
        print(f"{'config':12s} {'MiB/seq':>9s} {'batch':>6s} {'tok/s':>8s} {'vs dynamic':>10s} {'vs best':>8s}")
        for name, row in tp.items():
            ratio = f"{row['vs_dynamic']:.2f}x" if row["vs_dynamic"] is not None else "-"
            best = f"{row['vs_best_baseline']:.2f}x" if row["vs_best_baseline"] is not None else "-"
            print(
                f"{name:12s} {row['seq_bytes'] / 2**20:9.1f} {row['batch']:6d} {row['tokens_per_s']:8.1f} "
                f"{ratio:>10s} {best:>8s} {row.get('note', '')}"
            )
        print("vs best: tokens/s over the better of DynamicCache and StaticCache")
    if out:
        Path(out).write_text(json.dumps(result, indent=1, default=str))
    return result


def _print_speed(batch: int, summary: dict) -> None:
    static = any("decode_ratio_static" in r for by in summary.values() for r in by.values())
    print(
        f"\nbatch {batch}: prefill s and decode ms/token (median of interleaved repeats), ratio to DynamicCache"
        + ("; decode ratio to StaticCache in [ ]" if static else "")
    )
    contexts = sorted({c for by in summary.values() for c in by})
    head = "".join(f" | {c:>6d}: prefill  decode" + (" " * 8 if static else "") for c in contexts)
    print(f"{'config':12s}{head}")
    for name, by in summary.items():
        cells = ""
        for c in contexts:
            r = by.get(c)
            if r is None:
                cells += " | " + " " * 22
                continue
            cells += (
                f" | {r['prefill_s']:6.2f}s {r.get('prefill_ratio', float('nan')):4.2f}x"
                f" {r['decode_ms']:6.1f}ms {r.get('decode_ratio', float('nan')):4.2f}x"
            )
            if static:
                cells += f" [{r.get('decode_ratio_static', float('nan')):4.2f}x]"
        print(f"{name:12s}{cells}")
    for name, by in summary.items():
        paths: dict[str, int] = {}
        for r in by.values():
            for path, n in r.get("decode_paths", {}).items():
                paths[path] = paths.get(path, 0) + n
        if paths:
            print(
                f"{name:12s} decoding steps' attention paths (layer calls): "
                + ", ".join(f"{p} {n}" for p, n in sorted(paths.items()))
            )
