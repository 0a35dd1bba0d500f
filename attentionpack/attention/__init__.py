"""Attention on the stored form of a compressed layer (the transformers attention implementation "attentionpack")."""

from .packed import NAME, attend, disable, enable, register, strict
from .view import LayerView

__all__ = ["NAME", "LayerView", "attend", "disable", "enable", "register", "strict"]
