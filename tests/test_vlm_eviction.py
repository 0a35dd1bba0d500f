"""Image tokens kept by the attention the prompt's text gives them (`PackConfig(image={"keep": f})`): per sample,
KV head and image, the share of its tokens the last queries attend to most; the rest dropped or demoted.

Tiny random-weight VLMs (tiny_vlms.py) check the code paths and the bytes; no quality claim is made here.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import storage_bytes, walk_tensors
from test_vlm import FULL_RANK, IMAGES, _generate, _reference
from tiny_vlms import FAMILIES, tiny_vlm, vlm_inputs

from attentionpack import PackConfig, PackedCache

EXACT = FULL_RANK.replace(key_codec="exact", value_codec="exact")


def _image_segments(layer):
    return [s for s in layer.segments if s.modality == "image"]


@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_every_image_token_matches_dynamic_cache(family):
    """keep=1.0 keeps each image's tokens in slot segments (a different order per head is possible): attention
    over them equals DynamicCache's up to float round-off."""
    model, inputs = tiny_vlm(family), vlm_inputs(family, IMAGES[family], seed=11)
    ref = _reference(model, inputs)
    cache = PackedCache(model, EXACT.replace(image={"keep": 1.0}))
    out = _generate(model, cache, inputs)
    evicted = [s for layer in cache.layers for s in _image_segments(layer) if s.slots is not None]
    assert evicted, "image groups are stored as per-head slot segments"
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=0, atol=1e-4)
    paths = cache.stats()["attention_paths"]
    assert paths.get("fused", 0) + paths.get("per_part", 0) > 0 and not paths.get("dense", 0)  # on the stored form


@pytest.mark.parametrize("family", FAMILIES)
def test_a_quarter_of_each_image_is_kept_per_sample_and_head(family):
    model, inputs = tiny_vlm(family), vlm_inputs(family, IMAGES[family], seed=12)
    plain = PackedCache(model, FULL_RANK)  # every image a gathered segment of all its tokens
    _generate(model, plain, inputs, new=2)
    cache = PackedCache(model, FULL_RANK.replace(image={"keep": 0.25}))
    out = _generate(model, cache, inputs, new=2)
    assert bool(torch.isfinite(torch.stack(out.logits)).all())
    batch = inputs["input_ids"].shape[0]
    checked = 0
    for layer, whole in zip(cache.layers, plain.layers, strict=True):
        kept = {s.group: s for s in _image_segments(layer) if s.slots is not None}
        for seg in _image_segments(whole):
            if seg.index is None:
                continue
            if layer.is_sliding:  # sliding-window layers are not evicted
                assert not kept
                continue
            slot = kept[seg.group]
            real = seg.valid.sum(dim=1)  # (B,) the image's tokens per sample
            want = min(seg.index.shape[1], max(1, math.ceil(0.25 * int(real.max()))))
            assert slot.slots.shape == (batch, layer.spec.num_kv_heads, want)
            held = torch.isfinite(slot.slots).sum(dim=2)  # (B, H) tokens held per sample and head
            for b in range(batch):
                assert bool((held[b] == min(want, int(real[b]))).all())
            checked += 1
    assert checked
    # the dropped tokens free their bytes: the cache and the independent walk see the same, smaller total
    assert cache.nbytes() == storage_bytes(walk_tensors(cache.layers)) < plain.nbytes()


