"""Where tokens end up: sinks, prompt spans, decode chunks and the exact recent window."""

from __future__ import annotations

import pytest
import torch
from helpers import PAD, padded_batch, runs_of, walk_tensors

from attentionpack import PackConfig, PackedCache
from attentionpack.cache.layer import TAIL_GRANULE

CONFIG = PackConfig(sink=4, window=8, chunk=16, min_span=4, key_energy=0.9, value_energy=0.9)


def _prefill(model, cache, prompt_len=60, pad=0, batch=1, seed=13):
    ids, mask = padded_batch(prompt_len, pad=pad, seed=seed, batch=batch)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    return out, mask


def _decode(model, cache, out, mask, steps):
    with torch.no_grad():
        for _ in range(steps):
            tok = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(tok)], -1)
            out = model(input_ids=tok, attention_mask=mask, past_key_values=cache)
    return out, mask


def _layout(cache, layer=0):
    return [(r["kind"], r["start"], r["tokens"]) for r in runs_of(cache, layer)]


def _check_contiguous(cache):
    for layer in cache.stats()["layers"]:
        runs = layer["runs"]
        for a, b in zip(runs, runs[1:]):
            assert a["start"] + a["tokens"] == b["start"], runs
        if not layer["sliding"]:
            assert runs[0]["start"] == 0
            assert runs[-1]["start"] + runs[-1]["tokens"] == cache.get_seq_length()


def test_prefill_layout_sink_span_recent(tiny_model):
    model = tiny_model("llama")
    cache = PackedCache(model, CONFIG)
    _prefill(model, cache, 60)
    for layer in range(len(cache.layers)):
        assert _layout(cache, layer) == [("sink", 0, 4), ("span", 4, 48), ("recent", 52, 8)]
    runs = runs_of(cache)
    assert runs[0]["keys"]["codec"] == runs[0]["values"]["codec"] == "exact"
    assert runs[1]["keys"]["codec"] == "lowrank" and runs[1]["values"]["codec"] == "lowrank"
    assert 1 <= runs[1]["keys"]["rank"] < 32
    _check_contiguous(cache)
    assert cache.get_seq_length() == 60


def test_decode_produces_chunks(tiny_model):
    model = tiny_model("llama")
    cache = PackedCache(model, CONFIG)
    out, mask = _prefill(model, cache, 60)
    out, mask = _decode(model, cache, out, mask, 15)
    # 75 tokens: 23 past the prefill window start (52) would need 16 + 8 = 24 to freeze a chunk
    assert [k for k, _, _ in _layout(cache)] == ["sink", "span", "recent"]
    assert _layout(cache)[-1] == ("recent", 52, 23)
    out, mask = _decode(model, cache, out, mask, 1)
    assert _layout(cache) == [("sink", 0, 4), ("span", 4, 48), ("chunk", 52, 16), ("recent", 68, 8)]
    out, mask = _decode(model, cache, out, mask, 16)
    assert _layout(cache) == [("sink", 0, 4), ("span", 4, 48), ("chunk", 52, 16), ("chunk", 68, 16), ("recent", 84, 8)]
    _check_contiguous(cache)


def test_sinks_skip_left_padding(tiny_model):
    model = tiny_model("llama")
    cache = PackedCache(model, CONFIG)
    _prefill(model, cache, 60, pad=5, batch=2)
    assert _layout(cache) == [("sink", 0, 9), ("span", 9, 43), ("recent", 52, 8)]


def test_sinks_skip_left_padding_in_generate(tiny_model):
    """Through generate(): the padding mask reaches the cache."""
    model = tiny_model("llama")
    cache = PackedCache(model, CONFIG)
    ids, mask = padded_batch(60, pad=5, seed=14)
    with torch.no_grad():
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            past_key_values=cache,
            max_new_tokens=1,
            do_sample=False,
            pad_token_id=PAD,
        )
    assert _layout(cache) == [("sink", 0, 9), ("span", 9, 43), ("recent", 52, 8)]


def test_masked_tokens_are_left_out_of_the_factors(tiny_model):
    """Tokens the attention mask hides (here a hole in the middle of row 1) are zeroed before factoring: their
    reconstruction (before RoPE) is exactly zero, so they cannot pollute the shared basis."""
    model = tiny_model("llama")
    cache = PackedCache(model, CONFIG)
    ids, mask = padded_batch(60, pad=0, seed=15)
    mask[1, 20:26] = 0
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    span = next(s for s in cache.layers[0].segments if s.kind == "span")
    a = span.start
    assert a <= 20 and span.end == 52
    for part in (span.keys, span.values):
        recon = part.factors.reconstruct()  # (B, T, D)
        assert torch.all(recon[1, 20 - a : 26 - a] == 0)
        assert torch.all(recon[1, 26 - a :].abs().sum(-1) > 0)
        assert torch.all(recon[0].abs().sum(-1) > 0)


def test_span_boundaries_split_the_prompt(tiny_model):
    model = tiny_model("llama")
    cache = PackedCache(model, CONFIG, span_boundaries=(20, 40))
    _prefill(model, cache, 60)
    assert _layout(cache) == [("sink", 0, 4), ("span", 4, 16), ("span", 20, 20), ("span", 40, 12), ("recent", 52, 8)]
    # each span has its own basis
    spans = [s for s in cache.layers[0].segments if s.kind == "span"]
    assert len({id(s.keys.factors.basis) for s in spans}) == 3


def test_short_span_piece_is_kept_exact(tiny_model):
    model = tiny_model("llama")
    cache = PackedCache(model, CONFIG.replace(min_span=10), span_boundaries=(7,))
    _prefill(model, cache, 60)
    layout = _layout(cache)
    assert layout[:3] == [("sink", 0, 4), ("span", 4, 3), ("span", 7, 45)]
    runs = runs_of(cache)
    assert runs[1]["keys"]["codec"] == "exact"
    assert runs[2]["keys"]["codec"] == "lowrank"


