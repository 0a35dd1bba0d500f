"""`attentionpack bench speed`: prefill time and decode ms/token of DynamicCache, our presets and QuantizedCache
(quanto 4-bit) at several contexts and batch sizes, repeats interleaved, ratios to DynamicCache from the same run;
and aggregate decoding throughput when every cache gets the same KV memory budget.

Throughput at a budget: one sequence of `context` tokens is prefilled per configuration and its bytes measured
(every tensor of the cache); the largest batch whose cache fits the budget is that many copies of the sequence
(`batch_repeat_interleave`: decoding cost does not depend on what the tokens say), and `steps` one-token steps
of that batch are timed, the steps of all caches interleaved. Tokens/s = batch * steps / time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import cache_nbytes, load_model
from ..eval.configs import make_cache, parse_config
from ..eval.data import britannica_text, token_ids
from ..eval.speed import measure_speed

DEFAULT_CONFIGS = ("dynamic", "balanced", "max", "quanto-4")


def _ids(tokenizer, needed: int, batch: int) -> torch.Tensor:
    ids = token_ids(tokenizer, britannica_text(), needed * batch, source="Britannica")  # (needed * batch,)
    return ids[: needed * batch].view(batch, needed)  # each row its own stretch of text


@torch.inference_mode()
def throughput_at_budget(
    model, tokenizer, specs, budget_bytes: int, context: int, steps: int = 8, max_batch: int = 256
) -> dict:
    """{config: {seq_bytes, batch, tokens_per_s}} with every cache limited to `budget_bytes` of KV.

    All caches are built first, then their steps are interleaved (A B C A B C ...), so that a slow spell of a shared
    machine hits every configuration alike; tokens/s = batch * steps / (summed time of that cache's steps)."""
    ids = _ids(tokenizer, context + steps + 1, 1)
    out: dict[str, dict] = {}
    live: dict[str, tuple] = {}
    for sp in specs:
        cache = make_cache(model, sp)
        res = model(input_ids=ids[:, :context], past_key_values=cache, use_cache=True, logits_to_keep=1)
        seq_bytes = cache_nbytes(cache)
        batch = int(min(max_batch, budget_bytes // max(1, seq_bytes)))
        row: dict = {"seq_bytes": seq_bytes, "batch": batch, "tokens_per_s": 0.0}
        if sp.kind == "quantized":  # transformers' QuantizedCache repeats its residual but not its quantized part
            row.update(batch=0, note="not measured: QuantizedCache cannot repeat its batch (batch_repeat_interleave)")
        elif batch >= 1:
            if batch > 1:
                cache.batch_repeat_interleave(batch)
            tok = res.logits[:, -1:].argmax(-1).expand(batch, 1).contiguous()
            model(input_ids=tok, past_key_values=cache, use_cache=True)  # warm-up step
            live[sp.name] = (cache, batch, [])
        out[sp.name] = row
        del cache, res
    for i in range(steps):
        for cache, batch, times in live.values():
            step = ids[:, context + 1 + i : context + 2 + i].expand(batch, 1).contiguous()
            t0 = time.perf_counter()
            model(input_ids=step, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - t0)
    for name, (_, batch, times) in live.items():
        out[name]["tokens_per_s"] = batch * steps / sum(times)
    ref = out.get("dynamic", {}).get("tokens_per_s")
    for row in out.values():
        row["vs_dynamic"] = row["tokens_per_s"] / ref if ref and row["tokens_per_s"] else None
    return out


def run(
    model_path: str | None = None,
    configs: Sequence[str] = DEFAULT_CONFIGS,
    contexts: Sequence[int] = (2048, 8192),
    batches: Sequence[int] = (1, 8),
    steps: int = 8,
    repeats: int = 2,
    budget_gib: float = 1.0,
    budget_context: int = 4096,
    threads: int | None = None,
    out: Path | None = None,
) -> dict:
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
    model, tokenizer = load_model(model_path)
    result: dict = {"threads": torch.get_num_threads(), "steps": steps, "repeats": repeats, "speed": {}}
    for batch in batches:
        ids = _ids(tokenizer, max(contexts) + steps, batch)
        makers = {sp.name: (lambda sp=sp: make_cache(model, sp)) for sp in specs}
        summary = measure_speed(model, ids, makers, contexts=contexts, decode_steps=steps, repeats=repeats)
        result["speed"][batch] = summary
        _print_speed(batch, summary)
    if budget_gib > 0:
        tp = throughput_at_budget(model, tokenizer, specs, int(budget_gib * 2**30), budget_context, steps)
        result["throughput"] = {"budget_gib": budget_gib, "context": budget_context, "rows": tp}
        print(f"\nthroughput with {budget_gib:g} GiB of KV cache at {budget_context} tokens per sequence")
        print(f"{'config':12s} {'MiB/seq':>9s} {'batch':>6s} {'tok/s':>8s} {'vs dynamic':>10s}")
        for name, row in tp.items():
            ratio = f"{row['vs_dynamic']:.2f}x" if row["vs_dynamic"] is not None else "-"
            print(
                f"{name:12s} {row['seq_bytes'] / 2**20:9.1f} {row['batch']:6d} {row['tokens_per_s']:8.1f} "
                f"{ratio:>10s} {row.get('note', '')}"
            )
    if out:
        Path(out).write_text(json.dumps(result, indent=1, default=str))
    return result


def _print_speed(batch: int, summary: dict) -> None:
    print(f"\nbatch {batch}: prefill s and decode ms/token (median of interleaved repeats), ratio to DynamicCache")
    contexts = sorted({c for by in summary.values() for c in by})
    head = "".join(f" | {c:>6d}: prefill  decode" for c in contexts)
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
