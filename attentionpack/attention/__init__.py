"""Attention on the stored form of a PackedCache (registered as transformers attention "attentionpack")."""
from .packed import NAME, PackedView, enable, register

__all__ = ["NAME", "PackedView", "enable", "register"]
