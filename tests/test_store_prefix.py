"""PrefixStore: longest stored prefix wins, reuse continues exactly like a live cache, LRU eviction, index rebuilt,
damaged entries removed with a warning, entries of other models/configs never used."""

from __future__ import annotations

import shutil

import pytest
import torch

from attentionpack import PackConfig, PackedCache
from attentionpack.cache.files import TENSORS
from attentionpack.store import PrefixStore
from attentionpack.store.prefix import prefill_prefix

CONFIG = PackConfig(key_rank=6, value_codec="quant", value_bits=4, chunk=16, window=16)


def _prompt(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (n,), generator=gen)


def _put(store, model, ids, config=CONFIG):
    cache = PackedCache(model, config)
    prefill_prefix(model, cache, ids[None])
    return store.put(ids, cache)


def test_longest_stored_prefix_wins(tiny_model, tmp_path):
    model = tiny_model("llama")
    store = PrefixStore(tmp_path / "s", max_bytes=1 << 30, block=32)
    p = _prompt(300)
    for n in (50, 100, 200):  # 50 and 100: not multiples of the block
        assert _put(store, model, p[:n])
    _put(store, model, _prompt(250, seed=1))
    assert [n for n, _ in store.matches(p, model, CONFIG)] == [200, 100, 50]
    cache, covered = store.cache_for(p, model, CONFIG)
    assert covered == 200 and cache.get_seq_length() == 200
    q = torch.cat([p[:150], _prompt(100, seed=2)])  # shares the first 150 tokens only
    assert store.cache_for(q, model, CONFIG)[1] == 100
    assert store.cache_for(_prompt(300, seed=3), model, CONFIG)[1] == 0
    # an entry covering the whole prompt: its newest (exact) token is dropped so one token is left to feed
    cache, covered = store.cache_for(p[:200], model, CONFIG)
    assert covered == 199 and cache.get_seq_length() == 199
    assert store.hits == 4 - 1 and store.misses == 1


def test_reused_prefix_continues_exactly_like_a_live_cache(tiny_model, tmp_path):
    """generate() from a stored prefix == generate() from a live cache that prefilled the same prefix."""
    model = tiny_model("qwen2_sliding")
    store = PrefixStore(tmp_path / "s", max_bytes=1 << 30)
    p = _prompt(260)
    _put(store, model, p[:200])
    live = PackedCache(model, CONFIG)
    prefill_prefix(model, live, p[None, :200])
    stored, covered = store.cache_for(p, model, CONFIG)
    assert covered == 200
    outs = []
    for cache in (live, stored):  # the remaining 60 tokens are a multi-token call on the compressed cache
        with torch.no_grad():
            out = model.generate(
                input_ids=p[None],
                attention_mask=torch.ones(1, 260, dtype=torch.long),
                past_key_values=cache,
                max_new_tokens=24,
                min_new_tokens=24,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
        outs.append(torch.stack(out.logits))
    assert torch.equal(*outs)


def test_lru_eviction_past_max_bytes(tiny_model, tmp_path):
    model = tiny_model("llama")
    probe = PrefixStore(tmp_path / "probe", max_bytes=1 << 30)
    _put(probe, model, _prompt(120))
    size = probe.entries()[0].bytes
    store = PrefixStore(tmp_path / "s", max_bytes=int(2.5 * size))
    a, b, c = (_prompt(120, seed=s) for s in (10, 11, 12))
    ka, kb = _put(store, model, a), _put(store, model, b)
    import os
    import time

    past = time.time() - 100
    os.utime(store.entries_dir / ka, (past, past))
    os.utime(store.entries_dir / kb, (past - 50, past - 50))  # b is the least recently used
    assert store.cache_for(torch.cat([a, a]), model, CONFIG)[1] == 120  # a hit refreshes a
    kc = _put(store, model, c)
    keys = {e.key for e in store.entries()}
    assert keys == {ka, kc}
    assert store.total_bytes() <= store.max_bytes


def test_too_large_entry_not_stored(tiny_model, tmp_path):
    model = tiny_model("llama")
    store = PrefixStore(tmp_path / "s", max_bytes=1000)
    with pytest.warns(UserWarning, match="exceeds max_bytes"):
        assert _put(store, model, _prompt(100)) is None
    assert store.entries() == []


def test_index_rebuilt_from_files_when_lost_or_damaged(tiny_model, tmp_path):
    model = tiny_model("llama")
    store = PrefixStore(tmp_path / "s", max_bytes=1 << 30)
    p = _prompt(200)
    key = _put(store, model, p[:120])
    (tmp_path / "s" / "index.json").unlink()
    again = PrefixStore(tmp_path / "s", max_bytes=1 << 30)
    assert again.cache_for(p, model, CONFIG)[1] == 120
    assert (tmp_path / "s" / "index.json").exists()
    (tmp_path / "s" / "index.json").write_text("{not json")
    assert [e.key for e in PrefixStore(tmp_path / "s", max_bytes=1 << 30).entries()] == [key]


def test_damaged_entry_is_a_miss_removed_with_a_warning(tiny_model, tmp_path):
    model = tiny_model("llama")
    store = PrefixStore(tmp_path / "s", max_bytes=1 << 30)
    p = _prompt(200)
    _put(store, model, p[:80])
    key = _put(store, model, p[:150])
    path = store.entries_dir / key / TENSORS
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x04
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="damaged entry .* removed"):
        _, covered = store.cache_for(p, model, CONFIG)
    assert covered == 80  # the next longest entry
    assert not (store.entries_dir / key).exists() and store.damaged == 1
    assert [e.tokens for e in store.entries()] == [80]
    # a truncated manifest is found when the index is rebuilt
    other = _put(store, model, p[:100])
    (store.entries_dir / other / "manifest.json").write_bytes(b'{"format":')
    (tmp_path / "s" / "index.json").unlink()
    with pytest.warns(UserWarning, match="damaged entry"):
        assert [e.tokens for e in store.entries()] == [80]


def test_other_model_or_config_never_matches(tiny_model, tmp_path):
    store = PrefixStore(tmp_path / "s", max_bytes=1 << 30)
    p = _prompt(200)
    _put(store, tiny_model("llama"), p[:120])
    assert store.cache_for(p, tiny_model("qwen3"), CONFIG)[1] == 0
    assert store.cache_for(p, tiny_model("llama"), CONFIG.replace(window=32))[1] == 0
    assert store.cache_for(p, tiny_model("llama"), CONFIG)[1] == 120
    assert len(store.entries()) == 1


def test_remove_and_clear(tiny_model, tmp_path):
    model = tiny_model("llama")
    store = PrefixStore(tmp_path / "s", max_bytes=1 << 30)
    keys = [_put(store, model, _prompt(60, seed=s)) for s in range(3)]
    assert store.remove(keys[0]) and not store.remove(keys[0])
    assert {e.key for e in store.entries()} == set(keys[1:])
    assert store.clear() == 2 and store.entries() == []
    shutil.rmtree(tmp_path / "s")
