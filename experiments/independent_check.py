"""Independent check of the quality claims on the one text kept out of all tuning and evaluation: the Python
standard library's `pydoc_data/topics.py` (Python's documentation topics). Same protocol as `suite.py` (disjoint
windows of a 2,048-token prefill and 256 tokens teacher-forced one at a time; perplexity change against
DynamicCache and size against it after the 256). Run it to check a claim, never to choose anything: a change made
because of its numbers would spend the held-out text.

Usage: python -m experiments.independent_check smollm2|gemma3|PATH 'PackConfig(budget=1/8)' '"max"' ... [--windows 4]
"""

from __future__ import annotations

import argparse
import math
import pydoc_data
import time
from pathlib import Path

import torch

from attentionpack import PackConfig, load_model
from experiments.suite import mean_nll, windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--continuation", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    configs = [eval(c, {"PackConfig": PackConfig}) for c in a.configs]  # noqa: S307 - a research script's CLI
    model, tokenizer = load_model(a.model)
    text = (Path(pydoc_data.__file__).parent / "topics.py").read_text(encoding="utf-8")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    print(f"{a.model}: pydoc_data/topics.py {ids.numel()} tokens", flush=True)
    for i, w in enumerate(windows(ids, a.windows, a.context + a.continuation)):
        base, _ = mean_nll(model, None, w, a.context)
        row = [f"{a.model} pydoc w{i} base ppl {math.exp(base):.3f}"]
        for label, config in zip(a.configs, configs, strict=True):
            start = time.time()
            nll, fraction = mean_nll(model, config, w, a.context)
            change = 100 * (math.exp(nll - base) - 1)
            row.append(f"{label}: {change:+.2f}% ({1 / fraction:.1f}x, {time.time() - start:.0f}s)")
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
