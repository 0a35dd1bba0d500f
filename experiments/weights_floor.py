"""The weights-only floor of a batched decoding step: DynamicCache at a 64-token context (attention next to
nothing), batch B. It bounds what any cache can reach: a step of B sequences never takes less than this, so the
aggregate tokens/s of a configuration that fits B sequences in a KV budget is at most B / floor(B), whatever its
attention costs (`bench speed`'s throughput table divides such rates by the better baseline's).

Usage: python -m experiments.weights_floor smollm2|gemma3 BATCH[,BATCH...] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from attentionpack import load_model


def floor_step(model: torch.nn.Module, batch: int, steps: int = 6, context: int = 64) -> float:
    """Median seconds of a decoding step of `batch` sequences after a `context`-token prompt (the first step left
    out), on random token ids."""
    ids = torch.randint(100, 5000, (batch, context + steps), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.config)
    times = []
    with torch.inference_mode():
        model(ids[:, :context], past_key_values=cache, use_cache=True, logits_to_keep=1)
        for i in range(steps):
            t = time.perf_counter()
            model(ids[:, context + i : context + i + 1], past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=["smollm2", "gemma3"])
    ap.add_argument("batches", help="comma-separated batch sizes, e.g. 5,45")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(None if args.model == "smollm2" else args.model, dtype=getattr(torch, args.dtype))
    for batch in (int(b) for b in args.batches.split(",")):
        step = floor_step(model, batch)
        print(
            f"{args.model} {args.dtype} batch {batch}: weights-only step {step * 1e3:.0f} ms, "
            f"at most {batch / step:.1f} tokens/s"
        )


if __name__ == "__main__":
    main()
