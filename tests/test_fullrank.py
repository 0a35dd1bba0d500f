"""Low-rank compaction at full rank must reproduce DynamicCache up to floating-point round-off.

With key/value rank fraction 1.0 the factors span the whole H*d space, so the only differences come from
(1) the factorization: the basis comes from a float64 eigendecomposition of the Gram matrix and is cast to fp32,
    coefficients are computed in float64 and cast to fp32, and the product coeffs @ basis is evaluated in fp32
    (relative error ~ a few fp32 ulps, ~1e-7..1e-6 of the key/value norm);
(2) undoing and redoing RoPE in fp32 (~1 ulp each).
These perturb attention scores by ~1e-6 relative, which reaches the logits (magnitude ~1-5 for these tiny models)
at ~1e-6..1e-5 absolute: measured max |diff| over all architectures was 6.4e-6 (64 greedy steps, batch 2).
ATOL = 1e-4 leaves >10x margin while still being ~1000x smaller than any real compression error would cause.
"""

from __future__ import annotations

import pytest
import torch
from helpers import CacheRecorder, dynamic_cache, greedy, manual_decode, padded_batch
from tiny_models import MODEL_NAMES

from attentionpack import PackConfig, PackedCache

ATOL = 1e-4
FULL_RANK = PackConfig(
    key_rank_fraction=1.0, value_rank_fraction=1.0, fallback_exact=False, window=8, chunk=16, min_span=4
)
PROMPT_LEN, PAD, NEW = 70, 9, 64


def _lowrank_kinds(runs):
    return {run["kind"] for run in runs if run["keys"]["codec"] == "lowrank" and run["values"]["codec"] == "lowrank"}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_full_rank_generate_matches_dynamic_cache(tiny_model, name):
    model = tiny_model(name)
    ids, mask = padded_batch(PROMPT_LEN, pad=PAD, seed=4)
    ref = greedy(model, dynamic_cache(model), ids, mask, NEW)
    cache = PackedCache(model, FULL_RANK)
    recorder = CacheRecorder(cache)
    out = greedy(model, cache, ids, mask, NEW, recorder=recorder)

    # not vacuous: prompt spans and decode chunks really were stored as low-rank factors (full rank D = 32)
    runs = recorder.runs()
    assert {"span", "chunk"} <= _lowrank_kinds(runs), sorted({(r["kind"], r["keys"]["codec"]) for r in runs})
    dim = model.config.num_key_value_heads * model.config.head_dim
    assert all(r["keys"]["rank"] == dim and r["values"]["rank"] == dim for r in runs if r["keys"]["codec"] == "lowrank")
    # full-attention layers still hold them at the end
    final = cache.stats()["layers"]
    for layer in final:
        if not layer["sliding"]:
            assert {"span", "chunk"} <= _lowrank_kinds(layer["runs"]), layer

    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=0, atol=ATOL)
    assert torch.equal(out.sequences, ref.sequences)


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_full_rank_manual_loop_matches_dynamic_cache(tiny_model, name):
    model = tiny_model(name)
    ids, mask = padded_batch(PROMPT_LEN, pad=PAD, seed=5)
    ref_logits, ref_tokens = manual_decode(model, dynamic_cache(model), ids, mask, steps=40, explicit_positions=True)
    cache = PackedCache(model, FULL_RANK, span_boundaries=(30, 50))
    logits, tokens = manual_decode(model, cache, ids, mask, steps=40, explicit_positions=True)
    assert {"chunk"} <= _lowrank_kinds([r for layer in cache.stats()["layers"] for r in layer["runs"]])
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=ATOL)
    assert torch.equal(tokens, ref_tokens)
