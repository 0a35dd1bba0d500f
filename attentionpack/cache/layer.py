"""One layer of a `PackedCache`: frozen segments (sinks, compressed spans and chunks) plus an exact tail.

The tail holds the newest tokens exact, with their positions and padding flags, until they are compacted:
at the end of every multi-token (prefill) call everything past the sinks and before the recent window is
compressed, one basis per prompt span; while decoding, every `chunk` tokens that leave the window become a
segment with its own basis. Sliding-window layers drop segments that left the window.

Vision-language prompts: when the cache knows the per-sample modality of the prompt tokens (`StepContext.layout`),
each prompt span is split into modality groups — per sample a gathered set of cache indices (text, each image or
all images, video frame groups) — and every group becomes one gathered `Segment` with its own basis per sample and
its modality's codec settings (`PackConfig.for_modality`). Sliding-window layers keep contiguous spans.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers.cache_utils import CacheLayerMixin

from ..attention.packed import PackedView
from ..codecs.lowrank import RankRule, factorize
from ..codecs.quant import QuantizedLowRankPart, QuantizedPart
from ..config import PackConfig
from ..models.registry import LayerSpec
from ..rope import undo_rope
from .memory import storage_nbytes
from .segments import ExactPart, LowRankPart, RopeFn, Segment
from .tail import ExactTail

TAIL_GRANULE = 16  # compressing layers grow their exact tail 16 slots at a time once compression pays for them


@dataclass
class StepContext:
    """What one forward call tells every layer: new tokens' positions and padding, and how to get RoPE."""

    positions: torch.Tensor  # (B, q) long
    valid: torch.Tensor  # (B, q) bool, False for padding
    rope: RopeFn
    span_boundaries: Sequence[int]
    layout: Callable[[int, int], list["Group"] | None] | None = None  # modality groups of cache indices [a, b)


@dataclass
class Group:
    """One modality group of a prompt span: per sample the cache indices of its tokens (see `Segment`)."""

    name: str  # "text", "image 0", "images", "video 0 frames 1"
    modality: str  # "text", "image" or "video"
    index: torch.Tensor  # (B, n) long, ascending per sample; padding slots hold any index of the span
    valid: torch.Tensor  # (B, n) bool, False for padding slots
    start: int  # smallest cache index covered
    end: int  # largest cache index covered + 1


