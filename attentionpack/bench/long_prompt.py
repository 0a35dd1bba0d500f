"""`attentionpack bench long-prompt`: does a long prompt fit? Peak process memory and perplexity of one long
prefill per configuration, each in its own process.

A child (`python -m attentionpack.bench.long_prompt --cache NAME ...`, one JSON line) loads the model, prefills
`context` tokens of the Britannica article (DynamicCache: one call, transformers' stock path, unless
`chunk_dynamic`; a PackedCache: `chunk`-token chunks, each compacted before the next, as `attentionpack generate`
does above `--prefill-chunk`), then teacher-forces the next `continuation` tokens one step at a time and scores them
(perplexity). `batch` > 1 prefills that many different passages of the article at once (sample i starts i x
(context + continuation) tokens in), so per-sample choices (eviction) differ; the perplexity is over all samples.
Peak RSS is the child's high-water mark (`ru_maxrss`): weights, activations, masks and cache alike.
The parent runs the children one after another and prints each configuration beside DynamicCache, with the KV
bytes it saves and how much of that the peak RSS shows.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from typing import Any

import torch

from .rss import _current_rss_bytes, _rss_peak_bytes


@torch.inference_mode()
def measure(
    cache_name: str,
    context: int,
    continuation: int,
    chunk: int,
    model_path: str | None = None,
    threads: int = 2,
    chunk_dynamic: bool = False,
    batch: int = 1,
) -> dict[str, Any]:
    """One configuration in this process: peak RSS of the prefill + scoring, bytes held, perplexity."""
    from .. import cache_nbytes, load_model
    from ..eval.configs import make_cache, parse_config
    from ..eval.data import read_text, token_ids
    from ..generation import chunk_calls, prefill_chunks

    torch.set_num_threads(threads)
    spec = parse_config(cache_name)
    if spec.kind not in ("dynamic", "pack"):
        raise ValueError(f"bench long-prompt runs DynamicCache and PackedCache configurations, not {cache_name!r}")
    model, tokenizer = load_model(model_path)
    width = context + continuation
    ids = token_ids(tokenizer, read_text(), batch * width, source="the Britannica article")
    ids = ids[: batch * width].view(batch, width)  # (B, context + continuation): one passage per sample
    prompt, target = ids[:, :context], ids[:, context:]
    # one warm-up token first: a GGUF model unpacks its weights on its first forward call (about 0.5 GB for
    # SmolLM2), which belongs to the loaded model, not to any cache
    model(input_ids=prompt[:, :1], past_key_values=make_cache(model, parse_config("dynamic")), use_cache=True)
    rss_after_load = _current_rss_bytes()
    cache = make_cache(model, spec)
    chunked = spec.kind == "pack" or chunk_dynamic
    calls = chunk_calls(0, context, chunk) if chunked else []
    start = time.perf_counter()
    prefill_chunks(model, prompt, cache, calls)
    first = calls[-1][1] if calls else 0
    logits = model(input_ids=prompt[:, first:], past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    prefill_s = time.perf_counter() - start
    held_after_prefill = cache_nbytes(cache)
    nll = 0.0
    for i in range(continuation):
        nll -= torch.log_softmax(logits[:, -1].float(), -1).gather(1, target[:, i : i + 1]).sum().item()
        if i + 1 < continuation:
            logits = model(input_ids=target[:, i : i + 1], past_key_values=cache, use_cache=True).logits
    return {
        "cache": cache_name,
        "context": context,
        "continuation": continuation,
        "batch": batch,
        "prefill_calls": len(calls) + 1,
        "chunk": chunk if calls else None,
        "prefill_s": prefill_s,
        "cache_bytes_after_prefill": held_after_prefill,
        "cache_bytes": cache_nbytes(cache),
        "rss_after_load": rss_after_load,
        "peak_rss": _rss_peak_bytes(),
        "ppl": math.exp(nll / (continuation * batch)),
    }


def measure_in_subprocess(
    cache_name: str,
    context: int,
    continuation: int,
    chunk: int,
    model_path: str | None,
    threads: int,
    chunk_dynamic: bool,
    batch: int = 1,
) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "attentionpack.bench.long_prompt", "--cache", cache_name, "--context", str(context)]
    cmd += ["--continuation", str(continuation), "--chunk", str(chunk), "--threads", str(threads)]
    cmd += ["--batch", str(batch)]
    cmd += (["--model", model_path] if model_path else []) + (["--chunk-dynamic"] if chunk_dynamic else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"long-prompt child for {cache_name!r} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(
    configs: list[str],
    context: int,
    continuation: int = 256,
    chunk: int = 2048,
    model_path: str | None = None,
    threads: int = 2,
    chunk_dynamic: bool = False,
    echo: Any = print,
    batch: int = 1,
) -> list[dict[str, Any]]:
    """Every configuration in its own child (DynamicCache first: the reference); prints one line each."""
    if "dynamic" not in configs:
        configs = ["dynamic", *configs]
    configs = ["dynamic"] + [c for c in configs if c != "dynamic"]
    rows = []
    for name in configs:
        row = measure_in_subprocess(name, context, continuation, chunk, model_path, threads, chunk_dynamic, batch)
        rows.append(row)
        ref = rows[0]
        saved_kv, saved_rss = ref["cache_bytes"] - row["cache_bytes"], ref["peak_rss"] - row["peak_rss"]
        shown = f" | KV saved {saved_kv / 2**20:.1f} MiB, peak RSS {saved_rss / 2**20:.1f} MiB lower" + (
            f" ({saved_rss / saved_kv:.2f} of it)" if saved_kv > 0 else ""
        )
        echo(
            f"{name:>14}: peak RSS {row['peak_rss'] / 2**20:8.1f} MiB ({row['peak_rss'] / ref['peak_rss']:.2f}x "
            f"DynamicCache's; {(row['peak_rss'] - row['rss_after_load']) / 2**20:.1f} MiB above the loaded model) | "
            f"cache {row['cache_bytes_after_prefill'] / 2**20:.1f} MiB after the prefill | "
            f"prefill {row['prefill_s']:.1f} s in {row['prefill_calls']} call(s) | "
            f"ppl of the next {continuation} tokens {row['ppl']:.3f} ({100 * (row['ppl'] / ref['ppl'] - 1):+.2f}%)"
            + (shown if row is not ref else "")
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--context", type=int, required=True)
    parser.add_argument("--continuation", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None)
    parser.add_argument("--chunk-dynamic", action="store_true")
    parser.add_argument("--batch", type=int, default=1)
    a = parser.parse_args()
    row = measure(a.cache, a.context, a.continuation, a.chunk, a.model, a.threads, a.chunk_dynamic, a.batch)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
