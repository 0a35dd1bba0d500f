"""Reusing compressed caches (README "Saving and reusing caches").

- `save_cache` / `load_cache` (also `PackedCache.save` / `PackedCache.load`): a cache <-> a folder with
  `tensors.safetensors` and `manifest.json` (the format: `attentionpack/cache/files.py`); damaged or mismatched
  files raise `CacheFileError`.
- `PrefixStore`: a folder of saved caches keyed by the token ids they cover; `cache_for` returns a cache holding the
  longest stored prefix of a prompt.
"""

from __future__ import annotations

from ..cache.file_checks import FORMAT_VERSION, TENSORS, read_manifest
from ..cache.files import LoadedCache, save_cache
from ..cache.fingerprint import model_fingerprint, tokenizer_fingerprint
from ..cache.tree import CacheFileError
from .prefix import PrefixStore, load_cache, reusable_prefix

__all__ = [
    "FORMAT_VERSION",
    "TENSORS",
    "CacheFileError",
    "LoadedCache",
    "PrefixStore",
    "load_cache",
    "model_fingerprint",
    "read_manifest",
    "reusable_prefix",
    "save_cache",
    "tokenizer_fingerprint",
]
