"""Where the images and videos are in a vision-language prompt: per sample, from the token ids the model uses.

Every supported VLM replaces placeholder tokens in `input_ids` by vision features, so the placeholders mark the
vision tokens' cache indices exactly. Per family:

- LLaVA: `image_token_id` (config `image_token_index`); every image is `image_seq_length` consecutive tokens, so a
  run of several adjacent images is cut into images by that length.
- Qwen2-VL / Qwen2.5-VL: `image_token_id` and `video_token_id`; each image or video is one run between
  <|vision_start|> and <|vision_end|>. A video run is cut into groups of frames where its temporal RoPE position
  changes (the multimodal `position_ids` that `generate` passes), or else with `video_grid_thw` (tokens per
  temporal patch = h * w / spatial_merge_size²); with neither, a video is one group.
- Idefics3 / SmolVLM: `image_token_id`; an image split into tiles is several runs (one per tile, separated by
  <fake_token_around_image><row_i_col_j>) and always ends with its global view, the run right after
  <global-img>. The <global-img> id is the token before the last run of a sample (the last run of any prompt is
  a global view), so images are grouped without the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODALITIES = ("text", "image", "video")


@dataclass(frozen=True)
class VisionSpan:
    """Cache indices [start, end) of sample `sample` hold vision tokens of image (or video) number `number` (counted
    per sample from 0). An image may be several spans (Idefics3 tiles); a video group `group` of frames."""

    sample: int
    modality: str  # "image" or "video"
    number: int
    start: int
    end: int
    group: int = 0  # frame group of a video (0 for images)


def vision_token_ids(config) -> dict[str, int]:
    """{"image": id, "video": id} placeholder ids of a supported VLM config (video only for Qwen2-VL)."""
    out = {}
    image = getattr(config, "image_token_id", None)
    if image is None:
        image = getattr(config, "image_token_index", None)
    if image is not None:
        out["image"] = int(image)
    video = getattr(config, "video_token_id", None)
    if video is not None:
        out["video"] = int(video)
    return out


def _runs(row: torch.Tensor, token: int) -> list[tuple[int, int]]:
    """[start, end) of every maximal run of `token` in a 1D tensor."""
    hit = (row == token).to(torch.int8)
    if not bool(hit.any()):
        return []
    edges = torch.diff(torch.nn.functional.pad(hit, (1, 1)))
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return list(zip(starts, ends, strict=False))


def find_spans(
    config,
    input_ids: torch.Tensor,
    video_grid_thw: torch.Tensor | None = None,
    frames_per_group: int = 1,
    temporal: torch.Tensor | None = None,
) -> list[VisionSpan]:
    """Vision spans of every sample of `input_ids` (B, T), in cache-index order (see module docstring).
    `temporal` (B, T): the temporal multimodal RoPE position of every token (Qwen2-VL), to find video frames."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    ids = input_ids.detach().cpu()
    model_type = getattr(config, "model_type", None)
    tokens = vision_token_ids(config)
    spans: list[VisionSpan] = []
    video_grids = [] if video_grid_thw is None else [tuple(int(x) for x in g) for g in video_grid_thw.cpu()]
    video_cursor = 0  # videos are numbered across the batch in video_grid_thw, in sample order
    for b in range(ids.shape[0]):
        row = ids[b]
        image_runs = _runs(row, tokens["image"]) if "image" in tokens else []
        if model_type == "llava":
            per = int(getattr(config, "image_seq_length", 0) or 0)
            number = 0
            for s, e in image_runs:
                step = per if per and (e - s) % per == 0 else e - s
                for a in range(s, e, step):
                    spans.append(VisionSpan(b, "image", number, a, a + step))
                    number += 1
        elif model_type == "idefics3":
            global_id = int(row[image_runs[-1][0] - 1]) if image_runs and image_runs[-1][0] > 0 else None
            number = 0
            for s, e in image_runs:
                spans.append(VisionSpan(b, "image", number, s, e))
                if global_id is None or s == 0 or int(row[s - 1]) == global_id:
                    number += 1  # the global view closes an image
        else:  # Qwen2-VL / Qwen2.5-VL: one run per image
            spans.extend(VisionSpan(b, "image", k, s, e) for k, (s, e) in enumerate(image_runs))
        video_runs = _runs(row, tokens["video"]) if "video" in tokens else []
        for k, (s, e) in enumerate(video_runs):
            if temporal is not None:  # a frame = a run of equal temporal positions
                t_row = temporal[b, s:e].detach().cpu()
                starts = [s] + [s + i for i in (torch.diff(t_row) != 0).nonzero().flatten().add(1).tolist()]
                bounds = starts[::frames_per_group] + [e]
                spans.extend(
                    VisionSpan(b, "video", k, a, z, group=g)
                    for g, (a, z) in enumerate(zip(bounds, bounds[1:], strict=False))
                )
                video_cursor += 1
                continue
            per_frame = e - s
            if video_cursor < len(video_grids):
                t, h, w = video_grids[video_cursor]
                merge = int(getattr(getattr(config, "vision_config", None), "spatial_merge_size", 1) or 1)
                if t * h * w // merge**2 == e - s:
                    per_frame = h * w // merge**2
            video_cursor += 1
            step = per_frame * frames_per_group
            for g, a in enumerate(range(s, e, step)):
                spans.append(VisionSpan(b, "video", k, a, min(a + step, e), group=g))
    return sorted(spans, key=lambda sp: (sp.sample, sp.start))


def group_labels(
    spans: list[VisionSpan], batch: int, length: int, image_basis: str
) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """Per-token modality groups: labels (B, length) long indexing `groups`, a list of (group name, modality).

    Group 0 is "text". Images get one group each ("image 0", "image 1"... numbered per sample, so image k of every
    sample shares a segment, each sample keeping its own basis) or one "images" group (`image_basis="shared"`);
    every video frame group is its own group ("video 0 frames 1")."""
    labels = torch.zeros(batch, length, dtype=torch.long)
    groups: list[tuple[str, str]] = [("text", "text")]
    index: dict[str, int] = {"text": 0}
    for sp in spans:
        if sp.modality == "image":
            name = "images" if image_basis == "shared" else f"image {sp.number}"
        else:
            name = f"video {sp.number} frames {sp.group}"
        if name not in index:
            index[name] = len(groups)
            groups.append((name, sp.modality))
        labels[sp.sample, sp.start : sp.end] = index[name]
    return labels, groups
