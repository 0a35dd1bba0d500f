"""Multi-token calls over a compressed layer (a prompt prefilled in chunks, a second turn) attend on the segments'
rebuilt states with one SDPA call ("dense" path): the logits equal the per-part path's (each segment scored in its
own form) on every tiny architecture, with left padding in a batch, for low-rank, pre-RoPE and quantized forms."""

from __future__ import annotations

import pytest
import tiny_models
import torch

from attentionpack import PackConfig, PackedCache
from attentionpack.attention import packed

SMALL = dict(window=16, chunk=16, min_span=8, sink=2)
CONFIGS = {
    "max": PackConfig.preset("max").replace(budget=None, **SMALL),
    "pre_rope": PackConfig(**SMALL),
    "quant": PackConfig(key_codec="quant", key_bits=4, value_codec="quant", value_bits=2, **SMALL).replace(
        key_energy=None, value_energy=None
    ),
}


def _logits(model, config, ids, mask, dense: bool, monkeypatch) -> tuple[torch.Tensor, dict]:
    monkeypatch.setattr(packed, "DENSE_MIN_QUERIES", 16 if dense else 10**9)
    cache = PackedCache(model, config)
    with torch.no_grad():
        model(input_ids=ids[:, :90], attention_mask=mask[:, :90], past_key_values=cache)
        out = model(input_ids=ids[:, 90:], attention_mask=mask, past_key_values=cache).logits
    return out, cache.stats()["attention_paths"]


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", tiny_models.MODEL_NAMES)
def test_dense_path_equals_the_per_part_path(name, config, monkeypatch):
    model = tiny_models.build_model(name)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, tiny_models.VOCAB, (2, 130), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding in the second row
    dense, dense_paths = _logits(model, CONFIGS[config], ids, mask, True, monkeypatch)
    per_part, part_paths = _logits(model, CONFIGS[config], ids, mask, False, monkeypatch)
    assert dense_paths.get("dense", 0) > 0 and "dense" not in part_paths
    torch.testing.assert_close(dense, per_part, atol=2e-4, rtol=1e-4)
