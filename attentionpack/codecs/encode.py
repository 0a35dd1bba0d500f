"""Encode a run of keys or values into its stored form, as a `PackConfig`'s codec fields say.

Keys arrive rotated (B, H, T, d) with their (cos, sin) and positions: low-rank keys are factored before RoPE
(`key_pre_rope`, the most compressible form, rotated again when used) or after it (attended through their
factors); quantized keys stay rotated, per channel (KIVI); values are factored or quantized per token.
"""

from __future__ import annotations

import torch

from ..config import PackConfig
from ..parts import ExactPart, Factors, LowRankPart, Part, QuantizedLowRankPart, QuantizedPart, storage_nbytes
from ..rope import undo_rope
from .lowrank import RankRule, factorize, score_weighting


def rank_rules(cfg: PackConfig) -> tuple[RankRule, RankRule]:
    """The (key, value) rank rules of a config's low-rank codec."""
    return (
        RankRule(cfg.key_rank, cfg.key_rank_fraction, cfg.key_energy, cfg.key_max_rank_fraction),
        RankRule(cfg.value_rank, cfg.value_rank_fraction, cfg.value_energy, cfg.value_max_rank_fraction),
    )


def encode_keys(
    k: torch.Tensor,
    valid: torch.Tensor,
    cfg: PackConfig,
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None,
    positions: torch.Tensor | None,
    query_moments: torch.Tensor | None = None,
) -> Part:
    """k (B, H, T, d) rotated, valid (B, T) bool (padding False), cos/sin (B, T, d), positions (B, T[, 3]) (needed
    by low-rank keys factored before RoPE only); query_moments (B, H, d, d): second moments of the prompt's
    queries, used by `key_objective="scores"`."""
    return _encode(k, valid, cfg, is_key=True, cos_sin=cos_sin, positions=positions, query_moments=query_moments)


def encode_values(v: torch.Tensor, valid: torch.Tensor, cfg: PackConfig) -> Part:
    """v (B, H, T, d), valid (B, T) bool (padding False)."""
    return _encode(v, valid, cfg, is_key=False)


def _encode(
    x: torch.Tensor,
    valid: torch.Tensor,
    cfg: PackConfig,
    is_key: bool,
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None,
    positions: torch.Tensor | None = None,
    query_moments: torch.Tensor | None = None,
) -> Part:
    """Exact when the codec says so, or when the encoded form would not be smaller (`fallback_exact`)."""
    codec, bits = (cfg.key_codec, cfg.key_bits) if is_key else (cfg.value_codec, cfg.value_bits)
    if codec == "exact":
        return ExactPart(x.clone())
    x = x * valid[:, None, :, None]  # padding rows zeroed so they cannot skew a basis or a scale
    part: Part
    if codec == "quant":
        assert bits is not None  # PackConfig validates: the quant codec has bits
        part = (
            QuantizedPart.keys(x, bits, cfg.group(True)) if is_key else QuantizedPart.values(x, bits, cfg.group(False))
        )
    else:
        pre_rope = is_key and cfg.key_pre_rope
        b, h, t, d = x.shape
        if pre_rope:
            if cos_sin is None or positions is None:
                raise ValueError("low-rank keys factored before RoPE need the tokens' cos/sin and positions")
            x_in = undo_rope(x, *cos_sin)
        else:
            x_in = x
        rule = rank_rules(cfg)[0 if is_key else 1]
        weighting = None
        if is_key and not pre_rope and cfg.key_objective == "scores" and query_moments is not None:
            weighting = score_weighting(query_moments)  # (B, D, D): minimize the score error, not the key error
        factors, ranks, _ = factorize(x_in.transpose(1, 2).reshape(b, t, h * d), rule, weighting)  # (B, T, H*d)
        pos = positions.clone() if pre_rope and positions is not None else None
        if bits is None:
            part = LowRankPart(factors, h, pos, tuple(ranks))
        else:
            part = QuantizedLowRankPart.from_factors(
                factors, h, pos, tuple(ranks), coeff_bits=bits, basis_bits=16, coeff_group=cfg.group(is_key)
            )
    if cfg.fallback_exact and storage_nbytes(part.tensors()) >= x.numel() * x.element_size():
        return ExactPart(x.clone())
    return part


def nbytes_bound(cfg: PackConfig, shape: tuple[int, int, int, int], dtype: torch.dtype, is_key: bool) -> int:
    """The most bytes `encode_keys` / `encode_values` can store for states of `shape` (B, H, T, d) and `dtype`
    under `cfg`'s codec fields: quantized storages are fixed by the shape; factors are counted at full rank
    min(T, H*d) (no rank rule exceeds it), with their positions when keys are factored before RoPE; never more
    than the exact states when `fallback_exact` holds. Built from the same part constructors, on zeros."""
    b, h, t, d = shape
    exact = b * h * t * d * torch.empty((), dtype=dtype).element_size()
    codec, bits = (cfg.key_codec, cfg.key_bits) if is_key else (cfg.value_codec, cfg.value_bits)
    if codec == "exact":
        return exact
    part: Part
    if codec == "quant":
        assert bits is not None
        zeros = torch.zeros(shape, dtype=dtype)
        part = (
            QuantizedPart.keys(zeros, bits, cfg.group(True))
            if is_key
            else QuantizedPart.values(zeros, bits, cfg.group(False))
        )
    else:
        r = min(t, h * d)
        factors = Factors(torch.zeros(b, t, r, dtype=dtype), torch.zeros(b, r, h * d, dtype=dtype))
        pos = torch.zeros(b, t, 3, dtype=torch.int32) if is_key and cfg.key_pre_rope else None  # (B, T[, 3])
        if bits is None:
            part = LowRankPart(factors, h, pos)
        else:
            part = QuantizedLowRankPart.from_factors(
                factors, h, pos, coeff_bits=bits, basis_bits=16, coeff_group=cfg.group(is_key)
            )
    stored = storage_nbytes(part.tensors())
    return min(stored, exact) if cfg.fallback_exact else stored
