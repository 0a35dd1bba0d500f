"""Other ways caches get used: extreme compaction settings, multi-turn reuse, assisted decoding (crop), beams, bf16."""

from __future__ import annotations

import pytest
import torch
from helpers import PAD, dynamic_cache, greedy, padded_batch
from tiny_models import MODEL_NAMES

from attentionpack import PackConfig, PackedCache

ATOL = 1e-4  # full-rank round-off, see test_fullrank.py


def _full_rank(**kw):
    return PackConfig(key_rank_fraction=1.0, value_rank_fraction=1.0, fallback_exact=False, **kw)


EXTREME = {  # (sink, window, chunk, min_span)
    "everything_compressed": dict(sink=0, window=0, chunk=1, min_span=1),
    "tiny_window": dict(sink=0, window=1, chunk=3, min_span=1),
    "spans_never_long_enough": dict(sink=1, window=5, chunk=3, min_span=100),
    "no_window": dict(sink=4, window=0, chunk=16, min_span=4),
    "odd_sizes": dict(sink=2, window=3, chunk=7, min_span=2),
}


@pytest.mark.parametrize("setting", list(EXTREME), ids=list(EXTREME))
@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
@pytest.mark.parametrize("prompt,pad", [(10, 3), (40, 9)], ids=["short_prompt", "long_prompt"])
def test_extreme_compaction_settings_at_full_rank(tiny_model, name, setting, prompt, pad):
    model = tiny_model(name)
    ids, mask = padded_batch(prompt, pad=pad, seed=prompt)
    ref = greedy(model, dynamic_cache(model), ids, mask, 30)
    out = greedy(model, PackedCache(model, _full_rank(**EXTREME[setting])), ids, mask, 30)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=0, atol=ATOL)
    assert torch.equal(out.sequences, ref.sequences)


@pytest.mark.parametrize("config", ["lossless", "full_rank"])
@pytest.mark.parametrize("name", ["llama", "qwen2_sliding", "gemma3_text"])
def test_multi_turn_reuse_of_the_cache(tiny_model, name, config):
    """A second generate() on the same cache continues the conversation (its new prompt is a multi-token call)."""
    model = tiny_model(name)
    cfg = "lossless" if config == "lossless" else _full_rank(window=8, chunk=16, min_span=4)
    ids, mask = padded_batch(40, pad=5, seed=16)
    follow_up = torch.randint(3, 128, (2, 15), generator=torch.Generator().manual_seed(17))
    results = []
    for cache in (dynamic_cache(model), PackedCache(model, cfg)):
        first = greedy(model, cache, ids, mask, 20)
        ids2 = torch.cat([first.sequences, follow_up], -1)
        mask2 = torch.cat([mask, torch.ones(2, ids2.shape[1] - mask.shape[1], dtype=torch.long)], -1)
        results.append((first, greedy(model, cache, ids2, mask2, 20)))
    (ref1, ref2), (out1, out2) = results
    for ref, out in ((ref1, out1), (ref2, out2)):
        torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=0, atol=ATOL)
        assert torch.equal(out.sequences, ref.sequences)


def test_reset_makes_the_cache_reusable(tiny_model):
    model = tiny_model("gemma3_text")
    config = _full_rank(window=8, chunk=16, min_span=4)
    ids, mask = padded_batch(50, pad=6, seed=18)
    cache = PackedCache(model, config)
    greedy(model, cache, *padded_batch(30, pad=2, seed=19), 10)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0
    out = greedy(model, cache, ids, mask, 20)
    fresh_cache = PackedCache(model, config)
    fresh = greedy(model, fresh_cache, ids, mask, 20)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(fresh.logits), rtol=0, atol=0)
    assert cache.stats() == fresh_cache.stats()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_prompt_lookup_decoding_lossless_equals_greedy(tiny_model, name):
    """Assisted (prompt-lookup) decoding verifies several candidate tokens per call and crop()s the rejected ones.
    Greedy assisted decoding must give exactly plain greedy decoding, as it does with DynamicCache."""
    model = tiny_model(name)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12] * 6])  # repetitive, so the lookup proposes candidates

    def run(cache, **kwargs):
        with torch.no_grad():
            return model.generate(
                input_ids=ids,
                past_key_values=cache,
                do_sample=False,
                max_new_tokens=40,
                min_new_tokens=40,
                pad_token_id=PAD,
                **kwargs,
            )

    plain = run(dynamic_cache(model))
    assert torch.equal(run(dynamic_cache(model), prompt_lookup_num_tokens=4), plain)  # the reference behaviour
    assert torch.equal(run(PackedCache(model, "lossless")), plain)
    assert torch.equal(run(PackedCache(model, "lossless"), prompt_lookup_num_tokens=4), plain)


