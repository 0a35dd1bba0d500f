"""AttentionPack: memory-efficient transformer decoding with a compacted, attention-aware KV cache.

The public API: `PackedCache` (a transformers `Cache`), `PackConfig` and its presets, `load_model` / `load_vlm`
(offline), `check_device`, `cache_nbytes` (bytes really held by any cache), `BudgetError`.

The public names are imported on first use (module `__getattr__`), so `import attentionpack` and the command line's
`--help` do not pay for torch and transformers until a model or a cache is needed."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy names resolve to, for type checkers and IDEs
    from .budget import BudgetError
    from .cache import PackedCache, cache_nbytes
    from .config import PRESETS, PackConfig
    from .models import (
        SUPPORTED_MODEL_TYPES,
        SUPPORTED_VLM_TYPES,
        UnsupportedModelError,
        check_device,
        load_model,
        load_vlm,
    )

# public name -> module (relative to this package) that defines it
_LAZY = {
    "PackedCache": ".cache",
    "cache_nbytes": ".cache",
    "BudgetError": ".budget",
    "PackConfig": ".config",
    "PRESETS": ".config",
    "load_model": ".models",
    "check_device": ".models",
    "load_vlm": ".models",
    "SUPPORTED_MODEL_TYPES": ".models.registry",
    "SUPPORTED_VLM_TYPES": ".models.registry",
    "UnsupportedModelError": ".models.registry",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'attentionpack' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [  # the evaluation harness: attentionpack.eval.evaluate; the command line: attentionpack.cli
    "PRESETS",
    "SUPPORTED_MODEL_TYPES",
    "SUPPORTED_VLM_TYPES",
    "BudgetError",
    "PackConfig",
    "PackedCache",
    "UnsupportedModelError",
    "cache_nbytes",
    "check_device",
    "load_model",
    "load_vlm",
]
__version__ = "0.1.0"
