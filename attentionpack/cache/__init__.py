"""The transformers `Cache`: `PackedCache`, a list of `PackedLayer`s (segments + an exact tail), and byte counts."""

from .layer import PackedLayer, StepContext
from .nbytes import cache_nbytes, held_tensors
from .packed_cache import PackedCache

__all__ = ["PackedCache", "PackedLayer", "StepContext", "cache_nbytes", "held_tensors"]
