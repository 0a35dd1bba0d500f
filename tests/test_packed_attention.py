"""Attention on the stored form (attention/packed.py) must equal attention on materialized keys/values.

Both paths read the same stored tensors; only the order of floating-point operations differs (scores per piece
and factored products instead of one SDPA call on rebuilt tensors), so logits agree to ~1e-6 (ATOL 1e-4 as in
test_fullrank.py). Covered: every codec (exact sinks and tail, pre- and post-RoPE low-rank keys, low-rank values
through their factors, quantized states, quantized factors), padding, sliding-window layers, multi-token calls on
a cache that already holds compressed segments, and sampling through `generate`.
"""

from __future__ import annotations

import pytest
import torch
from helpers import dynamic_cache, greedy, manual_decode, padded_batch
from tiny_models import MODEL_NAMES

from attentionpack import PackConfig, PackedCache
from attentionpack.attention import NAME, LayerView
from attentionpack.attention import packed as packed_attention

ATOL = 1e-4
SMALL = dict(window=8, chunk=16, min_span=4)
CONFIGS = {
    "lowrank_pre_rope": PackConfig(key_energy=0.9, value_energy=0.9, **SMALL),
    "lowrank_post_rope": PackConfig(key_energy=0.9, key_pre_rope=False, value_energy=0.9, **SMALL),
    "quant": PackConfig(
        key_codec="quant", key_bits=4, key_energy=None, value_codec="quant", value_bits=2, value_energy=None, **SMALL
    ),
    "balanced_small": PackConfig.preset("balanced").replace(**SMALL),
    "factors_4bit": PackConfig(key_energy=0.95, key_bits=4, value_energy=0.95, value_bits=8, **SMALL),
}


CONTINUOUS = ("lowrank_pre_rope", "lowrank_post_rope")  # no rounding step: whole runs agree to round-off


def _pair(model, config):
    return PackedCache(model, config), PackedCache(model, config.replace(compressed_attention=False))


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("config", CONTINUOUS)
def test_packed_attention_matches_materialized(tiny_model, name, config):
    """Whole decoding runs agree. (With quantized codecs a 1e-6 difference in an earlier layer can flip a rounding
    step when a chunk is compacted, so those are compared call by call below.)"""
    model = tiny_model(name)
    ids, mask = padded_batch(50, pad=7, seed=3)
    packed, plain = _pair(model, CONFIGS[config])
    assert model.config._attn_implementation == NAME
    got, got_tokens = manual_decode(model, packed, ids, mask, steps=40)
    ref, ref_tokens = manual_decode(model, plain, ids, mask, steps=40)
    assert torch.equal(got_tokens, ref_tokens)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    assert packed.nbytes() == plain.nbytes()


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_call_matches_sdpa_on_materialized_pieces(tiny_model, name, config, monkeypatch):
    """Each attention call on the stored form equals SDPA over the same pieces materialized (same mask)."""
    model = tiny_model(name)
    ids, mask = padded_batch(50, pad=7, seed=3)
    original, checked = packed_attention.attend, []

    def attend(view, query, attn_mask, scaling, softcap=None):
        out = original(view, query, attn_mask, scaling, softcap)
        k = torch.cat([p.keys.materialize(p.start, p.end, view.rope) for p in view.segments], dim=2)
        v = torch.cat([p.values.materialize(p.start, p.end, view.rope) for p in view.segments], dim=2)
        ref = torch.nn.functional.scaled_dot_product_attention(
            query,
            k,
            v,
            attn_mask=attn_mask,
            scale=scaling,
            enable_gqa=True,
            is_causal=attn_mask is None and query.shape[2] > 1,
        )
        torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-5, rtol=1e-5)
        checked.append(len(view.segments))
        return out

    monkeypatch.setattr(packed_attention, "attend", attend)
    manual_decode(model, PackedCache(model, CONFIGS[config]), ids, mask, steps=30)
    assert checked and max(checked) >= 3  # sinks, compressed runs and the tail were all seen


def test_update_returns_a_view_only_for_compressed_layers(tiny_model):
    model = tiny_model("qwen2_sliding")
    cache = PackedCache(model, CONFIGS["lowrank_pre_rope"])
    ids, mask = padded_batch(50, pad=0)
    seen = {}

    def spy(module, args, kwargs, output):
        seen[module.layer_idx] = output

    layer = cache.layers[0]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)  # prefill: exact SDPA, then compaction
        k = torch.zeros(2, layer.spec.num_kv_heads, 1, layer.spec.head_dim)
        out, _ = cache.update(k, k.clone(), 0)
    assert isinstance(out, LayerView) and layer.segments
    lossless = PackedCache(model, "lossless")
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=lossless)
    out, _ = lossless.update(k, k.clone(), 0)
    assert isinstance(out, torch.Tensor)


@pytest.mark.parametrize("config", CONTINUOUS)  # whole runs: quantized codecs would amplify round-off (see above)
def test_multi_token_calls_on_compressed_cache(tiny_model, config):
    """A second multi-token call (chunked prefill) attends causally within itself and to the compressed past."""
    model = tiny_model("llama")
    ids, mask = padded_batch(90, pad=5, seed=8)
    packed, plain = _pair(model, CONFIGS[config])
    outs = []
    for cache in (packed, plain):
        with torch.no_grad():
            a = model(input_ids=ids[:, :40], attention_mask=mask[:, :40], past_key_values=cache).logits
            b = model(input_ids=ids[:, 40:70], attention_mask=mask[:, :70], past_key_values=cache).logits
            c = model(input_ids=ids[:, 70:], attention_mask=mask, past_key_values=cache).logits
        outs.append(torch.cat([a, b, c], dim=1))
    assert any(s.kind == "chunk" or s.kind == "span" for s in packed.layers[0].segments)
    torch.testing.assert_close(outs[0], outs[1], atol=ATOL, rtol=0)


def test_sampling_through_generate(tiny_model):
    model = tiny_model("qwen3")
    ids, mask = padded_batch(60, pad=4, seed=2)
    outs = []
    for cache in _pair(model, CONFIGS["balanced_small"]):
        torch.manual_seed(5)
        with torch.no_grad():
            outs.append(
                model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    past_key_values=cache,
                    do_sample=True,
                    top_k=20,
                    max_new_tokens=30,
                    min_new_tokens=30,
                    pad_token_id=0,
                )
            )
    assert torch.equal(outs[0], outs[1])


def test_other_caches_keep_stock_sdpa(tiny_model):
    """Once the model runs "attentionpack", a DynamicCache must still give SDPA's results exactly."""
    model = tiny_model("mistral")
    PackedCache(model, "balanced")
    ids, mask = padded_batch(40, pad=3)
    got = greedy(model, dynamic_cache(model), ids, mask, 10)
    model.set_attn_implementation("sdpa")
    try:
        ref = greedy(model, dynamic_cache(model), ids, mask, 10)
    finally:
        model.set_attn_implementation(NAME)
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.logits, ref.logits):
        assert torch.equal(a, b)
