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
# Vision-language models: model_type -> human name. Their language model must be one of the text types above or
# one of VLM_TEXT_MODEL_TYPES (text decoders that only exist inside a VLM).
SUPPORTED_VLM_TYPES = {
    "llava": "LLaVA-1.5 style (LlavaForConditionalGeneration)",
    "qwen2_vl": "Qwen2-VL",
    "qwen2_5_vl": "Qwen2.5-VL",
    "idefics3": "Idefics3 / SmolVLM",
}
VLM_TEXT_MODEL_TYPES = {"qwen2_vl_text", "qwen2_5_vl_text"}


class UnsupportedModelError(ValueError):
    """The model's architecture is not one AttentionPack knows how to compress."""


def supported_list() -> str:
    return ", ".join(f"{k} ({v})" for k, v in {**SUPPORTED_MODEL_TYPES, **SUPPORTED_VLM_TYPES}.items())


def is_vlm_config(config) -> bool:
    return getattr(config, "model_type", None) in SUPPORTED_VLM_TYPES


def check_supported(config) -> None:
    """Raise `UnsupportedModelError` naming the supported architectures if `config` is not one of them."""
    model_type = getattr(config, "model_type", None)
    if model_type in SUPPORTED_VLM_TYPES:
        text_type = getattr(getattr(config, "text_config", None), "model_type", None)
        if text_type in SUPPORTED_MODEL_TYPES or text_type in VLM_TEXT_MODEL_TYPES:
            return
        raise UnsupportedModelError(
            f"{SUPPORTED_VLM_TYPES[model_type]} with a {text_type!r} language model is not supported by "
            f"AttentionPack; its language model must be one of: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by AttentionPack. Supported: {supported_list()}."
        )


def language_model_of(model: nn.Module) -> nn.Module:
    """The decoder (with .layers and .rotary_emb) of a supported text model or VLM."""
    base = getattr(model, "model", model)
    if is_vlm_config(getattr(model, "config", None)):
        for name in ("language_model", "text_model"):  # LLaVA / Qwen2-VL; Idefics3
            if hasattr(base, name):
                return getattr(base, name)
    return base


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
        self.is_vlm = is_vlm_config(config)
        self.vlm_config = config if self.is_vlm else None
        config = config.text_config if self.is_vlm else config
        self.config = config
        base = language_model_of(model)
        self.language_model = base
        self.rotary = getattr(base, "rotary_emb", None)
        layers = getattr(base, "layers", None)
        if self.rotary is None or layers is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} lacks the expected .model.rotary_emb / .model.layers; "
                f"supported: {supported_list()}"
            )
        self.attention_modules = [layer.self_attn for layer in layers]
        self._rotary_takes_layer_type = "layer_type" in inspect.signature(self.rotary.forward).parameters
        # Qwen2-VL style multimodal RoPE: positions are (temporal, height, width) per token; the rotary module
        # mixes them into one (cos, sin) per token by frequency sections.
        self.mrope = getattr(self.rotary, "mrope_section", None) is not None

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
            for t, kw in zip(layer_types, layer_kwargs, strict=False)
        ]
        if any(t not in ("full_attention", "sliding_attention") for t in layer_types):
            raise UnsupportedModelError(f"layer types {sorted(set(layer_types))} are not supported (full/sliding only)")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @torch.no_grad()
    def rope(self, positions: torch.Tensor, layer_idx: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (B, T, d) for integer `positions` (B, T) — or (B, T, 3) for multimodal RoPE — exactly
        as the model computes them."""
        probe = torch.empty(0, dtype=dtype, device=positions.device)
        assert self.rotary is not None  # checked in __init__
        if self.mrope:
            if positions.dim() == 2:  # text-only positions: the same index on all three axes
                positions = positions.unsqueeze(-1).expand(*positions.shape, 3)
            return self.rotary(probe, positions.permute(2, 0, 1))
        if self._rotary_takes_layer_type:
            return self.rotary(probe, positions, self.layers[layer_idx].layer_type)
        return self.rotary(probe, positions)
