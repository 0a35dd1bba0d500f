from .packed_cache import PackedCache

__all__ = ["PackedCache"]
