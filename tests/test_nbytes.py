"""Byte accounting: `nbytes()` is every storage the cache keeps alive, `dynamic_nbytes()` what DynamicCache keeps."""

from __future__ import annotations

import pytest
import torch
from helpers import dynamic_cache, dynamic_cache_bytes, padded_batch, storage_bytes, walk_tensors
from tiny_models import MODEL_NAMES

from attentionpack import PackConfig, PackedCache

CONFIGS = {
    "max": "max",
    # random tiny models have nearly full-rank K/V: fix the rank so that spans and chunks really are factored
    "lowrank_small_window": PackConfig(window=8, chunk=16, min_span=4, key_rank=6, value_rank=6),
    "lossless": "lossless",
    "quant": PackConfig(
        key_codec="quant",
        key_bits=4,
        value_codec="quant",
        value_bits=2,
        key_energy=None,
        value_energy=None,
        quant_group=8,
        window=8,
        chunk=16,
        min_span=4,
    ),
    "lowrank_quant": PackConfig(
        key_rank=6, value_rank=6, key_bits=4, value_bits=8, quant_group=8, window=8, chunk=16, min_span=4
    ),
}


def _prefill_and_decode(model, cache, prompt_len=90, pad=6, steps=20):
    """Prefill then `steps` greedy single-token calls; yields after the prefill and after the last step."""
    ids, mask = padded_batch(prompt_len, pad=pad, seed=12)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        yield "prefill"
        for _ in range(steps):
            tok = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(tok)], -1)
            out = model(input_ids=tok, attention_mask=mask, past_key_values=cache)
        yield "decode"


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("name", ["llama", "qwen2_sliding", "mistral", "gemma3_text"])
def test_nbytes_equals_independent_walk(tiny_model, name, config):
    model = tiny_model(name)
    cache = PackedCache(model, CONFIGS[config])
    for phase in _prefill_and_decode(model, cache):
        walked = walk_tensors(cache.layers)
        assert walked, "the walk found no tensors"
        assert cache.nbytes() == storage_bytes(walked), phase
        assert cache.stats()["bytes"] == cache.nbytes()
    # the walk went through encoded parts, not only exact tensors
    expected_codec = {"lowrank_small_window": "lowrank", "quant": "quant", "lowrank_quant": "lowrank_quant"}
    if config in expected_codec:
        codecs = {r["keys"]["codec"] for layer in cache.stats()["layers"] for r in layer["runs"]}
        assert expected_codec[config] in codecs, codecs


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_lossless_nbytes_equals_dynamic_cache_storage(tiny_model, name):
    model = tiny_model(name)
    packed, ref = PackedCache(model, "lossless"), dynamic_cache(model)
    for phase, _ in zip(_prefill_and_decode(model, packed), _prefill_and_decode(model, ref)):
        assert packed.nbytes() == dynamic_cache_bytes(ref), phase


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_dynamic_nbytes_equals_dynamic_cache_storage(tiny_model, name):
    """`dynamic_nbytes()` ("bytes a transformers DynamicCache would hold for the same tokens") must agree with a
    real DynamicCache fed the same calls, measured the same way `nbytes()` measures (whole storages)."""
    model = tiny_model(name)
    for config in ("lossless", CONFIGS["lowrank_small_window"]):
        packed, ref = PackedCache(model, config), dynamic_cache(model)
        for phase, _ in zip(_prefill_and_decode(model, packed), _prefill_and_decode(model, ref)):
            assert packed.dynamic_nbytes() == dynamic_cache_bytes(ref), (config, phase)
            assert packed.stats()["dynamic_bytes"] == dynamic_cache_bytes(ref)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_lossless_ratio_is_one(tiny_model, name):
    model = tiny_model(name)
    cache = PackedCache(model, "lossless")
    for _ in _prefill_and_decode(model, cache):
        assert cache.stats()["ratio"] == 1.0


def test_per_layer_and_per_run_bytes_add_up(tiny_model):
    model = tiny_model("qwen2_sliding")
    cache = PackedCache(model, CONFIGS["lowrank_small_window"])
    for _ in _prefill_and_decode(model, cache):
        stats = cache.stats()
        assert sum(layer["bytes"] for layer in stats["layers"]) == stats["bytes"] == cache.nbytes()
        assert sum(layer["dynamic_bytes"] for layer in stats["layers"]) == stats["dynamic_bytes"]
        assert stats["tokens"] == cache.get_seq_length()


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_nbytes_is_recounted_whenever_the_segments_change(tiny_model, name):
    """`nbytes()` walks the segments again only when a layer's decode plan changed: it must equal an independent
    walk after every decoding step (chunks frozen; sliding layers dropping what they no longer see), after a
    segment's parts are replaced, and for a deep copy."""
    import copy

    from attentionpack.parts import ExactPart

    model = tiny_model(name)
    cache = PackedCache(model, CONFIGS["lowrank_quant"])
    ids, mask = padded_batch(90, pad=6, seed=12)
    counts = set()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        for step in range(40):
            assert cache.nbytes() == storage_bytes(walk_tensors(cache.layers)), step
            counts.add(sum(len(layer.segments) for layer in cache.layers))
            tok = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(tok)], -1)
            out = model(input_ids=tok, attention_mask=mask, past_key_values=cache)
    assert len(counts) > 1  # chunks were frozen on the way
    before = cache.nbytes()
    layer = next(layer for layer in cache.layers if layer.segments)
    seg = layer.segments[-1]
    values = seg.values.materialize(seg.start, seg.end, None)  # (B, H, T, d)
    layer.replace_parts(seg, ExactPart(values.clone()), ExactPart(values.clone()))
    assert cache.nbytes() == storage_bytes(walk_tensors(cache.layers)) != before
    twin = copy.deepcopy(cache)
    assert twin.nbytes() == storage_bytes(walk_tensors(twin.layers)) == cache.nbytes()
