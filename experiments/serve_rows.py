"""Does serving's per-sequence attention cost more than one batched call? A decoding step of N compressed sequences
through `SequenceBatchCache` (one cache per sequence: one attention call per sequence and layer, as the server
runs them) against the same N sequences as one batched `PackedCache` (one call per layer), interleaved.

Usage: python -m experiments.serve_rows [N] [CONTEXT] [--steps 8] [--threads 2]
(embedded SmolLM2, `PackConfig(budget=0.125)`, one Britannica prompt copied N times).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections import Counter

import torch

from attentionpack import PackConfig, PackedCache, load_model
from attentionpack.attention import packed
from attentionpack.eval.data import britannica_text, token_ids
from attentionpack.serve.batch_cache import SequenceBatchCache, layer_windows


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n", nargs="?", type=int, default=10)
    parser.add_argument("context", nargs="?", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    model, tokenizer = load_model()
    ids = token_ids(tokenizer, britannica_text(), a.context + a.steps, source="Britannica")[None]
    base = PackedCache(model, PackConfig(budget=0.125))
    model(input_ids=ids[:, : a.context], past_key_values=base, use_cache=True, logits_to_keep=1)
    shared = {id(m): m for m in model.modules()}  # copies share the model (a fresh memo per copy)
    rows = [copy.deepcopy(base, dict(shared)) for _ in range(a.n)]
    batched = copy.deepcopy(base, dict(shared))
    batched.batch_repeat_interleave(a.n)
    packed.enable(model)
    windows = layer_windows(model)
    per_row, one_call, failed = [], [], {}
    for i in range(a.steps):
        step = ids[:, a.context + i : a.context + i + 1].expand(a.n, 1)
        wrapper = SequenceBatchCache(rows, windows)
        t0 = time.perf_counter()
        model(input_ids=step, position_ids=torch.full((a.n, 1), a.context + i), past_key_values=wrapper, use_cache=True)
        per_row.append(time.perf_counter() - t0)
        failed.update(wrapper.failed)
        t0 = time.perf_counter()
        model(input_ids=step, past_key_values=batched, use_cache=True)
        one_call.append(time.perf_counter() - t0)
    row_paths: Counter[str] = Counter()
    for c in rows:
        row_paths.update(c.stats()["attention_paths"])
    print(
        f"attention paths (layer calls): per sequence {dict(row_paths)}, batched {batched.stats()['attention_paths']}"
    )
    if failed:  # a row that raised would be timed as zeros
        raise SystemExit(f"rows failed: {failed}")
    print(
        f"{a.n} sequences of {a.context} tokens, budget=1/8, median of {a.steps} steps: "
        f"SequenceBatchCache {1000 * statistics.median(per_row):.1f} ms, "
        f"one batched cache {1000 * statistics.median(one_call):.1f} ms"
    )


if __name__ == "__main__":
    main()
