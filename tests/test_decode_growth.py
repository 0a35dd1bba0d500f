"""The bound of what decoding can add to a PackedCache (cache/growth.py, `PackedCache.decode_bytes_bound`): never
below the bytes really held at any step, tighter than counting every decoded token exact once decode chunks are
compacted, and what serving reserves after a prefill (serve/accounting.py)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, build_model

from attentionpack import PackConfig, PackedCache
from attentionpack.codecs import nbytes_bound
from attentionpack.codecs.encode import encode_keys, encode_values
from attentionpack.parts import storage_nbytes
from attentionpack.serve.accounting import KVAccounting

CONFIGS = {
    "budget": dict(budget=0.4, window=16, chunk=32),
    "budget-chunk64": dict(budget=0.4, window=16, chunk=64),
    "lowrank": dict(window=16, chunk=32),
    "quant": dict(key_codec="quant", key_bits=4, value_codec="quant", value_bits=2, window=16, chunk=32),
    "lossless": dict(key_codec="exact", value_codec="exact", window=16, chunk=32),
}


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
@pytest.mark.parametrize("config", list(CONFIGS))
@torch.inference_mode()
def test_bytes_held_never_exceed_the_bound(name, config, batch):
    model = build_model(name)
    cfg = PackConfig(**CONFIGS[config])
    ids = torch.randint(0, VOCAB, (batch, 300), generator=torch.Generator().manual_seed(1))
    cache = PackedCache(model, cfg)
    model(input_ids=ids[:, :200], past_key_values=cache, use_cache=True, logits_to_keep=1)
    steps = 100
    prefilled, bound = cache.nbytes(), cache.decode_bytes_bound(steps)
    assert bound is not None
    accounting = KVAccounting(model, cfg)
    reserved = accounting.after_prefill(cache, prefilled, steps)  # what serving reserves now
    held = []
    for i in range(200, 200 + steps):
        model(input_ids=ids[:, i : i + 1], past_key_values=cache, use_cache=True)
        held.append(cache.nbytes())
    assert max(held) <= bound
    if name == "llama":  # no sliding layer dropping tokens: the bound stays close (measured 14-36% above)
        assert bound - max(held) <= 0.5 * (bound - prefilled)
    if batch == 1:  # serving accounts per sequence
        every_token_exact = prefilled + accounting.growth(steps)
        assert reserved == min(bound, every_token_exact) and max(held) <= reserved
        if config == "quant":  # decode chunks compacted at their encodings' size: less than all exact
            assert bound < every_token_exact


@pytest.mark.parametrize(
    "fields",
    [
        dict(key_codec="quant", key_bits=4, value_codec="quant", value_bits=8),
        dict(key_codec="quant", key_bits=2, value_codec="quant", value_bits=4, quant_group=16),
        dict(key_codec="quant", key_bits=2, value_codec="quant", value_bits=4, key_group=24, value_group=8),
        dict(key_energy=0.999, value_energy=0.999),  # low-rank, keys before RoPE, float coefficients
        dict(key_bits=4, value_bits=4, key_pre_rope=False, key_energy=1.0, value_energy=1.0),
        dict(key_bits=4, value_bits=4, fallback_exact=False, key_energy=1.0, value_energy=1.0),
    ],
)
def test_codec_bound_covers_full_rank_encodings(fields):
    """Random states (full rank, so the energy rules keep every component): the encodings are never larger than
    `nbytes_bound`, which is reached for quantization (fixed by the shape)."""
    cfg = PackConfig(**fields)
    x = torch.randn(2, 3, 40, 16, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(2, 40, dtype=torch.bool)
    cos_sin = (torch.ones(2, 40, 16), torch.zeros(2, 40, 16))
    pos = torch.arange(40, dtype=torch.int32).expand(2, 40).contiguous()
    k = storage_nbytes(encode_keys(x, valid, cfg, cos_sin, pos).tensors())
    v = storage_nbytes(encode_values(x, valid, cfg).tensors())
    kb, vb = nbytes_bound(cfg, tuple(x.shape), x.dtype, True), nbytes_bound(cfg, tuple(x.shape), x.dtype, False)
    assert k <= kb and v <= vb
    if cfg.key_codec == "quant":
        assert (k, v) == (kb, vb)
        keys, values = encode_keys(x, valid, cfg, cos_sin, pos), encode_values(x, valid, cfg)
        # each tensor in its own groups (`key_group` / `value_group`), quant_group where unset
        assert (keys.q.group_size, values.q.group_size) == (cfg.group(True), min(cfg.group(False), 16))


def test_razor_has_no_tighter_bound(cache_root):
    model = build_model("llama")
    cache = PackedCache(model, PackConfig(key_codec="exact", value_codec="exact", retrieval_heads=0.5, window=16))
    ids = torch.randint(0, VOCAB, (1, 120), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    assert cache.decode_bytes_bound(10) is None
    accounting = KVAccounting(model, PackConfig(retrieval_heads=0.5))
    assert accounting.after_prefill(cache, 1000, 10) == 1000 + accounting.growth(10)
