"""Sliding-window layers keep only what a later query can see: a prefill's older tokens are dropped before
compaction (not compressed and kept), and a byte budget is a fraction of what DynamicCache keeps while decoding
(its sliding layers: their last W-1 tokens), not of the whole prompt it still holds right after a prefill."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_model, sliding_window_of
from transformers import DynamicCache

from attentionpack import PackConfig, PackedCache

SMALL = dict(window=8, chunk=16, min_span=4, key_max_rank_fraction=0.25, value_max_rank_fraction=0.25)


@pytest.mark.parametrize("name", ["qwen2_sliding", "mistral", "gemma3_text"])
@pytest.mark.parametrize(
    "config",
    [PackConfig.preset("max").replace(budget=None, **SMALL), PackConfig(budget=0.5, **SMALL)],
    ids=["fixed", "budget"],
)
def test_sliding_layers_hold_only_their_window(name, config):
    model = build_model(name)
    w = sliding_window_of(name)
    ids = torch.randint(3, 128, (1, 200), generator=torch.Generator().manual_seed(0))
    cache = PackedCache(model, config)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        for layer in cache.layers:
            if layer.is_sliding:  # nothing older than the last W-1 tokens, in segments or in the tail
                assert layer.first_index >= layer.total - (w - 1), (layer.layer_idx, layer.first_index, layer.total)
        steady = cache.dynamic_nbytes(steady=True)
        assert steady < cache.dynamic_nbytes()  # right after the prefill the stock cache still holds the prompt
        if config.budget is not None:
            assert cache.nbytes() <= config.budget * steady
        out = model(input_ids=torch.tensor([[5]]), past_key_values=cache, use_cache=True).logits
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["qwen2_sliding", "gemma3_text"])
def test_lossless_still_equals_dynamic_cache_past_the_window(name):
    model = build_model(name)
    ids = torch.randint(3, 128, (1, 120), generator=torch.Generator().manual_seed(1))
    caches = [PackedCache(model, "lossless"), DynamicCache(config=model.config)]
    with torch.no_grad():
        outs = [model(input_ids=ids, past_key_values=c, use_cache=True).logits for c in caches]
        for t in range(40):
            step = torch.tensor([[3 + t]])
            outs += [model(input_ids=step, past_key_values=c, use_cache=True).logits for c in caches]
    for a, b in zip(outs[::2], outs[1::2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
