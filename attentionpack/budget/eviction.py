"""Eviction as a budget candidate: a prompt span keeps, per sample and KV head, only a share of its tokens.

With `PackConfig(budget=f, keep=s)` every prompt span is also offered at keep shares 1/2, 1/4, ... down to s: the
tokens kept per (sample, KV head) are the ones the *selection* queries attend to most (SnapKV importance of the
prompt queries just before the judge's, `planner.SELECT`), and the candidate is judged, like every other, by the
last `planner.QUERIES` prompt queries, which did not choose the tokens (a window that both ranks and judges
finds any eviction free: measured +7.8% against +1.24% at 1/16 in the team's frontier probe). The kept tokens
are encoded with every key and value candidate; the span's options become joint (share, keys, values) options whose
error is the error of dropping the rest plus the encodings' errors measured against that dropped output.

With `PackConfig.evicted_bits` the rest is demoted, not dropped ("tiers by bits", the token-specific treatment of
AttentionPack's second contribution in its quantized form): the tokens outside the kept share are stored at that
many bits (KIVI layout: keys per channel, values per token; in groups of `candidates.WIDE_GROUP`, the cheapest
form of those bits, or a whole span at 2 bits always costs less) in a second slot segment, and the judge's
reference is then the output with the kept tokens exact and the rest read from their demoted form.

Shapes: B batch, H KV heads, M = G*w judge query rows per KV head, n span tokens, m kept tokens, d head dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..parts import Part, QuantizedPart, Segment, gather_slots, slot_log, storage_nbytes
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
    demoted: Segment | None = None  # the other tokens at `evicted_bits` (a slot segment), None: dropped

    @property
    def extra_bytes(self) -> int:
        """Bytes of the choice beyond its key and value candidates: the slots, and the demoted tokens."""
        return storage_nbytes([self.slots] + ([] if self.demoted is None else self.demoted.tensors()))

    def segments(self, start: int, end: int, key: int, value: int) -> list[Segment]:
        """The slot segments of the chosen key and value candidates (and of the demoted tokens)."""
        kept = Segment(start, end, self.keys[key][1], self.values[value][1], "span", slots=self.slots)
        if self.demoted is None:
            return [kept]
        return [kept, Segment(start, end, self.demoted.keys, self.demoted.values, "span", slots=self.demoted.slots)]


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
    demote: tuple[int, int, int] | None = None,
) -> list[Eviction]:
    """Eviction candidates of the span at columns [a, b) of the planner's context `ctx` (`planner._Context`):
    k, v (B, H, n, d) the span's states, valid (B, n); `candidates(x, is_key)` encodes kept states every candidate
    way, `errors(diffs)` the planner's relative squared errors of K output differences (K, B, H, M, d) (`errors`
    module); `block` key candidates are scored together; `demote` (bits, key group, value group): the tokens not
    kept are stored at that many bits instead of dropped."""
    scores = ctx.importance[..., a:b].masked_fill(~valid[:, None, :], float("-inf"))  # (B, H, n)
    n = k.shape[2]
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
        ks, vs = gather_slots(k, rows, real), gather_slots(v, rows, real)  # (B, H, m, d)
        cols = rows[:, :, None, :].expand(-1, -1, logits.shape[2], -1)  # (B, H, M, m)
        kept_logits = logits.gather(-1, cols).masked_fill(~real[:, :, None, :], float("-inf"))
        e = torch.exp(kept_logits - ctx.top)  # (B, H, M, m) on the exact maximum's scale
        v_kept = vs.float()
        demoted, around = None, outside  # around: every row's softmax outside the kept tokens
        if demote is not None:
            demoted, around = _demoted(ctx, order[..., m:], scores, k, v, logits, outside, demote)
        total = around.total + e.sum(-1, keepdim=True)
        dropped = (around.mix + e @ v_kept) / total.clamp_min(1e-30)  # the judge's output, rest dropped/demoted
        drop_error = errors((dropped - ctx.out).unsqueeze(0))[0]
        hidden = ~real[:, :, None, :] | torch.isinf(kept_logits)  # (B, H, M, m)
        encoded = candidates(ks, True)
        key_err = key_errors(encoded, ctx.queries, (0, m), ctx.scaling, around, v_kept, hidden, dropped, errors, block)
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
        out.append(Eviction(share, slot_log(real), drop_error, key_opts, value_opts, demoted))
    return out


def _demoted(
    ctx: Any,
    rest: torch.Tensor,
    scores: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    logits: torch.Tensor,
    outside: Rest,
    demote: tuple[int, int, int],
) -> tuple[Segment, Rest]:
    """The tokens not kept, rest (B, H, r) span columns, stored at `demote`'s bits (keys per channel, values per
    token, `demote`'s group sizes): their slot segment (start and end set when installed) and every judge row's
    softmax outside the kept tokens, the demoted tokens read from their stored form."""
    bits, key_group, value_group = demote
    rows = rest.sort(dim=-1).values  # (B, H, r) in cache order
    real = scores.gather(-1, rows) > float("-inf")
    r = rows.shape[-1]
    keys = QuantizedPart.keys(gather_slots(k, rows, real), bits, key_group)
    values = QuantizedPart.values(gather_slots(v, rows, real), bits, value_group)
    cols = rows[:, :, None, :].expand(-1, -1, logits.shape[2], -1)  # (B, H, M, r)
    unseen = ~real[:, :, None, :] | torch.isinf(logits.gather(-1, cols))
    stored = keys.scores(ctx.queries, 0, r, None).float().mul_(ctx.scaling).masked_fill_(unseen, float("-inf"))
    e = torch.exp(stored - ctx.top)  # (B, H, M, r)
    mix = outside.mix + e @ values.materialize(0, r, None).float()
    return Segment(0, 0, keys, values, "span", slots=slot_log(real)), Rest(
        ctx.top, outside.total + e.sum(-1, True), mix
    )


def joint_options(
    keys: list[Candidate], values: list[Candidate], found: list[Eviction]
) -> list[tuple[int, float, tuple[float, int, int]]]:
    """One span's options as (bytes, error, (share, key index, value index)): every Pareto-efficient key option
    with every Pareto-efficient value option, for all tokens (share 1) and for each eviction."""
    out = []
    tables = [(1.0, keys, values, 0.0, 0)] + [(e.share, e.keys, e.values, e.drop_error, e.extra_bytes) for e in found]
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
