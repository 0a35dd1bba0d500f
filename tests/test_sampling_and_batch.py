"""Sampling with compressed caches, and the batch-reshaping operations generation strategies rely on."""

from __future__ import annotations

import pytest
import torch
from helpers import PAD, compressed_runs, dynamic_cache, greedy, padded_batch
from tiny_models import MODEL_NAMES

from attentionpack import PackConfig, PackedCache

# "max" with a small window, and its energy rule capped at rank 8 of 32: the random tiny models' K/V are nearly
# full-rank, so without the cap every span would fall back to exact storage and nothing would be compressed
SMALL = PackConfig.preset("max").replace(
    budget=None,  # the fixed codec settings: a 1/6.7 target cannot be met by these tiny models (sinks, metadata)
    window=8,
    chunk=16,
    min_span=4,
    key_max_rank_fraction=0.25,
    value_max_rank_fraction=0.25,
)
FULL_RANK = PackConfig(
    key_rank_fraction=1.0, value_rank_fraction=1.0, fallback_exact=False, window=8, chunk=16, min_span=4
)


def _sample(model, cache, ids, mask, new=40, seed=123, **kwargs):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            past_key_values=cache,
            do_sample=True,
            top_k=20,
            temperature=1.0,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=PAD,
            **kwargs,
        )


@pytest.mark.parametrize("config", ["max", SMALL], ids=["max", "max_small_window"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_sampling_runs_with_max_preset(tiny_model, name, config):
    model = tiny_model(name)
    ids, mask = padded_batch(100, pad=11, seed=6)
    cache = PackedCache(model, config)
    out = _sample(model, cache, ids, mask)
    assert out.shape == (2, 100 + 40)
    if config is SMALL:
        assert compressed_runs(cache)
    assert torch.equal(out[:, :100], ids)
    assert ((out[:, 100:] >= 0) & (out[:, 100:] < model.config.vocab_size)).all()
    # same seed, same result
    again = _sample(model, PackedCache(model, config), ids, mask)
    assert torch.equal(out, again)


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_sampling_num_return_sequences(tiny_model, name):
    model = tiny_model(name)
    ids, mask = padded_batch(100, pad=11, seed=7)
    cache = PackedCache(model, SMALL)
    out = _sample(model, cache, ids, mask, num_return_sequences=2)
    assert out.shape == (4, 140)
    assert compressed_runs(cache)
    assert torch.equal(out[:, :100], ids.repeat_interleave(2, dim=0))


@pytest.mark.parametrize("name", ["llama", "qwen2_sliding", "gemma3_text"])
def test_sampling_lossless_equals_dynamic_cache(tiny_model, name):
    """With the same seed, sampling through the lossless cache draws exactly the DynamicCache tokens."""
    model = tiny_model(name)
    ids, mask = padded_batch(80, pad=6, seed=8)
    ref = _sample(model, dynamic_cache(model), ids, mask, num_return_sequences=2)
    out = _sample(model, PackedCache(model, "lossless"), ids, mask, num_return_sequences=2)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("name", ["llama", "qwen2_sliding", "gemma3_text"])
def test_batch_repeat_interleave_and_select_match_dynamic_cache(tiny_model, name):
    """Prefill a batch of 2, repeat every row twice in the cache (as contrastive search / expansion do), decode,
    then select a subset of rows and decode again: must match a DynamicCache doing the same, at full rank."""
    model = tiny_model(name)
    ids, mask = padded_batch(60, pad=7, seed=9)
    results = []
    for cache in (dynamic_cache(model), PackedCache(model, FULL_RANK)):
        logits = []
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, past_key_values=cache)
            cache.batch_repeat_interleave(2)
            m = mask.repeat_interleave(2, dim=0)
            pos = (m.cumsum(-1) - 1).clamp_min(0)[:, -1:]
            tok = out.logits[:, -1:].argmax(-1).repeat_interleave(2, dim=0)
            tok[1::2] = (tok[1::2] + 1) % model.config.vocab_size  # make the copies diverge
            for _ in range(20):
                m = torch.cat([m, torch.ones_like(tok)], -1)
                pos = pos + 1
                out = model(input_ids=tok, attention_mask=m, position_ids=pos, past_key_values=cache)
                logits.append(out.logits[:, -1])
                tok = out.logits[:, -1:].argmax(-1)
            keep = torch.tensor([3, 0])
            cache.batch_select_indices(keep)
            m, pos, tok = m[keep], pos[keep], tok[keep]
            for _ in range(20):
                m = torch.cat([m, torch.ones_like(tok)], -1)
                pos = pos + 1
                out = model(input_ids=tok, attention_mask=m, position_ids=pos, past_key_values=cache)
                logits.append(torch.nn.functional.pad(out.logits[:, -1], (0, 0, 0, 2)))
                tok = out.logits[:, -1:].argmax(-1)
        results.append(torch.stack(logits))
        if isinstance(cache, PackedCache):
            kinds = {(r["kind"], r["keys"]["codec"]) for layer in cache.stats()["layers"] for r in layer["runs"]}
            assert ("span", "lowrank") in kinds or ("chunk", "lowrank") in kinds, kinds
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_beam_search_lossless_equals_dynamic_cache(tiny_model, name):
    """Beam search reorders the cache every step (reorder_cache / batch_select_indices)."""
    model = tiny_model(name)
    ids, mask = padded_batch(50, pad=5, seed=10)
    kwargs = dict(
        num_beams=3, do_sample=False, max_new_tokens=20, min_new_tokens=20, pad_token_id=PAD, early_stopping=False
    )
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, past_key_values=dynamic_cache(model), **kwargs)
        out = model.generate(
            input_ids=ids, attention_mask=mask, past_key_values=PackedCache(model, "lossless"), **kwargs
        )
    assert torch.equal(out, ref)


def test_greedy_with_max_preset_produces_compressed_runs(tiny_model):
    model = tiny_model("llama")
    ids, mask = padded_batch(100, pad=11, seed=11)
    cache = PackedCache(model, SMALL)
    out = greedy(model, cache, ids, mask, 40)
    assert out.sequences.shape == (2, 140)
    assert torch.isfinite(torch.stack(out.logits)).all()
    assert compressed_runs(cache)
    assert cache.nbytes() < cache.dynamic_nbytes()
