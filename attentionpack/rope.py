"""Rotary position embedding, undone and redone exactly.

The model hands the cache keys already rotated: k_rot = k * cos + rotate_half(k) * sin, with cos = s*cos(θ),
sin = s*sin(θ) for a scaling s (1 for plain RoPE). Rotation is orthogonal up to s, so
k = (k_rot * cos - rotate_half(k_rot) * sin) / (cos² + sin²) recovers the pre-RoPE key for any RoPE variant that
transformers expresses through (cos, sin).
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pre-RoPE keys. k: (B, H, T, d); cos, sin: (B, T, d)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return k * cos + rotate_half(k) * sin


def undo_rope(k_rot: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of `apply_rope`. k_rot: (B, H, T, d); cos, sin: (B, T, d)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (k_rot * cos - rotate_half(k_rot) * sin) / (cos * cos + sin * sin)
