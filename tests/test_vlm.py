"""Vision-language models: LLaVA, Qwen2-VL, Idefics3 (tiny random weights, see tiny_vlms.py).

Every test uses batch 2 with left padding and samples holding different numbers (and, for Qwen2-VL / Idefics3,
sizes) of images, so per-sample layouts really differ.
"""

from __future__ import annotations

import pytest
import torch
from helpers import storage_bytes, walk_tensors
from tiny_vlms import FAMILIES, IMAGE, VIDEO, model_kwargs, tiny_vlm, vlm_inputs
from transformers import DynamicCache

from attentionpack import PackConfig, PackedCache
from attentionpack.models.vlm import find_spans

IMAGES = {  # sample 0: one image; sample 1: two (of another size for Qwen2-VL, split in tiles for Idefics3)
    "llava": [[0], [0, 0]],
    "qwen2_vl": [[(4, 4)], [(4, 6), (4, 4)]],
    "qwen2_5_vl": [[(4, 6)], [(4, 4), (4, 8)]],
    "idefics3": [[(0, 0)], [(1, 2), (0, 0)]],
}
NEW = 12
ATOL = 1e-4  # full-rank factors: fp32 round-off only (see test_fullrank.py)
FULL_RANK = PackConfig(
    key_rank_fraction=1.0, value_rank_fraction=1.0, fallback_exact=False, sink=2, window=6, chunk=8, min_span=1
)


def _generate(model, cache, inputs, new=NEW):
    with torch.no_grad():
        return model.generate(
            **model_kwargs(inputs),
            past_key_values=cache,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )


def _reference(model, inputs):
    return _generate(model, DynamicCache(config=model.config.text_config), inputs)


def _gathered(cache, layer=0):
    return [s for s in cache.layers[layer].segments if s.index is not None]


@pytest.mark.parametrize("family", FAMILIES)
def test_lossless_matches_dynamic_cache_bit_exact(family):
    model, inputs = tiny_vlm(family), vlm_inputs(family, IMAGES[family], seed=1)
    ref = _reference(model, inputs)
    cache = PackedCache(model, "lossless")
    out = _generate(model, cache, inputs)
    assert torch.equal(torch.stack(out.logits), torch.stack(ref.logits))
    assert torch.equal(out.sequences, ref.sequences)
    assert cache.get_seq_length() == inputs["input_ids"].shape[1] + NEW - 1


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_modality_groups_match_dynamic_cache(family):
    """Text and every image compacted as gathered groups at full rank: only round-off differs (for Qwen2-VL this
    checks that the multimodal RoPE is undone and redone exactly)."""
    model, inputs = tiny_vlm(family), vlm_inputs(family, IMAGES[family], seed=2)
    ref = _reference(model, inputs)
    cache = PackedCache(model, FULL_RANK)
    out = _generate(model, cache, inputs)
    groups = {s.group: s.keys.describe()["codec"] for s in _gathered(cache)}
    assert groups == {"text": "lowrank", "image 0": "lowrank", "image 1": "lowrank"}, groups
    assert [s.group for s in cache.vision_segments(0)] == ["image 0", "image 1"]
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=0, atol=ATOL)
    assert torch.equal(out.sequences, ref.sequences)


