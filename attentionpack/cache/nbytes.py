"""Bytes really held by any cache: every tensor reachable from it, each storage counted once and whole."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..parts import storage_nbytes

if TYPE_CHECKING:
    from .layer import PackedLayer


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


class FrozenBytes:
    """`PackedCache.nbytes()`: the layers' frozen storages (segments and what their decode plans made) walked again
    only when a layer's plan changed (a plan is only appended to, and replaced otherwise: its identity and segment
    count say whether the segments changed), the exact tails at every call. Serving measures every sequence after
    every step: after 4,000 decoded tokens a SmolLM2 cache holds ~14,000 tensors (~10 ms a walk)."""

    def __init__(self) -> None:
        self.plans: list[tuple[weakref.ref, int]] = []  # each layer's plan and its segment count when counted
        self.bytes = 0
        self.storages: frozenset[int] = frozenset()

    def nbytes(self, layers: Sequence[PackedLayer]) -> int:
        if len(self.plans) != len(layers) or any(
            ref() is not layer.plan or count != layer.plan.count
            for (ref, count), layer in zip(self.plans, layers, strict=True)
        ):
            seen: set[int] = set()
            self.bytes = storage_nbytes([t for layer in layers for t in layer.frozen_tensors()], seen)
            self.plans = [(weakref.ref(layer.plan), layer.plan.count) for layer in layers]
            self.storages = frozenset(seen)
        tails = [t for layer in layers if layer.tail is not None for t in layer.tail.tensors()]
        return self.bytes + storage_nbytes(tails, counted=self.storages)
