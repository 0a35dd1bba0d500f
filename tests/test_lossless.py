"""The "lossless" preset must reproduce transformers' DynamicCache: same logits (1e-5), same tokens."""

from __future__ import annotations

import pytest
import torch
from helpers import dynamic_cache, greedy, manual_decode, padded_batch
from tiny_models import MODEL_NAMES, sliding_window_of

from attentionpack import PackedCache

PROMPT_LEN = 70  # longer than every tiny model's sliding window (16, 24, 32), so window semantics are exercised
PAD = 9
NEW = 64


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_lossless_generate_matches_dynamic_cache(tiny_model, name):
    model = tiny_model(name)
    window = sliding_window_of(name)
    assert window is None or PROMPT_LEN - PAD > window
    ids, mask = padded_batch(PROMPT_LEN, pad=PAD, seed=1)

    ref = greedy(model, dynamic_cache(model), ids, mask, NEW)
    cache = PackedCache(model, "lossless")
    out = greedy(model, cache, ids, mask, NEW)

    ref_logits, logits = torch.stack(ref.logits), torch.stack(out.logits)
    assert logits.shape == (NEW, 2, model.config.vocab_size)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    assert torch.equal(out.sequences, ref.sequences)
    assert out.sequences.shape == (2, PROMPT_LEN + NEW)
    assert cache.get_seq_length() == PROMPT_LEN + NEW - 1


@pytest.mark.parametrize("explicit_positions", [False, True], ids=["default_positions", "padding_aware_positions"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_lossless_manual_loop_matches_dynamic_cache(tiny_model, name, explicit_positions):
    model = tiny_model(name)
    ids, mask = padded_batch(PROMPT_LEN, pad=PAD, seed=2)
    ref_logits, ref_tokens = manual_decode(
        model, dynamic_cache(model), ids, mask, steps=40, explicit_positions=explicit_positions
    )
    logits, tokens = manual_decode(
        model, PackedCache(model, "lossless"), ids, mask, steps=40, explicit_positions=explicit_positions
    )
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    assert torch.equal(tokens, ref_tokens)


def test_lossless_multi_chunk_prefill_matches_dynamic_cache(tiny_model):
    """A prompt fed in two multi-token calls (chunked prefill) before decoding."""
    model = tiny_model("qwen2_sliding")
    ids, mask = padded_batch(60, pad=5, seed=3)
    results = []
    for cache in (dynamic_cache(model), PackedCache(model, "lossless")):
        with torch.no_grad():
            first = model(input_ids=ids[:, :35], attention_mask=mask[:, :35], past_key_values=cache)
            second = model(input_ids=ids[:, 35:], attention_mask=mask, past_key_values=cache)
            nxt = second.logits[:, -1:].argmax(-1)
            third = model(
                input_ids=nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], -1), past_key_values=cache
            )
        results.append(torch.cat([first.logits, second.logits, third.logits], dim=1))
    # padded query rows attend to nothing and are undefined; compare the real rows only
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(results[1][1, 5:], results[0][1, 5:], rtol=0, atol=1e-5)