def test_prompt_lookup_decoding_full_rank_equals_greedy(tiny_model):
    model = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12] * 6])
    with torch.no_grad():
        plain = model.generate(
            input_ids=ids,
            past_key_values=dynamic_cache(model),
            do_sample=False,
            max_new_tokens=40,
            min_new_tokens=40,
            pad_token_id=PAD,
        )
        out = model.generate(
            input_ids=ids,
            past_key_values=PackedCache(model, _full_rank(window=8, chunk=16, min_span=4)),
            do_sample=False,
            max_new_tokens=40,
            min_new_tokens=40,
            pad_token_id=PAD,
            prompt_lookup_num_tokens=4,
        )
    assert torch.equal(out, plain)


@pytest.mark.parametrize("config", ["lossless", "full_rank"])
@pytest.mark.parametrize("name", ["llama", "qwen2_sliding"])
def test_manual_crop_matches_dynamic_cache(tiny_model, name, config):
    """crop(-n) of tokens still in the exact window, then continue: same logits as DynamicCache. This is the
    protocol of assisted decoding: activate_past_recording(), a multi-token verify call, crop the rejected ones."""
    model = tiny_model(name)
    cfg = "lossless" if config == "lossless" else _full_rank(window=8, chunk=16, min_span=4)
    ids, mask = padded_batch(40, pad=0, seed=20, batch=1)
    results = []
    for cache in (dynamic_cache(model), PackedCache(model, cfg)):
        if hasattr(cache, "activate_past_recording"):
            cache.activate_past_recording()  # as assisted decoding does; lets sliding layers roll back
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache)
            model(input_ids=torch.tensor([[3, 4, 5]]), past_key_values=cache)
            cache.crop(-2)
            out = model(input_ids=torch.tensor([[7, 8]]), past_key_values=cache)
        assert cache.get_seq_length() == 43
        results.append(out.logits)
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=ATOL)


def test_crop_of_compressed_tokens_is_refused(tiny_model):
    model = tiny_model("llama")
    cache = PackedCache(model, _full_rank(window=8, chunk=16, min_span=4))
    with torch.no_grad():
        model(input_ids=torch.randint(3, 128, (1, 40)), past_key_values=cache)
    with pytest.raises(ValueError, match="compressed"):
        cache.crop(-9)
    with pytest.raises(ValueError):
        cache.layers[0].crop(3)


@pytest.mark.parametrize("config", ["lossless", "full_rank"])
@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_beam_search_matches_dynamic_cache(tiny_model, name, config):
    """Beam search reorders the cache rows every step."""
    model = tiny_model(name)
    cfg = "lossless" if config == "lossless" else _full_rank(window=8, chunk=16, min_span=4)
    ids, mask = padded_batch(50, pad=5, seed=10)
    kwargs = dict(
        num_beams=3,
        do_sample=False,
        max_new_tokens=30,
        min_new_tokens=30,
        pad_token_id=PAD,
        early_stopping=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, past_key_values=dynamic_cache(model), **kwargs)
        out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=PackedCache(model, cfg), **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", ["llama", "gemma3_text", "qwen2_sliding"])
def test_bfloat16_lossless_and_compressed(tiny_model, name):
    model = tiny_model(name)
    bf16 = type(model)(model.config).to(torch.bfloat16).eval()
    bf16.load_state_dict(model.state_dict())
    ids, mask = padded_batch(60, pad=7, seed=21)
    ref = greedy(bf16, dynamic_cache(bf16), ids, mask, 20)
    out = greedy(bf16, PackedCache(bf16, "lossless"), ids, mask, 20)
    assert torch.equal(torch.stack(out.logits), torch.stack(ref.logits))
    assert torch.equal(out.sequences, ref.sequences)
    cache = PackedCache(bf16, PackConfig(window=8, chunk=16, min_span=4, key_rank=8, value_rank=8))
    out = greedy(bf16, cache, ids, mask, 20)
    assert torch.isfinite(torch.stack(out.logits)).all()
    assert all(t.dtype in (torch.bfloat16, torch.int32, torch.bool) for t in cache.tensors())
    assert cache.nbytes() < cache.dynamic_nbytes()