def test_short_prompt_waits(tiny_model):
    """A prompt not longer than sink + window stays exact until decoding pushes tokens out of the window."""
    model = tiny_model("llama")
    cache = PackedCache(model, CONFIG)
    out, mask = _prefill(model, cache, 10)
    assert _layout(cache) == [("recent", 0, 10)]
    _decode(model, cache, out, mask, 30)
    kinds = [k for k, _, _ in _layout(cache)]
    assert kinds[0] == "sink" and "chunk" in kinds and kinds[-1] == "recent"
    _check_contiguous(cache)


def test_compaction_saves_bytes(tiny_model):
    model = tiny_model("llama")
    cache = PackedCache(model, CONFIG)
    out, mask = _prefill(model, cache, 60)
    assert cache.nbytes() < cache.dynamic_nbytes()
    _decode(model, cache, out, mask, 20)
    assert cache.nbytes() < cache.dynamic_nbytes()
    assert cache.stats()["ratio"] > 1


@pytest.mark.parametrize("batch,pad", [(1, 0), (2, 5)])
def test_prefill_storage_is_released(tiny_model, batch, pad):
    """After compaction no tensor of the cache is a view into the big prefill tensors."""
    model = tiny_model("llama")
    cache = PackedCache(model, CONFIG)
    out, mask = _prefill(model, cache, 60, pad=pad, batch=batch)
    for phase in ("prefill", "decode"):
        for layer in cache.layers:
            for t in layer.tail.view()[:2]:  # the tail buffer holds < TAIL_GRANULE spare slots
                assert t.shape[-2] == 8
                assert t.untyped_storage().nbytes() < (8 + TAIL_GRANULE) * t[..., :1, :].numel() * t.element_size()
            tail_storages = {t.untyped_storage().data_ptr() for t in layer.tail.tensors()}
            for t in walk_tensors(layer):
                if t.untyped_storage().data_ptr() not in tail_storages:
                    assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), (phase, t.shape)
        out, mask = _decode(model, cache, out, mask, 16)


def test_sliding_layers_drop_old_segments(tiny_model):
    model = tiny_model("gemma3_text")  # layers 0 and 2 slide with window 16
    cache = PackedCache(model, CONFIG)
    out, mask = _prefill(model, cache, 60)
    out, mask = _decode(model, cache, out, mask, 40)
    total = cache.get_seq_length()
    stats = cache.stats()["layers"]
    for layer in stats:
        if layer["sliding"]:
            # nothing that ended before the window is kept
            assert all(r["start"] + r["tokens"] > total - 15 for r in layer["runs"])
            assert not any(r["kind"] in ("sink", "span") for r in layer["runs"])
        else:
            assert [r["kind"] for r in layer["runs"]][:2] == ["sink", "span"]
    _check_contiguous(cache)


def test_compress_sliding_layers_false_keeps_them_exact(tiny_model):
    model = tiny_model("gemma3_text")
    cache = PackedCache(model, CONFIG.replace(compress_sliding_layers=False))
    out, mask = _prefill(model, cache, 60)
    _decode(model, cache, out, mask, 20)
    for layer in cache.stats()["layers"]:
        if layer["sliding"]:
            assert [r["kind"] for r in layer["runs"]] == ["recent"]
        else:
            assert any(r["keys"]["codec"] == "lowrank" for r in layer["runs"])


@pytest.mark.parametrize("name", ["llama", "gemma3_text", "qwen3"])
def test_stored_spans_are_optimal_truncations(tiny_model, name):
    """End to end: what a compressed span gives back differs from the exact states by exactly the discarded
    singular-value energy of the (pre-RoPE, for keys) span block - so RoPE is undone and redone at the right
    positions (padding-aware) and nothing else is lost."""
    from helpers import dynamic_cache

    from attentionpack.rope import undo_rope

    model = tiny_model(name)
    rank = 5
    config = CONFIG.replace(key_rank=rank, value_rank=rank, fallback_exact=False)
    ids, mask = padded_batch(60, pad=6, seed=22)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    ref, cache = dynamic_cache(model), PackedCache(model, config)
    with torch.no_grad():
        for c in (ref, cache):
            model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=c)
    checked = 0
    for idx, layer in enumerate(cache.layers):
        if layer.is_sliding:
            continue
        rope = lambda s, e, pos, idx=idx: cache.adapter.rope(pos.long(), idx, torch.float32)  # noqa: E731
        span = next(s for s in layer.segments if s.kind == "span")
        a, b = span.start, span.end
        assert span.keys.positions.tolist() == positions[:, a:b].tolist()
        cos, sin = rope(a, b, positions[:, a:b])
        for part, exact, is_key in (
            (span.keys, ref.layers[idx].keys, True),
            (span.values, ref.layers[idx].values, False),
        ):
            exact = exact[..., a:b, :].double()
            got = part.materialize(a, b, rope).double()
            pre = undo_rope(exact, cos.double(), sin.double()) if is_key else exact
            bsz, h, t, d = pre.shape
            block = pre.transpose(1, 2).reshape(bsz, t, h * d)
            sv2 = torch.linalg.svdvals(block) ** 2
            discarded = sv2[:, rank:].sum(-1)
            scale = 1.0 if not is_key else float((cos[0, 0] ** 2 + sin[0, 0] ** 2).mean())  # |rope| squared
            err = ((got - exact) ** 2).sum(dim=(1, 2, 3))
            total = (block**2).sum(dim=(1, 2))
            torch.testing.assert_close(err, discarded * scale, rtol=1e-3, atol=1e-5 * float(total.max()))
            checked += 1
    assert checked >= 2
