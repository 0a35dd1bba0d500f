"""`PackedCache`: a transformers `Cache` that stores the KV cache compacted (see `PackedLayer`).

Use it like any cache: `model.generate(**inputs, past_key_values=PackedCache(model, "balanced"))`, or pass it to
`model(...)` in a manual decoding loop. Constructing the cache attaches it to the model: forward pre-hooks (inert
for other caches) tell the cache each call's padding mask and token positions, which it needs to keep sinks per
sample, to leave padding out of the factorization, and to undo/redo RoPE exactly; and a model that runs SDPA is
switched to the "attentionpack" attention implementation (SDPA itself for every other cache). `detach()` (or
leaving `with PackedCache(model, cfg) as cache:`) removes the hooks and restores SDPA once no attached cache is
left on the model.

Vision-language models (LLaVA, Qwen2-VL / Qwen2.5-VL, Idefics3 / SmolVLM): a pre-hook on the top-level model
reads each multi-token call's `input_ids` and finds, per sample, the image and video tokens (`models/vlm.py`);
prompt spans are then compacted per modality group (see `PackedLayer`). For Qwen2-VL a pre-hook on the language
model records the multimodal (temporal, height, width) positions so RoPE is undone and redone exactly.
"""

from __future__ import annotations

import os
import weakref
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import Cache

from ..attention import disable as disable_packed_attention
from ..attention import enable as enable_packed_attention
from ..budget.planner import BudgetPlanner
from ..config import PackConfig
from ..models.registry import ModelAdapter
from ..models.vlm import find_spans, group_labels
from ..scoring.observation import attention_scaling, multi_token_inputs, query_moments, window_queries
from ..scoring.retrieval_heads import load_or_find
from ..scoring.sensitivity import load_or_probe_sensitivity
from .groups import Group, groups_of
from .growth import decode_growth
from .layer import PackedLayer
from .nbytes import FrozenBytes
from .step import FITS_HALF, STEP, StepContext

_ATTACHED = "_attentionpack_attached"  # model attribute: {"hooks": [...], "caches": n, "switched": bool}


