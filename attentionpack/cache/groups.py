"""The modality groups of a vision-language prompt span: per sample the cache indices of each group's tokens (text,
each image or all images of a sample, each group of video frames), from the per-token group labels that
`models.vlm.group_labels` gives. `PackedCache` finds them per compaction; `PackedLayer` stores each as a gathered
`Segment`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class Group:
    """One modality group of a prompt span: per sample the cache indices of its tokens (see `Segment`)."""

    name: str  # "text", "image 0", "images", "video 0 frames 1"
    modality: Literal["text", "image", "video"]
    index: torch.Tensor  # (B, n) long, ascending per sample; padding slots hold any index of the span
    valid: torch.Tensor  # (B, n) bool, False for padding slots
    start: int  # smallest cache index covered
    end: int  # largest cache index covered + 1


def groups_of(labels: torch.Tensor | None, groups: list[tuple[str, str]], start: int, end: int) -> list[Group] | None:
    """Per modality group present in [start, end): per sample the cache indices of its tokens, padded."""
    if labels is None or start >= labels.shape[1]:
        return None
    lab = labels[:, start:end]  # (B, n); indices past the labelled tokens are text (generated tokens)
    if lab.shape[1] < end - start:
        lab = torch.cat([lab, lab.new_zeros(lab.shape[0], end - start - lab.shape[1])], dim=1)
    present = torch.unique(lab).tolist()
    if present == [0]:
        return None
    out = []
    for g in present:
        mask = lab == g  # (B, n)
        counts = mask.sum(dim=1)  # (B,)
        slots = int(counts.max())
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :slots]  # this group's tokens first
        valid = torch.arange(slots, device=counts.device)[None, :] < counts[:, None]  # (B, slots)
        index = torch.where(valid, order + start, start)  # (B, slots) cache indices
        covered = index[valid]
        name, modality = groups[g]
        out.append(Group(name, modality, index, valid, int(covered.min()), int(covered.max()) + 1))
    return out
