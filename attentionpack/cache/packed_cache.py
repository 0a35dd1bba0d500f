"""`PackedCache`: a transformers `Cache` that stores the KV cache compacted (see `PackedLayer`).

Use it like any cache: `model.generate(**inputs, past_key_values=PackedCache(model, "balanced"))`, or pass it to
`model(...)` in a manual decoding loop. Two forward pre-hooks (installed once per model, inert for other caches)
tell the cache each call's padding mask and token positions, which it needs to keep sinks per sample, to leave
padding out of the factorization, and to undo/redo RoPE exactly.
"""
from __future__ import annotations

from typing import Sequence

import torch
from transformers.cache_utils import Cache

from ..attention.packed import enable as enable_packed_attention
from ..config import PackConfig
from ..models.registry import ModelAdapter
from .layer import PackedLayer, StepContext
from .memory import storage_nbytes

_HOOKED = "_attentionpack_hooks"


class PackedCache(Cache):
    """A compressed KV cache for a supported transformers model.

    Args:
        model: the model this cache will serve (its config decides layers, heads and RoPE).
        config: a `PackConfig`, a preset name ("lossless", "balanced", "max"), or None for "balanced".
        span_boundaries: cache indices where a new prompt span (own low-rank basis) starts, e.g. the end of the
            system prompt and of the document. Default: the whole prompt after the sinks is one span.
    """

    def __init__(self, model, config: PackConfig | str | None = None, span_boundaries: Sequence[int] = ()):
        if config is None:
            config = PackConfig.preset("balanced")
        elif isinstance(config, str):
            config = PackConfig.preset(config)
        elif not isinstance(config, PackConfig):
            raise TypeError(f"config must be a PackConfig or a preset name, not {type(config).__name__}")
        self.config = config
        self.adapter = ModelAdapter(model)
        super().__init__(layers=[PackedLayer(i, spec, config) for i, spec in enumerate(self.adapter.layers)])
        if config.compressed_attention and not config.is_lossless and enable_packed_attention(model):
            for layer in self.layers:
                layer.attend_packed = True
        self.set_spans(span_boundaries)
        _install_hooks(model, self.adapter)
        self._attention_mask: torch.Tensor | None = None  # 2D (B, kv) mask of the current call
        self._positions: dict[int, torch.Tensor] = {}  # layer -> (B, q) position ids of the current call
        self._rope_memo: dict = {}

    def set_spans(self, span_boundaries: Sequence[int]) -> None:
        """Set the cache indices where prompt spans start (each span gets its own basis); applies to the next prefill."""
        bounds = sorted(int(b) for b in span_boundaries)
        if any(b <= 0 for b in bounds):
            raise ValueError(f"span_boundaries={list(span_boundaries)} must be positive token indices")
        self.span_boundaries = tuple(bounds)

    # ---- the Cache interface ------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store this call's keys (B, H, q, d, rotated) and values, and return all keys/values to attend to."""
        if key_states.dtype != value_states.dtype or not key_states.dtype.is_floating_point:
            raise TypeError(f"keys/values must share a floating dtype, got {key_states.dtype} / {value_states.dtype}")
        ctx = StepContext(
            positions=self._step_positions(layer_idx, key_states),
            valid=self._step_valid(key_states),
            rope=lambda start, end, pos: self._rope(layer_idx, start, end, pos, key_states.dtype),
            span_boundaries=self.span_boundaries,
        )
        out = self.layers[layer_idx].update(key_states, value_states, ctx)
        if layer_idx == len(self.layers) - 1:  # end of the forward call: drop per-call state
            self._rope_memo.clear()
            self._positions.clear()
        return out

    # ---- accounting -----------------------------------------------------------------------------------------
    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds."""
        return [t for layer in self.layers for t in layer.tensors()]

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (each storage counted once, whole)."""
        return storage_nbytes(self.tensors())

    def dynamic_nbytes(self) -> int:
        """Bytes a transformers DynamicCache would hold for the same tokens."""
        return sum(layer.dynamic_equivalent_bytes() for layer in self.layers)

    def stats(self) -> dict:
        """Per layer and stored run: tokens, codec and rank of K and V, bytes; totals vs DynamicCache."""
        rows = [row for layer in self.layers for row in layer.stats()]
        held, dynamic = self.nbytes(), self.dynamic_nbytes()
        return {
            "config": self.config.name,
            "tokens": self.get_seq_length(),
            "bytes": held,
            "dynamic_bytes": dynamic,
            "ratio": dynamic / held if held else float("nan"),
            "layers": [
                {"layer": layer.layer_idx, "bytes": sum(r["bytes"] for r in rows if r["layer"] == layer.layer_idx),
                 "dynamic_bytes": layer.dynamic_equivalent_bytes(), "sliding": layer.is_sliding,
                 "runs": [r for r in rows if r["layer"] == layer.layer_idx]}
                for layer in self.layers
            ],
        }

    # ---- per-call context -----------------------------------------------------------------------------------
    def _begin_call(self, attention_mask: torch.Tensor | None) -> None:
        self._attention_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None

    def _step_positions(self, layer_idx: int, key_states: torch.Tensor) -> torch.Tensor:
        b, q = key_states.shape[0], key_states.shape[-2]
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

    def _rope(self, layer_idx: int, start: int, end: int, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin (B, T, d) for a stored run; shared by all layers of a RoPE group within one call."""
        group = self.adapter.layers[layer_idx].layer_type if self.adapter._rotary_takes_layer_type else "all"
        key = (group, start, end, positions.shape[0])
        if key not in self._rope_memo:
            self._rope_memo[key] = self.adapter.rope(positions.long(), layer_idx, dtype)
        return self._rope_memo[key]


def _install_hooks(model, adapter: ModelAdapter) -> None:
    """Forward pre-hooks that hand a PackedCache the 2D padding mask and each layer's position ids."""
    if getattr(model, _HOOKED, False):
        return
    base = getattr(model, "model", model)

    def on_model_call(module, args, kwargs):
        cache = kwargs.get("past_key_values")
        if isinstance(cache, PackedCache):
            cache._begin_call(kwargs.get("attention_mask"))

    base.register_forward_pre_hook(on_model_call, with_kwargs=True)
    for idx, attn in enumerate(adapter.attention_modules):
        def on_attention(module, args, kwargs, idx=idx):
            cache = kwargs.get("past_key_values")
            if isinstance(cache, PackedCache) and kwargs.get("position_ids") is not None:
                cache._positions[idx] = kwargs["position_ids"]

        attn.register_forward_pre_hook(on_attention, with_kwargs=True)
    setattr(model, _HOOKED, True)