class PackedCache(Cache):
    """A compressed KV cache for a supported transformers model.

    Args:
        model: the model this cache will serve (its config decides layers, heads and RoPE).
        config: a `PackConfig`, a preset name ("lossless", "balanced", "max"), or None for "balanced".
        span_boundaries: cache indices where a new prompt span (own low-rank basis) starts, e.g. the end of the
            system prompt and of the document. Default: the whole prompt after the sinks is one span.
    """

    def __init__(self, model: Any, config: PackConfig | str | None = None, span_boundaries: Sequence[int] = ()):
        if config is None:
            config = PackConfig.preset("balanced")
        elif isinstance(config, str):
            config = PackConfig.preset(config)
        elif not isinstance(config, PackConfig):
            raise TypeError(f"config must be a PackConfig or a preset name, not {type(config).__name__}")
        self.config = config
        self.adapter = ModelAdapter(model)
        self.model_ref = weakref.ref(model)  # the model served (its fingerprint is saved with the cache)
        layers = [PackedLayer(i, spec, config) for i, spec in enumerate(self.adapter.layers)]
        super().__init__(layers=list(layers))
        # the base class types its layers as any transformers layer; this cache's are all PackedLayers
        self.layers: list[PackedLayer] = layers  # type: ignore[assignment]
        self.paths: Counter[str] = Counter()  # attention path of every layer call (stats()["attention_paths"])
        self.planner = None
        if config.budget is not None:  # each layer's errors weighed by its sensitivity, probed once per model
            weights = load_or_probe_sensitivity(model).weights().tolist() if config.layer_weights else None
            self.planner = BudgetPlanner(self, config.budget, config.keep, weights)
        for layer in self.layers:
            layer.planner = self.planner
            layer.paths = self.paths
        if config.retrieval_heads is not None:  # RazorAttention: probed once per model, kept in a file
            chosen = load_or_find(model, fraction=config.retrieval_heads).chosen
            for layer in self.layers:
                layer.retrieval = tuple(h for h in range(layer.spec.num_kv_heads) if (layer.layer_idx, h) in chosen)
        self.set_spans(span_boundaries)
        self._model: weakref.ref[Any] | None = None
        self.attach(model)
        self._attention_mask: torch.Tensor | None = None  # 2D (B, kv) mask of the current call
        self._positions: dict[int, torch.Tensor] = {}  # layer -> (B, q) position ids of the current call
        self._rope_memo: dict = {}
        self._step_memo: dict = {}  # this call's new tokens' (positions, padding flags): the same for every layer
        self._frozen = FrozenBytes()  # nbytes(): the segments' bytes, walked again only when they change
        self._mrope_positions: torch.Tensor | None = None  # (B, q, 3) multimodal positions of the current call
        self._moments: dict[int, torch.Tensor] = {}  # layer -> (B, H, d, d) query moments of the current call
        self._observations: dict[int, tuple[torch.Tensor, float]] = {}  # layer -> last queries, scaling (keep)
        self.wants_query_moments = any(
            c.key_codec == "lowrank" and not c.key_pre_rope and c.key_objective == "scores"
            for c in (config.for_modality(m) for m in ("text", "image", "video"))
        )
        # vision-language prompts: modality group of every (sample, cache index) seen in input_ids
        self._labels: torch.Tensor | None = None  # (B, N) long, indexes self.groups
        self.groups: list[tuple[str, str]] = [("text", "text")]  # (group name, modality)
        self.spans: list = []  # VisionSpan of every multi-token call so far (cache indices)
        self._layout_memo: dict = {}

    # ---- the model change: scoped and reversible --------------------------------------------------------------
    def attach(self, model: Any) -> PackedCache:
        """Install the forward pre-hooks this cache needs on `model` (once per model, shared by its caches) and,
        when the config attends on the stored form, switch an SDPA model to the "attentionpack" attention (SDPA
        for every other cache). Done by the constructor; undone by `detach`."""
        if self._model is not None:
            if self._model() is model:
                return self
            self.detach()
        state = getattr(model, _ATTACHED, None)
        if state is None:
            state = {"hooks": _install_hooks(model, self.adapter), "caches": 0, "switched": False}
            setattr(model, _ATTACHED, state)
        state["caches"] += 1
        self._model = weakref.ref(model)
        reason = "attention on the stored form is off (PackConfig.compressed_attention=False)"
        if self.config.compressed_attention and not self.config.is_lossless:
            reason = enable_packed_attention(model)
            state["switched"] = state["switched"] or not reason
        for layer in self.layers:
            layer.attend_packed = not reason
            layer.dense_reason = reason
        return self

    def detach(self) -> None:
        """Undo `attach`: once no attached cache is left on the model, remove the hooks and switch the model back
        to SDPA if attaching switched it. The cache keeps what it holds; `attach(model)` before using it again."""
        model = self._model() if self._model is not None else None
        self._model = None
        for layer in self.layers:
            layer.attend_packed = False
        if model is None:
            return
        state = getattr(model, _ATTACHED, None)
        if state is None:
            return
        state["caches"] -= 1
        if state["caches"] <= 0:
            for handle in state["hooks"]:
                handle.remove()
            if state["switched"]:
                disable_packed_attention(model)
            delattr(model, _ATTACHED)

    def __enter__(self) -> PackedCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def set_inputs(
        self,
        input_ids: torch.Tensor,
        video_grid_thw: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> None:
        """Tell the cache the token ids of the next call (done automatically for VLMs by a pre-hook on the model:
        needed only when calling the language model directly). Finds the image/video tokens per sample; Qwen2-VL
        videos are cut into frame groups by `position_ids` (3 or 4, B, T) or `video_grid_thw`."""
        if not self.adapter.is_vlm or input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] < 2:
            return
        offset = self.get_seq_length()
        temporal = None
        if position_ids is not None and position_ids.dim() == 3 and position_ids.shape[0] in (3, 4):
            temporal = position_ids[-3]  # (B, T): the temporal axis of (temporal, height, width)
        spans = find_spans(self.adapter.vlm_config, input_ids, video_grid_thw, self.config.video_group_frames, temporal)
        labels, groups = group_labels(spans, input_ids.shape[0], input_ids.shape[1], self.config.image_basis)
        remap = []
        for name, modality in groups:
            if (name, modality) not in self.groups:
                self.groups.append((name, modality))
            remap.append(self.groups.index((name, modality)))
        labels = torch.tensor(remap, device=labels.device)[labels]  # (B, q)
        batch = labels.shape[0]
        old = self._labels if self._labels is not None and self._labels.shape[0] == batch else labels[:, :0]
        old = old[:, :offset]  # earlier labels past the cache length were cropped away
        gap = labels.new_zeros(batch, offset - old.shape[1])  # tokens seen without ids (decoding): text
        self._labels = torch.cat([old, gap, labels], dim=1)  # (B, offset + q)
        self.spans = [sp for sp in self.spans if sp.end <= offset] + [
            type(sp)(sp.sample, sp.modality, sp.number, sp.start + offset, sp.end + offset, sp.group) for sp in spans
        ]

    def set_spans(self, span_boundaries: Sequence[int]) -> None:
        """Set the cache indices where prompt spans start (each span gets its own basis); for the next prefill."""
        bounds = sorted(int(b) for b in span_boundaries)
        if any(b <= 0 for b in bounds):
            raise ValueError(f"span_boundaries={list(span_boundaries)} must be positive token indices")
        self.span_boundaries = tuple(bounds)

    # ---- the Cache interface ------------------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self.paths.clear()
        self._labels, self.groups, self.spans = None, [("text", "text")], []

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[Any, Any]:
        """Store this call's keys (B, H, q, d, rotated) and values, and return all keys/values to attend to (or a
        `LayerView` of the stored form, see `PackedLayer.update`)."""
        if key_states.dtype != value_states.dtype or not key_states.dtype.is_floating_point:
            raise TypeError(f"keys/values must share a floating dtype, got {key_states.dtype} / {value_states.dtype}")
        positions, valid, checked = self._step(layer_idx, key_states)
        kwargs = cache_kwargs or {}
        ctx = StepContext(
            positions=positions,
            valid=valid,
            checked=checked,
            rope=lambda start, end, pos: self._rope(layer_idx, start, end, pos, key_states.dtype),
            span_boundaries=self.span_boundaries,
            layout=(lambda a, b: self._layout(a, b, key_states.device)) if self._labels is not None else None,
            query_moments=self._moments.pop(layer_idx, None),
            observation=self._observations.pop(layer_idx, None),
            fits_half=kwargs.get(FITS_HALF),
        )
        out = self.layers[layer_idx].update(key_states, value_states, {**kwargs, STEP: ctx})
        if layer_idx == len(self.layers) - 1:  # end of the forward call: drop per-call state
            if self.planner is not None:  # every layer has proposed its candidates: choose within the budget
                self.planner.finish()
            self._rope_memo.clear()
            self._step_memo.clear()
            self._positions.clear()
            self._layout_memo.clear()
            self._moments.clear()
            self._observations.clear()
            self._mrope_positions = None
        return out

    def ingest(self, source: Any) -> PackedCache:
        """Fill this empty cache from another cache that holds a text prompt's keys/values (e.g. a DynamicCache
        after a prefill), leaving this cache exactly as if the prompt had been prefilled through it: prefill
        attention is exact in a PackedCache, so only the storage differs. Lets an evaluation prefill a prompt once
        and derive every configuration's cache from it. Unpadded single-call prompts only (positions 0..n-1, no
        padding, no image tokens); `source` is not modified."""
        if self.get_seq_length() != 0:
            raise ValueError("PackedCache.ingest needs an empty cache; call reset() first")
        layers = getattr(source, "layers", None)
        if not layers or len(layers) != len(self.layers):
            raise ValueError(
                f"ingest: the source cache has {len(layers or [])} layers, this model has {len(self.layers)}"
            )
        n = source.get_seq_length()
        self._begin_call(None)
        for idx, layer in enumerate(layers):
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            if keys is None or values is None or keys.dim() != 4 or keys.shape[-2] != n:
                raise ValueError(
                    f"ingest: layer {idx} of the source does not hold all {n} tokens (a sliding-window "
                    "or compressed layer); prefill through this cache instead"
                )
            self.update(keys, values, idx)
        return self

    def vision_segments(self, layer_idx: int) -> list:
        """The gathered image/video segments of one layer, in cache order.

        Hook point for attention-aware decompression (not built here): a scorer reads each segment's parts and
        `index` (B, n) / `valid` (B, n) — which cache indices of which sample it holds — ranks the image tokens per
        sample by the attention text queries give them, and re-encodes or restores the segment's parts."""
        return [s for s in self.layers[layer_idx].segments if s.index is not None and s.modality in ("image", "video")]

    # ---- saving (attentionpack/store/serialize.py: file format and checks) ------------------------------------
    def save(self, path: str | os.PathLike[str], tokens: torch.Tensor | None = None, tokenizer: Any = None) -> Path:
        """Save this cache into the folder `path` (tensors in safetensors + a JSON manifest); `tokens`: the (B, N)
        token ids it covers, `tokenizer`: fingerprinted so a load with another tokenizer is refused."""
        from .files import save_cache

        return save_cache(self, path, tokens=tokens, tokenizer=tokenizer)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], model: Any, config: PackConfig | str | None = None, tokenizer: Any = None
    ) -> PackedCache:
        """A cache saved by `save`, for `model`; it continues exactly as the saved one. Raises
        `CacheFileError` (a ValueError, `attentionpack.store.CacheFileError`) for damaged files and for another
        model, tokenizer or PackConfig (`config` None: the saved one)."""
        from .files import load_cache

        return load_cache(path, model, cls, config, tokenizer).cache

    # ---- accounting -----------------------------------------------------------------------------------------
    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds."""
        return [t for layer in self.layers for t in layer.tensors()]

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (each storage counted once, whole); see `FrozenBytes`."""
        return self._frozen.nbytes(self.layers)

    def decode_bytes_bound(self, tokens: int) -> int | None:
        """Most bytes the cache can hold at any step boundary of its next `tokens` one-token decoding steps: what
        it holds now plus each layer's `cache.growth.decode_growth`; None when a layer cannot bound its growth."""
        grow = [decode_growth(layer, tokens) for layer in self.layers]
        if any(g is None for g in grow):
            return None
        return self.nbytes() + sum(g for g in grow if g is not None)

    def dynamic_nbytes(self, steady: bool = False) -> int:
        """Bytes a transformers DynamicCache would hold for the same tokens now; `steady`: once decoding, when its
        sliding-window layers keep only their last W-1 tokens (after a prefill they still hold the whole prompt)."""
        return sum(layer.dynamic_equivalent_bytes(steady) for layer in self.layers)

    def stats(self) -> dict:
        """Per layer and stored run: tokens, codec and rank of K and V, bytes; totals vs DynamicCache; per modality
        ("text", "image", "video", "exact" = sinks and recent window, "mixed") the entries held, bytes and
        DynamicCache bytes for the same entries."""
        seen: set = set()  # storages shared by layers (a gathered segment's index/valid) count once
        rows = [row for layer in self.layers for row in layer.stats(seen)]
        held, dynamic = self.nbytes(), self.dynamic_nbytes()
        modalities: dict[str, dict] = {}
        for r in rows:
            m = modalities.setdefault(r["modality"], {"entries": 0, "bytes": 0, "dynamic_bytes": 0})
            for key in m:
                m[key] += r[key]
        for m in modalities.values():
            m["ratio"] = m["dynamic_bytes"] / m["bytes"] if m["bytes"] else float("nan")
        return {
            "config": self.config.name,
            "tokens": self.get_seq_length(),
            "bytes": held,
            "dynamic_bytes": dynamic,
            "ratio": dynamic / held if held else float("nan"),
            "modalities": modalities,
            "attention_paths": dict(self.paths),
            "layers": [
                {
                    "layer": layer.layer_idx,
                    "bytes": sum(r["bytes"] for r in rows if r["layer"] == layer.layer_idx),
                    "dynamic_bytes": layer.dynamic_equivalent_bytes(),
                    "sliding": layer.is_sliding,
                    "runs": [r for r in rows if r["layer"] == layer.layer_idx],
                }
                for layer in self.layers
            ],
        }

    # ---- per-call context -----------------------------------------------------------------------------------
    def _begin_call(self, attention_mask: torch.Tensor | None) -> None:
        self._attention_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        self._step_memo.clear()

    def _step(self, layer_idx: int, key_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The call's new tokens' positions (B, q[, 3]) int32, as the exact tail stores them, padding flags (B, q)
        and the exact tails' padding-rule answers for them: made by the first layer of a call and shared by the
        others (every layer sees the same tokens at the same cache indices; the key also names the position ids
        the model passed, if any)."""
        start, given = self.layers[layer_idx].get_seq_length(), self._positions.get(layer_idx)
        key = (start, key_states.shape[0], key_states.shape[-2], None if given is None else id(given))
        hit = self._step_memo.get(key)
        if hit is None:
            hit = (self._step_positions(layer_idx, key_states).to(torch.int32), self._step_valid(key_states), {})
            self._step_memo[key] = hit
        return hit

    def _step_positions(self, layer_idx: int, key_states: torch.Tensor) -> torch.Tensor:
        b, q = key_states.shape[0], key_states.shape[-2]
        if self.adapter.mrope:  # (B, q, 3): what the language model gave its rotary module
            pos = self._mrope_positions
            if pos is None:
                start = self.layers[layer_idx].get_seq_length()
                pos = torch.arange(start, start + q, device=key_states.device)[None, :, None].expand(b, q, 3)
            if pos.shape[-2] != q:
                raise ValueError(f"multimodal position_ids of shape {tuple(pos.shape)} do not match {q} new tokens")
            return pos.expand(b, q, 3)
        pos = self._positions.get(layer_idx)
        if pos is None:
            start = self.layers[layer_idx].get_seq_length()
            pos = torch.arange(start, start + q, device=key_states.device).unsqueeze(0)
        if pos.dim() != 2 or pos.shape[-1] != q:
            raise ValueError(f"position_ids of shape {tuple(pos.shape)} do not match {q} new tokens")
        return pos.expand(b, q)

    def _step_valid(self, key_states: torch.Tensor) -> torch.Tensor:
        b, q = key_states.shape[0], key_states.shape[-2]
        mask = self._attention_mask
        if mask is None or mask.shape[-1] < q:
            return torch.ones(b, q, dtype=torch.bool, device=key_states.device)
        return mask[:, -q:].to(torch.bool).expand(b, q)

    def _rope(
        self, layer_idx: int, start: int, end: int, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, T, d) for a stored run; shared by all layers of a RoPE group within one call (gathered
        segments may share start/end, so a hit is checked against the positions themselves)."""
        group = self.adapter.layers[layer_idx].layer_type if self.adapter._rotary_takes_layer_type else "all"
        key = (group, start, end, tuple(positions.shape))
        hit = self._rope_memo.get(key)
        if hit is not None and torch.equal(hit[0], positions):
            return hit[1]
        cos_sin = self.adapter.rope(positions.long(), layer_idx, dtype)
        self._rope_memo[key] = (positions, cos_sin)
        return cos_sin

    def _layout(self, start: int, end: int, device: torch.device) -> list[Group] | None:
        """Modality groups of cache indices [start, end) (None when they are all text); shared by the layers."""
        key = (start, end, str(device))
        if key not in self._layout_memo:
            groups = groups_of(self._labels, self.groups, start, end)
            self._layout_memo[key] = (
                None
                if groups is None
                else [Group(g.name, g.modality, g.index.to(device), g.valid.to(device), g.start, g.end) for g in groups]
            )
        return self._layout_memo[key]

    def _note_queries(self, layer_idx: int, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Attention pre-hook of a multi-token call: the second moments of its queries (key_objective="scores")."""
        inputs = multi_token_inputs(args, kwargs)
        if inputs is None:
            return
        hidden, pe = inputs
        mask = self._attention_mask
        valid = None if mask is None or mask.shape[-1] < hidden.shape[1] else mask[:, -hidden.shape[1] :].bool()
        heads = self.adapter.layers[layer_idx].num_kv_heads
        self._moments[layer_idx] = query_moments(module, hidden, pe, heads, valid)

    @property
    def observes(self) -> bool:
        """A prompt's last queries are kept for eviction: `keep` without a budget (a budget's own eviction
        candidates are chosen by its planner), or image/video tokens kept by importance."""
        return self.config.keep is not None and self.planner is None or self.config.evicts_visual

    def _note_observation(self, layer_idx: int, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Attention pre-hook of a multi-token call: its last `PackConfig.observation` queries (eviction)."""
        inputs = multi_token_inputs(args, kwargs)
        if inputs is None:
            return
        hidden, pe = inputs
        queries = window_queries(module, hidden, pe, min(self.config.observation, hidden.shape[1]))
        self._observations[layer_idx] = (queries, attention_scaling(module))

    def _begin_top_call(self, input_ids: torch.Tensor | None, kwargs: dict) -> None:
        if input_ids is not None and input_ids.dim() == 2 and input_ids.shape[1] > 1:
            self.set_inputs(input_ids, kwargs.get("video_grid_thw"), kwargs.get("position_ids"))

    def _set_mrope_positions(self, position_ids: torch.Tensor | None) -> None:
        """Positions the language model will rotate with, normalized as it does: (3, B, q) -> (B, q, 3)."""
        if position_ids is None:
            self._mrope_positions = None
            return
        if position_ids.dim() == 2:
            position_ids = position_ids[None].expand(3, -1, -1)
        elif position_ids.shape[0] == 4:  # text positions prepended for packed masks
            position_ids = position_ids[1:]
        self._mrope_positions = position_ids.permute(1, 2, 0)


def _install_hooks(model: Any, adapter: ModelAdapter) -> list[Any]:
    """Forward pre-hooks that hand a PackedCache the 2D padding mask and each layer's position ids; returns their
    handles."""
    handles = []
    base = adapter.language_model  # the decoder: it always receives the 2D padding mask

    def on_model_call(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cache = kwargs.get("past_key_values")
        if isinstance(cache, PackedCache):
            cache._begin_call(kwargs.get("attention_mask"))

    handles.append(base.register_forward_pre_hook(on_model_call, with_kwargs=True))
    if adapter.is_vlm:

        def on_top_call(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            cache = kwargs.get("past_key_values")
            if isinstance(cache, PackedCache):
                ids = kwargs.get("input_ids", args[0] if args else None)
                cache._begin_top_call(ids, kwargs)

        handles.append(model.register_forward_pre_hook(on_top_call, with_kwargs=True))
    if adapter.mrope:

        def on_language_model(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            cache = kwargs.get("past_key_values")
            if isinstance(cache, PackedCache):
                cache._set_mrope_positions(kwargs.get("position_ids"))

        handles.append(adapter.language_model.register_forward_pre_hook(on_language_model, with_kwargs=True))
    for idx, attn in enumerate(adapter.attention_modules):

        def on_attention(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], idx: int = idx) -> None:
            cache = kwargs.get("past_key_values")
            if not isinstance(cache, PackedCache):
                return
            if kwargs.get("position_ids") is not None:
                cache._positions[idx] = kwargs["position_ids"]
            if cache.planner is not None:
                cache.planner.note_attention(idx, module, args, kwargs)
            if cache.wants_query_moments:
                cache._note_queries(idx, module, args, kwargs)
            if cache.observes:
                cache._note_observation(idx, module, args, kwargs)

        handles.append(attn.register_forward_pre_hook(on_attention, with_kwargs=True))
    return handles
