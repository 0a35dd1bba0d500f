"""Does decoding slow down as a long generation piles up decode chunks? One prompt, then many one-token steps;
every `--every` steps it prints the median step, the time inside the C kernel (`ap_decode`) and around it
(`DecodePlan.run`), the time in `PackedCache.update`, one layer's segment count and the bytes held.

A budget layer freezes a `decode_chunk`-token segment (64 tokens) every 64 steps, so the kernel meets more and
smaller pieces as the generation grows: the kernel's time should grow with the tokens held, not faster (it grew
about 4x faster per token before 5abd1d2, when a chunk's keys took the scalar path).

Usage: python -m experiments.long_decode [--context 4096] [--new 3000] [--every 500] [--config budget=0.125]
[--threads 2]   (embedded SmolLM2, a Britannica prompt)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from attentionpack import PackedCache, kernels, load_model
from attentionpack.bench.speed import _ids
from attentionpack.generation import pack_config
from attentionpack.kernels import plan


def timed(acc: dict[str, float], key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn, adding its wall time to acc[key]."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[key] += time.perf_counter() - start

    return wrapper


class _TimedKernels:
    """The kernel library with `ap_decode` timed."""

    def __init__(self, lib: Any, acc: dict[str, float]) -> None:
        self.lib, self.decode = lib, timed(acc, "kernel", lib.ap_decode)

    def __getattr__(self, name: str) -> Any:
        return self.decode if name == "ap_decode" else getattr(self.lib, name)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--new", type=int, default=3000)
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--config", default="budget=0.125", help="a preset or budget=F")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lib = kernels.library()
    if lib is None:
        raise SystemExit(f"the kernels are not available: {kernels.reason()}")
    model, tok = load_model(None)
    budget = float(args.config.split("=", 1)[1]) if args.config.startswith("budget=") else None
    cache = PackedCache(model, pack_config("balanced" if budget is not None else args.config, budget))
    ids = _ids(tok, args.context + args.new + 1, 1)
    acc = dict.fromkeys(("kernel", "run", "update"), 0.0)
    plan.DecodePlan.run = timed(acc, "run", plan.DecodePlan.run)  # type: ignore[method-assign]
    PackedCache.update = timed(acc, "update", PackedCache.update)  # type: ignore[method-assign]
    kernels._lib = _TimedKernels(lib, acc)  # type: ignore[assignment]
    try:
        model(ids[:, : args.context], past_key_values=cache, use_cache=True, logits_to_keep=1)
        for key in acc:
            acc[key] = 0.0
        steps: list[float] = []
        for i in range(args.new):
            at = args.context + i
            start = time.perf_counter()
            model(ids[:, at : at + 1], past_key_values=cache, use_cache=True)
            steps.append(time.perf_counter() - start)
            if (i + 1) % args.every == 0:
                per = {key: 1e3 * value / args.every for key, value in acc.items()}
                print(
                    f"after {i + 1:>5} new tokens: step {1e3 * statistics.median(steps[-args.every :]):.1f} ms "
                    f"(median), kernel {per['kernel']:.2f} ms, around it {per['run'] - per['kernel']:.2f} ms, "
                    f"update {per['update']:.2f} ms; layer 0 holds {len(cache.layers[0].segments)} segments, "
                    f"the cache {cache.nbytes() / 1e6:.1f} MB",
                    flush=True,
                )
                for key in acc:
                    acc[key] = 0.0
    finally:
        kernels._lib = lib


if __name__ == "__main__":
    main()
