"""The compressed cache. `PackedCache` is imported on first use, so that importing a submodule
(`attentionpack.cache.segments`, which the codecs build on) does not import the whole cache (and back the codecs)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .packed_cache import PackedCache

__all__ = ["PackedCache"]


def __getattr__(name: str) -> Any:
    if name == "PackedCache":
        from .packed_cache import PackedCache

        return PackedCache
    raise AttributeError(f"module 'attentionpack.cache' has no attribute {name!r}")
