"""Eviction: which tokens to keep given importance scores, and RazorAttention's compensation token.

Pure tensor functions, per sample and optionally per KV head. The first `protect_first` real tokens (attention
sinks) and the last `protect_last` tokens (the recent window, which holds the observation window) are always kept;
the rest are kept by descending score. A non-retrieval head that drops tokens can keep one compensation token, the
mean of its dropped keys and values (RazorAttention, arXiv 2407.15891): attended with its logit raised by
log(count), it stands for all the dropped tokens at once and is exact when they share one key.

Shapes: B batch, H KV heads, T tokens, n kept tokens, d head dim. "[H,]" marks an optional per-head axis.
"""

from __future__ import annotations

import math

import torch


def _keep_counts(keep: int | float, n_valid: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """Tokens each row keeps (same shape as n_valid): its share of its valid tokens, never fewer than protected."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ValueError(f"keep={keep!r} is invalid: must be a token count (int >= 1) or a fraction in (0, 1]")
    if isinstance(keep, int):
        if keep < 1:
            raise ValueError(f"keep={keep} is invalid: a token count must be >= 1")
        share = torch.full_like(n_valid, keep)
    else:
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep={keep} is invalid: a fraction must be in (0, 1]")
        share = torch.ceil(n_valid.double() * keep).long()
    return torch.minimum(torch.maximum(share, protected), n_valid)


def select_tokens(
    scores: torch.Tensor,
    keep: int | float,
    protect_first: int = 4,
    protect_last: int = 64,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices (B, [H,] n) of the tokens to keep, ascending, for scores (B, [H,] T).

    keep: a count (int) or a fraction (float) of each row's valid tokens. protect_first: the first real tokens of
    each sample (after its left padding) are always kept; protect_last: so are the last tokens. valid (B, T) or
    (B, [H,] T) bool marks real tokens (default all); padding is never chosen over a real token.
    The result is rectangular: n is the largest row count; a row whose own count is smaller keeps its next best
    tokens too, and a row with fewer than n real tokens is filled with its padding indices (still masked)."""
    if not isinstance(scores, torch.Tensor) or scores.dim() not in (2, 3) or not scores.is_floating_point():
        raise ValueError(f"scores must be a float tensor (B, T) or (B, H, T), got {getattr(scores, 'shape', scores)}")
    for name, value in (("protect_first", protect_first), ("protect_last", protect_last)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r} is invalid: must be an integer >= 0")
    t = scores.shape[-1]
    if valid is None:
        valid = torch.ones(scores.shape[0], t, dtype=torch.bool, device=scores.device)
    bad_shape = valid.shape[0] != scores.shape[0] or valid.shape[-1] != t or valid.dim() > scores.dim()
    if valid.dtype != torch.bool or bad_shape:
        raise ValueError(
            f"valid must be a bool mask (B, T) or {tuple(scores.shape)}, got {valid.dtype} {tuple(valid.shape)}"
        )
    if valid.dim() < scores.dim():
        valid = valid.unsqueeze(1)  # (B, 1, T)
    valid = valid.expand_as(scores)  # (B, [H,] T)
    rank_in_row = valid.long().cumsum(-1)  # 1-based rank of each real token
    idx = torch.arange(t, device=scores.device)
    protected = valid & ((rank_in_row <= protect_first) | (idx >= t - protect_last))  # (B, [H,] T)
    counts = _keep_counts(keep, valid.sum(-1), protected.sum(-1))  # (B, [H])
    n = int(counts.max().item()) if counts.numel() else 0
    n = max(n, 1)
    # order: protected real tokens, then real tokens by descending score, then padding (lexicographic, stable)
    s = scores.float().nan_to_num(nan=float("-inf"))
    by_score = s.argsort(dim=-1, descending=True, stable=True)  # (B, [H,] T)
    tier = (valid.long() + protected.long()).gather(-1, by_score)  # 2 protected, 1 real, 0 padding
    order = by_score.gather(-1, tier.argsort(dim=-1, descending=True, stable=True))
    top = order[..., :n]  # (B, [H,] n)
    return top.sort(dim=-1).values


def kept_mask(indices: torch.Tensor, length: int) -> torch.Tensor:
    """Bool mask (B, [H,] T) with True at the kept `indices` (B, [H,] n)."""
    mask = torch.zeros(*indices.shape[:-1], length, dtype=torch.bool, device=indices.device)
    return mask.scatter_(-1, indices, True)


def gather_tokens(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Kept tokens (B, H, n, d) of x (B, H, T, d): `indices` (B, n) shared by the heads, or (B, H, n) per head."""
    if x.dim() != 4:
        raise ValueError(f"x must be (B, H, T, d), got {tuple(x.shape)}")
    if indices.dim() == 2:
        indices = indices.unsqueeze(1).expand(-1, x.shape[1], -1)  # (B, H, n)
    if indices.shape[:2] != x.shape[:2]:
        raise ValueError(f"indices {tuple(indices.shape)} do not match x {tuple(x.shape)}: need (B, n) or (B, H, n)")
    return x.gather(2, indices.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


def compensation_token(
    keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean key and value (B, H, 1, d) of the real tokens NOT in `indices` (B, [H,] n), and their count (B, H).

    keys/values (B, H, T, d). Attend to the token with logit q·k_c·scale + log(count): then its weight equals the
    total weight the dropped tokens would have had if they shared the key k_c. A head that dropped nothing gets a
    zero token with count 0 (log 0 = -inf: it receives no attention)."""
    if keys.shape != values.shape or keys.dim() != 4:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must both be (B, H, T, d)")
    b, h, t, _ = keys.shape
    if indices.dim() == 2:
        indices = indices.unsqueeze(1).expand(b, h, -1)
    dropped = ~kept_mask(indices, t)  # (B, H, T)
    if valid is not None:
        dropped &= valid.view(b, -1, t)
    weight = dropped.to(keys.dtype).unsqueeze(-1)  # (B, H, T, 1)
    count = dropped.sum(-1)  # (B, H)
    denom = count.clamp_min(1).to(keys.dtype).view(b, h, 1, 1)
    k_c = (keys * weight).sum(2, keepdim=True) / denom  # (B, H, 1, d)
    v_c = (values * weight).sum(2, keepdim=True) / denom
    return k_c, v_c, count


def compensation_bias(count: torch.Tensor) -> torch.Tensor:
    """Logit bias log(count) (B, H) for the compensation token; -inf where nothing was dropped."""
    log_count = count.double().clamp_min(1).log()
    return torch.where(count > 0, log_count, torch.full_like(log_count, -math.inf)).float()
