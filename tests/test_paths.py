"""Which attention path ran is recorded, ATTENTIONPACK_STRICT=1 turns a fallback into an error naming the reason,
the cache's change to the model is scoped (attach/detach), and layers take transformers' `cache_kwargs`."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, build_model

from attentionpack import PackConfig, PackedCache, kernels
from attentionpack.attention import NAME
from attentionpack.eval.speed import time_one

needs_kernels = pytest.mark.skipif(kernels.library() is None, reason="no C compiler: no fused path")
IDS = torch.randint(0, VOCAB, (1, 200), generator=torch.Generator().manual_seed(0))


def _hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("preset", ["balanced", "max"])
def test_decoding_steps_of_the_presets_take_the_fused_path_under_strict(preset, dtype, monkeypatch):
    monkeypatch.setenv("ATTENTIONPACK_STRICT", "1")
    model = build_model("llama").to(dtype)
    res = time_one(model, IDS, 180, 4, lambda n: PackedCache(model, preset))
    assert res["decode_paths"] == {"fused": 4 * model.config.num_hidden_layers}


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_budget_cache_decodes_on_the_fused_path(dtype, monkeypatch):
    monkeypatch.setenv("ATTENTIONPACK_STRICT", "1")
    model = build_model("llama").to(dtype)
    res = time_one(model, IDS, 180, 3, lambda n: PackedCache(model, PackConfig(budget=0.25)))
    assert set(res["decode_paths"]) == {"fused"}


def test_strict_names_why_a_decoding_step_cannot_be_fused(monkeypatch):
    model = build_model("llama")
    cfg = PackConfig(
        key_codec="lowrank", key_energy=0.9, key_pre_rope=True, value_codec="quant", value_bits=4, value_energy=None
    )
    loose = time_one(model, IDS, 180, 2, lambda n: PackedCache(model, cfg))
    assert loose["decode_paths"] == {"per_part": 2 * model.config.num_hidden_layers}  # recorded, not silent
    monkeypatch.setenv("ATTENTIONPACK_STRICT", "1")
    with pytest.raises(RuntimeError, match="ATTENTIONPACK_STRICT.*before RoPE"):
        time_one(model, IDS, 180, 2, lambda n: PackedCache(model, cfg))


def test_dense_fallback_is_recorded_and_strict_refuses_it(monkeypatch):
    model = build_model("llama")
    model.set_attn_implementation("eager")  # the packed attention cannot replace eager attention
    cache = PackedCache(model, "balanced")
    assert "eager" in cache.layers[0].dense_reason
    res = time_one(model, IDS, 180, 2, lambda n: PackedCache(model, "balanced"))
    assert res["decode_paths"] == {"dense": 2 * model.config.num_hidden_layers}
    monkeypatch.setenv("ATTENTIONPACK_STRICT", "1")
    with pytest.raises(RuntimeError, match="rebuilds its compressed keys/values.*eager"):
        time_one(model, IDS, 180, 2, lambda n: PackedCache(model, "balanced"))


def test_attach_is_scoped_and_reversible():
    model = build_model("llama")
    hooks, impl = _hooks(model), model.config._attn_implementation
    assert impl == "sdpa"
    with PackedCache(model, "balanced") as cache:
        assert model.config._attn_implementation == NAME and _hooks(model) > hooks
        attached = _hooks(model)
        other = PackedCache(model, "max")  # a second cache on the same model shares the hooks
        assert _hooks(model) == attached
        other.detach()
        assert model.config._attn_implementation == NAME  # `cache` is still attached
        with torch.no_grad():
            model(input_ids=IDS[:, :100], past_key_values=cache)
        assert cache.get_seq_length() == 100
    assert model.config._attn_implementation == impl and _hooks(model) == hooks
    with torch.no_grad():  # the detached model runs as before
        model(input_ids=IDS[:, :10])
    cache.attach(model)  # and the cache can be attached again
    assert model.config._attn_implementation == NAME
    cache.detach()
    assert model.config._attn_implementation == impl and _hooks(model) == hooks


def test_lossless_cache_leaves_the_attention_implementation_alone():
    model = build_model("llama")
    with PackedCache(model, "lossless"):
        assert model.config._attn_implementation == "sdpa"


def test_layer_update_takes_cache_kwargs():
    model = build_model("llama")
    cache = PackedCache(model, "balanced")
    k = torch.zeros(1, 2, 3, 16)
    with pytest.raises(RuntimeError, match="step context in cache_kwargs"):
        cache.layers[0].update(k, k)  # transformers' signature; the step context is missing
    keys, values = cache.update(k, k.clone(), 0, {"cache_position": torch.arange(3)})  # as transformers calls it
    assert keys.shape == (1, 2, 3, 16) and cache.layers[0].get_seq_length() == 3


@needs_kernels
@torch.inference_mode()
def test_a_deep_copied_cache_decodes_from_its_own_tensors(monkeypatch):
    """The decode plan holds raw addresses: a deep copy moves them to the copied tensors (DecodePlan.__deepcopy__),
    so the copy decodes as a fresh cache even when the original's storage has been overwritten."""
    import copy

    monkeypatch.setenv("ATTENTIONPACK_STRICT", "1")
    model = build_model("llama")
    caches = [PackedCache(model, PackConfig(budget=0.25)) for _ in range(2)]
    for cache in caches:
        model(input_ids=IDS[:, :180], past_key_values=cache, use_cache=True)
    original, fresh = caches
    copied = copy.deepcopy(original, {id(m): m for m in model.modules()})
    for layer in original.layers:  # what a plan still pointing here would read
        for seg in layer.segments:
            for t in seg.tensors():
                t.zero_()
    step = IDS[:, 180:181]
    want = model(input_ids=step, past_key_values=fresh, use_cache=True).logits
    got = model(input_ids=step, past_key_values=copied, use_cache=True).logits
    torch.testing.assert_close(got, want)
    assert copied.stats()["attention_paths"]["fused"] >= model.config.num_hidden_layers
