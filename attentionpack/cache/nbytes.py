"""Bytes really held by any cache: every tensor reachable from it, each storage counted once and whole."""

from __future__ import annotations

import dataclasses

import torch

from ..parts import storage_nbytes


def held_tensors(obj: object, _seen: set[int] | None = None) -> list[torch.Tensor]:
    """All tensors reachable from `obj` through attributes, containers and dataclass fields (not modules)."""
    seen = set() if _seen is None else _seen
    if id(obj) in seen or isinstance(obj, (torch.nn.Module, type, str, bytes, int, float, bool)) or obj is None:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return _plain_tensors(obj)
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        items = list(obj)
    elif dataclasses.is_dataclass(obj):
        items = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    elif hasattr(obj, "__dict__"):
        items = list(vars(obj).values())
    else:
        items = []
    out = []
    for item in items:
        out.extend(held_tensors(item, seen))
    return out


def _plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """Plain tensors behind a tensor subclass (e.g. optimum-quanto's packed QTensors), recursively."""
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [leaf for name in names for leaf in _plain_tensors(getattr(t, name))]
    return [t]


def cache_nbytes(cache: object) -> int:
    """Bytes held by a cache: `nbytes()` for ours, a walk of the layers' tensors for any other cache."""
    nbytes = getattr(cache, "nbytes", None)
    if callable(nbytes):
        return int(nbytes())
    return storage_nbytes(held_tensors(getattr(cache, "layers", cache)))
