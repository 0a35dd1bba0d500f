"""What one forward call of a `PackedCache` tells each of its layers: the `StepContext`, carried to
`PackedLayer.update` in `cache_kwargs[STEP]`, and the optional hints a caller of `PackedCache.update` may put in
`cache_kwargs` (`FITS_HALF`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..parts import RopeFn
from .groups import Group

STEP = "attentionpack_step"  # the key of the `StepContext` in `cache_kwargs`
# `cache_kwargs[FITS_HALF]` (optional): the caller found that every element of this call's keys and values fits
# float16 (True) or not (False), e.g. once for a whole serving batch (`tail.fits_half_states`); absent: the tail checks
FITS_HALF = "attentionpack_fits_half"


@dataclass
class StepContext:
    """What one forward call tells every layer: new tokens' positions and padding, and how to get RoPE. Travels
    to `PackedLayer.update` in `cache_kwargs[STEP]`."""

    positions: torch.Tensor  # (B, q) int32, or (B, q, 3) multimodal positions
    valid: torch.Tensor  # (B, q) bool, False for padding
    rope: RopeFn
    span_boundaries: Sequence[int]
    layout: Callable[[int, int], list[Group] | None] | None = None  # modality groups of cache indices [a, b)
    query_moments: torch.Tensor | None = None  # (B, H, d, d) of this call's queries (multi-token calls, "scores")
    observation: tuple[torch.Tensor, float] | None = None  # the call's last queries (B, Hq, w, d) and scaling (keep)
    checked: dict | None = None  # the exact tails' padding-rule answers for these positions (shared by the layers)
    fits_half: bool | None = None  # the new keys and values fit float16 (None: not checked yet; see FITS_HALF)
