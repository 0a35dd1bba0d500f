"""The judged error of a span's candidate encodings: the judge's attention output with a candidate in place of the
exact span, against a reference output (`planner.BudgetPlanner.propose` for a whole span, `eviction.evictions`
for the tokens an eviction keeps).

Only the span's share of each softmax changes, so the rest of it is computed once (`Rest`) and each candidate adds
its span's share: a short span costs little, whatever the prompt. Errors are returned by label, as the caller's
`errors` callable measures them (relative squared error of the output, times the layer's weight).

Shapes: B batch, H KV heads, M judge query rows per KV head (G*w), n span tokens, d head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..parts import Part
from .candidates import candidate_mixes, candidate_scores

Errors = Callable[[torch.Tensor], list[float]]  # diffs (K, ...) of K candidates' outputs -> K judged errors


@dataclass
class Rest:
    """Each judge row's softmax outside the span, on the scale of its largest exact logit `top` (B, H, M, 1): the
    sum of its weights exp(logit - top) `total` (B, H, M, 1) and their mix of the values `mix` (B, H, M, d)."""

    top: torch.Tensor
    total: torch.Tensor
    mix: torch.Tensor

    @classmethod
    def outside(cls, top: torch.Tensor, weights: torch.Tensor, values: torch.Tensor, a: int, b: int) -> Rest:
        """The rest of rows whose weights (B, H, M, T) over values (B, H, T, d) leave out the span's columns
        [a, b) (summed from the two sides, not subtracted from the whole: no cancellation)."""
        w, v = (weights[..., :a], weights[..., b:]), (values[..., :a, :], values[..., b:, :])
        return cls(top, w[0].sum(-1, keepdim=True) + w[1].sum(-1, keepdim=True), w[0] @ v[0] + w[1] @ v[1])


def key_errors(
    keys: list[tuple[str, Part]],
    queries: torch.Tensor,
    span: tuple[int, int],
    scaling: float,
    rest: Rest,
    values: torch.Tensor,
    hidden: torch.Tensor | None,
    reference: torch.Tensor,
    errors: Errors,
    block: int,
) -> dict[str, float]:
    """{label: error} of every key candidate but exact, the span's logits computed on its stored form.

    queries (B, H, M, d) float32 judge rows; span: the (start, end) cache positions of the keys; values (B, H, n, d)
    float32 the span's exact values; hidden (B, H, M, n) keys a row cannot see (None: none); reference (B, H, M, d)
    the output each candidate is compared with; `block` candidates are scored in one set of operations."""
    judged: dict[str, float] = {}
    top, total, mix = rest.top.unsqueeze(2), rest.total.unsqueeze(2), rest.mix.unsqueeze(2)  # (B, H, 1, M, .)
    # scaled logits: the queries scaled once (logits are linear in them), not every candidate's logits
    for labels, logits in candidate_scores(keys, queries * scaling, *span, block):  # (B, H, K, M, n) stored form
        if hidden is not None:
            logits.masked_fill_(hidden.unsqueeze(2), float("-inf"))
        new_top = torch.maximum(top, logits.amax(-1, keepdim=True))  # the new row maximum
        e = logits.sub_(new_top).exp_()
        shrink = torch.exp(top - new_top)  # rescales the rest's share to the new maximum
        b, h, k, m, n = e.shape  # the K candidates' rows as one matrix: one product with the span's values
        mixed = (e.view(b, h, k * m, n) @ values).view(b, h, k, m, -1)
        out = (mix * shrink + mixed) / (total * shrink + e.sum(-1, keepdim=True)).clamp_min(1e-30)
        found = errors((out - reference.unsqueeze(2)).transpose(0, 2))  # (K, H, B, M, d)
        judged.update(zip(labels, found, strict=True))
    return judged


def value_errors(
    values: list[tuple[str, Part]], probs: torch.Tensor, exact: torch.Tensor, errors: Errors
) -> dict[str, float]:
    """{label: error} of every value candidate but exact: probs (B, H, M, n) the judge rows' weights of the span's
    tokens, exact (B, H, n, d) float32 their exact values."""
    mixes = candidate_mixes(values, probs)  # padding rows are zero in every encoding and get no weight
    labels = list(mixes)
    if not labels:
        return {}
    reference = probs @ exact  # (B, H, M, d)
    return dict(zip(labels, errors(torch.stack([mixes[label] - reference for label in labels])), strict=True))
