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

import dataclasses
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..codecs import energy_rank, spectrum_and_basis
from ..codecs.lowrank import score_weighting
from ..config import PackConfig
from ..kernels import ops
from ..parts import (
    ExactPart,
    Factors,
    Part,
    Quantized,
    QuantizedLowRankPart,
    QuantizedPart,
    RopeFn,
    Segment,
    quantize_widths,
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
from .eviction import Eviction, evictions, joint_options, shares_for
from .knapsack import BudgetError, Option, allocate

QUERIES = 16  # observation-window queries per layer that measure errors
SELECT = 32  # with eviction candidates: the prompt queries before those, which choose the tokens kept
SPREAD = 16  # with eviction candidates: more judge queries, spread over the prompt's second half (read far back)
# candidate encodings: label -> codec fields for one tensor ("{p}" is "key" or "value"); low-rank keys post-RoPE
_QUANT = {f"q{b}": dict(codec="quant", bits=b) for b in (8, 4, 2)}
_LOWRANK = {
    f"lr{e:g}c{b}": dict(codec="lowrank", energy=e, bits=b)
    for e, b in ((0.98, 4), (0.95, 4), (0.9, 4), (0.8, 4), (0.6, 4))
}
KEY_CANDIDATES: dict[str, dict[str, Any]] = {"exact": dict(codec="exact"), **_QUANT, **_LOWRANK}
VALUE_CANDIDATES: dict[str, dict[str, Any]] = {
    "exact": dict(codec="exact"),
    **_QUANT,
    **{k: v for k, v in _LOWRANK.items() if float(v["energy"]) <= 0.95},  # type: ignore[arg-type]
}


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

    def replace_segment(self, segment: Segment, new: Segment) -> None: ...

    def set_text_codec(self, cfg: PackConfig) -> None: ...


class BudgetCache(Protocol):
    """What the planner reads of the cache (`PackedCache` implements it)."""

    def tensors(self) -> list[torch.Tensor]: ...

    def dynamic_nbytes(self, steady: bool = False) -> int: ...


def candidate_config(base: PackConfig, key: str, value: str) -> PackConfig:
    """`base` with the codec fields of key candidate `key` and value candidate `value` (for decode chunks)."""
    fields = {}
    for prefix, spec in (("key", KEY_CANDIDATES[key]), ("value", VALUE_CANDIDATES[value])):
        fields.update(
            {
                f"{prefix}_codec": spec["codec"],
                f"{prefix}_bits": spec.get("bits"),
                f"{prefix}_energy": spec.get("energy"),
                f"{prefix}_rank": None,
                f"{prefix}_rank_fraction": None,
                f"{prefix}_max_rank_fraction": 1.0,
            }
        )
    return base.replace(key_pre_rope=False, **fields)


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
        mask = valid[:, None, :, None]
        moments = layer.query_moments if cfg.key_objective == "scores" else None
        keys = self._candidates(k * mask, True, KEY_CANDIDATES, cfg, moments)
        values = self._candidates(v * mask, False, VALUE_CANDIDATES, cfg)
        pend = _Pending(layer)
        masked = torch.isinf(c.logits[..., a:b])  # (B, H, G*w, n) keys of the span a query cannot see
        # only the span's logits change: the softmax's sum and weighted values over the other keys are computed
        # once, and each candidate adds its span's share (so a short span costs little, whatever the prompt)
        w_out, v_out = (c.weights[..., :a], c.weights[..., b:]), (c.values[..., :a, :], c.values[..., b:, :])
        total_out = sum(w.sum(-1, keepdim=True) for w in w_out)  # (B, H, G*w, 1)
        mixed_out = sum(w @ v for w, v in zip(w_out, v_out, strict=False))  # (B, H, G*w, d)
        v_span = c.values[..., a:b, :]
        for label, part in keys:
            err = 0.0
            if label != "exact":
                span = ops.scores(part, c.queries, start, end, None)  # (B, H, G*w, n) on the stored form
                span = span.float().mul_(c.scaling).masked_fill_(masked, float("-inf"))
                top = torch.maximum(c.top, span.amax(-1, keepdim=True))  # the new row maximum
                e = torch.exp(span - top)
                shrink = torch.exp(c.top - top)  # rescales the other keys' share to the new maximum
                total = total_out * shrink + e.sum(-1, keepdim=True)
                out = (mixed_out * shrink + e @ v_span) / total.clamp_min(1e-30)
                err = self._error(out - c.out, c)
            pend.keys.append((label, part, storage_nbytes(part.tensors()), err))
        probs_span = c.weights[..., a:b] / c.total.clamp_min(1e-30)  # (B, H, G*w, n)
        exact_mix = probs_span @ (v.float() * mask)  # (B, H, G*w, d)
        for label, part in values:
            err = 0.0
            if label != "exact":  # padding rows are zero in every encoding's input and get no weight
                err = self._error(ops.mix(part, probs_span).float() - exact_mix, c)
            pend.values.append((label, part, storage_nbytes(part.tensors()), err))
        if kind == "span" and c.importance is not None and not layer.sliding_window:  # sliding layers: never
            pend.evictions = evictions(
                c,
                a,
                b,
                k * mask,
                v * mask,
                valid,
                self.shares,
                lambda x, is_key: self._candidates(
                    x, is_key, KEY_CANDIDATES if is_key else VALUE_CANDIDATES, cfg, moments if is_key else None
                ),
                lambda diff: self._error(diff, c),
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
                p.layer.replace_segment(seg, chosen.segment(seg.start, seg.end, ki, vi))
            longest = guide.get(p.layer.layer_idx)
            if longest is None or seg.kind != "window" and seg.length > longest[1]:
                guide[p.layer.layer_idx] = (p.layer, seg.length, choice)
        for layer, _, choice in guide.values():  # decode chunks take the encoding of the layer's longest prompt span
            layer.budget_choice = choice
            layer.set_text_codec(candidate_config(layer.config, *choice))

    # ---- internals -------------------------------------------------------------------------------------------
    @staticmethod
    def _error(diff: torch.Tensor, c: _Context) -> float:
        """Squared output error relative to the window output's energy, times the layer's weight."""
        return c.weight * float(diff.square().sum()) / max(c.energy, 1e-30)

    @staticmethod
    def _candidates(
        x: torch.Tensor,
        is_key: bool,
        table: dict[str, dict[str, Any]],
        cfg: PackConfig,
        query_moments: torch.Tensor | None = None,
    ) -> list[tuple[str, Part]]:
        """(label, part) of every candidate of x (B, H, n, d), padding rows zeroed; encodings not smaller than
        exact are left out (exact itself is a candidate). Low-rank candidates share one factorization."""
        exact_bytes = x.numel() * x.element_size()
        out: list[tuple[str, Part]] = [("exact", ExactPart(x.clone()))]
        b, h, n, d = x.shape
        # factors of a span shorter than its width (H*d) hold little less than its states: quantization only
        lowrank = [(lab, s) for lab, s in table.items() if s["codec"] == "lowrank" and n >= h * d]
        if lowrank:
            block = x.transpose(1, 2).reshape(b, n, h * d)  # (B, T, H*d)
            weighting = score_weighting(query_moments).to(x.dtype) if query_moments is not None else None
            # float32 Gram: the candidates keep <= 98% of the energy, far above its round-off (~1e-7 of the total)
            spectrum, vecs = spectrum_and_basis(block, torch.float32)  # ranks from the keys' own energy
            seen = block
            if weighting is not None:  # which directions: those the prompt's queries see (codecs.lowrank.factorize)
                seen = block @ weighting
                _, vecs = spectrum_and_basis(seen, torch.float32)
            ranks = {lab: [energy_rank(spectrum[i], s["energy"]) for i in range(b)] for lab, s in lowrank}
            top = max(max(r) for r in ranks.values())
            basis = vecs[:, :, :top].to(x.dtype)  # (B, D, top)
            right = basis.transpose(1, 2)  # (B, top, D)
            if weighting is not None:  # basis = V_rᵀ L⁻¹ (see codecs.lowrank.factorize)
                right = torch.linalg.solve_triangular(weighting, right, upper=False, left=False)
            f = Factors(seen @ basis, right.contiguous())  # (B, T, top), (B, top, D)
            # coefficients are quantized per column (groups along T): the first r columns of the top-rank
            # encoding are exactly the rank-r encoding, so each bit width is quantized once
            full = {
                bits: QuantizedLowRankPart.from_factors(
                    f, h, None, (), coeff_bits=bits, basis_bits=16, coeff_group=cfg.quant_group
                )
                for bits in {s["bits"] for _, s in lowrank}
            }
        widths = tuple(s["bits"] for s in table.values() if s["codec"] == "quant")
        quantized = quantize_widths(x, widths, cfg.quant_group, axis=2 if is_key else 3)  # keys per channel
        for label, spec in table.items():
            part: Part
            if spec["codec"] == "quant":
                part = QuantizedPart(quantized[spec["bits"]])
            elif spec["codec"] == "lowrank" and lowrank:
                part = _first_components(full[spec["bits"]], max(ranks[label]), tuple(ranks[label]))
            else:
                continue
            if storage_nbytes(part.tensors()) < exact_bytes:
                out.append((label, part))
        return out


def _codec_labels(config: PackConfig, segment: Segment | None) -> tuple[str, str]:
    """The (key, value) candidate labels that store a span as `config`'s codec fields would (exact where no
    candidate matches them, and for the recent window, which fixed codecs keep exact)."""
    if segment is None or segment.kind == "window":
        return "exact", "exact"
    labels = []
    for prefix, table in (("key", KEY_CANDIDATES), ("value", VALUE_CANDIDATES)):
        codec, bits, energy = (getattr(config, f"{prefix}_{n}") for n in ("codec", "bits", "energy"))
        if prefix == "key" and codec == "lowrank" and config.key_pre_rope:
            codec = "pre-rope"  # not among the candidates (they factor rotated keys)
        want = {"codec": codec, "bits": bits} | ({"energy": energy} if codec == "lowrank" else {})
        match = [lab for lab, spec in table.items() if all(spec.get(k) == v for k, v in want.items())]
        labels.append(match[0] if match and codec != "exact" else "exact")
    return labels[0], labels[1]


def _codec_bytes(config: PackConfig, pending: _Pending) -> int:
    """Bytes of a span stored as `config`'s codec fields would store it (`_codec_labels`); a label the span was
    not offered counts as exact."""
    total = 0
    for opts, label in zip((pending.keys, pending.values), _codec_labels(config, pending.segment), strict=True):
        total += next(
            (nb for lab, _, nb, _ in opts if lab == label), next(nb for lab, _, nb, _ in opts if lab == "exact")
        )
    return total


def _first_components(part: QuantizedLowRankPart, r: int, sample_ranks: tuple[int, ...]) -> QuantizedLowRankPart:
    """The rank-r part made of the first r components of `part` (own storages, so bytes count exactly)."""
    q = part.coeffs  # stored (B, top, ...): one row per component
    coeffs = dataclasses.replace(
        q,
        codes=q.codes[:, :r].clone(),
        scales=q.scales[:, :r].clone(),
        mins=q.mins[:, :r].clone(),
        shape=(q.shape[0], q.shape[1], r),
    )
    basis = part.basis
    assert not isinstance(basis, Quantized), "budget candidates keep a float16 basis"
    return QuantizedLowRankPart(coeffs, basis[:, :r].clone(), part.num_heads, None, sample_ranks)
