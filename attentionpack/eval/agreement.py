"""Agreement with the uncompressed model: on the same teacher-forced continuation, the share of decoding steps whose
greedy next token equals DynamicCache's, and the mean KL divergence KL(P_dynamic || P_cache) of the next-token
distributions. The prefill's own prediction (position 0) is left out: only steps that read the cache count."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .perplexity import continuation_perplexity


def agreement_stats(reference: torch.Tensor, test: torch.Tensor, skip_first: bool = True) -> dict:
    """reference, test: (K, V) next-token log-probabilities of the same positions (reference = DynamicCache)."""
    if reference.shape != test.shape or reference.dim() != 2:
        raise ValueError(f"log-prob tables differ in shape: {tuple(reference.shape)} vs {tuple(test.shape)}")
    if skip_first:
        reference, test = reference[1:], test[1:]
    if reference.shape[0] == 0:
        raise ValueError("no decoding step to compare")
    ref, tst = reference.double(), test.double()
    kl = (ref.exp() * (ref - tst)).sum(-1).clamp_min(0)
    same = reference.argmax(-1) == test.argmax(-1)
    return {
        "top1_agreement": float(same.double().mean()),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "steps": int(reference.shape[0]),
    }


def read_logprobs(path: str | Path, vocab: int) -> torch.Tensor:
    """A raw float32 (rows, vocab) file written by `memory.LogprobWriter` (or the kvpress worker)."""
    data = np.fromfile(path, dtype=np.float32)
    if data.size == 0 or data.size % vocab:
        raise ValueError(f"{path}: {data.size} floats is not a whole number of rows of {vocab}")
    return torch.from_numpy(data.reshape(-1, vocab))


def compare_files(reference_path: str | Path, test_path: str | Path, vocab: int) -> dict:
    return agreement_stats(read_logprobs(reference_path, vocab), read_logprobs(test_path, vocab))


def collect_logprobs(model, ids: torch.Tensor, context: int, steps: int, make_cache: Callable[[], object]):
    """(ContinuationResult, (steps, V) log-probs) of one teacher-forced continuation through a fresh cache."""
    rows = []
    res = continuation_perplexity(
        model,
        ids,
        context,
        steps,
        make_cache,
        on_logits=lambda logits: rows.append(torch.log_softmax(logits[0].float(), -1)),
    )
    return res, torch.stack(rows)


def agreement(
    model,
    ids: torch.Tensor,
    context: int,
    steps: int,
    make_cache: Callable[[], object],
    make_reference: Callable[[], object] | None = None,
) -> dict:
    """Agreement of `make_cache()` with `make_reference()` (default: DynamicCache) over `steps` teacher-forced
    positions after `context` tokens of `ids` (steps - 1 of them read the cache)."""
    if make_reference is None:
        from transformers import DynamicCache

        make_reference = lambda: DynamicCache(config=model.config)  # noqa: E731
    _, ref = collect_logprobs(model, ids, context, steps, make_reference)
    _, tst = collect_logprobs(model, ids, context, steps, make_cache)
    return agreement_stats(ref, tst)