def test_qwen2_vl_rope_is_the_models_multimodal_rope():
    """The cache's (cos, sin) for the positions it recorded equal what the attention modules received."""
    model, inputs = tiny_vlm("qwen2_vl"), vlm_inputs("qwen2_vl", IMAGES["qwen2_vl"], seed=3)
    cache, seen = PackedCache(model, FULL_RANK), []

    def record(module, args, kwargs):  # what the attention module rotates with, and what the cache recorded
        seen.append((kwargs["position_embeddings"], cache._mrope_positions.clone()))

    hook = cache.adapter.attention_modules[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**model_kwargs(inputs), past_key_values=cache)
    finally:
        hook.remove()
    (model_cos, model_sin), positions = seen[0]  # positions (B, T, 3)
    assert positions.shape == (*inputs["input_ids"].shape, 3)
    image = inputs["input_ids"] == IMAGE
    assert not torch.equal(positions[..., 1][image], positions[..., 2][image])  # really 3D on image tokens
    cos, sin = cache.adapter.rope(positions, 0, torch.float32)
    torch.testing.assert_close(cos, model_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin, model_sin, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_spans_found_per_sample_from_token_ids(family):
    model = tiny_vlm(family)
    inputs = vlm_inputs(family, IMAGES[family], seed=4)
    spans = find_spans(model.config, inputs["input_ids"])
    for b, expected in enumerate(inputs["expected"]):
        found: dict[int, list[int]] = {}
        for sp in spans:
            if sp.sample == b:
                assert sp.modality == "image"
                found.setdefault(sp.number, []).extend(range(sp.start, sp.end))
        assert found == dict(expected), (b, found)
    # the cache records the same spans through its pre-hook on the model
    cache = PackedCache(model, FULL_RANK)
    _generate(model, cache, inputs, new=2)
    assert cache.spans == spans


def test_llava_adjacent_images_are_cut_by_image_seq_length():
    config = tiny_vlm("llava").config
    n = config.image_seq_length
    ids = torch.tensor([[5, 6] + [IMAGE] * (3 * n) + [7]])
    spans = find_spans(config, ids)
    assert [(sp.number, sp.start, sp.end) for sp in spans] == [(k, 2 + k * n, 2 + (k + 1) * n) for k in range(3)]


def test_qwen2_vl_video_frames_are_grouped_with_video_grid_thw():
    config = tiny_vlm("qwen2_vl").config
    # a video of 3 temporal patches of 4x4 patches -> 3 frames of 4 tokens; an image; a second, 1-frame video
    row = [5, 152] + [VIDEO] * 12 + [153, 6, 152] + [IMAGE] * 4 + [153, 152] + [VIDEO] * 4 + [153]
    ids = torch.tensor([row])
    grids = torch.tensor([[3, 4, 4], [1, 4, 4]])
    spans = find_spans(config, ids, video_grid_thw=grids, frames_per_group=2)
    videos = [(sp.number, sp.group, sp.start, sp.end) for sp in spans if sp.modality == "video"]
    assert videos == [(0, 0, 2, 10), (0, 1, 10, 14), (1, 0, 23, 27)]
    assert [(sp.number, sp.start, sp.end) for sp in spans if sp.modality == "image"] == [(0, 17, 21)]


@pytest.mark.parametrize("family", FAMILIES)
def test_only_configured_modalities_compressed_and_indices_match_tokens(family):
    model, inputs = tiny_vlm(family), vlm_inputs(family, IMAGES[family], seed=5)
    config = FULL_RANK.replace(
        text={"key_codec": "exact", "value_codec": "exact"}, image={"key_rank": 3, "value_rank": 3}
    )
    cache = PackedCache(model, config)
    _generate(model, cache, inputs, new=2)
    ids = inputs["input_ids"]
    for layer in range(len(cache.layers)):
        for seg in _gathered(cache, layer):
            picked = ids.gather(1, seg.index)[seg.valid]  # the token ids at the group's cache indices
            if seg.modality == "image":
                assert seg.keys.describe() == {"codec": "lowrank", "rank": 3, "sample_ranks": [3, 3]}
                assert bool((picked == IMAGE).all())
                number = int(seg.group.split()[1])
                for b, expected in enumerate(inputs["expected"]):
                    want = [i for k, idx in expected if k == number for i in idx if i >= cache.layers[layer].sink_end]
                    assert seg.index[b][seg.valid[b]].tolist() == want
            else:
                assert seg.modality == "text" and seg.keys.describe()["codec"] == "exact"
                assert seg.values.describe()["codec"] == "exact"
                assert not bool((picked == IMAGE).any())


@pytest.mark.parametrize("family", FAMILIES)
def test_every_cache_index_covered_exactly_once(family):
    model, inputs = tiny_vlm(family), vlm_inputs(family, IMAGES[family], seed=6)
    cache = PackedCache(model, FULL_RANK)
    _generate(model, cache, inputs, new=10)
    batch = inputs["input_ids"].shape[0]
    for layer in cache.layers:
        count = torch.zeros(batch, layer.total, dtype=torch.long)
        for seg in layer.segments:
            if seg.index is None:
                count[:, seg.start : seg.end] += 1
            else:
                for b in range(batch):
                    count[b].index_add_(
                        0, seg.index[b][seg.valid[b]], torch.ones(int(seg.valid[b].sum()), dtype=torch.long)
                    )
        count[:, layer.total - layer.tail_length :] += 1
        assert bool((count == 1).all()), count


@pytest.mark.parametrize(
    "basis,groups", [("per_image", {"text", "image 0", "image 1"}), ("shared", {"text", "images"})]
)
def test_image_basis_per_image_or_shared(basis, groups):
    model, inputs = tiny_vlm("qwen2_vl"), vlm_inputs("qwen2_vl", IMAGES["qwen2_vl"], seed=7)
    ref = _reference(model, inputs)
    cache = PackedCache(model, FULL_RANK.replace(image_basis=basis))
    out = _generate(model, cache, inputs)
    assert {s.group for s in _gathered(cache)} == groups
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_bytes_per_modality_equal_factor_arithmetic(family):
    model, inputs = tiny_vlm(family), vlm_inputs(family, IMAGES[family], seed=8)
    r = 3
    config = FULL_RANK.replace(
        image={"key_rank": r, "value_rank": r, "key_rank_fraction": None, "value_rank_fraction": None}
    )
    cache = PackedCache(model, config)
    _generate(model, cache, inputs, new=2)
    text = model.config.text_config
    dim = text.num_key_value_heads * (text.hidden_size // text.num_attention_heads)  # D = H * d
    pos_width = 3 if family.startswith("qwen") else 1  # Qwen2-VL keys keep (temporal, height, width) positions
    expected, entries, layouts = 0, 0, set()
    for seg in (s for layer in cache.layers for s in layer.segments if s.modality == "image"):
        b, m = seg.index.shape
        factors = b * m * r * 4 + b * r * dim * 4  # fp32 coefficients (B, m, r) and basis (B, r, D)
        expected += 2 * factors + b * m * pos_width * 4  # keys and values; int32 key positions
        if seg.index.data_ptr() not in layouts:  # index (B, m) int64 + valid (B, m) bool, shared by the layers
            layouts.add(seg.index.data_ptr())
            expected += b * m * 8 + b * m
        entries += int(seg.valid.sum())
    stats = cache.stats()["modalities"]
    assert stats["image"]["bytes"] == expected
    assert stats["image"]["entries"] == entries > 0
    entry = 2 * dim * 4  # one token's K and V in fp32 in one layer
    assert stats["image"]["dynamic_bytes"] == entries * entry
    # all modalities add up to the whole cache
    assert sum(m["bytes"] for m in stats.values()) == cache.nbytes() == storage_bytes(walk_tensors(cache.layers))
    assert sum(m["dynamic_bytes"] for m in stats.values()) == cache.dynamic_nbytes()


def test_manual_loop_on_the_language_model_with_set_inputs():
    """Decoding by hand with the language model alone: the spans come from `cache.set_inputs(input_ids)`."""
    model, inputs = tiny_vlm("llava"), vlm_inputs("llava", IMAGES["llava"], seed=9)
    lm = model.model.language_model
    captured = {}
    hook = lm.register_forward_pre_hook(lambda m, a, kw: captured.update(embeds=kw["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        model(**model_kwargs(inputs), use_cache=False)
        hook.remove()
        results = []
        for cache in (DynamicCache(config=model.config.text_config), PackedCache(model, FULL_RANK)):
            if isinstance(cache, PackedCache):
                cache.set_inputs(inputs["input_ids"])
            mask = inputs["attention_mask"]
            out = lm(inputs_embeds=captured["embeds"], attention_mask=mask, past_key_values=cache)
            logits = [model.lm_head(out.last_hidden_state[:, -1])]
            for _ in range(8):
                nxt = logits[-1].argmax(-1, keepdim=True)
                mask = torch.cat([mask, torch.ones_like(nxt)], -1)
                out = lm(inputs_embeds=lm.embed_tokens(nxt), attention_mask=mask, past_key_values=cache)
                logits.append(model.lm_head(out.last_hidden_state[:, -1]))
            results.append(torch.stack(logits))
    assert {s.group for s in _gathered(cache)} == {"text", "image 0", "image 1"}
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=ATOL)


def test_batch_reorder_keeps_layouts_with_their_samples():
    """Beam search reorders the batch: gathered segments' index/valid move with their rows."""
    model, inputs = tiny_vlm("idefics3"), vlm_inputs("idefics3", IMAGES["idefics3"], seed=10)
    kw = dict(
        max_new_tokens=6,
        min_new_tokens=6,
        num_beams=2,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        ref = model.generate(
            **model_kwargs(inputs), past_key_values=DynamicCache(config=model.config.text_config), **kw
        )
        out = model.generate(**model_kwargs(inputs), past_key_values=PackedCache(model, FULL_RANK), **kw)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, rtol=0, atol=ATOL)


def test_qwen2_vl_video_frame_groups_full_rank_match_dynamic_cache():
    """A video of 4 temporal patches (4 tokens each) next to an image, batch 2 with left padding: each group of
    `video_group_frames` frames is its own group; full rank reproduces DynamicCache."""
    from tiny_vlms import PAD, QWEN_MERGE, QWEN_PATCH, QWEN_TEMPORAL, VISION_END, VISION_START

    model, gen = tiny_vlm("qwen2_vl"), torch.Generator().manual_seed(11)
    text = lambda n: torch.randint(3, 130, (n,), generator=gen).tolist()  # noqa: E731
    video = [VISION_START] + [VIDEO] * 16 + [VISION_END]
    rows = [
        [1] + text(10) + video + text(14),
        [1] + text(4) + [VISION_START] + [IMAGE] * 4 + [VISION_END] + text(3) + video + text(12),
    ]
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    kinds = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()
    row_dim = 3 * QWEN_TEMPORAL * QWEN_PATCH**2
    inputs = {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": kinds,
        "pixel_values": torch.randn(16, row_dim, generator=gen),
        "image_grid_thw": torch.tensor([[1, 4, 4]]),
        "pixel_values_videos": torch.randn(2 * 4 * 16, row_dim, generator=gen),
        "video_grid_thw": torch.tensor([[4, 4, 4], [4, 4, 4]]),
    }
    assert 4 * 16 // QWEN_MERGE**2 == 16  # tokens per video
    ref = _reference(model, inputs)
    cache = PackedCache(model, FULL_RANK.replace(video_group_frames=2))
    out = _generate(model, cache, inputs)
    groups = {s.group for s in _gathered(cache)}
    assert {"video 0 frames 0", "video 0 frames 1", "image 0", "text"} <= groups, groups
    assert all(s.modality == "video" for s in _gathered(cache) if s.group.startswith("video"))
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=0, atol=ATOL)
    assert torch.equal(out.sequences, ref.sequences)
