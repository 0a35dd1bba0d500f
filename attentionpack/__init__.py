"""AttentionPack: memory-efficient transformer decoding with a compacted, attention-aware KV cache."""
from .cache import PackedCache
from .config import PRESETS, PackConfig
from .models import SUPPORTED_MODEL_TYPES, UnsupportedModelError, load_model

__all__ = ["PackedCache", "PackConfig", "PRESETS", "load_model", "SUPPORTED_MODEL_TYPES", "UnsupportedModelError"]
__version__ = "0.1.0"
