"""Tiny random-weight causal LMs, one per architecture AttentionPack supports (plus one it does not).

All share the same shape: hidden 64, 4 query heads, 2 KV heads, head_dim 16, vocab 128, fp32, eval mode.
Sliding windows are kept small so that test prompts of 40-100 tokens run well past them.
"""

from __future__ import annotations

import torch

VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)

# Parametrization ids used throughout the tests (qwen2_sliding: layers 2-3 of 4 slide; mistral: all slide;
# gemma3_text: layers 0 and 2 slide).
MODEL_NAMES = ("llama", "qwen2", "qwen2_sliding", "qwen3", "mistral", "gemma3_text")


def _config(name: str):
    from transformers import (
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
    )

    if name == "llama":
        return LlamaConfig(**COMMON, num_hidden_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if name == "qwen2":
        return Qwen2Config(**COMMON, num_hidden_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if name == "qwen2_sliding":
        # Qwen2Config.__post_init__: sliding_window is kept only if use_sliding_window, and layer i is
        # "sliding_attention" iff i >= max_window_layers. 4 layers, max_window_layers=2 -> [full, full, slide, slide].
        cfg = Qwen2Config(
            **COMMON,
            num_hidden_layers=4,
            use_sliding_window=True,
            sliding_window=24,
            max_window_layers=2,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        assert cfg.layer_types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
        return cfg
    if name == "qwen3":
        return Qwen3Config(**COMMON, num_hidden_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if name == "mistral":
        # Mistral has no layer_types: every layer slides (inferred from sliding_window by transformers).
        return MistralConfig(
            **COMMON, num_hidden_layers=2, sliding_window=32, pad_token_id=0, bos_token_id=1, eos_token_id=2
        )
    if name == "gemma3_text":
        cfg = Gemma3TextConfig(
            **COMMON,
            num_hidden_layers=3,
            sliding_window=16,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        )
        return cfg
    raise KeyError(name)


def sliding_window_of(name: str) -> int | None:
    return {"qwen2_sliding": 24, "mistral": 32, "gemma3_text": 16}.get(name)


def build_model(name: str, seed: int = 0):
    """A tiny random causal LM for parametrization id `name` (see MODEL_NAMES)."""
    from transformers import (
        Gemma3ForCausalLM,
        LlamaForCausalLM,
        MistralForCausalLM,
        Qwen2ForCausalLM,
        Qwen3ForCausalLM,
    )

    classes = {
        "llama": LlamaForCausalLM,
        "qwen2": Qwen2ForCausalLM,
        "qwen2_sliding": Qwen2ForCausalLM,
        "qwen3": Qwen3ForCausalLM,
        "mistral": MistralForCausalLM,
        "gemma3_text": Gemma3ForCausalLM,
    }
    config = _config(name)
    torch.manual_seed(seed)
    model = classes[name](config).to(torch.float32)
    # The default init (std 0.02) makes near-uniform logits; a larger scale gives peaked, informative logits and
    # attention patterns so that any cache discrepancy shows up.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    model.eval()
    return model


def build_gpt2(seed: int = 0):
    """A tiny model of an architecture AttentionPack does not support."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    return GPT2LMHeadModel(cfg).eval()
