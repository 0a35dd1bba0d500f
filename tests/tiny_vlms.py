"""Tiny random-weight vision-language models (vision tower + 2-layer text model, hidden 64) and their inputs.

No processor or weights are downloaded: each `*_inputs` function builds what the family's processor would produce —
input_ids with the right number of image tokens per image, left padding, pixel_values (and image_grid_thw /
mm_token_type_ids for Qwen2-VL) — so tests know exactly where every image's tokens are.
"""

from __future__ import annotations

import functools

import torch

VOCAB = 160
PAD, BOS = 0, 1
IMAGE, VIDEO, VISION_START, VISION_END = 150, 151, 152, 153  # Qwen2-VL / LLaVA / Idefics3 special ids
FAKE, GLOBAL = 154, 155  # Idefics3 <fake_token_around_image>, <global-img>
ROW_COL = 140  # Idefics3 <row_i_col_j> markers use ids 140..148 here
TEXT_LOW, TEXT_HIGH = 3, 130  # ordinary text ids are drawn from [3, 130)
FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "idefics3")

TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=2,
    tie_word_embeddings=False,
)
LLAVA_IMAGE_TOKENS = 16  # (image_size 32 / patch 8)^2, CLS dropped ("default" strategy)
IDEFICS3_IMAGE_TOKENS = 4  # (32 / 8)^2 / scale_factor^2
QWEN_PATCH, QWEN_MERGE, QWEN_TEMPORAL = 4, 2, 2


def _config(family: str):
    from transformers import Idefics3Config, LlavaConfig, Qwen2_5_VLConfig, Qwen2VLConfig

    if family == "llava":
        vision = dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=32,
        )
        return LlavaConfig(
            vision_config=vision,
            text_config=dict(model_type="llama", head_dim=16, **TEXT),
            image_token_index=IMAGE,
            image_seq_length=LLAVA_IMAGE_TOKENS,
            vision_feature_layer=-1,
        )
    if family == "qwen2_vl":
        vision = dict(
            depth=1,
            embed_dim=32,
            hidden_size=64,
            num_heads=2,
            mlp_ratio=2,
            patch_size=QWEN_PATCH,
            spatial_merge_size=QWEN_MERGE,
            temporal_patch_size=QWEN_TEMPORAL,
        )
        text = dict(TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
        return Qwen2VLConfig(
            vision_config=vision,
            text_config=text,
            image_token_id=IMAGE,
            video_token_id=VIDEO,
            vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END,
        )
    if family == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

        vision = Qwen2_5_VLVisionConfig(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=QWEN_PATCH,
            spatial_merge_size=QWEN_MERGE,
            temporal_patch_size=QWEN_TEMPORAL,
            window_size=16,
            fullatt_block_indexes=[1],
        )
        text = dict(TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
        return Qwen2_5_VLConfig(
            vision_config=vision,
            text_config=text,
            image_token_id=IMAGE,
            video_token_id=VIDEO,
            vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END,
        )
    if family == "idefics3":
        vision = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
        return Idefics3Config(
            vision_config=vision,
            text_config=dict(model_type="llama", head_dim=16, **TEXT),
            image_token_id=IMAGE,
            scale_factor=2,
            pad_token_id=PAD,
        )
    raise KeyError(family)


def build_vlm(family: str, seed: int = 0):
    """A tiny random VLM of `family` (eval mode, fp32); weights scaled up so attention patterns are peaked."""
    from transformers import (
        Idefics3ForConditionalGeneration,
        LlavaForConditionalGeneration,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
    )

    cls = {
        "llava": LlavaForConditionalGeneration,
        "qwen2_vl": Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
        "idefics3": Idefics3ForConditionalGeneration,
    }[family]
    torch.manual_seed(seed)
    model = cls(_config(family)).to(torch.float32)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for _name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    model.generation_config.pad_token_id = PAD
    return model.eval()


@functools.cache
def tiny_vlm(family: str):
    return build_vlm(family)


def _text(gen, n: int) -> list[int]:
    return torch.randint(TEXT_LOW, TEXT_HIGH, (n,), generator=gen).tolist()


def _left_pad(rows: list[list[int]]):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


def vlm_inputs(family: str, images_per_sample: list[list], text_len: int = 12, seed: int = 0) -> dict:
    """Processor-like inputs for a batch: sample i has the images `images_per_sample[i]` between text pieces.

    An image is described per family: llava -> anything (fixed 16 tokens); qwen2_vl / qwen2_5_vl -> (h, w) patch grid
    (tokens h*w/4); idefics3 -> (rows, cols) split grid ((0, 0): no split; tokens (rows*cols + 1) * 4).
    Returns the model kwargs plus "expected": per sample, a list of (image number, [cache indices of its tokens])."""
    gen = torch.Generator().manual_seed(seed)
    rows, expected, pixels, grids, idefics_counts = [], [], [], [], []
    for images in images_per_sample:
        row, spans = [BOS] + _text(gen, text_len), []
        for k, image in enumerate(images):
            if family == "llava":
                block = [IMAGE] * LLAVA_IMAGE_TOKENS
                pixels.append(torch.randn(3, 32, 32, generator=gen))
            elif family in ("qwen2_vl", "qwen2_5_vl"):
                h, w = image
                block = [VISION_START] + [IMAGE] * (h * w // QWEN_MERGE**2) + [VISION_END]
                grids.append([1, h, w])
                pixels.append(torch.randn(h * w, 3 * QWEN_TEMPORAL * QWEN_PATCH**2, generator=gen))
            else:
                r, c = image
                block = []
                for i in range(r):
                    for j in range(c):
                        block += [FAKE, ROW_COL + i * 3 + j] + [IMAGE] * IDEFICS3_IMAGE_TOKENS
                    block += [3]  # "\n"
                block += [FAKE, GLOBAL] + [IMAGE] * IDEFICS3_IMAGE_TOKENS + [FAKE]
                pixels.append(torch.randn(r * c + 1, 3, 32, 32, generator=gen))
            first = len(row)
            row += block
            spans.append((k, [first + i for i, t in enumerate(block) if t == IMAGE]))
            row += _text(gen, 3 + k)
        row += _text(gen, text_len // 2)
        rows.append(row)
        expected.append(spans)
        idefics_counts.append(
            sum(p.shape[0] for p in pixels[len(pixels) - len(images) :]) if family == "idefics3" else 0
        )
    ids, mask = _left_pad(rows)
    width = ids.shape[1]
    expected = [[(k, [i + width - len(row) for i in idx]) for k, idx in spans] for row, spans in zip(rows, expected)]
    out = {"input_ids": ids, "attention_mask": mask, "expected": expected}
    if family == "llava" and pixels:
        out["pixel_values"] = torch.stack(pixels)
    elif family in ("qwen2_vl", "qwen2_5_vl") and pixels:
        out["pixel_values"] = torch.cat(pixels)
        out["image_grid_thw"] = torch.tensor(grids)
        out["mm_token_type_ids"] = (ids == IMAGE).int()
    elif family == "idefics3" and pixels:
        # (B, max sub-images per sample, 3, 32, 32); all-zero padding images are skipped by the model
        most = max(idefics_counts)
        batch, start = torch.zeros(len(rows), most, 3, 32, 32), 0
        for i, n in enumerate(idefics_counts):
            sample = torch.cat(pixels[start : start + len(images_per_sample[i])]) if n else torch.zeros(0, 3, 32, 32)
            batch[i, :n] = sample
            start += len(images_per_sample[i])
        out["pixel_values"] = batch
    return out


def model_kwargs(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k != "expected"}
