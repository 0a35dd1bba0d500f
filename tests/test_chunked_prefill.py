"""Chunked prefill (`generation.prefill_chunks`): a long prompt fed in chunks, each compacted before the next.

An exact cache must give the logits of a one-call prefill (chunks only change how the same causal attention is
split); a compressing cache holds its compressed bytes after every chunk, so the prefill never holds the prompt
at full size; the CLI's `--prefill-chunk` reaches it."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_model
from transformers import DynamicCache

from attentionpack import PackConfig, PackedCache
from attentionpack.generation import chunk_calls, prefill_chunks


def test_chunk_calls_leave_the_last_token_and_cover_the_rest():
    assert chunk_calls(0, 10, 4) == [(0, 4), (4, 8), (8, 9)]
    assert chunk_calls(3, 10, 4) == [(3, 7), (7, 9)]  # from what the cache already holds
    assert chunk_calls(0, 8, 8) == []  # fits in one call
    assert chunk_calls(0, 100, 0) == []  # 0: one call
    for start, total, chunk in ((0, 257, 64), (5, 1000, 100), (0, 65, 64)):
        calls = chunk_calls(start, total, chunk)
        assert calls[0][0] == start and calls[-1][1] == total - 1
        assert all(a[1] == b[0] for a, b in zip(calls, calls[1:], strict=False))
        assert all(0 < e - b <= chunk for b, e in calls)


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
@pytest.mark.parametrize("make", [lambda m: DynamicCache(config=m.config), lambda m: PackedCache(m, "lossless")])
def test_exact_caches_give_the_one_call_logits(name, make):
    model = build_model(name)
    ids = torch.randint(3, 128, (1, 150), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = model(input_ids=ids, past_key_values=make(model), use_cache=True).logits[0, -1]
        cache = make(model)
        calls = chunk_calls(0, ids.shape[1], 32)
        prefill_chunks(model, ids, cache, calls)
        assert cache.get_seq_length() == ids.shape[1] - 1
        last = model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).logits[0, -1]
    torch.testing.assert_close(last, whole, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config", ["max", PackConfig(budget=0.5)])
def test_compressing_cache_stays_compressed_between_chunks(config):
    model = build_model("llama")
    ids = torch.randint(3, 128, (1, 400), generator=torch.Generator().manual_seed(5))
    cache = PackedCache(model, config)
    held = []
    with torch.no_grad():
        for call in chunk_calls(0, ids.shape[1], 100):
            prefill_chunks(model, ids, cache, [call])
            held.append((cache.nbytes(), cache.dynamic_nbytes()))
        logits = model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).logits
    assert torch.isfinite(logits).all()
    assert all(h < d for h, d in held[1:]), held  # every chunk after the first leaves the cache compressed
    if isinstance(config, PackConfig):
        assert all(h <= 0.5 * d for h, d in held[1:]), held  # the budget holds after every chunk


def test_cli_prefill_chunk_option_is_validated():
    from typer.testing import CliRunner

    from attentionpack.cli import app

    result = CliRunner().invoke(app, ["generate", "-f", "-", "--prefill-chunk", "-1"], input="hi")
    assert result.exit_code == 2
    assert "prefill-chunk" in result.output
