"""AttentionPack: memory-efficient transformer decoding with a compacted, attention-aware KV cache."""
from .cache import PackedCache
from .config import PRESETS, PackConfig
from .models import SUPPORTED_MODEL_TYPES, SUPPORTED_VLM_TYPES, UnsupportedModelError, load_model, load_vlm



def evaluate(*args, **kwargs):
    """Run the evaluation harness (see `attentionpack.eval.runner.evaluate`)."""
    from .eval.runner import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


__all__ = ["PackedCache", "PackConfig", "PRESETS", "load_model", "load_vlm", "evaluate", "SUPPORTED_MODEL_TYPES",
           "SUPPORTED_VLM_TYPES", "UnsupportedModelError"]
__version__ = "0.1.0"
