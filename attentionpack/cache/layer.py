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

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from ..attention import LayerView, strict
from ..codecs import encode_keys, encode_values
from ..config import PackConfig
from ..kernels.plan import DecodePlan
from ..models.registry import LayerSpec
from ..parts import BatchFn, ExactPart, Kind, Modality, Part, RopeFn, Segment, storage_nbytes
from ..parts.trim import trim_segment
from .groups import Group
from .heads import evicted_pieces, freeze_evicted, freeze_razor, importance
from .layer_stats import layer_rows
from .step import STEP, StepContext
from .tail import ExactTail

TAIL_GRANULE = 16  # compressing layers grow their exact tail 16 slots at a time once compression pays for them
TRIM_MIN = 64  # a sliding layer drops a segment's out-of-window tokens once this many can go (one copy per 64 steps)


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
        self.attend_packed = False  # set by PackedCache while the model runs the "attentionpack" attention
        self.dense_reason = ""  # why attention cannot run on the stored form (set by PackedCache)
        self.paths: Counter[str] = Counter()  # which attention path each call took (shared by the cache's layers)
        # codec settings per modality; text also serves decode chunks
        self.codecs: dict[str, PackConfig] = {m: config.for_modality(m) for m in ("text", "image", "video")}
        self.planner: Any = None  # a BudgetPlanner (budget/planner.py) when PackConfig.budget is set
        self.budget_choice: tuple[str, str] | None = None  # (key, value) candidate labels the budget chose
        # RazorAttention (PackConfig.retrieval_heads): the KV heads that keep every token; None: every head does
        self.retrieval: tuple[int, ...] | None = None
        self._importance: tuple[int, torch.Tensor] | None = None  # (cache index of column 0, (B, H, n)) for keep
        self._budgeted = False  # the current prefill call's spans are chosen by the planner
        self._reset_state()

    def _reset_state(self) -> None:
        self.segments: list[Segment] = []
        self.plan = DecodePlan(self.spec.num_kv_heads, self.spec.head_dim)
        self.query_moments: torch.Tensor | None = None  # (B, H, d, d) of the last prompt's queries
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

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict[str, Any] | None = None
    ) -> tuple[Any, Any]:
        """Store this call's keys (B, H, q, d, rotated) and values; return what attention reads: the layer's keys
        and values (B, H, N, d), or one `LayerView` for both when attention runs on the stored form. The call's
        `StepContext` arrives in `cache_kwargs[STEP]` (PackedCache.update puts it there)."""
        ctx = (cache_kwargs or {}).get(STEP)
        if not isinstance(ctx, StepContext):
            raise RuntimeError(
                "PackedLayer.update needs the step context in cache_kwargs; call it through PackedCache.update"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if ctx.query_moments is not None:  # a prompt's queries weigh its keys' factors (and later decode chunks')
            self.query_moments = ctx.query_moments
        q = key_states.shape[-2]
        if self.compress:  # positions and padding flags are needed only to compress later
            self._append(key_states, value_states, ctx.positions, ctx.valid, ctx.checked, ctx.fits_half)
        else:
            self._append(key_states, value_states, None, None, fits_half=ctx.fits_half)
        keys: Any
        values: Any
        if self.segments and self.attend_packed:  # attention runs on the stored form (attention/packed.py)
            keys = values = self.view(ctx.rope)
        else:
            if self.segments:
                self._dense_fallback()
            else:
                self.paths["exact"] += 1
            keys, values = self.materialize(ctx.rope)
        if self.compress:
            if self.is_sliding and not self.record_past:  # what no later query can see is dropped, not compressed
                self._drop_outside_window()
            self._compact(prefill=q > 1, ctx=ctx)
        if self.is_sliding and not self.record_past:
            self._drop_outside_window()
        if self.compress and self.config.half_tail and self.tail is not None and self.tail.keys.element_size() > 2:
            self.tail.store_half()  # this call's tokens were compressed exact; from now on the tail holds 16 bits
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
        return self.spec.sliding_window if self.spec.sliding_window is not None else -1

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
        self._live.drop_newest(n)
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
        self.codecs["text"] = cfg

    def replace_parts(self, segment: Segment, keys: Part, values: Part) -> None:
        """Store `segment`'s keys and values in other forms (a budget's choice); the decode plan follows."""
        if not any(s is segment for s in self.segments):
            raise ValueError(f"segment [{segment.start}, {segment.end}) is not one of layer {self.layer_idx}'s")
        segment.keys, segment.values = keys, values
        self.plan = DecodePlan(self.spec.num_kv_heads, self.spec.head_dim, self.segments)

    def replace_segment(self, segment: Segment, new: list[Segment]) -> None:
        """Put `new` in `segment`'s place (a budget's eviction choice: slot segments); the decode plan follows."""
        at = next((i for i, s in enumerate(self.segments) if s is segment), None)
        if at is None:
            raise ValueError(f"segment [{segment.start}, {segment.end}) is not one of layer {self.layer_idx}'s")
        self.segments[at : at + 1] = new
        self.plan = DecodePlan(self.spec.num_kv_heads, self.spec.head_dim, self.segments)

    def view(self, rope: RopeFn) -> LayerView:
        """A snapshot of the segments and the exact tail for one attention call."""
        tail = None
        if self.tail is not None and self.tail_length:
            k, v = self.tail.states()
            tail = (k, v, self.total - self.tail_length)
        return LayerView.of(
            self.segments,
            tail,
            self.first_index,
            self.total,
            self.spec.num_kv_heads,
            rope,
            self.plan,
            self.paths,
            self.is_sliding,
        )

    def materialize(self, rope: RopeFn) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every token the layer holds, (B, H, N, d) in cache order (compressed segments
        rebuilt; gathered segments scattered back to their cache indices)."""
        if any(seg.per_head for seg in self.segments):
            raise RuntimeError(
                f"layer {self.layer_idx} keeps different tokens per KV head (retrieval heads or eviction), which "
                "the model's own attention cannot read: load the model with attn_implementation='sdpa' so the "
                "cache attends on its stored form"
            )
        keys, values = (x.to(self.dtype) for x in self._live.states())  # (B, H, n, d) each
        return (self._materialize(lambda s: s.keys, keys, rope), self._materialize(lambda s: s.values, values, rope))

    def _dense_fallback(self) -> None:
        self.paths["dense"] += 1
        if strict() and self.config.compressed_attention and not self.config.is_lossless:
            raise RuntimeError(
                f"ATTENTIONPACK_STRICT: layer {self.layer_idx} rebuilds its compressed keys/values "
                f"for the model's attention: {self.dense_reason or 'attention on the stored form is off'}"
            )

    # ---- inspection -------------------------------------------------------------------------------------------
    @property
    def tail_length(self) -> int:
        return 0 if self.tail is None else len(self.tail)

    @property
    def tail_valid(self) -> torch.Tensor | None:
        """(B, n) padding flags of the exact tail (None when the layer does not compress or holds nothing)."""
        return None if self.tail is None else self.tail.view()[3]

    @property
    def sliding_window(self) -> int | None:
        """The layer's attention window (None for full attention)."""
        return self.spec.sliding_window

    @property
    def first_index(self) -> int:
        """Cache index of the oldest token this layer still holds."""
        if self.segments:
            return self.segments[0].start
        return self.total - self.tail_length

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the layer holds: segments, the exact tail's buffers, and what the decode plan made."""
        return self.frozen_tensors() + ([] if self.tail is None else self.tail.tensors())

    def frozen_tensors(self) -> list[torch.Tensor]:
        """The segments' tensors and what the decode plan made: they change only with the plan (a new plan, or one
        more segment added to it)."""
        return [t for s in self.segments for t in s.tensors()] + self.plan.tensors()

    def stats(self, seen: set | None = None) -> list[dict]:
        """One row per stored run of tokens (cache/layer_stats.py); storages in `seen` are not counted again."""
        return layer_rows(self, set() if seen is None else seen)

    def dynamic_equivalent_bytes(self, steady: bool = False) -> int:
        """Bytes a transformers DynamicCache would hold for this layer after the same tokens. A sliding layer's
        stock cache keeps a view of cat(old, new) — the last call's tokens plus W-1 older ones, all of a prefill —
        until its next call; `steady`: what it keeps from then on while decoding (W-1 tokens)."""
        if not self.is_initialized or self.tail is None and not self.segments:
            return 0
        held = self.total
        if self.spec.sliding_window is not None:
            q = 0 if steady else self._last_call_tokens
            held = min(self.total - q, self.spec.sliding_window - 1) + q
        batch = self.tail.keys.shape[0] if self.tail is not None else self.segments[0].keys.tensors()[0].shape[0]
        return 2 * batch * self.spec.num_kv_heads * held * self.spec.head_dim * self.dtype.itemsize

    # ---- internals --------------------------------------------------------------------------------------------
    @property
    def _live(self) -> ExactTail:
        if self.tail is None:
            raise RuntimeError(f"layer {self.layer_idx} holds no tokens yet")
        return self.tail

    def _compress_view(
        self, start: int = 0, stop: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """keys, values (B, H, n, d), positions (B, n[, 3]) and valid (B, n) of tail tokens [start, stop) of a
        compressing layer (which records positions and padding flags)."""
        k, v, pos, valid = self._live.view(start, stop)
        if pos is None or valid is None:
            raise RuntimeError(f"layer {self.layer_idx} does not compress: it keeps no positions")
        return k.to(self.dtype), v.to(self.dtype), pos, valid  # a half-precision tail is encoded at the model dtype

    def _append(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor | None,
        valid: torch.Tensor | None,
        checked: dict | None = None,
        fits_half: bool | None = None,
    ) -> None:
        if self.tail is None:
            self.tail = ExactTail(k, v, positions, valid)  # granule 1 until compression pays for spare slots
        else:
            self.tail.append(k, v, positions, valid, checked, fits_half)
        self.total += k.shape[-2]

    def _materialize(self, part_of: Callable[[Segment], Part], tail: torch.Tensor, rope: RopeFn) -> torch.Tensor:
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
        for seg, x in zip(self.segments, pieces, strict=False):
            if seg.index is None:
                buf[:, :, seg.start - first : seg.end - first] = x
            else:
                assert seg.valid is not None
                slot = torch.where(seg.valid, seg.index - first, held)  # (B, n)
                buf.scatter_(2, slot[:, None, :, None].expand(b, h, -1, d), x.to(buf.dtype))
        return torch.cat([buf[:, :, :held], tail], dim=-2)

    def _compact(self, prefill: bool, ctx: StepContext) -> None:
        """Move tokens from the exact tail into frozen segments (see module docstring)."""
        tail_start = self.total - self.tail_length
        # a budget chooses this call's encodings (begin: before the sinks leave the tail, their padding flags with
        # them), unless it declines the prompt (a target budget on image/video tokens): then the codec fields do
        self._budgeted = prefill and self.planner is not None and self.planner.begin(self, ctx)
        self._importance = None
        evicts = self.config.keep is not None or ctx.layout is not None and self.config.evicts_visual
        if prefill and evicts and ctx.observation is not None and not self.is_sliding:
            keys, _, _, valid = self._compress_view()
            self._importance = (tail_start, importance(keys, valid, ctx.observation))
        if self.sink_end is None:  # first call: the tail starts at token 0
            # sinks: each sample's first `sink` real tokens; with left padding the latest-starting sample decides
            _, _, _, tail_valid = self._compress_view()
            leading_pad = torch.cumprod((~tail_valid).int(), dim=1).sum(dim=1)  # left padding only, not inner holes
            self.sink_end = int(leading_pad.max()) + self.config.sink
        stop = self.total - self.config.window
        if self.sink_end > tail_start:
            if stop <= self.sink_end:
                return
            if self.sink_end > 0:
                self._freeze(tail_start, self.sink_end, kind="sink", compress=False, ctx=ctx)
            tail_start = self.sink_end
        chunk = self.config.decode_chunk
        if stop - tail_start < (self.config.min_span if prefill else chunk):
            if self._live.capacity > len(self._live):  # frozen sinks: release their tail slots (no bytes twice)
                self._live.shrink()
            return
        if prefill:
            bounds = [b for b in ctx.span_boundaries if tail_start < b < stop]
            edges = [tail_start, *bounds, stop]
            for a, b in zip(edges[:-1], edges[1:], strict=False):
                groups = ctx.layout(a, b) if ctx.layout is not None and not self.is_sliding else None
                if groups:
                    self._freeze_groups(a, b, groups, ctx)
                else:
                    self._freeze(a, b, kind="span", compress=b - a >= self.config.min_span, ctx=ctx)
            if self._budgeted and self.total > stop and not self.record_past:  # a budget weighs the
                # recent window's bytes too (kept exact, or 8-bit when bytes are better spent on older tokens)
                self._freeze(
                    stop, self.total, kind="window", compress=self.total - stop >= self.config.min_span, ctx=ctx
                )
        else:
            while stop - tail_start >= chunk:
                self._freeze(tail_start, tail_start + chunk, kind="chunk", compress=True, ctx=ctx)
                tail_start += chunk
        self._live.granule = _tail_granule(self)
        self._live.shrink()  # release the slots of the frozen tokens (the whole prompt's buffer after a prefill)

    def _freeze(self, start: int, end: int, kind: Kind, compress: bool, ctx: StepContext) -> None:
        """Turn tail tokens [start, end) (which must be the oldest tail tokens) into a segment."""
        n = end - start
        k, v, pos, valid = self._compress_view(0, n)
        pending = None
        key_part: Part
        value_part: Part
        if compress and kind in ("span", "window") and self._budgeted:  # candidates now, choice later
            pending, key_part, value_part = self.planner.propose(self, start, end, k, v, valid, kind)
        elif compress and self.retrieval is not None and len(self.retrieval) < self.spec.num_kv_heads:
            freeze_razor(self, start, end, kind, k, v, pos, valid, ctx)
            return
        elif compress and kind == "span" and self._importance is not None and self.config.keep is not None:
            freeze_evicted(self, start, end, k, v, valid, self._importance)
            return
        elif compress:
            cfg = self.codecs["text"]
            key_part = encode_keys(k, valid, cfg, ctx.rope(start, end, pos), pos, self.query_moments)
            value_part = encode_values(v, valid, cfg)
        else:
            key_part, value_part = ExactPart(k.clone()), ExactPart(v.clone())
        self.segments.append(Segment(start, end, key_part, value_part, kind))
        self.plan.add(self.segments[-1])
        if pending is not None:
            pending.segment = self.segments[-1]
        self._live.drop_oldest(n)

    def add_segment(self, seg: Segment, n: int) -> None:
        """Append a frozen segment made of the oldest `n` tail tokens (several segments may share them)."""
        self.segments.append(seg)
        self.plan.add(seg)
        if n:
            self._live.drop_oldest(n)

    def _freeze_groups(self, start: int, end: int, groups: list[Group], ctx: StepContext) -> None:
        """Turn tail tokens [start, end) (the oldest tail tokens) into one gathered segment per modality group."""
        n = end - start
        k, v, pos, valid = self._compress_view(0, n)  # (B, H, n, d) x2, (B, n[, 3]), (B, n)
        b, h, _, d = k.shape
        for g in sorted(groups, key=lambda g: g.start):
            local = torch.where(g.valid, g.index - start, 0)  # (B, m) rows of the tail block
            rows = local[:, None, :, None].expand(b, h, -1, d)
            gk, gv = k.gather(2, rows), v.gather(2, rows)  # (B, H, m, d)
            gpos = pos.gather(1, local if pos.dim() == 2 else local[..., None].expand(-1, -1, pos.shape[-1]))
            gvalid = valid.gather(1, local) & g.valid  # real tokens only: padding slots and padding tokens are zeroed
            cfg = self.codecs[g.modality]
            slots = int(g.valid.sum(dim=1).max())
            kind: Kind = "span" if g.modality == "text" else g.modality
            modality: Modality = g.modality
            if cfg.keep is not None and g.modality != "text" and self._importance is not None:
                # the image's (frames') tokens the prompt's last queries attend to most: slot segments per head
                first, scores = self._importance
                score = scores.gather(2, (local + start - first)[:, None, :].expand(-1, h, -1))  # (B, H, m)
                pieces = evicted_pieces(gk, gv, gvalid, score, cfg, self.query_moments)
                for keys, values, log in pieces:
                    self.add_segment(
                        Segment(g.start, g.end, keys, values, kind, modality=modality, group=g.name, slots=log), 0
                    )
                continue
            key_part: Part
            value_part: Part
            if slots >= self.config.min_span:
                key_part = encode_keys(gk, gvalid, cfg, ctx.rope(g.start, g.end, gpos), gpos, self.query_moments)
                value_part = encode_values(gv, gvalid, cfg)
            else:
                key_part, value_part = ExactPart(gk), ExactPart(gv)
            segment = Segment(
                g.start,
                g.end,
                key_part,
                value_part,
                kind,
                index=g.index,
                valid=g.valid,
                modality=modality,
                group=g.name,
            )
            self.add_segment(segment, 0)
        self._live.drop_oldest(n)

    def _drop_outside_window(self) -> None:
        """Sliding layers: forget what no future query can see (the stock layer keeps the last W-1 tokens)."""
        assert self.spec.sliding_window is not None and self.tail is not None
        horizon = self.total - (self.spec.sliding_window - 1)
        kept = [s for s in self.segments if s.end > horizon]
        # (only on the stored form: the model's own attention needs every sliding layer to hold the same tokens)
        trimmed = trim_segment(kept[0], horizon, TRIM_MIN) if kept and self.attend_packed else None
        if trimmed is not None:  # the oldest segment's out-of-window tokens, in whole groups, freed
            kept[0] = trimmed
        if len(kept) != len(self.segments) or trimmed is not None:
            self.segments = kept
            self.plan = DecodePlan(self.spec.num_kv_heads, self.spec.head_dim, kept)
        excess = (self.total - self.tail_length) - horizon
        if excess < 0 and not self.segments:
            self.tail.drop_oldest(-excess)

    def _map_batch(self, fn: BatchFn) -> None:
        for seg in self.segments:
            seg.map_batch(fn)
        self.plan = DecodePlan(self.spec.num_kv_heads, self.spec.head_dim, self.segments)
        if self.tail is not None:
            self.tail.map_batch(fn)


def _tail_granule(layer: PackedLayer) -> int:
    """TAIL_GRANULE when the layer's segments hold at least that many token slots' bytes less than DynamicCache
    would for their tokens (so the tail's spare slots never make the layer larger than DynamicCache), else 1."""
    k = layer._live.keys
    per_token = 2 * k.shape[1] * k.shape[3] * torch.empty((), dtype=layer.dtype).element_size()  # DynamicCache's
    slot = 2 * k.shape[0] * k.shape[1] * k.shape[3] * k.element_size()  # keys + values of one tail slot
    saved = sum(seg.tokens() * per_token - storage_nbytes(seg.tensors()) for seg in layer.segments)
    return TAIL_GRANULE if saved >= TAIL_GRANULE * slot else 1
