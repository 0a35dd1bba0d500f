"""Fingerprints that tie a saved cache to the model and tokenizer that produced it.

A model fingerprint is a dict {"architecture", "config_sha256", "weights_sha256"}:
- architecture: the model class name and `config.model_type`;
- config_sha256: sha256 of the model config as canonical JSON (name/path and library version fields left out);
- weights_sha256: sha256 over every state_dict entry's name, dtype, shape and the CRC-32 of its bytes (every byte
  of every weight is read once; storages shared by tied weights are read once).
It is computed once per model object and memoized; the memo is checked against every state_dict tensor's data
pointer and version counter, so an in-place weight change (which bumps the counter) is noticed.

A tokenizer fingerprint is {"class", "sha256"}: sha256 of the vocabulary, added and special tokens and the chat
template, memoized per tokenizer object.
"""

from __future__ import annotations

import hashlib
import json
import weakref
import zlib
from typing import Any

import torch

_IGNORED_CONFIG_KEYS = {
    "_name_or_path",
    "name_or_path",
    "transformers_version",
    "_commit_hash",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "attn_implementation",
    "_experts_implementation",
}
_MODEL_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TOKENIZER_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def _config_dict(config: Any) -> dict:
    data = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))

    def clean(d: Any) -> Any:
        if isinstance(d, dict):
            return {k: clean(v) for k, v in d.items() if k not in _IGNORED_CONFIG_KEYS}
        if isinstance(d, (list, tuple)):
            return [clean(v) for v in d]
        return d

    return clean(data)


def _state_key(state: dict) -> tuple:
    return tuple((name, t.data_ptr(), t._version, tuple(t.shape), str(t.dtype)) for name, t in state.items())


def _weights_sha256(state: dict) -> str:
    h = hashlib.sha256()
    crcs: dict[tuple, int] = {}  # (data_ptr, nbytes, dtype) -> crc: tied weights are read once
    for name in sorted(state):
        t = state[name].detach()
        key = (t.data_ptr(), t.numel() * t.element_size(), str(t.dtype), tuple(t.stride()))
        if key not in crcs:
            flat = t.cpu().contiguous().reshape(-1)
            crcs[key] = zlib.crc32(memoryview(flat.view(torch.uint8).numpy())) if flat.numel() else 0
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{crcs[key]:08x};".encode())
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> dict:
    """{"architecture", "config_sha256", "weights_sha256"} of `model` (see module docstring); memoized."""
    state = model.state_dict()
    key = _state_key(state)
    hit = _MODEL_MEMO.get(model)
    if hit is not None and hit[0] == key:
        return dict(hit[1])
    config = getattr(model, "config", None)
    fp = {
        "architecture": f"{type(model).__name__}/{getattr(config, 'model_type', '?')}",
        "config_sha256": hashlib.sha256(_canonical(_config_dict(config))).hexdigest() if config is not None else "",
        "weights_sha256": _weights_sha256(state),
    }
    _MODEL_MEMO[model] = (key, fp)
    return dict(fp)


def tokenizer_fingerprint(tokenizer: Any) -> dict | None:
    """{"class", "sha256"} of a tokenizer (vocabulary, added/special tokens, chat template), or None for None."""
    if tokenizer is None:
        return None
    try:
        hit = _TOKENIZER_MEMO.get(tokenizer)
    except TypeError:  # not weak-referenceable
        hit = None
    if hit is not None:
        return dict(hit)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    data = {
        "vocab": vocab,
        "added": sorted((int(i), str(t)) for i, t in added.items()),
        "special": sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []) or []),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "bos": getattr(tokenizer, "bos_token_id", None),
        "eos": getattr(tokenizer, "eos_token_id", None),
    }
    fp = {"class": type(tokenizer).__name__, "sha256": hashlib.sha256(_canonical(data)).hexdigest()}
    try:
        _TOKENIZER_MEMO[tokenizer] = fp
    except TypeError:
        pass
    return dict(fp)


def config_fields(config: Any) -> dict:
    """A PackConfig's fields as JSON-able values (the dataclass fields, `name` included)."""
    import dataclasses

    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def config_sha256(config: Any) -> str:
    """sha256 of a PackConfig's compared fields (`name` is not compared: presets equal custom configs)."""
    fields = config_fields(config)
    fields.pop("name", None)
    return hashlib.sha256(_canonical(fields)).hexdigest()
