"""Observation-window token importance (SnapKV style), per sample and per KV head.

The last `w` prompt queries see the whole prompt; the attention they pay to each earlier token predicts the
attention decoding will pay to it (SnapKV, arXiv 2404.14469). This module recomputes those queries exactly as the
model's attention does (q_proj, optional q_norm, RoPE) from the attention module's inputs, and turns them into
per-token scores: softmax attention probabilities summed over the window, with the query heads of a GQA group
aggregated onto their KV head. Every sample is scored on its own (padding excluded), so a batch never shares one
ranking.

Shapes: B batch, Hq query heads, H KV heads, G = Hq / H group size, w window, T key tokens, d head dim.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from ..rope import apply_rope


def attention_scaling(attn_module) -> float:
    """The factor the module multiplies q·k by (head_dim^-0.5, or query_pre_attn_scalar^-0.5 for Gemma 3)."""
    scaling = getattr(attn_module, "scaling", None)
    if scaling is None:
        raise ValueError(f"{type(attn_module).__name__} has no .scaling; pass a supported attention module")
    return float(scaling)


def multi_token_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None:
    """(hidden_states (B, T, hidden), position_embeddings) of an attention pre-hook's call, or None unless it is a
    multi-token call (a prompt) that carries both."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    pe = kwargs.get("position_embeddings")
    if hidden is None or pe is None or hidden.dim() != 3 or hidden.shape[1] < 2:
        return None
    return hidden, pe


@torch.no_grad()
def window_queries(
    attn_module, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor], window: int
) -> torch.Tensor:
    """Rotated queries (B, Hq, w, d) of the last `window` positions, as `attn_module.forward` computes them.

    hidden_states (B, T, hidden) and position_embeddings (cos, sin), each (B, T, d), are the attention module's own
    inputs (e.g. captured by a forward pre-hook). Only the last w rows are projected."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
        shape = tuple(getattr(hidden_states, "shape", ()))
        raise ValueError(f"hidden_states must be (B, T, hidden), got shape {shape}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window={window!r} is invalid: must be an integer >= 1")
    q_proj, head_dim = getattr(attn_module, "q_proj", None), getattr(attn_module, "head_dim", None)
    if q_proj is None or head_dim is None:
        raise ValueError(f"{type(attn_module).__name__} lacks q_proj/head_dim; pass a supported attention module")
    cos, sin = position_embeddings
    b, t, _ = hidden_states.shape
    if cos.shape[-2] != t or sin.shape != cos.shape:
        raise ValueError(f"position_embeddings of shape {tuple(cos.shape)} do not match hidden_states {(b, t)}")
    w = min(window, t)
    return queries_at(
        attn_module, hidden_states, position_embeddings, torch.arange(t - w, t, device=hidden_states.device)
    )


@torch.no_grad()
def queries_at(
    attn_module, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor
) -> torch.Tensor:
    """Rotated queries (B, Hq, n, d) of the call's positions `rows` (n,) ascending, as `attn_module.forward`
    computes them (see `window_queries`)."""
    q_proj, head_dim = getattr(attn_module, "q_proj", None), getattr(attn_module, "head_dim", None)
    if q_proj is None or head_dim is None:
        raise ValueError(f"{type(attn_module).__name__} lacks q_proj/head_dim; pass a supported attention module")
    cos, sin = position_embeddings
    b = hidden_states.shape[0]
    rows = rows.to(hidden_states.device)
    q = q_proj(hidden_states[:, rows]).view(b, len(rows), -1, head_dim)  # (B, n, Hq, d)
    q_norm = getattr(attn_module, "q_norm", None)  # qwen3, gemma3: RMSNorm over d before RoPE
    if q_norm is not None:
        q = q_norm(q)
    q = q.transpose(1, 2)  # (B, Hq, n, d)
    return apply_rope(q, cos[:, rows].expand(b, -1, -1), sin[:, rows].expand(b, -1, -1))


@torch.no_grad()
def query_moments(
    attn_module: torch.nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    num_kv_heads: int,
    valid: torch.Tensor | None = None,
    max_positions: int = 512,
) -> torch.Tensor:
    """Second moment of the rotated queries of each KV head's query group, (B, H, d, d) float64: the mean of
    q qᵀ over up to `max_positions` evenly spaced positions of the call (padding excluded by `valid` (B, T)).

    With it, the mean squared score error of replacing keys K by K̂ over these queries is
    tr((K - K̂) M (K - K̂)ᵀ) per head: the weighting `codecs.lowrank` factors keys under (objective "scores")."""
    b, t, _ = hidden_states.shape
    stride = max(1, -(-t // max_positions))
    pos = torch.arange(t - 1, -1, -stride, device=hidden_states.device).flip(0)  # always includes the last
    q = queries_at(attn_module, hidden_states, position_embeddings, pos)  # (B, Hq, n, d)
    hq, head_dim = q.shape[1], q.shape[-1]
    q = q.double().reshape(b, num_kv_heads, hq // num_kv_heads, len(pos), head_dim)
    if valid is not None:
        q = q * valid[:, pos].to(q.dtype).view(b, 1, 1, -1, 1)
        count = valid[:, pos].sum(dim=1).clamp_min(1).to(q.dtype).view(b, 1, 1, 1) * (hq // num_kv_heads)
    else:
        count = torch.full((b, 1, 1, 1), float(len(pos) * (hq // num_kv_heads)), dtype=q.dtype, device=q.device)
    q = q.flatten(2, 3)  # (B, H, g*n, d)
    return (q.transpose(-1, -2) @ q) / count  # (B, H, d, d)


def _check(queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor) -> tuple[int, int, int, int]:
    if queries.dim() != 4 or keys.dim() != 4:
        raise ValueError(
            f"queries (B, Hq, w, d) and keys (B, H, T, d) must be 4-D, got {tuple(queries.shape)} "
            f"and {tuple(keys.shape)}"
        )
    b, hq, w, d = queries.shape
    _, h, t, _ = keys.shape
    if keys.shape[0] != b or keys.shape[-1] != d or hq % h:
        raise ValueError(
            f"queries {tuple(queries.shape)} do not fit keys {tuple(keys.shape)}: batch and head dim "
            f"must match and Hq must be a multiple of H"
        )
    if w > t:
        raise ValueError(f"window of {w} queries is longer than the {t} keys; the window must be the keys' last tokens")
    if valid.dtype != torch.bool or valid.shape not in ((b, t), (b, h, t)):
        raise ValueError(
            f"valid must be a bool mask (B, T) or (B, H, T) = {(b, t)} / {(b, h, t)}, got "
            f"{valid.dtype} {tuple(valid.shape)}"
        )
    return b, h, w, t


def window_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    valid: torch.Tensor,
    window_valid: torch.Tensor | None = None,
    scaling: float | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Softmax attention probabilities (B, H, G, w, T), float32, of the window queries over all keys.

    The window is the keys' last w tokens: query i sits at key index T - w + i and sees keys <= that index (and,
    with `sliding_window`, the last `sliding_window` of them, as transformers' sliding masks do). `valid` (B, T)
    or per head (B, H, T) marks the keys that exist (False: padding or evicted). Rows of invalid queries
    (`window_valid` (B, w) False) are all zero."""
    logits = window_logits(queries, keys, valid, window_valid, scaling, sliding_window)
    return torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # fully masked rows (invalid queries) -> 0


