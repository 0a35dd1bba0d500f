"""`SequenceBatchCache`: N independent batch-1 caches seen by the model as one batch of N one-token rows.

Continuous batching runs ONE model forward per decoding step over every active sequence: input_ids (N, 1),
position_ids (N, 1) (each sequence's own length), past_key_values = a `SequenceBatchCache` wrapping the N
sequences' own caches (each a `PackedCache` or a `DynamicCache`, of any lengths). The weights are read once per
step for all sequences; attention is computed per sequence, each row against its own cache only.

`update(k (N, H, 1, d), v, layer_idx)` hands row i to cache i (`update(k[i:i+1], v[i:i+1], layer_idx)`) and returns
one `RowsView` for both keys and values. The model must run the "attentionpack" attention implementation
(`attentionpack.attention.packed.enable(model)`), which calls `RowsView.attend` for any key object with `attend`:
each row is attended either by its cache's own view (a `LayerView` of its compressed segments) or, for plain tensors,
by SDPA (or eager math when the model uses a logit softcap) over that row's keys/values.

Faults stay in their row: an exception raised by one sequence's cache (in `update` or in its view's `attend`) is
recorded in `failed[row]` and that row's attention output is zeros for the rest of the step, so the other rows'
results are unaffected (rows never mix in a decoder); the caller fails that sequence and drops its cache.

Padding rows: `padding` rows after the N sequences' (the engine pads a step to the row count its matrix products run
fastest at, `serve.row_padding`) have no cache: `update` skips them and their attention output is zeros; the caller
ignores their logits.

Masks: the model builds a mask from this wrapper's `get_mask_sizes`, which describes a trivial one-key mask; it
is ignored. Each row needs no causal mask (one query token attending to everything its cache returned) except on
sliding-window layers, where the row keeps only keys at cache indices >= length - window (the stock semantics:
query position p sees keys p - window < j <= p).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, NoReturn

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..attention.packed import attend_many, packed_attention_forward
from ..cache import FITS_HALF, fits_half_states


def layer_windows(model: Any) -> list[int | None]:
    """Per decoder layer: its sliding window in tokens, or None for full attention (transformers' own rule)."""
    config = model.config.get_text_config(decoder=True)
    types, kwargs = get_layer_types_and_kwargs(config)
    return [
        kw.get("sliding_window") if t in ("sliding_attention", "chunked_attention") else None
        for t, kw in zip(types, kwargs, strict=False)
    ]


class _RowsLayer(CacheLayerMixin):
    """Layer object transformers' mask code inspects: a trivial (1 query, 1 key) mask, never used by `RowsView`."""

    is_compileable = False
    is_croppable = False

    def __init__(self, sliding: bool):
        super().__init__()
        self.is_sliding = sliding
        self.is_initialized = True

    def lazy_initialization(
        self, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> None:  # pragma: no cover - never stores
        pass

    # never called: SequenceBatchCache.update dispatches per row
    def update(self, *args: Any, **kwargs: Any) -> NoReturn:  # pragma: no cover
        raise RuntimeError("a SequenceBatchCache layer stores nothing; call SequenceBatchCache.update")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1


class SequenceBatchCache(Cache):
    """N batch-1 caches (one per sequence) served as one batch of one-token decoding rows.

    Args:
        caches: the sequences' caches, row i of the batch is `caches[i]`; each already holds that sequence's tokens.
        windows: per layer the sliding window (None for full attention), from `layer_windows(model)`.
        padding: rows after the sequences' that belong to no sequence (see the module docstring).
    """

    def __init__(self, caches: Sequence[Cache], windows: Sequence[int | None], padding: int = 0):
        if not caches:
            raise ValueError("SequenceBatchCache needs at least one sequence cache")
        if padding < 0:
            raise ValueError(f"padding={padding} must be a number of rows >= 0")
        self.padding = padding
        super().__init__(layers=[_RowsLayer(w is not None) for w in windows])
        self.caches = list(caches)
        self.windows = list(windows)
        self.failed: dict[int, BaseException] = {}  # row -> the exception its cache raised during this step

    # returns RowsView, not tensors: the "attentionpack" attention forward recognises it and attends row by row
    def update(  # type: ignore[override]
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[RowsView, RowsView]:
        """key_states/value_states (N + padding, H, 1, d): row i < N goes to cache i. Returns (view, view), one
        `RowsView`."""
        n = key_states.shape[0]
        if n != len(self.caches) + self.padding:
            raise ValueError(f"a step of {n} rows for {len(self.caches)} sequence caches and {self.padding} padding")
        if key_states.shape[-2] != 1:
            raise ValueError(f"SequenceBatchCache serves one-token decoding steps, got {key_states.shape[-2]} tokens")
        rows = []
        # every row fits a float16 tail: checked once for the batch (if not, each cache checks its own row)
        real_k, real_v = key_states[: len(self.caches)], value_states[: len(self.caches)]
        fits = key_states.dtype == torch.float16 or fits_half_states(real_k, real_v)
        kwargs = {FITS_HALF: True} if fits else {}
        for i, cache in enumerate(self.caches):
            result = None
            if i not in self.failed:
                try:
                    result = cache.update(key_states[i : i + 1], value_states[i : i + 1], layer_idx, kwargs)
                except Exception as err:  # noqa: BLE001 - a fault of one sequence fails that sequence only
                    self.failed[i] = err
            rows.append(result)
        view = RowsView(rows + [None] * self.padding, self.windows[layer_idx], self.failed)
        return view, view

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Longest sequence held (positions are passed explicitly per row; masks use `get_mask_sizes`)."""
        return max(c.get_seq_length(layer_idx) for c in self.caches)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0


class RowsView:
    """The per-row results of one layer's update; `attend` computes each row's attention against its own cache.

    rows[i] is (keys, values) returned by sequence i's cache: a view with `attend` (both entries the same object)
    or plain tensors (1, H, L, d) covering that sequence's newest L cache indices; None for a failed or padding row
    (its output is zeros).
    """

    def __init__(self, rows: list[tuple | None], window: int | None, failed: dict[int, BaseException]):
        self.rows = rows
        self.window = window
        self.failed = failed

    def attend(
        self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float | None, softcap: float | None = None
    ) -> torch.Tensor:
        """query (N, Hq, 1, d) rotated -> output (N, 1, Hq, d); `mask` (built for the whole batch) is ignored.
        The rows over stored pieces attend in one call (`attend_many`: the threads share the sequences); if that
        raises, each row again on its own, so that a fault fails its sequence only."""
        outs: list[torch.Tensor | None] = [None] * len(self.rows)
        views = {  # row -> its view of stored pieces
            i: row[0]
            for i, row in enumerate(self.rows)
            if row is not None and i not in self.failed and not isinstance(row[0], torch.Tensor)
        }
        try:
            steps = [(view, query[i : i + 1], self._window_mask(view, query)) for i, view in views.items()]
            for i, out in zip(views, attend_many(steps, scaling, softcap), strict=True):
                outs[i] = out
        except Exception:  # noqa: BLE001 - found again row by row below
            outs = [None] * len(self.rows)
        for i, row in enumerate(self.rows):
            q = query[i : i + 1]
            if outs[i] is None and row is not None and i not in self.failed:
                try:
                    outs[i] = self._attend_row(q, row[0], row[1], scaling, softcap)
                except Exception as err:  # noqa: BLE001 - see the module docstring
                    self.failed[i] = err
        zeros = query.new_zeros(1, query.shape[2], query.shape[1], query.shape[3])
        return torch.cat([zeros if out is None else out for out in outs], dim=0)

    def _window_mask(self, view: Any, q: torch.Tensor) -> torch.Tensor | None:
        """(1, 1, 1, held) bool: the sliding window over a view's cache indices [first, total), None when the
        view holds no more than the window."""
        if self.window is None or view.total - view.first <= self.window:
            return None
        cols = torch.arange(view.first, view.total, device=q.device)
        return (cols >= view.total - self.window)[None, None, None, :]

    def _attend_row(
        self, q: torch.Tensor, keys: Any, values: Any, scaling: float | None, softcap: float | None
    ) -> torch.Tensor:
        if not isinstance(keys, torch.Tensor):  # a view of stored pieces over cache indices [first, total)
            row_mask = self._window_mask(keys, q)
            module = SimpleNamespace(
                num_key_value_groups=q.shape[1] // keys.num_kv_heads, is_causal=True, training=False
            )
            # a stand-in module: the attention forward reads only these three attributes from it
            out, _ = packed_attention_forward(
                module,  # type: ignore[arg-type]
                q,
                keys,
                values,
                row_mask,
                scaling=scaling,
                softcap=softcap,
            )
            return out
        if self.window is not None and keys.shape[-2] > self.window:
            keys, values = keys[..., -self.window :, :], values[..., -self.window :, :]
        groups = q.shape[1] // keys.shape[1]
        if softcap is None:
            module = SimpleNamespace(num_key_value_groups=groups, is_causal=True, training=False)
            # a stand-in module: the SDPA forward reads only these three attributes from it
            out, _ = sdpa_attention_forward(module, q, keys, values, None, scaling=scaling)  # type: ignore[arg-type]
            return out
        return _eager(q, keys, values, groups, scaling, softcap)


def _eager(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, groups: int, scaling: float | None, softcap: float
) -> torch.Tensor:
    """Eager attention of one row with a logit softcap: q (1, Hq, 1, d), keys/values (1, H, L, d) -> (1, 1, Hq, d)."""
    keys = keys.repeat_interleave(groups, dim=1)
    values = values.repeat_interleave(groups, dim=1)
    scale = q.shape[-1] ** -0.5 if scaling is None else scaling
    scores = (q @ keys.transpose(-1, -2)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return (probs @ values).transpose(1, 2).contiguous()
