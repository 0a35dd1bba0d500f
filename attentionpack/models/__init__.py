from .loading import embedded_model_file, is_vlm_folder, load_model, load_vlm
from .registry import SUPPORTED_MODEL_TYPES, SUPPORTED_VLM_TYPES, ModelAdapter, UnsupportedModelError, check_supported

__all__ = ["load_model", "load_vlm", "is_vlm_folder", "embedded_model_file", "SUPPORTED_MODEL_TYPES",
           "SUPPORTED_VLM_TYPES", "ModelAdapter", "UnsupportedModelError", "check_supported"]
