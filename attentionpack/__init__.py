"""AttentionPack: memory-efficient transformer decoding with a compacted, attention-aware KV cache.

The public API: `PackedCache` (a transformers `Cache`), `PackConfig` and its presets, `load_model` / `load_vlm`
(offline), `cache_nbytes` (bytes really held by any cache),, `BudgetError`. The
evaluation harness is `attentionpack.eval.evaluate`; the command line `attentionpack` (cli.py).
"""

from .budget import BudgetError
from .cache import PackedCache, cache_nbytes
from .config import PRESETS, PackConfig
from .models import SUPPORTED_MODEL_TYPES, SUPPORTED_VLM_TYPES, UnsupportedModelError, load_model, load_vlm


__all__ = [
    "PRESETS",
    "SUPPORTED_MODEL_TYPES",
    "SUPPORTED_VLM_TYPES",
    "BudgetError",
    "PackConfig",
    "PackedCache",
    "UnsupportedModelError",
    "cache_nbytes",
    "load_model",
    "load_vlm",
]
__version__ = "0.1.0"
