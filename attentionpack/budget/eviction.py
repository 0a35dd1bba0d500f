"""Eviction as a budget candidate: a prompt span keeps, per sample and KV head, only a share of its tokens.

With `PackConfig(budget=f, keep=s)` every prompt span is also offered at keep shares 1/2, 1/4, ... down to s: the
tokens kept per (sample, KV head) are the ones the *selection* queries attend to most (SnapKV importance of the
prompt queries just before the judge's, `planner.SELECT`), and the candidate is judged, like every other, by the
last `planner.QUERIES` prompt queries, which did not choose the tokens (a window that both ranks and judges
finds any eviction free: measured +7.8% against +1.24% at 1/16 in the team's frontier probe). The kept tokens
are encoded with every key and value candidate; the span's options become joint (share, keys, values) options whose
error is the error of dropping the rest plus the encodings' errors measured against that dropped output.

Shapes: B batch, H KV heads, M = G*w judge query rows per KV head, n span tokens, m kept tokens, d head dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..parts import Part, Segment, storage_nbytes
from .errors import Errors, Rest, key_errors, value_errors

SHARES = (0.5, 0.25, 0.125, 0.0625)  # keep shares offered, down to PackConfig.keep

Candidate = tuple[str, Part, int, float]  # (label, part, bytes, error)


@dataclass
class Eviction:
    """One keep share of a span: the kept slots and their key and value candidates."""

    share: float
    slots: torch.Tensor  # (B, H, m) float16 log multiplicity: 0 for a kept token, -inf for an empty slot
    drop_error: float  # relative squared error of the judge's output with the other tokens dropped (exact kept)
    keys: list[Candidate]
    values: list[Candidate]

    def segment(self, start: int, end: int, key: int, value: int) -> Segment:
        """The slot segment of the chosen key and value candidates."""
        return Segment(start, end, self.keys[key][1], self.values[value][1], "span", slots=self.slots)


def shares_for(keep: float | None) -> tuple[float, ...]:
    """The keep shares a budget offers when `PackConfig.keep` is its smallest allowed share."""
    if keep is None:
        return ()
    return tuple(s for s in SHARES if s >= keep - 1e-9)


def evictions(
    ctx: Any,
    a: int,
    b: int,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor,
    shares: tuple[float, ...],
    candidates: Callable[[torch.Tensor, bool], list[tuple[str, Part]]],
    errors: Errors,
    block: int,
) -> list[Eviction]:
    """Eviction candidates of the span at columns [a, b) of the planner's context `ctx` (`planner._Context`):
    k, v (B, H, n, d) the span's states, valid (B, n); `candidates(x, is_key)` encodes kept states every candidate
    way, `errors(diffs)` the planner's relative squared errors of K output differences (K, B, H, M, d) (`errors`
    module); `block` key candidates are scored together."""
    scores = ctx.importance[..., a:b].masked_fill(~valid[:, None, :], float("-inf"))  # (B, H, n)
    bsz, h, n, d = k.shape
    order = scores.argsort(dim=-1, descending=True, stable=True)
    real_count = int(valid.sum(dim=1).max())
    logits = ctx.logits[..., a:b]  # (B, H, M, n) exact scaled logits of the judge's rows, -inf where masked
    outside = Rest.outside(ctx.top, ctx.weights, ctx.values, a, b)  # every row's softmax outside the span
    out: list[Eviction] = []
    for share in shares:
        m = min(n, max(1, math.ceil(share * real_count)))
        if m >= n:
            continue
        rows = order[..., :m].sort(dim=-1).values  # (B, H, m) kept, in cache order
        real = scores.gather(-1, rows) > float("-inf")
        zero = real[..., None].to(k.dtype)
        pick = rows[..., None].expand(bsz, h, m, d)
        ks, vs = k.gather(2, pick) * zero, v.gather(2, pick) * zero  # (B, H, m, d)
        cols = rows[:, :, None, :].expand(-1, -1, logits.shape[2], -1)  # (B, H, M, m)
        kept_logits = logits.gather(-1, cols).masked_fill(~real[:, :, None, :], float("-inf"))
        e = torch.exp(kept_logits - ctx.top)  # (B, H, M, m) on the exact maximum's scale
        v_kept = vs.float()
        total = outside.total + e.sum(-1, keepdim=True)
        dropped = (outside.mix + e @ v_kept) / total.clamp_min(1e-30)  # the judge's output, rest dropped
        drop_error = errors((dropped - ctx.out).unsqueeze(0))[0]
        hidden = ~real[:, :, None, :] | torch.isinf(kept_logits)  # (B, H, M, m)
        encoded = candidates(ks, True)
        key_err = key_errors(encoded, ctx.queries, (0, m), ctx.scaling, outside, v_kept, hidden, dropped, errors, block)
        key_opts = [
            (lab, part, storage_nbytes(part.tensors()), 0.0 if lab == "exact" else key_err[lab])
            for lab, part in encoded
        ]
        probs = e / total.clamp_min(1e-30)  # (B, H, M, m) the kept tokens' weights
        encoded = candidates(vs, False)
        value_err = value_errors(encoded, probs, v_kept, errors)
        value_opts = [
            (lab, part, storage_nbytes(part.tensors()), 0.0 if lab == "exact" else value_err[lab])
            for lab, part in encoded
        ]
        slots = torch.zeros(real.shape, dtype=torch.float16, device=k.device).masked_fill_(~real, float("-inf"))
        out.append(Eviction(share, slots, drop_error, key_opts, value_opts))
    return out


def joint_options(
    keys: list[Candidate], values: list[Candidate], found: list[Eviction]
) -> list[tuple[int, float, tuple[float, int, int]]]:
    """One span's options as (bytes, error, (share, key index, value index)): every Pareto-efficient key option
    with every Pareto-efficient value option, for all tokens (share 1) and for each eviction."""
    out = []
    tables = [(1.0, keys, values, 0.0, 0)] + [
        (e.share, e.keys, e.values, e.drop_error, storage_nbytes([e.slots])) for e in found
    ]
    for share, ks, vs, base, extra in tables:
        for i in _pareto(ks):
            for j in _pareto(vs):
                out.append((ks[i][2] + vs[j][2] + extra, base + ks[i][3] + vs[j][3], (share, i, j)))
    return out


def _pareto(options: list[Candidate]) -> list[int]:
    """Indices of the options that no option with at most their bytes beats in error."""
    order = sorted(range(len(options)), key=lambda i: (options[i][2], options[i][3]))
    kept, best = [], math.inf
    for i in order:
        if options[i][3] < best:
            kept.append(i)
            best = options[i][3]
    return kept
