"""Does the budget's float32 eigensolver change what it judges or chooses? One prompt (Britannica window 1 of 4,
2,048 tokens) prefilled through `PackConfig(budget=0.125)` twice: the candidates' eigenvectors solved in float64,
then in float32 (what `budget/candidates.py` does). Prints the ratio of every low-rank candidate's judged error
(float32 / float64) and how many span choices differ.

Usage: python -m experiments.eigh_precision smollm2|gemma3
"""

from __future__ import annotations

import sys

import torch

import attentionpack.budget.candidates as candidates
from attentionpack import PackConfig, PackedCache, load_model
from attentionpack.codecs import spectrum_and_basis
from experiments.suite import texts, windows


def judged(model, window: torch.Tensor, solve: torch.dtype) -> tuple[dict, dict]:
    """({(layer, start, tensor, label): error}, {(layer, start): choice}) of one budget prefill."""
    candidates.spectrum_and_basis = lambda blocks, gram, _: spectrum_and_basis(blocks, gram, solve)
    try:
        cache = PackedCache(model, PackConfig(budget=0.125))
        with torch.inference_mode():
            model(window[None, :2048], past_key_values=cache, use_cache=True, logits_to_keep=1)
    finally:
        candidates.spectrum_and_basis = spectrum_and_basis
    assert cache.planner is not None
    report = cache.planner.report
    errors = {(*k, t, label): e for k, r in report.items() for t in ("keys", "values") for label, _, e in r[t]}
    return errors, {k: r["choice"] for k, r in report.items()}


def main() -> None:
    name = sys.argv[1]
    torch.set_num_threads(2)
    model, tokenizer = load_model(None if name == "smollm2" else name)
    ids = tokenizer(texts()["britannica"], return_tensors="pt", add_special_tokens=False).input_ids[0]
    window = windows(ids, 4, 2304)[1]
    e64, c64 = judged(model, window, torch.float64)
    e32, c32 = judged(model, window, torch.float32)
    ratios = sorted(e32[k] / e64[k] for k in e64 if k[3].startswith("lr") and e64[k] > 0)
    print(
        f"{name}: {len(ratios)} low-rank candidates, judged error float32/float64 min {ratios[0]:.4f} "
        f"median {ratios[len(ratios) // 2]:.4f} max {ratios[-1]:.4f}; "
        f"choices differ in {sum(c64[k] != c32[k] for k in c64)} of {len(c64)} spans"
    )


if __name__ == "__main__":
    main()
