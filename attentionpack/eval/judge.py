"""Does the budget's judge predict what a choice costs? Judged error beside measured KL, per candidate encoding.

`PackConfig(budget=f)` chooses among candidate encodings of each prompt span by a judged error: the attention
output of the prompt's last queries with the candidate in place of the exact span, relative to the exact output,
times the layer's weight (`budget/planner.py`). The quality issue asks how well that predicts the real damage. Here,
for a prompt and its continuation: the budget cache is prefilled and, before it chooses, every candidate of every
span is recorded with its judged error; the spans are then put back exact, and for each candidate of the prompt
span of a sample of layers, that one encoding alone is installed in a copy of the cache and the continuation is
teacher-forced through it: its KL divergence from DynamicCache's next-token distributions (mean over the
continuation's tokens, nats) is what the choice really costs there. Spearman's rank correlation of judged error and
KL is reported pooled over all trials (across layers: what the knapsack compares) and within each layer (mean).

The continuation is one forward call: every query of it attends to the prompt as stored (the call's own keys exact),
so nothing but the installed encoding differs from DynamicCache.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .. import PackConfig, PackedCache
from .agreement import agreement_stats


@dataclass
class Trial:
    layer: int
    tensor: str  # "keys" or "values"
    label: str  # candidate label (budget/candidates.py), e.g. "q4", "lr0.9c4"
    nbytes: int
    judged: float  # the planner's error (relative squared window-output error x layer weight)
    kl: float  # mean KL(DynamicCache || this encoding alone) over the continuation, nats per token


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (ties get their mean rank); nan for fewer than 3 pairs or a constant side."""
    if len(a) != len(b):
        raise ValueError(f"spearman needs equal lengths, got {len(a)} and {len(b)}")
    if len(a) < 3:
        return math.nan
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else math.nan


def _ranks(x: list[float]) -> list[float]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over steps of KL(reference || other), both (M, V) log-probabilities, nats (agreement.py's, every step)."""
    return agreement_stats(reference, other, skip_first=False)["mean_kl"]


def _log_probs(model: Any, ids: torch.Tensor, cache: Any) -> torch.Tensor:
    """Log-probabilities (T, V) of the next token after each of ids (1, T), attending to `cache`."""
    return torch.log_softmax(model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0].float(), dim=-1)


def _trial_copy(cache: PackedCache, model: Any) -> PackedCache:
    """A deep copy of the cache's state that shares the model (its modules are not copied) and stores what it is
    given as is: no planner (the continuation is not a prompt to choose encodings for) and no compression (the
    copy is dropped after the continuation's one call, whose attention reads the prompt as installed)."""
    trial = copy.deepcopy(cache, memo={id(m): m for m in model.modules()})
    trial.planner = None
    for layer in trial.layers:
        layer.planner = None
        layer.compress = False
    return trial


@torch.inference_mode()
def judge_trials(model: Any, ids: torch.Tensor, context: int, layers: int = 6, budget: float = 0.125) -> list[Trial]:
    """ids (1, context + c): prompt then continuation. Every candidate of the prompt span of `layers` evenly spaced
    layers (all layers with a span if fewer), each installed alone; see the module doc. Each layer also gets a
    control trial, label "exact": the span as it is, which measures the KL floor of the comparison itself (the
    cache's attention path against DynamicCache's; ~0)."""
    from transformers import DynamicCache

    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < context + 2:
        raise ValueError(f"judge_trials needs ids (1, context + >= 2 tokens), got {tuple(ids.shape)} for {context}")
    prompt, continuation = ids[:, :context], ids[:, context:]
    reference = DynamicCache(config=model.config)
    model(input_ids=prompt, past_key_values=reference, use_cache=True, logits_to_keep=1)
    want = _log_probs(model, continuation, reference)  # (c, V)
    del reference

    cache = PackedCache(model, PackConfig(budget=budget))
    planner = cache.planner
    assert planner is not None
    recorded: list[tuple[Any, Any, list, list]] = []
    finish = planner.finish

    def record() -> None:  # the candidates with their judged errors, before the knapsack picks
        recorded.extend((p.layer, p.segment, list(p.keys), list(p.values)) for p in planner.pending if p.segment)
        finish()

    planner.finish = record  # type: ignore[method-assign]
    try:
        model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
    finally:
        planner.finish = finish  # type: ignore[method-assign]
    exact = {}
    for layer, seg, keys, values in recorded:  # every span back to exact: a trial changes one tensor of one span
        layer.replace_parts(seg, _exact(keys), _exact(values))
        if seg.kind == "span":
            exact[layer.layer_idx] = (layer.segments.index(seg), keys, values)
    found = sorted(exact)
    if not found:
        raise ValueError(f"no prompt span was compressed at context {context}: use a longer prompt")
    picks = sorted({found[round(i * (len(found) - 1) / max(1, layers - 1))] for i in range(min(layers, len(found)))})
    trials = []
    for idx in picks:
        at, keys, values = exact[idx]
        for tensor, options in (("keys", keys), ("values", values)):
            for label, part, nbytes, judged in options:
                if label == "exact" and tensor == "values":
                    continue  # one control per layer
                trial = _trial_copy(cache, model)
                layer = trial.layers[idx]
                seg = layer.segments[at]
                layer.replace_parts(
                    seg, part if tensor == "keys" else seg.keys, part if tensor == "values" else seg.values
                )
                got = _log_probs(model, continuation, trial)
                trials.append(Trial(idx, tensor, label, int(nbytes), float(judged), kl(want, got)))
                del trial
    return trials


def _exact(options: list) -> Any:
    return next(part for label, part, _, _ in options if label == "exact")


def summarize(trials: list[Trial]) -> dict:
    """Pooled and mean within-layer Spearman correlation of judged error and KL (the controls left out), the
    largest control KL, and the trials themselves."""
    controls = [t for t in trials if t.label == "exact"]
    trials_all, trials = trials, [t for t in trials if t.label != "exact"]
    by_layer: dict[int, list[Trial]] = {}
    for t in trials:
        by_layer.setdefault(t.layer, []).append(t)
    within = [spearman([t.judged for t in ts], [t.kl for t in ts]) for ts in by_layer.values()]
    within = [r for r in within if not math.isnan(r)]
    return {
        "trials": [asdict(t) for t in trials_all],
        "layers": sorted(by_layer),
        "control_kl_max": max((t.kl for t in controls), default=math.nan),
        "spearman_pooled": spearman([t.judged for t in trials], [t.kl for t in trials]),
        "spearman_within_layer_mean": sum(within) / len(within) if within else math.nan,
        "spearman_keys": spearman(
            [t.judged for t in trials if t.tensor == "keys"], [t.kl for t in trials if t.tensor == "keys"]
        ),
        "spearman_values": spearman(
            [t.judged for t in trials if t.tensor == "values"], [t.kl for t in trials if t.tensor == "values"]
        ),
    }
