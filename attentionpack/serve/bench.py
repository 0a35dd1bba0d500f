"""`attentionpack bench serve`: a bounded async load generator against servers it starts on a loopback port.

For each cache configuration (default: DynamicCache, `balanced`, `budget=1/8`) under the same `--kv-memory`: one
engine + HTTP server on 127.0.0.1, `requests` streaming completion requests sent at once (each a distinct
`prompt_tokens`-token slice of the Britannica article, greedy, `max_tokens` each), bounded by `duration` seconds.
Measured: most sequences held at once (the engine's batch), aggregate generated tokens/s over the run (first
request sent to last token) and over decoding steps only (tokens / time inside batched decoding steps), time to
first token and inter-token latency p50/p99 (client side, per streamed chunk), failed requests, KV bytes held
(sampled by a poller every `sample_every` s and measured by the engine at every step boundary) vs the cap.
Writes `serve-bench.json` and plots (`serve-bench.png`) into the output folder.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .accounting import cache_spec_from, parse_bytes, parse_fraction
from .engine import Engine

if TYPE_CHECKING:
    import httpx

    from ..config import PackConfig


def _spec(name: str) -> str | PackConfig:
    if name.startswith("budget="):
        return cache_spec_from(None, parse_fraction(name.split("=", 1)[1]))
    return cache_spec_from(name, None)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


async def _one(client: httpx.AsyncClient, url: str, body: dict, deadline: float) -> dict:
    sent = time.monotonic()
    chunks: list[float] = []
    usage = None
    status = None
    error = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, timeout=max(1.0, deadline - sent)) as r:
            status = r.status_code
            if status != 200:
                error = (await r.aread()).decode(errors="replace")[:300]
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    data = json.loads(line[6:])
                    if "error" in data:
                        error = data["error"]["message"]
                    elif data.get("usage"):
                        usage = data["usage"]
                    elif data["choices"] and data["choices"][0]["text"]:
                        chunks.append(time.monotonic())
    except Exception as err:  # noqa: BLE001 - a failed request is counted, the bench goes on
        error = f"{type(err).__name__}: {err}"
    ok = status == 200 and error is None and usage is not None
    return {
        "ok": ok,
        "status": status,
        "error": error,
        "sent": sent,
        "chunks": chunks,
        "tokens": usage["completion_tokens"] if usage else 0,
    }


async def _load(
    url: str, prompts: list[list[int]], max_tokens: int, duration: float, engine: Engine, sample_every: float
) -> tuple[list[dict], list[dict]]:
    import httpx

    deadline = time.monotonic() + duration
    samples: list[dict] = []
    stop = asyncio.Event()

    async def sampler() -> None:
        t0 = time.monotonic()
        while not stop.is_set():
            snap = engine.snapshot()
            samples.append(
                {
                    "t": time.monotonic() - t0,
                    "held": snap["kv_bytes_held"],
                    "reserved": snap["kv_bytes_reserved"],
                    "running": snap["running"],
                    "queued": snap["queued"],
                }
            )
            try:
                await asyncio.wait_for(stop.wait(), sample_every)
            except TimeoutError:
                pass

    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        task = asyncio.create_task(sampler())
        bodies = [
            {
                "prompt": p,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            for p in prompts
        ]
        results = await asyncio.gather(*[_one(client, url, b, deadline) for b in bodies])
        stop.set()
        await task
    return list(results), samples


def bench_config(
    model: Any,
    tokenizer: Any,
    name: str,
    prompts: list[list[int]],
    kv_memory: int,
    max_tokens: int,
    duration: float,
    sample_every: float = 0.5,
) -> dict:
    """Serve `prompts` at once through a fresh engine + server for config `name`; return the measured row."""
    from .app import ServerThread, create_app
    from .metrics import ServerMetrics

    metrics = ServerMetrics()
    engine = Engine(model, _spec(name), kv_memory=kv_memory, max_queue=len(prompts) + 1, metrics=metrics).start()
    app = create_app(engine, tokenizer, "bench", metrics)
    try:
        with ServerThread(app) as server:
            start = time.monotonic()
            results, samples = asyncio.run(_load(server.url, prompts, max_tokens, duration, engine, sample_every))
            wall = time.monotonic() - start
            snap = engine.snapshot()
    finally:
        engine.stop()
    ok = [r for r in results if r["ok"]]
    ttft = [r["chunks"][0] - r["sent"] for r in ok if r["chunks"]]
    itl = [b - a for r in ok for a, b in zip(r["chunks"], r["chunks"][1:], strict=False)]
    tokens = sum(r["tokens"] for r in ok)
    last = max((r["chunks"][-1] for r in ok if r["chunks"]), default=start)
    first_sent = min(r["sent"] for r in results)
    return {
        "config": name,
        "requests": len(prompts),
        "failed": len(results) - len(ok),
        "errors": sorted({str(r["error"])[:200] for r in results if not r["ok"]}),
        "max_concurrent_sequences": snap["max_running"],
        "max_running_sampled": max((s["running"] for s in samples), default=0),
        "generated_tokens": tokens,
        "tokens_per_s_end_to_end": tokens / max(1e-9, last - first_sent),
        "decode_tokens_per_s": snap["decode_tokens"] / max(1e-9, snap["decode_seconds"]),
        "decode_steps": snap["decode_steps"],
        "padded_steps": snap["padded_steps"],  # "n->rows": steps of n sequences run as more rows (row_padding)
        "mean_decode_batch": snap["decode_tokens"] / max(1, snap["decode_steps"]),
        "ttft_p50_s": _pct(ttft, 0.5),
        "ttft_p99_s": _pct(ttft, 0.99),
        "itl_p50_s": _pct(itl, 0.5),
        "itl_p99_s": _pct(itl, 0.99),
        "kv_memory": kv_memory,
        "kv_bytes_held_max_sampled": max((s["held"] for s in samples), default=0),
        "kv_bytes_held_max_engine": snap["kv_bytes_held_max"],
        "kv_bytes_reserved_max_sampled": max((s["reserved"] for s in samples), default=0),
        "reservation_violations": snap["reservation_violations"],
        "exact_fallbacks": snap["exact_fallbacks"],
        "wall_s": wall,
        "samples": samples,
    }


def run(
    model_path: str | None = None,
    configs: Sequence[str] = ("dynamic", "balanced", "budget=1/8"),
    kv_memory: str | None = None,
    prompt_tokens: int = 4096,
    max_tokens: int = 32,
    requests: list[int] | None = None,
    duration: float = 600.0,
    threads: int | None = None,
    out: Path = Path("serve-bench"),
) -> list[dict]:
    """Run the bench; print one table row per config; write JSON and plots into `out`. `kv_memory` default: room
    for exactly two DynamicCache sequences of prompt_tokens + max_tokens. `requests`: per config (default 4 for
    DynamicCache, 6 for presets, 12 for byte budgets)."""
    from ..eval.data import britannica_text, token_ids
    from ..models import load_model

    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_model(model_path)
    from .accounting import KVAccounting

    per_token = KVAccounting(model, "dynamic").per_token
    cap = parse_bytes(kv_memory) if kv_memory else 2 * per_token * (prompt_tokens + max_tokens)
    counts = (
        list(requests) if requests else [4 if c == "dynamic" else 12 if c.startswith("budget") else 6 for c in configs]
    )
    if len(counts) != len(configs):
        raise ValueError(f"--requests gives {len(counts)} counts for {len(configs)} configs")
    ids = token_ids(tokenizer, britannica_text(), prompt_tokens * max(counts)).tolist()
    rows = []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"kv-memory cap {cap:,} bytes ({cap / per_token:,.0f} DynamicCache tokens); prompts of {prompt_tokens} "
        f"tokens, {max_tokens} new tokens each"
    )
    for name, count in zip(configs, counts, strict=False):
        prompts = [ids[i * prompt_tokens : (i + 1) * prompt_tokens] for i in range(count)]
        row = bench_config(model, tokenizer, name, prompts, cap, max_tokens, duration)
        rows.append(row)
        print(_line(row), flush=True)
        (out / "serve-bench.json").write_text(
            json.dumps(
                {
                    "rows": rows,
                    "prompt_tokens": prompt_tokens,
                    "max_tokens": max_tokens,
                    "kv_memory": cap,
                    "threads": torch.get_num_threads(),
                },
                indent=1,
            )
        )
    _summary(rows)
    _plot(rows, cap, out)
    return rows


def _fmt(x: float | None, unit: str = "s") -> str:
    return "-" if x is None else f"{x:.2f}{unit}"


def _line(r: dict) -> str:
    return (
        f"{r['config']:>12}: {r['requests']} requests, {r['failed']} failed"
        f" | held at once {r['max_concurrent_sequences']}"
        f" | tokens/s end-to-end {r['tokens_per_s_end_to_end']:.2f}, in decoding steps "
        f"{r['decode_tokens_per_s']:.2f} (mean batch {r['mean_decode_batch']:.1f})"
        f" | TTFT p50 {_fmt(r['ttft_p50_s'])} p99 {_fmt(r['ttft_p99_s'])}"
        f" | ITL p50 {_fmt(r['itl_p50_s'])} p99 {_fmt(r['itl_p99_s'])}"
        f" | KV held max {r['kv_bytes_held_max_engine']:,} B (sampled {r['kv_bytes_held_max_sampled']:,}) of cap "
        f"{r['kv_memory']:,} B | reservation misses {r['reservation_violations']} | wall {r['wall_s']:.0f}s"
        f" | padded steps {_padded(r)}"
    )


def _padded(r: dict) -> str:
    steps = r.get("padded_steps") or {}
    if not steps:
        return f"none of {r['decode_steps']}"
    return f"{sum(steps.values())} of {r['decode_steps']} (" + ", ".join(f"{k}: {v}" for k, v in steps.items()) + ")"


def _summary(rows: list[dict]) -> None:
    base = next((r for r in rows if r["config"] == "dynamic"), None)
    if base is None:
        return
    for r in rows:
        if r is base:
            continue
        held = r["max_concurrent_sequences"] / max(1, base["max_concurrent_sequences"])
        print(
            f"{r['config']} vs dynamic: {held:.2f}x "
            f"sequences held, {r['decode_tokens_per_s'] / max(1e-9, base['decode_tokens_per_s']):.2f}x tokens/s in "
            f"decoding steps, {r['tokens_per_s_end_to_end'] / max(1e-9, base['tokens_per_s_end_to_end']):.2f}x "
            "tokens/s end-to-end"
        )
    over = [
        r["config"] for r in rows if max(r["kv_bytes_held_max_engine"], r["kv_bytes_held_max_sampled"]) > r["kv_memory"]
    ]
    print("KV bytes held never exceeded the cap" if not over else f"CAP EXCEEDED by: {over}")


def _plot(rows: list[dict], cap: int, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the eval extra is not installed: JSON only
        print("matplotlib not installed: no plots")
        return
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for r in rows:
        t = [s["t"] for s in r["samples"]]
        axes[0].plot(t, [s["held"] / 2**20 for s in r["samples"]], label=r["config"])
        axes[1].plot(t, [s["running"] for s in r["samples"]], label=r["config"])
    axes[0].axhline(cap / 2**20, color="k", ls="--", lw=1, label="--kv-memory")
    axes[0].set(xlabel="s", ylabel="KV MiB held", title="KV bytes held (sampled)")
    axes[1].set(xlabel="s", ylabel="sequences", title="sequences running")
    names = [r["config"] for r in rows]
    axes[2].bar(names, [r["decode_tokens_per_s"] for r in rows], label="in decoding steps")
    axes[2].bar(names, [r["tokens_per_s_end_to_end"] for r in rows], label="end-to-end", alpha=0.7)
    axes[2].set(ylabel="generated tokens/s", title="aggregate throughput")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "serve-bench.png", dpi=110)
    plt.close(fig)
    print(f"wrote {out / 'serve-bench.json'} and {out / 'serve-bench.png'}")