def test_demoted_image_tokens_are_kept_at_two_bits():
    model, inputs = tiny_vlm("qwen2_vl"), vlm_inputs("qwen2_vl", IMAGES["qwen2_vl"], seed=13)
    cache = PackedCache(model, EXACT.replace(image={"keep": 0.25, "evicted_bits": 2}))
    _generate(model, cache, inputs, new=2)
    layer = cache.layers[0]
    groups = {s.group for s in _image_segments(layer)}
    for group in groups:
        pieces = [s for s in _image_segments(layer) if s.group == group]
        assert [s.keys.describe()["codec"] for s in pieces] == ["exact", "quant"]
        assert pieces[1].keys.describe()["bits"] == 2
        kept, demoted = (torch.isfinite(s.slots).sum(dim=2) for s in pieces)  # (B, H) tokens each holds
        total = kept + demoted  # every real token of the image, in one piece or the other
        assert bool((total == total[:, :1]).all())
        quarter = math.ceil(0.25 * int(total.max()))
        assert pieces[0].slots.shape[-1] == quarter
        assert torch.equal(kept, total.clamp_max(quarter))


def test_text_is_not_evicted_when_only_images_keep_a_share():
    model, inputs = tiny_vlm("llava"), vlm_inputs("llava", IMAGES["llava"], seed=14)
    cache = PackedCache(model, EXACT.replace(image={"keep": 0.5}))
    _generate(model, cache, inputs, new=2)
    for layer in cache.layers:
        for seg in layer.segments:
            assert (seg.slots is not None) == (seg.modality == "image"), (seg.modality, seg.kind)


def test_a_cache_with_evicted_images_saves_and_loads(tmp_path):
    model, inputs = tiny_vlm("qwen2_vl"), vlm_inputs("qwen2_vl", IMAGES["qwen2_vl"], seed=15)
    config = EXACT.replace(image={"keep": 0.25, "evicted_bits": 4})
    cache = PackedCache(model, config)
    _generate(model, cache, inputs, new=2)
    cache.save(tmp_path / "c")
    again = PackedCache.load(tmp_path / "c", model, config)
    for a, b in zip(cache.layers, again.layers, strict=True):
        assert [(s.group, s.modality) for s in a.segments] == [(s.group, s.modality) for s in b.segments]
        for s, t in zip(a.segments, b.segments, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(s.tensors(), t.tensors(), strict=True))


@pytest.mark.parametrize(
    "fields,words",
    [
        ({"keep": 0.25}, "keys among"),  # text eviction is the top-level `keep`
        ({"evicted_bits": 2}, "keys among"),
    ],
)
def test_text_overrides_cannot_evict(fields, words):
    with pytest.raises(ValueError, match=words):
        PackConfig(text=fields)


@pytest.mark.parametrize("image", [{"keep": 0.0}, {"keep": 2}, {"evicted_bits": 2}, {"keep": 0.5, "evicted_bits": 3}])
def test_invalid_image_eviction_is_refused(image):
    with pytest.raises(ValueError, match="image"):
        PackConfig(image=image)


def test_each_image_token_is_ranked_by_its_own_importance(monkeypatch):
    """The scores an image's tokens are ranked by are the prompt's importance at exactly those cache indices (per
    sample: images sit at different places), not a neighbour's."""
    import attentionpack.cache.layer as layer_module

    model, inputs = tiny_vlm("qwen2_vl"), vlm_inputs("qwen2_vl", IMAGES["qwen2_vl"], seed=16)
    plain = PackedCache(model, FULL_RANK)
    _generate(model, plain, inputs, new=1)
    importances, ranked = [], []
    real_importance, real_pieces = layer_module.importance, layer_module.evicted_pieces

    def spy_importance(*args):
        out = real_importance(*args)
        importances.append(out)
        return out

    def spy_pieces(k, v, valid, score, cfg, moments):
        ranked.append((valid, score))
        return real_pieces(k, v, valid, score, cfg, moments)

    monkeypatch.setattr(layer_module, "importance", spy_importance)
    monkeypatch.setattr(layer_module, "evicted_pieces", spy_pieces)
    cache = PackedCache(model, FULL_RANK.replace(image={"keep": 0.5}))
    _generate(model, cache, inputs, new=1)
    first = 0  # the prompt's call compacts a tail that starts at cache index 0: the importance's column 0
    images = [s for s in plain.layers[0].segments if s.modality == "image" and s.index is not None]
    assert images and len(ranked) >= len(images)
    for seg, (valid, score) in zip(images, ranked, strict=False):  # layer 0's groups, in order
        assert torch.equal(valid, seg.valid)
        want = importances[0].gather(2, (seg.index - first).clamp_min(0)[:, None, :].expand_as(score))
        assert torch.equal(score[valid[:, None, :].expand_as(score)], want[valid[:, None, :].expand_as(score)])


