"""A compressed cache is never larger than DynamicCache for the same tokens: short prompts stay exact and the exact
tail holds neither spare slots nor position/padding arrays that compression has not paid for."""

from __future__ import annotations

import pytest
import torch
from helpers import PAD, dynamic_cache, dynamic_cache_bytes, padded_batch, storage_bytes, walk_tensors
from transformers import LogitsProcessor, LogitsProcessorList

from attentionpack import PackConfig, PackedCache


class BytesRecorder(LogitsProcessor):
    """Records (bytes held, DynamicCache bytes for the same tokens) after every forward call of `generate`."""

    def __init__(self, cache):
        self.cache, self.rows = cache, []

    def __call__(self, input_ids, scores):
        self.rows.append((self.cache.get_seq_length(), self.cache.nbytes(), self.cache.dynamic_nbytes()))
        return scores


def _generate(model, cache, ids, mask, new: int, recorder=None):
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            past_key_values=cache,
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=PAD,
            logits_processor=LogitsProcessorList([recorder] if recorder else []),
        )


CONFIGS = {"balanced": "balanced", "max": "max", "budget_half": PackConfig(budget=0.5, window=8, min_span=8, sink=2)}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("prompt", [1, 5, 17, 42, 70, 101])
def test_never_larger_than_dynamic_cache(tiny_model, config, batch, prompt):
    model = tiny_model("llama")
    pad = min(3, prompt - 1) if batch == 2 else 0
    ids, mask = padded_batch(prompt, pad=pad, seed=prompt, batch=batch)
    cache = PackedCache(model, CONFIGS[config])
    recorder = BytesRecorder(cache)
    try:
        _generate(model, cache, ids, mask, 20, recorder)
    except ValueError as err:  # a budget too small for a tiny prompt says so; other configs never raise
        assert config.startswith("budget") and "infeasible" in str(err)
        return
    for tokens, held, dynamic in recorder.rows:
        assert held <= dynamic, f"{held:,} bytes held vs {dynamic:,} for DynamicCache after {tokens} tokens"
    # the accounting itself: every tensor the cache keeps alive, and a real DynamicCache after the same tokens
    ref = dynamic_cache(model)
    _generate(model, ref, ids, mask, 20)
    if cache.planner is None:  # (a budget's planner links back to the model's modules: the walk stops there)
        assert storage_bytes(walk_tensors(cache.layers)) == cache.nbytes()
    assert cache.nbytes() <= dynamic_cache_bytes(ref) == cache.dynamic_nbytes()


@pytest.mark.parametrize("prompt", [5, 42])
def test_short_prompt_is_exactly_dynamic_cache_bytes(tiny_model, prompt):
    """Nothing compressed yet: the same bytes as DynamicCache, not a byte more (no spare slots, no flags); half of
    them once the budget's tail holds them in float16 (`tail_dtype`, the preset's default)."""
    model = tiny_model("llama")
    ids, mask = padded_batch(prompt, pad=2, seed=1, batch=2)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)  # as `generate` computes them for a left-padded batch
    for config, share in ((PackConfig.preset("max").replace(tail_dtype="model"), 1), (PackConfig.preset("max"), 2)):
        cache = PackedCache(model, config)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache)
        assert cache.nbytes() * share == cache.dynamic_nbytes()


def test_irregular_positions_fall_back_to_stored_flags(tiny_model):
    """Positions that break the left-padding rule (here: explicit positions that skip a step) are stored and
    still used: the cache matches one that is given the same positions throughout."""
    model = tiny_model("llama")
    ids, mask = padded_batch(120, pad=0, seed=3, batch=1)
    pos = torch.arange(120)[None]
    pos[:, 60:] += 5  # a jump: not index - pad
    cache = PackedCache(model, PackConfig(window=8, min_span=8, key_rank=6, value_rank=6))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache)
    layer = cache.layers[0]
    assert layer.tail.pad is None and layer.tail.positions is not None
    stored = [s.keys.positions for s in layer.segments if getattr(s.keys, "positions", None) is not None]
    assert stored and torch.equal(torch.cat([p for p in stored], dim=1)[0, -5:], pos[0, 107:112].to(torch.int32))


def test_size_wording_never_says_smaller_for_more_bytes():
    from attentionpack.generation import size_ratio

    assert size_ratio(2_219_040, 1_935_360) == "1.15x larger"
    assert size_ratio(1_935_360, 1_935_360) == "same size"
    assert size_ratio(483_840, 1_935_360) == "4.00x smaller"
    assert size_ratio(0, 10) == "-"
