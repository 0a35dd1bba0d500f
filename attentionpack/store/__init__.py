"""Saving, loading and reusing compressed caches (README "Saving and reusing caches").

- `save_cache` / `load_cache` (also `PackedCache.save` / `PackedCache.load`): a cache <-> a folder with
  `tensors.safetensors` and `manifest.json` (format in `serialize.py`); damaged or mismatched files raise
  `CacheFileError`.
- `PrefixStore`: a folder of saved caches keyed by the token ids they cover; `cache_for` returns a cache holding the
  longest stored prefix of a prompt.
"""
from __future__ import annotations

from .fingerprint import model_fingerprint, tokenizer_fingerprint
from .prefix import PrefixStore, reusable_prefix
from .serialize import FORMAT_VERSION, CacheFileError, LoadedCache, load_cache, read_manifest, save_cache

__all__ = ["FORMAT_VERSION", "CacheFileError", "LoadedCache", "PrefixStore", "load_cache", "model_fingerprint",
           "read_manifest", "reusable_prefix", "save_cache", "tokenizer_fingerprint"]
