"""`PackConfig(budget=f)`: choose, per layer and tensor, the encoding of the prompt that fits a byte budget.

At a prefill every layer proposes, for each prompt span it freezes, a few candidate encodings of its keys and of
its values (exact, KIVI quantization at 8/4/2 bits, low-rank post-RoPE factors with 8- or 4-bit coefficients at
several energies). Each candidate is really encoded, so its bytes are the bytes of its storages, and it gets an
error measured on the prompt itself: the attention output of the last `QUERIES` prompt queries (the observation
window, recomputed from the attention module's inputs by a pre-hook, `window_queries`) with the candidate in
place of the exact span, relative to the exact output (squared, so errors of independent groups add).

Prefill attention is exact in a PackedCache (a layer's segments are not read while its own prefill call
attends), so no layer's choice changes what later layers see: the cache collects the candidates of every layer
and, once the last layer has been called, solves one multiple-choice knapsack (`budget.allocate`) over all of
them with budget f x DynamicCache bytes minus everything else the cache holds (sinks, recent window, earlier
segments). Each frozen span then gets its chosen parts; the layer's decode chunks use its chosen encoding too.
Not supported (clear errors): vision-language prompts (modality groups) and `PackedCache.ingest` (no queries).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..budget import BudgetError, Option, allocate
from ..codecs.lowrank import Factors, energy_rank, spectrum_and_basis
from ..codecs.quant import QuantizedLowRankPart, QuantizedPart
from ..config import PackConfig
from ..scoring.observation import attention_scaling, window_attention, window_queries
from .memory import storage_nbytes
from .segments import ExactPart, Segment

QUERIES = 32  # observation-window queries per layer used to measure errors
# candidate encodings: label -> codec fields for one tensor ("{p}" is "key" or "value"); low-rank keys post-RoPE
_QUANT = {f"q{b}": dict(codec="quant", bits=b) for b in (8, 4, 2)}
_LOWRANK = {f"lr{e:g}c{b}": dict(codec="lowrank", energy=e, bits=b)
            for e, b in ((0.99, 8), (0.98, 4), (0.95, 4), (0.9, 4), (0.8, 4))}
KEY_CANDIDATES: dict[str, dict] = {"exact": dict(codec="exact"), **_QUANT, **_LOWRANK}
VALUE_CANDIDATES: dict[str, dict] = {"exact": dict(codec="exact"), **_QUANT,
                                     **{k: v for k, v in _LOWRANK.items() if v["bits"] == 4}}


def candidate_config(base: PackConfig, key: str, value: str) -> PackConfig:
    """`base` with the codec fields of key candidate `key` and value candidate `value` (for decode chunks)."""
    fields = {}
    for prefix, spec in (("key", KEY_CANDIDATES[key]), ("value", VALUE_CANDIDATES[value])):
        fields.update({f"{prefix}_codec": spec["codec"], f"{prefix}_bits": spec.get("bits"),
                       f"{prefix}_energy": spec.get("energy"), f"{prefix}_rank": None,
                       f"{prefix}_rank_fraction": None, f"{prefix}_max_rank_fraction": 1.0})
    return base.replace(key_pre_rope=False, **fields)


@dataclass
class _Context:
    """What one layer's prefill call needs to score candidates: exact K/V of every token the window sees."""

    first: int  # cache index of keys[..., 0, :]
    keys: torch.Tensor  # (B, H, T, d)
    values: torch.Tensor  # (B, H, T, d)
    queries: torch.Tensor  # (B, Hq, w, d) the call's last w queries
    probs: torch.Tensor  # (B, H, G, w, T) exact window attention
    out: torch.Tensor  # (B, H, G, w, d) exact window output
    energy: float  # ||out||^2
    scaling: float
    sliding: int | None
    valid: torch.Tensor  # (B, T)


@dataclass
class _Pending:
    layer: object  # PackedLayer
    segment: Segment
    keys: list[tuple[str, object, int, float]] = field(default_factory=list)  # (label, part, bytes, error)
    values: list[tuple[str, object, int, float]] = field(default_factory=list)


