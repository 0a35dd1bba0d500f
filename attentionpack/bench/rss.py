"""Peak process memory of a batch prefill with one cache, measured in its own process.

Run as `python -m attentionpack.bench.rss --cache dynamic|<preset> --batch 8 --context 4096`; prints one JSON line.
The parent runs one child per cache so no configuration can hide another's memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@torch.inference_mode()
def measure(cache_name: str, batch: int, context: int, model_path: str | None = None, decode_steps: int = 4) -> dict:
    from transformers import DynamicCache

    from .. import PackedCache, cache_nbytes, load_model
    from ..eval.data import read_text, token_ids

    torch.set_num_threads(2)
    model, tokenizer = load_model(model_path)
    ids = token_ids(tokenizer, read_text(), batch * context)
    rows = ids[: batch * context].view(batch, context)  # a different stretch of text per sample
    baseline_rss = _current_rss_bytes()
    cache = DynamicCache(config=model.config) if cache_name == "dynamic" else PackedCache(model, cache_name)
    out = model(input_ids=rows, past_key_values=cache, use_cache=True, logits_to_keep=1)
    for _ in range(decode_steps):
        out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    return {
        "cache": cache_name,
        "batch": batch,
        "context": context,
        "cache_bytes": cache_nbytes(cache),
        "rss_after_load": baseline_rss,
        "peak_rss": _rss_peak_bytes(),
        "rss_now": _current_rss_bytes(),
    }


def measure_in_subprocess(cache_name: str, batch: int, context: int, model_path: str | None = None) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "attentionpack.bench.rss",
        "--cache",
        cache_name,
        "--batch",
        str(batch),
        "--context",
        str(context),
    ] + (["--model", model_path] if model_path else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"RSS child for {cache_name!r} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    print(json.dumps(measure(args.cache, args.batch, args.context, args.model)))


if __name__ == "__main__":
    main()
