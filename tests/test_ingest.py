"""`PackedCache.ingest`: a cache derived from a DynamicCache prefill equals one prefilled through itself."""

from __future__ import annotations

import pytest
import torch
from helpers import padded_batch
from transformers import DynamicCache

from attentionpack import PackConfig, PackedCache

CONFIG = PackConfig(
    sink=4,
    window=8,
    chunk=16,
    min_span=4,
    key_energy=0.9,
    value_codec="quant",
    value_bits=4,
    key_bits=8,
    key_pre_rope=False,
)


@pytest.mark.parametrize("config", [CONFIG, CONFIG.replace(key_pre_rope=True), "lossless"])
def test_ingest_equals_own_prefill(tiny_model, config):
    tiny_model = tiny_model("llama")
    ids, _ = padded_batch(50, pad=0, seed=3, batch=1)
    with torch.no_grad():
        direct = PackedCache(tiny_model, config)
        tiny_model(input_ids=ids, past_key_values=direct)
        dyn = DynamicCache()
        tiny_model(input_ids=ids, past_key_values=dyn)
        before = [layer.keys.clone() for layer in dyn.layers]
        derived = PackedCache(tiny_model, config).ingest(dyn)
        assert all(torch.equal(a, layer.keys) for a, layer in zip(before, dyn.layers))  # source untouched
        assert derived.nbytes() == direct.nbytes() and derived.get_seq_length() == direct.get_seq_length()
        tok = ids[:, -1:]
        for _ in range(20):  # decode through both; the logits must be identical
            a = tiny_model(input_ids=tok, past_key_values=direct).logits[:, -1]
            b = tiny_model(input_ids=tok, past_key_values=derived).logits[:, -1]
            assert torch.equal(a, b)
            tok = a.argmax(-1, keepdim=True)


def test_ingest_rejects_a_filled_cache(tiny_model):
    tiny_model = tiny_model("llama")
    ids, _ = padded_batch(20, pad=0, seed=3, batch=1)
    with torch.no_grad():
        dyn = DynamicCache()
        tiny_model(input_ids=ids, past_key_values=dyn)
        cache = PackedCache(tiny_model, CONFIG).ingest(dyn)
        with pytest.raises(ValueError, match="empty cache"):
            cache.ingest(dyn)
