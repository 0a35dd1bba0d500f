from .loading import embedded_model_file, load_model
from .registry import SUPPORTED_MODEL_TYPES, ModelAdapter, UnsupportedModelError, check_supported

__all__ = ["load_model", "embedded_model_file", "SUPPORTED_MODEL_TYPES", "ModelAdapter", "UnsupportedModelError",
           "check_supported"]