def window_logits(
    queries: torch.Tensor,
    keys: torch.Tensor,
    valid: torch.Tensor,
    window_valid: torch.Tensor | None = None,
    scaling: float | None = None,
    sliding_window: int | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The scaled logits (B, H, G, w, T), float32, of `window_attention`, -inf where a key is masked. `rows` (w,):
    the key index of each query (default: the keys' last w tokens)."""
    b, h, w, t = _check(queries, keys, valid)
    g = queries.shape[1] // h
    scale = queries.shape[-1] ** -0.5 if scaling is None else scaling
    q = queries.float().reshape(b, h, g * w, -1)  # (B, H, G*w, d): no copy of the keys per query head
    logits = (q @ keys.float().transpose(-1, -2)).mul_(scale).view(b, h, g, w, t)  # (B, H, G, w, T)
    row = (torch.arange(t - w, t) if rows is None else rows).to(keys.device).unsqueeze(1)  # (w, 1) key index
    col = torch.arange(t, device=keys.device).unsqueeze(0)  # (1, T)
    allowed = col <= row  # (w, T)
    if sliding_window is not None:
        allowed = allowed & (col > row - sliding_window)
    keep = valid.view(b, -1, 1, 1, t) & allowed  # (B, H|1, 1, w, T)
    if window_valid is not None:
        if window_valid.shape != (b, w) or window_valid.dtype != torch.bool:
            raise ValueError(
                f"window_valid must be a bool mask {(b, w)}, got {window_valid.dtype} {tuple(window_valid.shape)}"
            )
        keep = keep & window_valid.view(b, 1, 1, w, 1)
    return logits.masked_fill_(~keep, float("-inf"))


class Importance(NamedTuple):
    per_head: torch.Tensor  # (B, H, T) per KV head
    per_token: torch.Tensor  # (B, T) mean over KV heads


def token_importance(
    queries: torch.Tensor,
    keys: torch.Tensor,
    valid: torch.Tensor,
    window_valid: torch.Tensor | None = None,
    pool_kernel: int = 1,
    pool: Literal["max", "avg"] = "max",
    group: Literal["mean", "sum"] = "mean",
    scaling: float | None = None,
    sliding_window: int | None = None,
) -> Importance:
    """Cumulative attention of the window queries (B, Hq, w, d) on each key of keys (B, H, T, d).

    per_head[b, h, j] = Σ over the window queries i and (mean or sum over) the G query heads of KV head h of the
    softmax probability of key j; the window itself is scored too (causally). pool_kernel > 1 (odd) smooths the
    scores along the tokens with a max or average 1-D pool (SnapKV uses 5-7) so neighbours of an important token
    rank with it. Padding keys (valid False) always score 0. per_token is the mean over KV heads."""
    if isinstance(pool_kernel, bool) or not isinstance(pool_kernel, int) or pool_kernel < 1 or pool_kernel % 2 == 0:
        raise ValueError(f"pool_kernel={pool_kernel!r} is invalid: must be an odd integer >= 1")
    if pool not in ("max", "avg"):
        raise ValueError(f"pool={pool!r} is invalid: must be 'max' or 'avg'")
    if group not in ("mean", "sum"):
        raise ValueError(f"group={group!r} is invalid: must be 'mean' or 'sum'")
    probs = window_attention(queries, keys, valid, window_valid, scaling, sliding_window)  # (B, H, G, w, T)
    scores = probs.sum(dim=3)  # (B, H, G, T)
    scores = scores.mean(dim=2) if group == "mean" else scores.sum(dim=2)  # (B, H, T)
    if pool_kernel > 1:
        b, h, t = scores.shape
        flat = scores.reshape(b * h, 1, t)
        pad = pool_kernel // 2
        if pool == "max":
            flat = F.max_pool1d(flat, pool_kernel, stride=1, padding=pad)
        else:
            flat = F.avg_pool1d(flat, pool_kernel, stride=1, padding=pad, count_include_pad=False)
        scores = flat.view(b, h, t) * valid.view(b, -1, t)  # padding stays 0
    return Importance(scores, scores.mean(dim=1))


def attention_output_error(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    keys_hat: torch.Tensor,
    values_hat: torch.Tensor,
    valid: torch.Tensor,
    valid_hat: torch.Tensor | None = None,
    window_valid: torch.Tensor | None = None,
    scaling: float | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Relative error (B,) of the window's attention output softmax(q Kᵀ·scale) V with (K̂, V̂) instead of (K, V).

    queries (B, Hq, w, d) are the window queries (the keys' last w tokens); keys/values and their encodings
    (B, H, T, d). valid (B, T) marks real tokens; valid_hat (B, [H,] T) the tokens the encoding keeps (eviction:
    dropped tokens False; default `valid`). Per sample: ||O - Ô||_F / ||O||_F over heads, queries and channels."""
    if keys_hat.shape != keys.shape or values_hat.shape != values.shape or values.shape != keys.shape:
        raise ValueError(
            f"keys {tuple(keys.shape)}, values {tuple(values.shape)}, keys_hat {tuple(keys_hat.shape)} "
            f"and values_hat {tuple(values_hat.shape)} must share one (B, H, T, d) shape"
        )
    if valid_hat is None:
        valid_hat = valid
    elif valid_hat.dim() == 3:
        valid_hat = valid_hat & valid.unsqueeze(1)
    else:
        valid_hat = valid_hat & valid

    def output(k, v, mask):
        probs = window_attention(queries, k, mask, window_valid, scaling, sliding_window)  # (B, H, G, w, T)
        return probs @ v.float().unsqueeze(2)  # (B, H, G, w, d)

    exact = output(keys, values, valid)
    approx = output(keys_hat, values_hat, valid_hat)
    b = exact.shape[0]
    num = (exact - approx).reshape(b, -1).norm(dim=-1)
    return num / exact.reshape(b, -1).norm(dim=-1).clamp_min(1e-30)
