"""`PackConfig(budget=f)`: choose, per layer and tensor, the encoding of the prompt that fits a byte budget.

At a prefill every layer proposes, for each prompt span it freezes (the recent `window` tokens too: they are one
more span under a budget, so a tight budget can store them at 8 bits rather than starve the older tokens; a short
prompt's exact window alone can take half of 1/8), a few candidate encodings of its keys and of
its values (exact, KIVI quantization at 8/4/2 bits, low-rank post-RoPE factors with 8- or 4-bit coefficients at
several energies). Each candidate is really encoded, so its bytes are the bytes of its storages, and it gets an
error measured on the prompt itself: the attention output of the last `QUERIES` prompt queries (the observation
window, recomputed from the attention module's inputs by a pre-hook, `window_queries`) with the candidate in
place of the exact span, relative to the exact output (squared, so errors of independent groups add), times the
layer's weight: how much a unit of such error moves the model's predictions in that layer, probed once per model
(`scoring.sensitivity`, `PackConfig.layer_weights`).

Prefill attention is exact in a PackedCache (a layer's segments are not read while its own prefill call
attends), so no layer's choice changes what later layers see: the cache collects the candidates of every layer
and, once the last layer has been called, solves one multiple-choice knapsack (`budget.allocate`) over all of
them with budget f x DynamicCache bytes minus everything else the cache holds (sinks, recent window, earlier
segments). Each frozen span then gets its chosen parts; the layer's decode chunks use the encoding chosen for its
longest prompt span.
Not supported (clear errors): vision-language prompts (modality groups) and `PackedCache.ingest` (no queries).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..config import PackConfig
from ..parts import (
    Part,
    RopeFn,
    Segment,
    storage_nbytes,
)
from ..scoring.observation import (
    attention_scaling,
    multi_token_inputs,
    queries_at,
    token_importance,
    window_logits,
    window_queries,
)
from .candidates import (
    KEY_CANDIDATES,
    VALUE_CANDIDATES,
    WIDE_GROUP,
    candidate_config,
    codec_labels,
    encode_candidates,
)
from .errors import Rest, key_errors, value_errors
from .eviction import Eviction, evictions, joint_options, shares_for
from .knapsack import BudgetError, Option, allocate

QUERIES = 16  # observation-window queries per layer that measure errors
SELECT = 32  # with eviction candidates: the prompt queries before those, which choose the tokens kept
SPREAD = 16  # with eviction candidates: more judge queries, spread over the prompt's second half (read far back)
CANDIDATE_BLOCK = 1 << 22  # logits (floats) of the key candidates scored in one batch of operations


class BudgetLayer(Protocol):
    """What the planner reads and calls on a cache layer (`PackedLayer` implements it)."""

    layer_idx: int
    config: PackConfig
    segments: list[Segment]
    total: int
    budget_choice: tuple[str, str] | None
    query_moments: torch.Tensor | None

    @property
    def tail_length(self) -> int: ...

    @property
    def tail_valid(self) -> torch.Tensor | None: ...

    @property
    def sliding_window(self) -> int | None: ...

    def materialize(self, rope: RopeFn) -> tuple[torch.Tensor, torch.Tensor]: ...

    def replace_parts(self, segment: Segment, keys: Part, values: Part) -> None: ...

    def replace_segment(self, segment: Segment, new: list[Segment]) -> None: ...

    def set_text_codec(self, cfg: PackConfig) -> None: ...


class BudgetCache(Protocol):
    """What the planner reads of the cache (`PackedCache` implements it)."""

    def tensors(self) -> list[torch.Tensor]: ...

    def dynamic_nbytes(self, steady: bool = False) -> int: ...


@dataclass
class _Context:
    """What one layer's prefill call needs to score candidates: exact K/V of every token the window sees."""

    first: int  # cache index of keys[..., 0, :]
    keys: torch.Tensor  # (B, H, T, d)
    values: torch.Tensor  # (B, H, T, d)
    queries: torch.Tensor  # (B, H, G*w, d) the call's last w queries, grouped by KV head
    logits: torch.Tensor  # (B, H, G*w, T) scaled, -inf where masked
    top: torch.Tensor  # (B, H, G*w, 1) each row's largest logit (0 for a row that sees no key)
    weights: torch.Tensor  # (B, H, G*w, T) exp(logits - top): unnormalized exact window attention
    total: torch.Tensor  # (B, H, G*w, 1) the weights' sum
    out: torch.Tensor  # (B, H, G*w, d) exact window output
    energy: float  # ||out||^2
    scaling: float
    sliding: int | None
    valid: torch.Tensor  # (B, T)
    importance: torch.Tensor | None = None  # (B, H, T) the selection queries' attention (eviction candidates)
    weight: float = 1.0  # the layer's error weight (scoring.sensitivity; 1 without layer weights)


