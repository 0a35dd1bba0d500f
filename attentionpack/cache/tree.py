"""Stored forms as a tree: every tensor of a cache's segments under a hierarchical name, everything else as JSON.

`_Writer.encode` walks dataclass fields (any stored form `attentionpack.parts` exports, nested `Quantized`,
`Factors`, tuples, dtypes), storing each tensor once (a view of a stored tensor refers to it) and recording each
class's fields in the manifest; `_Reader.decode` rebuilds the objects and refuses anything the manifest does not
describe with `CacheFileError`. The file format around it: `files.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
from typing import Any

import torch


class CacheFileError(ValueError):
    """A saved cache that cannot be used: `reason` is one of "missing", "format", "damaged", "truncated", "model",
    "tokenizer", "config", "tokens", "malformed"; the message says what differs or is broken."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{message} [{reason}]")
        self.reason = reason


# ---- canonical JSON ------------------------------------------------------------------------------------------------
def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _sha(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data if flat.numel() else memoryview(b"")


# ---- generic encoding of stored forms ------------------------------------------------------------------------------
def _registry() -> dict[str, type]:
    """Classes by name: every dataclass `attentionpack.parts` exports (the storage contract) and the VLM span."""
    from .. import parts
    from ..models.vlm import VisionSpan

    out = {
        name: getattr(parts, name)
        for name in getattr(parts, "__all__", dir(parts))
        if isinstance(getattr(parts, name, None), type) and dataclasses.is_dataclass(getattr(parts, name))
    }
    out["VisionSpan"] = VisionSpan
    return out


def _is_dense(t: torch.Tensor) -> bool:
    """True when `t` covers its memory without gaps or overlap (contiguous up to a permutation of its dims)."""
    return _stride_is_dense(list(t.shape), list(t.stride()))


def _stride_is_dense(shape: list[Any], stride: list[Any]) -> bool:
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in [*shape, *stride]):
        return False
    expected = 1
    for st, size in sorted((st, size) for size, st in zip(shape, stride, strict=False) if size != 1):
        if st != expected:
            return False
        expected *= size
    return True


