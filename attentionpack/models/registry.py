"""Which architectures AttentionPack supports, and the per-model facts the cache needs.

A `ModelAdapter` answers three questions for the cache: the shape of each layer's KV (heads, head dim, sliding
window), the attention modules to observe, and the rotary embedding (cos, sin) at any positions, computed by the
model's own rotary module so that undoing and redoing RoPE is exact.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

# model_type -> human name. Text decoders whose attention calls `past_key_values.update` with rotated keys and
# passes `position_ids` / `position_embeddings` to the attention module.
SUPPORTED_MODEL_TYPES = {
    "llama": "Llama (incl. SmolLM2)",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3",
    "mistral": "Mistral",
    "gemma3_text": "Gemma 3 (text)",
}


class UnsupportedModelError(ValueError):
    """The model's architecture is not one AttentionPack knows how to compress."""


def supported_list() -> str:
    return ", ".join(f"{k} ({v})" for k, v in SUPPORTED_MODEL_TYPES.items())


def check_supported(config) -> None:
    """Raise `UnsupportedModelError` naming the supported architectures if `config` is not one of them."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by AttentionPack. Supported: {supported_list()}."
        )


@dataclass
class LayerSpec:
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None  # None for full attention
    layer_type: str


class ModelAdapter:
    """Per-model facts for `PackedCache`, derived from a loaded supported model."""

    def __init__(self, model: nn.Module):
        config = getattr(model, "config", None)
        if config is None:
            raise UnsupportedModelError(f"{type(model).__name__} has no .config; pass a transformers model")
        check_supported(config)
        self.config = config
        base = getattr(model, "model", model)
        self.rotary = getattr(base, "rotary_emb", None)
        layers = getattr(base, "layers", None)
        if self.rotary is None or layers is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} lacks the expected .model.rotary_emb / .model.layers; "
                f"supported: {supported_list()}"
            )
        self.attention_modules = [layer.self_attn for layer in layers]
        self._rotary_takes_layer_type = "layer_type" in inspect.signature(self.rotary.forward).parameters

        from transformers.cache_utils import get_layer_types_and_kwargs

        layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.layers = [
            LayerSpec(
                num_kv_heads=config.num_key_value_heads,
                head_dim=head_dim,
                sliding_window=kw.get("sliding_window") if t in ("sliding_attention", "chunked_attention") else None,
                layer_type=t,
            )
            for t, kw in zip(layer_types, layer_kwargs)
        ]
        if any(t not in ("full_attention", "sliding_attention") for t in layer_types):
            raise UnsupportedModelError(f"layer types {sorted(set(layer_types))} are not supported (full/sliding only)")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @torch.no_grad()
    def rope(self, positions: torch.Tensor, layer_idx: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (B, T, d) for integer `positions` (B, T), exactly as the model computes them."""
        probe = torch.empty(0, dtype=dtype, device=positions.device)
        if self._rotary_takes_layer_type:
            return self.rotary(probe, positions, self.layers[layer_idx].layer_type)
        return self.rotary(probe, positions)