@dataclass
class _Pending:
    layer: BudgetLayer
    segment: Segment | None = None
    keys: list[tuple[str, Part, int, float]] = field(default_factory=list)  # (label, part, bytes, error)
    values: list[tuple[str, Part, int, float]] = field(default_factory=list)
    evictions: list[Eviction] = field(default_factory=list)


class BudgetPlanner:
    """Collects candidates during a prefill and assigns encodings within the budget at its end (one per cache)."""

    def __init__(
        self, cache: BudgetCache, fraction: float, keep: float | None = None, weights: Sequence[float] | None = None
    ) -> None:
        # weakly: the cache owns its planner, and a planner that kept its cache alive would tie the layers to the
        # cache's model (tests/test_nbytes.py walks every tensor reachable from the layers)
        self._cache = weakref.ref(cache)
        self.fraction = fraction
        self.shares = shares_for(keep)  # eviction candidates (PackConfig.keep: the smallest share offered)
        # per layer: a unit of relative error costs this much (PackConfig.layer_weights, scoring.sensitivity)
        self.weights = None if weights is None else [float(w) for w in weights]
        self.queries: dict[int, torch.Tensor] = {}  # layer -> (B, Hq, w, d) window queries of the current call
        # with eviction candidates: the judge's query positions (offsets from the call's end) and the choosers
        self.judge_rows: dict[int, torch.Tensor] = {}
        self.choosers: dict[int, torch.Tensor] = {}  # layer -> (B, Hq, SELECT, d) queries before the last QUERIES
        self.scaling: dict[int, float] = {}
        self.contexts: dict[int, _Context] = {}
        self.pending: list[_Pending] = []
        # the last prefill's options per (layer, span start): {"kind": the segment's kind, "keys"/"values":
        # [(label, bytes, error)], "choice": (key label, value label)}
        self.report: dict[tuple[int, int], dict[str, Any]] = {}

    # ---- hooks called by PackedCache / PackedLayer ----------------------------------------------------------
    def note_attention(
        self, layer_idx: int, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Attention pre-hook: keep the last prompt queries of a multi-token call."""
        inputs = multi_token_inputs(args, kwargs)
        if inputs is None:
            return
        hidden, pe = inputs
        self.scaling[layer_idx] = attention_scaling(module)
        t = hidden.shape[1]
        if not self.shares:
            self.queries[layer_idx] = window_queries(module, hidden, pe, min(QUERIES, t))
            return
        last = max(0, t - QUERIES)
        chooser = torch.arange(max(0, last - SELECT), last)
        spread = torch.linspace(t // 2, max(t // 2, last - SELECT - 1), SPREAD).long().unique()
        judge = torch.cat([spread[spread < last - SELECT], torch.arange(last, t)])
        self.queries[layer_idx] = queries_at(module, hidden, pe, judge)
        self.judge_rows[layer_idx] = judge - t
        if len(chooser):
            self.choosers[layer_idx] = queries_at(module, hidden, pe, chooser)

    def begin(self, layer: BudgetLayer, ctx: Any) -> bool:
        """Start of a prefill compaction of `layer`: snapshot the exact K/V the window queries attend to. Returns
        whether the budget applies to this call; a prompt it cannot serve raises, or, for a target budget
        (`PackConfig.budget_strict=False`, the presets), returns False: the layer then uses its codec fields."""
        if not layer.config.budget_strict and (ctx.layout is not None or layer.layer_idx not in self.queries):
            self.queries.pop(layer.layer_idx, None)
            self.scaling.pop(layer.layer_idx, None)
            return False
        if ctx.layout is not None:
            raise ValueError(
                "PackConfig.budget covers text prompts only: this prompt has image/video tokens; "
                "use a config without budget for vision-language prompts"
            )
        idx = layer.layer_idx
        queries = self.queries.pop(idx, None)
        if queries is None:
            raise ValueError(
                "PackConfig.budget needs the prompt's last queries, seen by a hook on the model's "
                "attention: prefill through the model with this cache (PackedCache.ingest cannot)"
            )
        keys, values = layer.materialize(ctx.rope)  # (B, H, T, d) each
        t, n_tail = keys.shape[-2], layer.tail_length
        rows = self.judge_rows.pop(idx, None)  # None: the judge is the last queries
        if rows is None:
            queries = queries[:, :, -t:]  # a sliding layer may keep fewer tokens than the window has queries
        else:
            rows = t + rows  # key index of each judge query
            queries, rows = queries[:, :, rows >= 0], rows[rows >= 0]
        valid = torch.ones(keys.shape[0], t, dtype=torch.bool, device=keys.device)
        if layer.tail_valid is not None:
            valid[:, t - n_tail :] = layer.tail_valid  # earlier segments: taken as real tokens
        scaling = self.scaling.pop(idx)
        sliding = layer.sliding_window
        b, h = keys.shape[:2]
        importance = None
        chooser = self.choosers.pop(idx, None)
        if chooser is not None and t >= QUERIES + chooser.shape[2]:  # the queries before the last QUERIES choose
            seen = t - QUERIES  # the kept tokens; the choosers are the last queries of tokens [0, seen)
            importance = torch.zeros(b, h, t, dtype=torch.float32, device=keys.device)
            importance[..., :seen] = token_importance(
                chooser, keys[..., :seen, :], valid[:, :seen], pool_kernel=7, scaling=scaling, sliding_window=sliding
            ).per_head
        logits = window_logits(queries, keys, valid, None, scaling, sliding, rows).flatten(2, 3)  # (B, H, G*w, T)
        top = logits.amax(-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        weights = torch.exp(logits - top)  # masked keys: 0
        total = weights.sum(-1, keepdim=True)
        out = (weights @ values.float()) / total.clamp_min(1e-30)  # (B, H, G*w, d)
        grouped = queries.float().reshape(b, h, -1, queries.shape[-1])  # (B, H, G*w, d)
        self.contexts = {}  # one layer at a time: earlier layers are done
        self.contexts[idx] = _Context(
            layer.total - t,
            keys,
            values.float(),
            grouped,
            logits,
            top,
            weights,
            total,
            out,
            float(out.square().sum()),
            scaling,
            sliding,
            valid,
            importance,
            1.0 if self.weights is None else self.weights[idx],
        )
        return True

    def propose(
        self,
        layer: BudgetLayer,
        start: int,
        end: int,
        k: torch.Tensor,
        v: torch.Tensor,
        valid: torch.Tensor,
        kind: str = "span",
    ) -> tuple[_Pending, Part, Part]:
        """Encode span [start, end) (k, v (B, H, n, d)) every candidate way; return placeholder (key, value) parts
        (the cheapest candidates) for the segment the layer builds, and remember the segment."""
        c = self.contexts[layer.layer_idx]
        a, b = start - c.first, end - c.first
        cfg = layer.config
        # padding rows zeroed (a batch without padding: k and v as they are, multiplying by ones would copy them)
        k, v = (k, v) if bool(valid.all()) else (k * valid[:, None, :, None], v * valid[:, None, :, None])
        moments = layer.query_moments if cfg.key_objective == "scores" else None
        keys = encode_candidates(k, True, KEY_CANDIDATES, cfg, moments)
        values = encode_candidates(v, False, VALUE_CANDIDATES, cfg)
        hidden = torch.isinf(c.logits[..., a:b])  # (B, H, G*w, n) keys of the span a query cannot see
        rest = Rest.outside(c.top, c.weights, c.values, a, b)  # the other keys' share, once for every candidate
        errors = lambda diffs: self._errors(diffs, c)  # noqa: E731
        block = max(1, CANDIDATE_BLOCK // max(1, hidden.numel()))  # candidates scored together
        key_err = key_errors(
            keys,
            c.queries,
            (start, end),
            c.scaling,
            rest,
            c.values[..., a:b, :],
            hidden if bool(hidden.any()) else None,  # None: every judge query sees the whole span
            c.out,
            errors,
            block,
        )
        probs = c.weights[..., a:b] / c.total.clamp_min(1e-30)  # (B, H, G*w, n)
        value_err = value_errors(values, probs, v.float(), errors)
        pend = _Pending(layer)
        for found, err, opts in ((keys, key_err, pend.keys), (values, value_err, pend.values)):
            for label, part in found:
                opts.append((label, part, storage_nbytes(part.tensors()), err[label] if label != "exact" else 0.0))
        if kind == "span" and c.importance is not None and not layer.sliding_window:  # sliding layers: never
            pend.evictions = evictions(
                c,
                a,
                b,
                k,
                v,
                valid,
                self.shares,
                lambda x, is_key: encode_candidates(
                    x, is_key, KEY_CANDIDATES if is_key else VALUE_CANDIDATES, cfg, moments if is_key else None
                ),
                errors,
                block,
                None if cfg.evicted_bits is None else (cfg.evicted_bits, WIDE_GROUP, WIDE_GROUP),
            )
        self.pending.append(pend)
        cheap = lambda opts: min(opts, key=lambda o: o[2])[1]  # noqa: E731
        return pend, cheap(pend.keys), cheap(pend.values)

    def finish(self) -> None:
        """End of a forward call: choose every pending span's encodings within the budget and install them."""
        self.contexts.clear()
        self.queries.clear()
        self.judge_rows.clear()
        self.choosers.clear()
        pending = [p for p in self.pending if p.segment is not None and any(s is p.segment for s in p.layer.segments)]
        self.pending = []
        if not pending:
            return
        segments = [p.segment for p in pending if p.segment is not None]
        ours = {t.untyped_storage().data_ptr() for s in segments for t in s.tensors()}
        cache = self._cache()
        assert cache is not None, "a planner is called by its cache, which is alive"
        fixed = storage_nbytes([t for t in cache.tensors() if t.untyped_storage().data_ptr() not in ours])
        # f of what DynamicCache keeps while decoding (its sliding layers: W-1 tokens), not of the whole prompt its
        # sliding layers still hold right after a prefill: the bound that holds for the rest of the sequence
        dynamic = cache.dynamic_nbytes(steady=True)
        limit = int(self.fraction * dynamic)
        # one group per span and tensor; with eviction candidates one group of joint (share, keys, values) options
        # per span (the share couples its keys and values)
        joint = (
            [joint_options(p.keys, p.values, p.evictions) for p in pending]
            if any(p.evictions for p in pending)
            else None
        )
        if joint is None:
            groups = [
                [Option(nb, err, label) for label, _, nb, err in opts] for p in pending for opts in (p.keys, p.values)
            ]
        else:
            groups = [[Option(nb, err) for nb, err, _ in opts] for opts in joint]
        cheapest = fixed + sum(min(o.nbytes for o in g) for g in groups)
        config = pending[0].layer.config
        if not config.budget_strict:  # a target: f, or what the codec fields would hold if that is more
            limit = max(limit, fixed + sum(_codec_bytes(config, p) for p in pending))
        if limit < cheapest:
            smallest = math.ceil(cheapest / dynamic * 1e4) / 1e4  # rounded up: this fraction fits
            raise BudgetError(
                f"PackConfig.budget={self.fraction:g} is infeasible for this prompt: the cheapest "
                f"encodings hold {cheapest} bytes (the sinks stay exact) of DynamicCache's {dynamic}; "
                f"use budget >= {smallest:.4f} or a longer prompt"
            )
        alloc = allocate(groups, limit - fixed)
        self.report = {}
        guide: dict[int, tuple[BudgetLayer, int, tuple[str, str]]] = {}  # layer -> (layer, span length, choice)
        for i, (p, seg) in enumerate(zip(pending, segments, strict=True)):
            if joint is not None:
                share, ki, vi = joint[i][alloc.choice[i]][2]
            else:
                share, ki, vi = 1.0, alloc.choice[2 * i], alloc.choice[2 * i + 1]
            chosen = next((e for e in p.evictions if e.share == share), None)
            keys, values = (p.keys, p.values) if chosen is None else (chosen.keys, chosen.values)
            choice = (keys[ki][0], values[vi][0])
            self.report[p.layer.layer_idx, seg.start] = {
                "kind": seg.kind,
                "keys": [o[:1] + o[2:] for o in p.keys],
                "values": [o[:1] + o[2:] for o in p.values],
                "evictions": [(e.share, e.drop_error) for e in p.evictions],
                "choice": choice,
                "share": share,
            }
            if chosen is None:
                p.layer.replace_parts(seg, keys[ki][1], values[vi][1])
            else:
                p.layer.replace_segment(seg, chosen.segments(seg.start, seg.end, ki, vi))
            longest = guide.get(p.layer.layer_idx)
            if longest is None or seg.kind != "window" and seg.length > longest[1]:
                guide[p.layer.layer_idx] = (p.layer, seg.length, choice)
        for layer, _, choice in guide.values():  # decode chunks take the encoding of the layer's longest prompt span
            layer.budget_choice = choice
            layer.set_text_codec(candidate_config(layer.config, *choice))

    # ---- internals -------------------------------------------------------------------------------------------
    @staticmethod
    def _errors(diffs: torch.Tensor, c: _Context) -> list[float]:
        """Of each of K candidates' output differences diffs (K, ...): the squared error relative to the window
        output's energy, times the layer's weight."""
        sums = diffs.square().sum(tuple(range(1, diffs.dim()))).tolist()
        return [c.weight * s / max(c.energy, 1e-30) for s in sums]


def _codec_bytes(config: PackConfig, pending: _Pending) -> int:
    """Bytes of a span stored as `config`'s codec fields would store it (`_codec_labels`); a label the span was
    not offered counts as exact."""
    total = 0
    for opts, label in zip((pending.keys, pending.values), codec_labels(config, pending.segment), strict=True):
        total += next(
            (nb for lab, _, nb, _ in opts if lab == label), next(nb for lab, _, nb, _ in opts if lab == "exact")
        )
    return total