class _Writer:
    """Encodes objects into the compact layout tree (see `encode`) and collects the tensors to store."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.strides: dict[str, list] = {}  # tensors stored contiguous that were dense with other strides
        self.classes: dict[str, dict] = {}
        self._seen: dict[tuple, str] = {}

    def tensor(self, t: torch.Tensor, name: str) -> str:
        """Store `t` under `name`: "#<first 8 hex digits of its bytes' sha256>"; or refer to an identical view
        stored earlier: "@<its name>"."""
        key: tuple[Any, ...] = (
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            tuple(t.stride()),
            t.dtype,
        )
        if t.numel() == 0:  # empty tensors may share a null pointer: never merged
            key = (name,)
        if key in self._seen:
            return "@" + self._seen[key]
        if name in self.tensors:
            raise ValueError(f"two tensors would both be stored as {name!r}")
        self._seen[key] = name
        data = t.detach().cpu().contiguous()
        self.tensors[name] = data
        if not t.is_contiguous() and _is_dense(t):
            self.strides[name] = list(t.stride())
        return "#" + _sha(_tensor_bytes(data))[:8]

    def encode(self, obj: Any, name: str) -> Any:
        """JSON form of `obj`: scalars as themselves (strings starting with one of "#@%!~" get a "~" prefix), a
        tensor "#checksum" / "@name" (see `tensor`), a dtype "%float32", a non-finite float "!inf", a dict an
        object, a tuple ["(", ...], a list ["[", ...], a dataclass [class name, field values in the order listed in
        `classes`]."""
        if obj is None or isinstance(obj, (bool, int)):
            return obj
        if isinstance(obj, str):
            return "~" + obj if obj[:1] in _MARKS else obj
        if isinstance(obj, float):
            return obj if math.isfinite(obj) else "!" + repr(obj)
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj, name)
        if isinstance(obj, torch.dtype):
            return "%" + str(obj).removeprefix("torch.")
        if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
            return ["(", *(self.encode(x, f"{name}.{i}") for i, x in enumerate(obj))]
        if isinstance(obj, list):
            return ["[", *(self.encode(x, f"{name}.{i}") for i, x in enumerate(obj))]
        if isinstance(obj, dict):
            if not all(isinstance(k, str) for k in obj):
                raise TypeError(f"{name}: only dicts with string keys can be saved")
            return {k: self.encode(v, f"{name}.{k}") for k, v in obj.items()}
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            cls = type(obj)
            fields = [f.name for f in dataclasses.fields(obj)]
            known = self.classes.setdefault(cls.__name__, {"module": cls.__module__, "fields": fields})
            if known["fields"] != fields or known["module"] != cls.__module__:
                raise TypeError(f"two classes named {cls.__name__} in one cache")
            return [cls.__name__, *(self.encode(getattr(obj, f), f"{name}.{f}") for f in fields)]
        raise TypeError(f"{name}: cannot save an object of type {type(obj).__name__}")


_MARKS = ("#", "@", "%", "!", "~")


class _Reader:
    """Decodes the layout tree written by `_Writer` into objects, with tensors from the verified tensors file."""

    def __init__(self, tensors: dict[str, torch.Tensor], strides: dict, classes: dict, device: torch.device):
        self.tensors, self.strides, self.device = tensors, strides, device
        self.classes = classes if isinstance(classes, dict) else {}
        self.registry = _registry()
        self._built: dict[str, torch.Tensor] = {}

    def tensor(self, name: str) -> torch.Tensor:
        if name in self._built:  # a tensor shared by several owners stays shared
            return self._built[name]
        if name not in self.tensors:
            raise CacheFileError("malformed", f"the layout refers to tensor {name!r}, which the file does not hold")
        src = self.tensors[name]
        stride = self.strides.get(name)
        out = (
            torch.empty_strided(src.shape, stride, dtype=src.dtype, device=self.device)
            if stride
            else torch.empty(src.shape, dtype=src.dtype, device=self.device)
        )
        out.copy_(src)
        self._built[name] = out
        return out

    def decode(self, obj: Any, name: str) -> Any:
        if obj is None or isinstance(obj, (bool, int, float)):
            return obj
        if isinstance(obj, str):
            mark, rest = obj[:1], obj[1:]
            if mark in ("#", "@"):
                return self.tensor(name if mark == "#" else rest)
            if mark == "%":
                dtype = getattr(torch, rest, None)
                if not isinstance(dtype, torch.dtype):
                    raise CacheFileError("malformed", f"unknown dtype {rest!r}")
                return dtype
            if mark == "!":
                return float(rest)
            return rest if mark == "~" else obj
        if isinstance(obj, dict):
            return {k: self.decode(v, f"{name}.{k}") for k, v in obj.items()}
        if not isinstance(obj, list) or not obj or not isinstance(obj[0], str):
            raise CacheFileError("malformed", f"unexpected layout node {str(obj)[:80]!r} at {name}")
        tag, items = obj[0], obj[1:]
        if tag in ("(", "["):
            out = [self.decode(x, f"{name}.{i}") for i, x in enumerate(items)]
            return tuple(out) if tag == "(" else out
        return self._dataclass(tag, items, name)

    def _dataclass(self, cls_name: str, items: list, name: str) -> Any:
        info = self.classes.get(cls_name)
        if not isinstance(info, dict) or not isinstance(info.get("fields"), list) or len(info["fields"]) != len(items):
            raise CacheFileError("malformed", f"stored form {cls_name!r} at {name} is not described in the manifest")
        module = info.get("module", "")
        cls = self.registry.get(cls_name)
        if cls is None and isinstance(module, str) and module.startswith("attentionpack."):
            try:
                cls = getattr(importlib.import_module(module), cls_name, None)
            except ImportError:
                cls = None
        if cls is None or not dataclasses.is_dataclass(cls):
            raise CacheFileError("malformed", f"stored form {cls_name!r} ({module}) is unknown to this attentionpack")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if set(info["fields"]) != set(fields):
            raise CacheFileError(
                "malformed",
                f"stored form {cls_name} has fields {info['fields']}, this "
                f"attentionpack's {cls_name} has {list(fields)}",
            )
        decoded = {k: self.decode(v, f"{name}.{k}") for k, v in zip(info["fields"], items, strict=False)}
        inst = cls(**{k: v for k, v in decoded.items() if fields[k].init})
        for k, v in decoded.items():
            if not fields[k].init:
                object.__setattr__(inst, k, v)
        return inst