class BudgetPlanner:
    """Collects candidates during a prefill and assigns encodings within the budget at its end (one per cache)."""

    def __init__(self, cache, fraction: float):
        self.cache = cache
        self.fraction = fraction
        self.queries: dict[int, torch.Tensor] = {}  # layer -> (B, Hq, w, d) window queries of the current call
        self.scaling: dict[int, float] = {}
        self.contexts: dict[int, _Context] = {}
        self.pending: list[_Pending] = []

    # ---- hooks called by PackedCache / PackedLayer ----------------------------------------------------------
    def note_attention(self, layer_idx: int, module, args, kwargs) -> None:
        """Attention pre-hook: keep the last prompt queries of a multi-token call."""
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        pe = kwargs.get("position_embeddings")
        if hidden is None or pe is None or hidden.dim() != 3 or hidden.shape[1] < 2:
            return
        self.queries[layer_idx] = window_queries(module, hidden, pe, min(QUERIES, hidden.shape[1]))
        self.scaling[layer_idx] = attention_scaling(module)

    def begin(self, layer, ctx) -> None:
        """Start of a prefill compaction of `layer`: snapshot the exact K/V the window queries attend to."""
        if ctx.layout is not None:
            raise ValueError("PackConfig.budget covers text prompts only: this prompt has image/video tokens; "
                             "use a config without budget for vision-language prompts")
        idx = layer.layer_idx
        queries = self.queries.pop(idx, None)
        if queries is None:
            raise ValueError("PackConfig.budget needs the prompt's last queries, seen by a hook on the model's "
                             "attention: prefill through the model with this cache (PackedCache.ingest cannot)")
        keys = layer._materialize(lambda s: s.keys, layer.tail_keys, ctx.rope)  # (B, H, T, d)
        values = layer._materialize(lambda s: s.values, layer.tail_values, ctx.rope)
        t, n_tail = keys.shape[-2], layer.tail_length
        valid = torch.ones(keys.shape[0], t, dtype=torch.bool, device=keys.device)
        valid[:, t - n_tail:] = layer.tail_valid  # earlier segments: taken as real tokens
        scaling = self.scaling.pop(idx)
        sliding = layer.spec.sliding_window
        probs = window_attention(queries, keys, valid, None, scaling, sliding)  # (B, H, G, w, T)
        out = probs @ values.float().unsqueeze(2)  # (B, H, G, w, d)
        self.contexts = {}  # one layer at a time: earlier layers are done
        self.contexts[idx] = _Context(layer.total - t, keys, values, queries, probs, out,
                                      float(out.square().sum()), scaling, sliding, valid)

    def propose(self, layer, start: int, end: int, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor):
        """Encode span [start, end) (k, v (B, H, n, d)) every candidate way; return placeholder (key, value) parts
        (the cheapest candidates) for the segment the layer builds, and remember the segment."""
        c = self.contexts[layer.layer_idx]
        a, b = start - c.first, end - c.first
        cfg = layer.config
        mask = valid[:, None, :, None]
        keys = self._candidates(k * mask, True, KEY_CANDIDATES, cfg)
        values = self._candidates(v * mask, False, VALUE_CANDIDATES, cfg)
        pend = _Pending(layer, None)
        for label, part in keys:
            k_hat = c.keys.clone()
            k_hat[..., a:b, :] = part.materialize(start, end, None).to(k_hat.dtype)
            probs = window_attention(c.queries, k_hat, c.valid, None, c.scaling, c.sliding)
            diff = probs @ c.values.float().unsqueeze(2) - c.out
            pend.keys.append((label, part, storage_nbytes(part.tensors()), self._error(diff, c)))
        for label, part in values:
            delta = part.materialize(start, end, None).float() - v.float()  # (B, H, n, d)
            diff = c.probs[..., a:b] @ (delta * mask).unsqueeze(2)  # (B, H, G, w, d)
            pend.values.append((label, part, storage_nbytes(part.tensors()), self._error(diff, c)))
        self.pending.append(pend)
        cheap = lambda opts: min(opts, key=lambda o: o[2])[1]  # noqa: E731
        return pend, cheap(pend.keys), cheap(pend.values)

    def finish(self) -> None:
        """End of a forward call: choose every pending span's encodings within the budget and install them."""
        self.contexts.clear()
        self.queries.clear()
        pending = [p for p in self.pending if p.segment is not None and p.segment in p.layer.segments]
        self.pending = []
        if not pending:
            return
        ours = {t.untyped_storage().data_ptr() for p in pending for t in p.segment.tensors()}
        fixed = storage_nbytes([t for t in self.cache.tensors() if t.untyped_storage().data_ptr() not in ours])
        dynamic = self.cache.dynamic_nbytes()
        limit = int(self.fraction * dynamic)
        groups = [[Option(nb, err, label) for label, _, nb, err in opts]
                  for p in pending for opts in (p.keys, p.values)]
        cheapest = fixed + sum(min(o.nbytes for o in g) for g in groups)
        if limit < cheapest:
            raise BudgetError(f"PackConfig.budget={self.fraction:g} is infeasible for this prompt: the cheapest "
                              f"encodings hold {cheapest} bytes (sinks and the {layer_window(pending)}-token recent "
                              f"window stay exact), {cheapest / dynamic:.4f} of DynamicCache's {dynamic}; use "
                              f"budget >= {cheapest / dynamic:.4f}, a smaller window, or a longer prompt")
        alloc = allocate(groups, limit - fixed)
        for i, p in enumerate(pending):
            ki, vi = alloc.choice[2 * i], alloc.choice[2 * i + 1]
            p.segment.keys, p.segment.values = p.keys[ki][1], p.values[vi][1]
            cfg = candidate_config(p.layer.config, p.keys[ki][0], p.values[vi][0])
            p.layer.set_text_codec(cfg)
            p.layer.budget_choice = (p.keys[ki][0], p.values[vi][0])

    # ---- internals -------------------------------------------------------------------------------------------
    @staticmethod
    def _error(diff: torch.Tensor, c: _Context) -> float:
        return float(diff.square().sum()) / max(c.energy, 1e-30)

    @staticmethod
    def _candidates(x: torch.Tensor, is_key: bool, table: dict[str, dict], cfg: PackConfig) -> list:
        """(label, part) of every candidate of x (B, H, n, d), padding rows zeroed; encodings not smaller than
        exact are left out (exact itself is a candidate). Low-rank candidates share one factorization."""
        exact_bytes = x.numel() * x.element_size()
        out = [("exact", ExactPart(x.clone()))]
        b, h, n, d = x.shape
        lowrank = [(lab, s) for lab, s in table.items() if s["codec"] == "lowrank"]
        if lowrank:
            block = x.transpose(1, 2).reshape(b, n, h * d)  # (B, T, H*d)
            spectrum, vecs = spectrum_and_basis(block)
            ranks = {lab: [energy_rank(spectrum[i], s["energy"]) for i in range(b)] for lab, s in lowrank}
            top = max(max(r) for r in ranks.values())
            coeffs = block.to(torch.float64) @ vecs[:, :, :top]  # (B, T, top)
        for label, spec in table.items():
            if spec["codec"] == "quant":
                make = QuantizedPart.keys if is_key else QuantizedPart.values
                part = make(x, spec["bits"], cfg.quant_group)
            elif spec["codec"] == "lowrank":
                r = max(ranks[label])
                f = Factors(coeffs[:, :, :r].to(x.dtype).contiguous(),
                            vecs[:, :, :r].transpose(1, 2).to(x.dtype).contiguous())
                part = QuantizedLowRankPart.from_factors(f, h, None, tuple(ranks[label]), coeff_bits=spec["bits"],
                                                         basis_bits=16, coeff_group=cfg.quant_group)
            else:
                continue
            if storage_nbytes(part.tensors()) < exact_bytes:
                out.append((label, part))
        return out


def layer_window(pending: list[_Pending]) -> int:
    return pending[0].layer.config.window