class PackedLayer(CacheLayerMixin):
    is_compileable = False
    is_croppable = True

    def __init__(self, layer_idx: int, spec: LayerSpec, config: PackConfig):
        super().__init__()
        self.layer_idx = layer_idx
        self.spec = spec
        self.config = config
        self.is_sliding = spec.sliding_window is not None
        self.compress = not config.is_lossless and (not self.is_sliding or config.compress_sliding_layers)
        self.attend_packed = False  # set by PackedCache when the model runs the "attentionpack" attention
        # codec settings per modality: (config, key rule, value rule); text also serves decode chunks
        self.codecs = {m: _codec(config.for_modality(m)) for m in ("text", "image", "video")}
        _, self.key_rule, self.value_rule = self.codecs["text"]
        self.planner = None  # a BudgetPlanner (cache/budgeted.py) when PackConfig.budget is set
        self.budget_choice: tuple[str, str] | None = None  # (key, value) candidate labels the budget chose
        self._reset_state()

    def _reset_state(self) -> None:
        self.segments: list[Segment] = []
        self.tail: ExactTail | None = None  # newest tokens, exact
        self.total = 0  # tokens seen (cache index of the next token)
        self.sink_end: int | None = None  # cache index where the exact sinks end (per-batch max)
        self.record_past = False
        self._last_call_tokens = 0
        self.is_initialized = False

    # ---- transformers CacheLayerMixin interface -------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, ctx: StepContext | None = None, *args, **kwargs):
        if ctx is None:
            raise RuntimeError("PackedLayer.update needs the step context; call it through PackedCache.update")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        if self.compress:  # positions and padding flags are needed only to compress later
            self._append(key_states, value_states, ctx.positions.to(torch.int32), ctx.valid)
        else:
            self._append(key_states, value_states, None, None)
        if self.segments and self.attend_packed:  # attention runs on the stored form (attention/packed.py)
            keys = values = PackedView(self, ctx.rope)
        else:
            keys = self._materialize(lambda s: s.keys, self.tail_keys, ctx.rope)
            values = self._materialize(lambda s: s.values, self.tail_values, ctx.rope)
        if self.compress:
            self._compact(prefill=q > 1, ctx=ctx)
        if self.is_sliding and not self.record_past:
            self._drop_outside_window()
        self._last_call_tokens = q
        return keys, values

    def activate_past_recording(self) -> None:
        """Keep out-of-window tokens until the next `crop` (assisted decoding may roll back a multi-token call)."""
        self.record_past = True

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        offset = self.first_index
        return self.total - offset + query_length, offset

    def get_seq_length(self) -> int:
        return self.total

    def get_max_length(self) -> int:
        return self.spec.sliding_window if self.is_sliding else -1

    def reset(self) -> None:
        self._reset_state()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number of tokens to remove")
        n = -tokens_to_remove
        if not self.is_initialized:
            return
        if n == 0:
            if self.is_sliding:
                self._drop_outside_window()
            return
        if n > self.tail_length:
            raise ValueError(
                f"cannot crop {n} tokens from layer {self.layer_idx}: only the {self.tail_length} newest tokens "
                "are still exact; compressed tokens cannot be removed"
            )
        self.tail.drop_newest(n)
        self.total -= n
        if self.is_sliding:
            self._drop_outside_window()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def set_text_codec(self, cfg: PackConfig) -> None:
        """Use `cfg`'s codecs for text spans and decode chunks from now on (a budget's choice for this layer)."""
        self.codecs["text"] = _codec(cfg)
        _, self.key_rule, self.value_rule = self.codecs["text"]

    # ---- inspection -------------------------------------------------------------------------------------------
    @property
    def tail_length(self) -> int:
        return 0 if self.tail is None else len(self.tail)

    # views of the exact tail: keys/values (B, H, n, d), positions (B, n) int32, valid (B, n) bool (None when the
    # layer does not compress)
    @property
    def tail_keys(self) -> torch.Tensor | None:
        return None if self.tail is None else self.tail.view()[0]

    @property
    def tail_values(self) -> torch.Tensor | None:
        return None if self.tail is None else self.tail.view()[1]

    @property
    def tail_positions(self) -> torch.Tensor | None:
        return None if self.tail is None else self.tail.view()[2]

    @property
    def tail_valid(self) -> torch.Tensor | None:
        return None if self.tail is None else self.tail.view()[3]

    @property
    def first_index(self) -> int:
        """Cache index of the oldest token this layer still holds."""
        if self.segments:
            return self.segments[0].start
        return self.total - self.tail_length

    def tensors(self) -> list[torch.Tensor]:
        out = [t for s in self.segments for t in s.tensors()]
        return out + ([] if self.tail is None else self.tail.tensors())

    def stats(self, seen: set | None = None) -> list[dict]:
        """One row per stored run of tokens: kind, modality, group, tokens (slots per sample), entries (over the
        batch), codec and rank of K and V, bytes. Storages in `seen` (shared across layers, e.g. a gathered
        segment's index) are not counted again; the ones counted here are added to it."""
        seen = set() if seen is None else seen
        entry = 2 * self.spec.num_kv_heads * self.spec.head_dim * torch.empty((), dtype=self.dtype).element_size() \
            if self.is_initialized else 0
        rows = []
        for seg in self.segments:
            rows.append({"layer": self.layer_idx, "kind": seg.kind, "start": seg.start, "tokens": seg.length,
                         "entries": seg.tokens(), "modality": "exact" if seg.kind == "sink" else seg.modality,
                         "group": seg.group, "keys": seg.keys.describe(), "values": seg.values.describe(),
                         "bytes": _new_bytes(seg.tensors(), seen), "dynamic_bytes": seg.tokens() * entry})
        if self.tail_length:
            tail = self.tail.tensors()
            entries = self.tail_keys.shape[0] * self.tail_length
            rows.append({"layer": self.layer_idx, "kind": "recent", "start": self.total - self.tail_length,
                         "tokens": self.tail_length, "entries": entries, "modality": "exact", "group": "",
                         "keys": {"codec": "exact"}, "values": {"codec": "exact"},
                         "bytes": _new_bytes(tail, seen), "dynamic_bytes": entries * entry})
        return rows

    def dynamic_equivalent_bytes(self) -> int:
        """Bytes a transformers DynamicCache would hold for this layer after the same tokens."""
        if not self.is_initialized or self.tail is None and not self.segments:
            return 0
        held = self.total
        if self.is_sliding:  # the stock layer keeps a view of cat(old, new): W-1 older tokens plus the last call
            q = self._last_call_tokens
            held = min(self.total - q, self.spec.sliding_window - 1) + q
        ref = self.tail_keys if self.tail_keys is not None else None
        batch = ref.shape[0] if ref is not None else self.segments[0].keys.tensors()[0].shape[0]
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * batch * self.spec.num_kv_heads * held * self.spec.head_dim * elem

    # ---- internals --------------------------------------------------------------------------------------------
    def _append(self, k, v, positions, valid) -> None:
        if self.tail is None:
            self.tail = ExactTail(k, v, positions, valid)  # granule 1 until compression pays for spare slots
        else:
            self.tail.append(k, v, positions, valid)
        self.total += k.shape[-2]

    def _materialize(self, part_of, tail: torch.Tensor, rope: RopeFn) -> torch.Tensor:
        if not self.segments:
            return tail
        pieces = [part_of(s).materialize(s.start, s.end, rope) for s in self.segments]
        if all(s.index is None for s in self.segments):
            return torch.cat(pieces + [tail], dim=-2)
        # gathered segments: scatter every piece to its cache indices; padding slots land in a scratch column
        first = self.segments[0].start
        held = self.total - self.tail_length - first  # cache indices [first, first + held) are in segments
        b, h, _, d = tail.shape
        buf = tail.new_empty(b, h, held + 1, d)  # (B, H, held + scratch, d)
        for seg, x in zip(self.segments, pieces):
            if seg.index is None:
                buf[:, :, seg.start - first:seg.end - first] = x
            else:
                slot = torch.where(seg.valid, seg.index - first, held)  # (B, n)
                buf.scatter_(2, slot[:, None, :, None].expand(b, h, -1, d), x.to(buf.dtype))
        return torch.cat([buf[:, :, :held], tail], dim=-2)

    def _compact(self, prefill: bool, ctx: StepContext) -> None:
        """Move tokens from the exact tail into frozen segments (see module docstring)."""
        tail_start = self.total - self.tail_length
        if prefill and self.planner is not None:  # before the sinks leave the tail (their padding flags with them)
            self.planner.begin(self, ctx)
        if self.sink_end is None:  # first call: the tail starts at token 0
            # sinks: each sample's first `sink` real tokens; with left padding the latest-starting sample decides
            leading_pad = torch.cumprod((~self.tail_valid).int(), dim=1).sum(dim=1)  # left padding only, not inner holes
            self.sink_end = int(leading_pad.max()) + self.config.sink
        stop = self.total - self.config.window
        if self.sink_end > tail_start:
            if stop <= self.sink_end:
                return
            if self.sink_end > 0:
                self._freeze(tail_start, self.sink_end, kind="sink", compress=False, ctx=ctx)
            tail_start = self.sink_end
        if stop - tail_start < (self.config.min_span if prefill else self.config.chunk):
            if self.tail.capacity > len(self.tail):  # frozen sinks: release their tail slots (no bytes held twice)
                self.tail.shrink()
            return
        if prefill:
            bounds = [b for b in ctx.span_boundaries if tail_start < b < stop]
            edges = [tail_start, *bounds, stop]
            for a, b in zip(edges[:-1], edges[1:]):
                groups = ctx.layout(a, b) if ctx.layout is not None and not self.is_sliding else None
                if groups:
                    self._freeze_groups(a, b, groups, ctx)
                else:
                    self._freeze(a, b, kind="span", compress=b - a >= self.config.min_span, ctx=ctx)
            if self.planner is not None and self.total > stop and not self.record_past:  # a budget weighs the
                # recent window's bytes too (kept exact, or 8-bit when bytes are better spent on older tokens)
                self._freeze(stop, self.total, kind="window", compress=self.total - stop >= self.config.min_span,
                             ctx=ctx)
        else:
            while stop - tail_start >= self.config.chunk:
                self._freeze(tail_start, tail_start + self.config.chunk, kind="chunk", compress=True, ctx=ctx)
                tail_start += self.config.chunk
        self.tail.granule = _tail_granule(self)
        self.tail.shrink()  # release the slots of the frozen tokens (the whole prompt's buffer after a prefill)

    def _freeze(self, start: int, end: int, kind: str, compress: bool, ctx: StepContext) -> None:
        """Turn tail tokens [start, end) (which must be the oldest tail tokens) into a segment."""
        n = end - start
        k, v, pos, valid = self.tail.view(0, n)
        pending = None
        if compress and kind in ("span", "window") and self.planner is not None:  # candidates now, choice later
            pending, key_part, value_part = self.planner.propose(self, start, end, k, v, valid)
        elif compress:
            cfg, key_rule, value_rule = self.codecs["text"]
            key_part = self._encode(k, valid, cfg.key_codec, key_rule, cfg.key_bits, ctx.rope(start, end, pos), pos)
            value_part = self._encode(v, valid, cfg.value_codec, value_rule, cfg.value_bits, None, None)
        else:
            key_part, value_part = ExactPart(k.clone()), ExactPart(v.clone())
        self.segments.append(Segment(start, end, key_part, value_part, kind))
        if pending is not None:
            pending.segment = self.segments[-1]
        self.tail.drop_oldest(n)

    def _freeze_groups(self, start: int, end: int, groups: list[Group], ctx: StepContext) -> None:
        """Turn tail tokens [start, end) (the oldest tail tokens) into one gathered segment per modality group."""
        n = end - start
        k, v, pos, valid = self.tail.view(0, n)  # (B, H, n, d) x2, (B, n[, 3]), (B, n)
        b, h, _, d = k.shape
        for g in sorted(groups, key=lambda g: g.start):
            local = torch.where(g.valid, g.index - start, 0)  # (B, m) rows of the tail block
            rows = local[:, None, :, None].expand(b, h, -1, d)
            gk, gv = k.gather(2, rows), v.gather(2, rows)  # (B, H, m, d)
            gpos = pos.gather(1, local if pos.dim() == 2 else local[..., None].expand(-1, -1, pos.shape[-1]))
            gvalid = valid.gather(1, local) & g.valid  # real tokens only: padding slots and padding tokens are zeroed
            cfg, key_rule, value_rule = self.codecs[g.modality]
            slots = int(g.valid.sum(dim=1).max())
            if slots >= self.config.min_span:
                key_part = self._encode(gk, gvalid, cfg.key_codec, key_rule, cfg.key_bits,
                                        ctx.rope(g.start, g.end, gpos), gpos, cfg)
                value_part = self._encode(gv, gvalid, cfg.value_codec, value_rule, cfg.value_bits, None, None, cfg)
            else:
                key_part, value_part = ExactPart(gk), ExactPart(gv)
            kind = "span" if g.modality == "text" else g.modality
            self.segments.append(Segment(g.start, g.end, key_part, value_part, kind, index=g.index, valid=g.valid,
                                         modality=g.modality, group=g.name))
        self.tail.drop_oldest(n)

    def _encode(self, x, valid, codec, rule, bits, rope_cos_sin, positions, cfg: PackConfig | None = None):
        """x (B, H, T, d) -> a stored part. Keys come with (cos, sin) and positions: low-rank keys are factored
        before RoPE (or after it, `key_pre_rope=False`); quantized keys are kept rotated (KIVI). Exact when the
        codec says so, or when the encoded form would not be smaller (`fallback_exact`)."""
        cfg = cfg or self.config
        if codec == "exact":
            return ExactPart(x.clone())
        x = x * valid[:, None, :, None]  # padding rows zeroed so they cannot skew a basis or a scale
        is_key = positions is not None
        pre_rope = is_key and cfg.key_pre_rope
        if codec == "quant":
            part = QuantizedPart.keys(x, bits, cfg.quant_group) if is_key else \
                QuantizedPart.values(x, bits, cfg.quant_group)
        else:
            b, h, t, d = x.shape
            pre = undo_rope(x, *rope_cos_sin) if pre_rope else x
            factors, ranks, _ = factorize(pre.transpose(1, 2).reshape(b, t, h * d), rule)  # block (B, T, H*d)
            pos = positions.clone() if pre_rope else None
            if bits is None:
                part = LowRankPart(factors, h, pos, tuple(ranks))
            else:
                part = QuantizedLowRankPart.from_factors(factors, h, pos, tuple(ranks), coeff_bits=bits, basis_bits=16,
                                                         coeff_group=cfg.quant_group)
        if cfg.fallback_exact and storage_nbytes(part.tensors()) >= x.numel() * x.element_size():
            return ExactPart(x.clone())
        return part

    def _drop_outside_window(self) -> None:
        """Sliding layers: forget what no future query can see (the stock layer keeps the last W-1 tokens)."""
        horizon = self.total - (self.spec.sliding_window - 1)
        self.segments = [s for s in self.segments if s.end > horizon]
        excess = (self.total - self.tail_length) - horizon
        if excess < 0 and not self.segments:
            self.tail.drop_oldest(-excess)

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for seg in self.segments:
            seg.map_batch(fn)
        if self.tail is not None:
            self.tail.map_batch(fn)


def _tail_granule(layer: PackedLayer) -> int:
    """TAIL_GRANULE when the layer's segments hold at least that many token slots' bytes less than DynamicCache
    would for their tokens (so the tail's spare slots never make the layer larger than DynamicCache), else 1."""
    k = layer.tail.keys
    slot = 2 * k.shape[0] * k.shape[1] * k.shape[3] * k.element_size()  # keys + values of one token slot
    saved = sum(seg.tokens() * slot // k.shape[0] - storage_nbytes(seg.tensors()) for seg in layer.segments)
    return TAIL_GRANULE if saved >= TAIL_GRANULE * slot else 1


def _codec(cfg: PackConfig) -> tuple[PackConfig, RankRule, RankRule]:
    return (cfg, RankRule(cfg.key_rank, cfg.key_rank_fraction, cfg.key_energy, cfg.key_max_rank_fraction),
            RankRule(cfg.value_rank, cfg.value_rank_fraction, cfg.value_energy, cfg.value_max_rank_fraction))


def _new_bytes(tensors, seen: set) -> int:
    """Bytes of the storages behind `tensors` not yet in `seen` (which they are added to)."""
    total = 0
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total

