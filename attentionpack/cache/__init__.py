"""The transformers `Cache`: `PackedCache`, a list of `PackedLayer`s (segments + an exact tail), and byte counts."""

from .layer import PackedLayer
from .nbytes import cache_nbytes, held_tensors
from .packed_cache import PackedCache
from .step import FITS_HALF, StepContext
from .tail import fits_half_states

__all__ = ["FITS_HALF", "PackedCache", "PackedLayer", "StepContext", "cache_nbytes", "fits_half_states", "held_tensors"]