def test_a_preset_with_image_eviction_evicts_images():
    """Presets are target budgets, which leave vision-language prompts to the codec fields: the image override's
    `keep` still applies (the prompt's last queries are kept for it although a budget planner exists)."""
    model, inputs = tiny_vlm("llava"), vlm_inputs("llava", IMAGES["llava"], seed=17)
    base = PackConfig.preset("balanced").replace(sink=2, window=6, min_span=1)  # a tiny prompt: a short window
    whole, kept = PackedCache(model, base), PackedCache(model, base.replace(image={"keep": 0.25}))
    for cache in (whole, kept):
        _generate(model, cache, inputs, new=2)
    assert any(s.slots is not None for layer in kept.layers for s in _image_segments(layer))
    assert not any(s.slots is not None for layer in whole.layers for s in layer.segments)
    assert kept.nbytes() < whole.nbytes()


QUANT = PackConfig(
    key_codec="quant", key_bits=4, value_codec="quant", value_bits=4, key_energy=None, value_energy=None,
    sink=2, window=6, chunk=8, min_span=1,
)  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("image", [None, {"keep": 0.5}])
def test_gathered_groups_decode_on_the_fused_step(family, image, monkeypatch):
    """Vision-language modality groups (per sample their own cache indices, padding slots for samples with fewer
    or smaller images, left padding) are read by the one-call C step, their mask passed as slots: the same logits
    as the per-part torch path."""
    from attentionpack.kernels.plan import DecodePlan

    model, inputs = tiny_vlm(family), vlm_inputs(family, IMAGES[family], seed=18)
    config = QUANT.replace(image=image)
    fused = PackedCache(model, config)
    out = _generate(model, fused, inputs, new=6)
    paths = fused.stats()["attention_paths"]
    assert paths.get("fused", 0) > 0 and not paths.get("per_part", 0), paths
    assert any(s.index is not None for layer in fused.layers for s in layer.segments)
    monkeypatch.setattr(DecodePlan, "why_not", lambda *a: "the per-part path, for comparison")
    ref_cache = PackedCache(model, config)
    ref = _generate(model, ref_cache, inputs, new=6)
    assert ref_cache.stats()["attention_paths"].get("fused", 0) == 0
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=0, atol=1e-4)
    assert torch.equal(out.sequences, ref.sequences)


def test_gathered_groups_decode_on_the_triton_step_as_on_the_c_step(monkeypatch):
    """The Triton step reads the same gathered groups (their mask as slots) with the C step's logits (Triton's
    interpreter on CPU, tests/conftest.py)."""
    pytest.importorskip("triton")
    model, inputs = tiny_vlm("qwen2_vl"), vlm_inputs("qwen2_vl", IMAGES["qwen2_vl"], seed=19)
    config = QUANT.replace(image={"keep": 0.5})
    monkeypatch.setenv("ATTENTIONPACK_STRICT", "1")
    runs = {}
    for backend in ("c", "triton"):
        monkeypatch.setenv("ATTENTIONPACK_DECODE", backend)
        cache = PackedCache(model, config)
        runs[backend] = (_generate(model, cache, inputs, new=3), cache.stats()["attention_paths"])
    (c_out, c_paths), (t_out, t_paths) = runs["c"], runs["triton"]
    assert c_paths.get("fused", 0) > 0 and t_paths.get("triton", 0) == c_paths["fused"], (c_paths, t_paths)
    torch.testing.assert_close(torch.stack(t_out.logits), torch.stack(c_out.logits), rtol=0, atol=1e-4)
