"""Supported architectures (registry), offline loading (loading) and vision-language token spans (vlm)."""

from .loading import check_device, converted_cache_dir, embedded_model_file, is_vlm_folder, load_model, load_vlm
from .names import MODEL_NAMES, gemma3_file, model_name
from .registry import SUPPORTED_MODEL_TYPES, SUPPORTED_VLM_TYPES, ModelAdapter, UnsupportedModelError, check_supported

__all__ = [
    "MODEL_NAMES",
    "gemma3_file",
    "model_name",
    "SUPPORTED_MODEL_TYPES",
    "SUPPORTED_VLM_TYPES",
    "ModelAdapter",
    "UnsupportedModelError",
    "check_device",
    "check_supported",
    "converted_cache_dir",
    "embedded_model_file",
    "is_vlm_folder",
    "load_model",
    "load_vlm",
]
