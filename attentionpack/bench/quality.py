"""`attentionpack bench quality`: memory, perplexity and decode speed of DynamicCache vs our presets and a K/V rank
sweep, all in one run on one model and text; then peak RSS of a large batch with and without compression.

Protocol (../shared/docs/peers.md): prefill `context` tokens of the Britannica article, teacher-force the next
`continuation` tokens one at a time; PPL of those tokens; bytes held after prefill; median decode ms/token.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm
from transformers import DynamicCache

from .. import PackConfig, PackedCache, load_model
from ..eval.data import read_text, token_ids
from ..eval.perplexity import continuation_perplexity
from .rss import measure_in_subprocess

PRESET_NAMES = ("lossless", "balanced", "max")


def sweep_configs(dim: int) -> list[PackConfig]:
    """Fixed K ranks with V exact, fixed V ranks with K exact (D = H_kv * d)."""
    k = [
        PackConfig(key_rank=r, key_energy=None, value_codec="exact", value_energy=None, name=f"K rank {r}")
        for r in (dim // 6, dim // 3, dim // 2)
    ]
    v = [
        PackConfig(value_rank=r, value_energy=None, key_codec="exact", key_energy=None, name=f"V rank {r}")
        for r in (dim // 2, 3 * dim // 4)
    ]
    return k + v


def run_quality_bench(
    model_path: str | None = None,
    context: int = 2048,
    continuation: int = 256,
    sweep: bool = True,
    rss: bool = True,
    rss_batch: int = 8,
    rss_context: int = 4096,
    out: Path | None = None,
    console: Console | None = None,
) -> dict:
    console = console or Console()
    torch.set_num_threads(2)
    model, tokenizer = load_model(model_path)
    ids = token_ids(tokenizer, read_text(), context + continuation, source="the Britannica text")
    dim = model.config.num_key_value_heads * (
        getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    )
    configs: list[tuple[str, object]] = [("DynamicCache", None)]
    configs += [(f"preset {n}", PackConfig.preset(n)) for n in PRESET_NAMES]
    if sweep:
        configs += [(c.name, c) for c in sweep_configs(dim)]
    rows = []
    bar = tqdm(configs, desc="bench quality", unit="config")
    for label, config in bar:
        bar.set_postfix_str(label)
        make = (
            (lambda: DynamicCache(config=model.config)) if config is None else (lambda c=config: PackedCache(model, c))
        )
        res = continuation_perplexity(model, ids, context, continuation, make)
        rows.append(
            {
                "cache": label,
                "bytes": res.bytes_after_prefill,
                "ppl": res.ppl,
                "prefill_s": res.prefill_s,
                "decode_ms": res.decode_ms,
            }
        )
    base = rows[0]
    for row in rows:
        row["ratio"] = base["bytes"] / row["bytes"]
        row["ppl_change_pct"] = 100 * (row["ppl"] / base["ppl"] - 1)
        row["decode_ratio"] = row["decode_ms"] / base["decode_ms"]
        row["prefill_ratio"] = row["prefill_s"] / base["prefill_s"]
    table = Table(title=f"{context} tokens prefilled, next {continuation} teacher-forced (one run)")
    for col in (
        "cache",
        "MiB held",
        "vs Dynamic",
        "PPL",
        "change",
        "decode ms/tok",
        "vs Dynamic",
        "prefill vs Dynamic",
    ):
        table.add_column(col, justify="left" if col == "cache" else "right")
    for r in rows:
        table.add_row(
            r["cache"],
            f"{r['bytes'] / 2**20:.1f}",
            f"{r['ratio']:.2f}x",
            f"{r['ppl']:.2f}",
            f"{r['ppl_change_pct']:+.2f}%",
            f"{r['decode_ms']:.1f}",
            f"{r['decode_ratio']:.2f}x",
            f"{r['prefill_ratio']:.2f}x",
        )
    console.print(table)
    result = {"context": context, "continuation": continuation, "rows": rows}
    if rss:
        del model
        result["rss"] = run_rss(rss_batch, rss_context, model_path, console)
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
        Path(out).with_suffix(".md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    """The tables as Markdown (for the README), from the numbers of one run."""
    lines = [
        f"Prefill {result['context']} tokens, teacher-force the next {result['continuation']} (one run):",
        "",
        "| cache | MiB held after prefill | vs DynamicCache | PPL | change | decode ms/token | vs DynamicCache |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['cache']} | {r['bytes'] / 2**20:.1f} | {r['ratio']:.2f}x smaller | {r['ppl']:.2f} | "
            f"{r['ppl_change_pct']:+.2f}% | {r['decode_ms']:.0f} | {r['decode_ratio']:.2f}x |"
        )
    rss_rows = result.get("rss") or []
    if rss_rows:
        rss = rss_rows
        dyn = rss[0]
        lines += [
            "",
            f"Peak RSS, batch {dyn['batch']} x {dyn['context']} tokens, each cache in its own process:",
            "",
            "| cache | KV MiB held | peak RSS MiB | peak RSS above the loaded model, MiB |",
            "|---|---|---|---|",
        ]
        for r in rss:
            lines.append(
                f"| {r['cache']} | {r['cache_bytes'] / 2**20:.0f} | {r['peak_rss'] / 2**20:.0f} | "
                f"{(r['peak_rss'] - r['rss_after_load']) / 2**20:.0f} |"
            )
    return "\n".join(lines) + "\n"


def run_rss(batch: int, context: int, model_path: str | None, console: Console) -> list[dict]:
    """Peak RSS of prefilling batch x context with DynamicCache and with preset "max", each in its own process."""
    rows = []
    for name in tqdm(("dynamic", "max"), desc=f"peak RSS, batch {batch} x {context}", unit="process"):
        rows.append(measure_in_subprocess(name, batch, context, model_path))
    dyn, packed = rows
    saved_kv = dyn["cache_bytes"] - packed["cache_bytes"]
    saved_rss = dyn["peak_rss"] - packed["peak_rss"]
    table = Table(title=f"Peak process memory, batch {batch} x {context} tokens (separate processes)")
    for col in ("cache", "KV bytes held", "peak RSS", "peak RSS - RSS after load"):
        table.add_column(col, justify="left" if col == "cache" else "right")
    for r in rows:
        table.add_row(
            r["cache"],
            f"{r['cache_bytes'] / 2**20:.0f} MiB",
            f"{r['peak_rss'] / 2**20:.0f} MiB",
            f"{(r['peak_rss'] - r['rss_after_load']) / 2**20:.0f} MiB",
        )
    console.print(table)
    console.print(
        f"KV bytes saved by 'max': {saved_kv / 2**20:.0f} MiB; peak RSS lower by {saved_rss / 2**20:.0f} MiB "
        f"({saved_rss / saved_kv:.0%} of the KV saving)"
        if saved_kv > 0
        else "no KV saving"
    )
    return rows
