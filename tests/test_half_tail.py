"""The exact tail in half precision (`PackConfig.tail_dtype`, cache/tail.py `store_half`): a budget cache keeps its
newest tokens in float16 from the end of the prefill on (half the tail's bytes on a float32 model), the prefill's
own tokens are compressed from the model's values, values beyond float16's range switch the tail to bfloat16, and
lossless caches stay exact."""

from __future__ import annotations

import pytest
import torch
from helpers import storage_bytes
from tiny_models import VOCAB, build_model

from attentionpack import PackConfig, PackedCache
from attentionpack.cache.tail import ExactTail

BUDGET = dict(budget=0.4, window=16, chunk=32)


@torch.inference_mode()
def _run(model, config: PackConfig, steps: int = 20, prompt: int = 200) -> tuple[PackedCache, list[torch.Tensor]]:
    ids = torch.randint(0, VOCAB, (2, prompt + steps), generator=torch.Generator().manual_seed(3))
    cache = PackedCache(model, config)
    logits = [model(input_ids=ids[:, :prompt], past_key_values=cache, use_cache=True, logits_to_keep=1).logits]
    for i in range(prompt, prompt + steps):
        logits.append(model(input_ids=ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits)
    return cache, logits


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_budget_tail_holds_half_the_bytes_and_the_same_prefill(name):
    model = build_model(name)
    half, half_logits = _run(model, PackConfig(**BUDGET))
    full, full_logits = _run(model, PackConfig(**BUDGET, tail_dtype="model"))
    tails = [(a.tail, b.tail) for a, b in zip(half.layers, full.layers, strict=True)]
    assert all(a is not None and b is not None and len(a) == len(b) > 0 for a, b in tails)
    for a, b in tails:
        assert a.keys.dtype == a.values.dtype == torch.float16 and b.keys.dtype == torch.float32
        assert a.capacity == b.capacity and storage_bytes(a.tensors()) < storage_bytes(b.tensors())
        assert storage_bytes([a.keys, a.values]) * 2 == storage_bytes([b.keys, b.values])
    saved = sum(storage_bytes(b.tensors()) - storage_bytes(a.tensors()) for a, b in tails)
    if name == "gemma3_text":
        # its sliding layers keep prompt tokens in their tails, now in 16 bits: the budget counts those bytes
        # (what else the cache holds) and spends them on the prompt's encodings
        assert full.nbytes() - half.nbytes() < saved
        return
    assert full.nbytes() - half.nbytes() == saved  # nothing else differs in size
    # the prompt was compressed from the model's own keys and values: its segments are bit for bit the same
    prompt_runs = [
        [(s.start, s.end) + tuple(s.tensors()) for s in layer.segments if s.kind != "chunk"] for layer in half.layers
    ]
    reference = [
        [(s.start, s.end) + tuple(s.tensors()) for s in layer.segments if s.kind != "chunk"] for layer in full.layers
    ]
    for mine, theirs in zip(prompt_runs, reference, strict=True):
        assert len(mine) == len(theirs) > 0
        for x, y in zip(mine, theirs, strict=True):
            assert x[:2] == y[:2] and all(torch.equal(p, q) for p, q in zip(x[2:], y[2:], strict=True))
    assert torch.equal(half_logits[0], full_logits[0])  # the prefill's own logits
    for a, b in zip(half_logits[1:], full_logits[1:], strict=True):  # float16 rounding only (2^-11 relative)
        torch.testing.assert_close(a, b, atol=2e-2 * float(b.abs().max()), rtol=0)


def test_kernel_and_torch_paths_agree_on_a_half_tail(monkeypatch):
    """The C one-call step reads the float16 tail rows as stored; the per-part torch path casts them to the
    queries' dtype: the same logits."""
    from attentionpack.attention import packed

    model = build_model("llama")
    cache, fused = _run(model, PackConfig(**BUDGET), steps=6)
    assert cache.layers[0].paths["fused"] > 0
    monkeypatch.setattr(packed, "_c_why_not", lambda view, query: "forced off by the test")
    _, per_part = _run(model, PackConfig(**BUDGET), steps=6)
    for a, b in zip(fused[1:], per_part[1:], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("preset", ["lossless", "model"])
def test_exact_caches_keep_the_model_dtype(preset):
    model = build_model("llama")
    config = PackConfig.preset("lossless") if preset == "lossless" else PackConfig(**BUDGET, tail_dtype="model")
    cache, _ = _run(model, config, steps=4)
    assert all(layer.tail is not None and layer.tail.keys.dtype == torch.float32 for layer in cache.layers)


def test_half_precision_model_tail_unchanged():
    model = build_model("llama").to(torch.bfloat16)
    cache, _ = _run(model, PackConfig(**BUDGET), steps=4)
    assert all(layer.tail is not None and layer.tail.keys.dtype == torch.bfloat16 for layer in cache.layers)


def test_values_beyond_float16_switch_the_tail_to_bfloat16():
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 5, 8, generator=gen), torch.randn(1, 2, 5, 8, generator=gen)
    tail = ExactTail(k, v)
    tail.store_half()
    assert tail.keys.dtype == torch.float16
    torch.testing.assert_close(tail.states()[0].float(), k, atol=0, rtol=2**-11)
    big = torch.full((1, 2, 1, 8), 1.0e6)
    tail.append(big, -big)
    keys, values = tail.states()
    assert keys.dtype == values.dtype == torch.bfloat16 and len(tail) == 6
    assert bool(torch.isfinite(keys.float()).all()) and bool(torch.isfinite(values.float()).all())
    torch.testing.assert_close(keys[:, :, -1:].float(), big, atol=0, rtol=2**-8)
    torch.testing.assert_close(values[:, :, :5].float(), v, atol=0, rtol=2**-8)  # the earlier tokens kept
    assert storage_bytes([tail.keys, tail.values]) == 2 * 2 * tail.capacity * 8 * 2  # still 2 bytes an element
    # a prompt beyond float16's range starts in bfloat16 right away
    wide = ExactTail(k * 1.0e5, v)
    wide.store_half()
    assert wide.keys.dtype == torch.bfloat16


def test_tail_dtype_settings_are_checked():
    with pytest.raises(ValueError, match="tail_dtype"):
        PackConfig(**BUDGET, tail_dtype="bfloat16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tail_dtype.*lossless"):
        PackConfig.preset("lossless").replace(tail_dtype="float16")
    assert PackConfig(budget=0.2).half_tail and not PackConfig().half_tail
    assert PackConfig(tail_dtype="float16").half_tail and not PackConfig(budget=0.2, tail_dtype="model").half_tail
