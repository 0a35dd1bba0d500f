"""Save a `PackedCache` to a folder and load it back, bit for bit, refusing anything damaged or mismatched.

On disk a saved cache is a folder with two files:

- `tensors.safetensors`: every tensor the cache holds, once (tensors shared between layers, e.g. the index/valid of
  gathered vision segments, are stored once), named hierarchically (`3.1.keys.coeffs.codes`: layer 3, segment 1,
  the keys part's `coeffs.codes`; `3.tail.keys`: the live slots of layer 3's exact tail), plus `tokens` (B, N)
  int32, the token ids the cache covers when the caller gave them.
- `manifest.json`: one line of canonical JSON (sorted keys, no spaces, ASCII) with
  `format` ("attentionpack.cache"), `format_version` (FORMAT_VERSION), `model` (architecture, config and weights
  fingerprint, `fingerprint.model_fingerprint`), `tokenizer` (fingerprint or null), `config` (every PackConfig field)
  and `config_sha256`, `seq_length`, `batch`, `tokens` (count, batch and sha256, or null), `nbytes` (the cache's
  `nbytes()` when saved), `cache` (the layout: per layer its counters, segments and exact tail), `classes` (name ->
  module and field names of every dataclass in the layout), `strides` (the few tensors that were dense but not
  contiguous: their strides), `file` (size and sha256 of `tensors.safetensors`), `extra` (caller data, e.g. the
  prefix store's) and `manifest_sha256` (sha256 of the canonical JSON of every other field).
  Stored forms are written generically (`_Writer.encode`): a dataclass is [class name, its field values in the order
  `classes` lists], a tensor "#<first 8 hex digits of the sha256 of its bytes>" (stored under its path, e.g.
  `3.1.keys.coeffs.codes`) or "@<name>" (the same tensor stored earlier), so every dataclass `attentionpack.parts`
  exports round-trips without per-class code, wherever it lives.

Loading checks, before any cache is built (`file_checks.py`): the manifest parses, is in canonical form and matches
its checksum; format and version; the model fingerprint; the tokenizer fingerprint (when the caller passes a
tokenizer and the file has one); the PackConfig (when the caller passes one); the tensors file's size and sha256;
every tensor's dtype and shape. Any failure raises `CacheFileError` naming the reason. The cache is then rebuilt
with the same tensors (dtype, shape and strides), the exact tail with its original capacity and slot offsets, and
every counter, so it continues exactly as the saved cache did.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .file_checks import (
    _TOKENS,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    TENSORS,
    check_compatible,
    read_manifest,
    read_tensors,
    stored_config,
    stored_tokens,
)
from .fingerprint import config_fields, config_sha256, model_fingerprint, tokenizer_fingerprint
from .tree import CacheFileError, _Reader, _sha, _tensor_bytes, _Writer, canonical_json

if TYPE_CHECKING:
    from ..config import PackConfig
    from .layer import PackedLayer
    from .packed_cache import PackedCache
    from .tail import ExactTail


@dataclass
class LoadedCache:
    """What `load_cache` returns: the cache, the token ids it covers ((B, N) long, or None when not saved) and the
    validated manifest."""

    cache: Any
    tokens: torch.Tensor | None
    manifest: dict


# ---- the cache <-> tree ----------------------------------------------------------------------------------------------
def _encode_cache(cache: PackedCache, w: _Writer) -> dict:
    layers = []
    for i, layer in enumerate(cache.layers):
        entry = {
            "total": layer.total,
            "sink_end": layer.sink_end,
            "last_call_tokens": layer._last_call_tokens,
            "record_past": layer.record_past,
            "is_initialized": layer.is_initialized,
            "dtype": w.encode(getattr(layer, "dtype", None), f"{i}.dtype") if layer.is_initialized else None,
            "budget_choice": list(layer.budget_choice) if layer.budget_choice is not None else None,
            "segments": [w.encode(seg, f"{i}.{j}") for j, seg in enumerate(layer.segments)],
            "query_moments": None
            if layer.query_moments is None
            else w.tensor(layer.query_moments, f"{i}.query_moments"),
            "tail": None,
        }
        tail = layer.tail
        if tail is not None:
            keys, values, positions, valid = tail.view()
            if tail.pad is not None:  # positions and padding flags follow the left-padding rule: derived, not held
                positions = valid = None
            entry["tail"] = {
                "keys": w.tensor(keys, f"{i}.tail.keys"),
                "values": w.tensor(values, f"{i}.tail.values"),
                "positions": None if positions is None else w.tensor(positions, f"{i}.tail.positions"),
                "valid": None if valid is None else w.tensor(valid, f"{i}.tail.valid"),
                "begin": tail.begin,
                "end": tail.end,
                "capacity": tail.capacity,
                "granule": tail.granule,
                "pad": tail.pad,
                "dropped": tail.dropped,
            }
        layers.append(entry)
    return {
        "span_boundaries": list(cache.span_boundaries),
        "labels": None if cache._labels is None else w.tensor(cache._labels, "labels"),
        "groups": [list(g) for g in cache.groups],
        "spans": [w.encode(sp, f"span.{k}") for k, sp in enumerate(cache.spans)],
        "layers": layers,
    }


def _restore_tail(layer: PackedLayer, t: dict, r: _Reader) -> ExactTail:
    from .tail import ExactTail

    i = layer.layer_idx
    keys, values = r.decode(t["keys"], f"{i}.tail.keys"), r.decode(t["values"], f"{i}.tail.values")
    positions, valid = r.decode(t["positions"], f"{i}.tail.positions"), r.decode(t["valid"], f"{i}.tail.valid")
    if not all(isinstance(x, torch.Tensor) for x in (keys, values)) or keys.dim() != 4 or keys.shape != values.shape:
        raise CacheFileError("malformed", f"layer {i}: the exact tail's keys/values are not (B, H, n, d) tensors")
    begin, end, cap, granule = (int(t[k]) for k in ("begin", "end", "capacity", "granule"))
    n = keys.shape[-2]
    if not (0 <= begin <= end <= cap and end - begin == n and granule >= 1):
        raise CacheFileError(
            "malformed", f"layer {layer.layer_idx}: tail slots [{begin}, {end}) of {cap} do not hold its {n} tokens"
        )
    tail = ExactTail.__new__(ExactTail)
    tail.granule, tail.begin, tail.end = granule, begin, end
    pad, dropped = t.get("pad"), int(t.get("dropped", 0))
    if pad is not None and (
        not isinstance(pad, list)
        or len(pad) != keys.shape[0]
        or not all(isinstance(p, int) and p >= 0 for p in pad)
        or positions is not None
    ):
        raise CacheFileError("malformed", f"layer {i}: the exact tail's padding rule {pad!r} does not fit its tokens")
    if pad is None and (positions is None) != (valid is None):
        raise CacheFileError("malformed", f"layer {i}: the exact tail holds positions or padding flags, not both")
    tail.pad, tail.dropped = pad, dropped

    # the original capacity, live tokens at their original slots (same strides as before)
    def buffer(live: torch.Tensor) -> torch.Tensor:
        shape = list(live.shape)
        axis = 2 if live.dim() == 4 else 1
        shape[axis] = cap
        buf = torch.empty(shape, dtype=live.dtype, device=live.device)
        buf.narrow(axis, begin, n).copy_(live)
        return buf

    tail.keys, tail.values = buffer(keys), buffer(values)
    tail.positions = None if positions is None else buffer(positions)
    tail.valid = None if valid is None else buffer(valid)
    return tail


def _decode_cache(cache: PackedCache, tree: dict, r: _Reader) -> None:
    from ..budget.candidates import candidate_config

    layers = tree["layers"]
    if len(layers) != len(cache.layers):
        raise CacheFileError("malformed", f"the file holds {len(layers)} layers, the model has {len(cache.layers)}")
    cache.span_boundaries = tuple(int(b) for b in tree["span_boundaries"])
    cache._labels = r.decode(tree["labels"], "labels")
    cache.groups = [tuple(g) for g in tree["groups"]]
    cache.spans = [r.decode(sp, f"span.{k}") for k, sp in enumerate(tree["spans"])]
    for layer, entry in zip(cache.layers, layers, strict=False):
        layer._reset_state()
        layer.total, layer.sink_end = int(entry["total"]), entry["sink_end"]
        layer._last_call_tokens, layer.record_past = int(entry["last_call_tokens"]), bool(entry["record_past"])
        layer.is_initialized = bool(entry["is_initialized"])
        if layer.is_initialized:
            layer.dtype, layer.device = r.decode(entry["dtype"], ""), r.device
        i = layer.layer_idx
        layer.segments = [r.decode(seg, f"{i}.{j}") for j, seg in enumerate(entry["segments"])]
        plan = getattr(layer, "plan", None)
        if plan is not None:  # state derived from the segments (a decode table), when the layer keeps one
            layer.plan = type(plan)(layer.spec.num_kv_heads, layer.spec.head_dim, layer.segments)
        layer.tail = None if entry["tail"] is None else _restore_tail(layer, entry["tail"], r)
        moments = entry.get("query_moments")
        layer.query_moments = None if moments is None else r.decode(moments, f"{i}.query_moments")
        if entry["budget_choice"] is not None:
            layer.budget_choice = tuple(entry["budget_choice"])
            layer.set_text_codec(candidate_config(layer.config, *layer.budget_choice))
        held = layer.segments[0].start if layer.segments else layer.total - layer.tail_length
        if not 0 <= held <= layer.total or layer.tail_length > layer.total:
            raise CacheFileError("malformed", f"layer {layer.layer_idx}: counters do not match its stored tokens")


# ---- files ---------------------------------------------------------------------------------------------------------
def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _tokens_tensor(tokens: Any, cache: PackedCache) -> torch.Tensor | None:
    if tokens is None:
        return None
    t = torch.as_tensor(tokens)
    if t.dim() == 1:
        t = t[None]
    n = cache.get_seq_length()
    if t.dim() != 2 or t.shape[1] != n:
        raise ValueError(
            f"tokens of shape {tuple(t.shape)} do not cover the cache's {n} tokens: pass the (B, {n}) "
            "token ids the cache holds"
        )
    batch = _batch_of(cache)
    if batch is not None and t.shape[0] != batch:
        raise ValueError(f"tokens have {t.shape[0]} rows, the cache holds {batch} samples")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= 2**31):
        raise ValueError("token ids must lie in [0, 2^31)")
    return t.to(torch.int32).contiguous()


def _batch_of(cache: PackedCache) -> int | None:
    for layer in cache.layers:
        if layer.tail is not None:
            return layer.tail.keys.shape[0]
        for seg in layer.segments:
            return seg.keys.tensors()[0].shape[0]
    return None


def build_files(
    cache: PackedCache, tokens: Any = None, tokenizer: Any = None, extra: dict | None = None
) -> tuple[bytes, bytes]:
    """The two files of a saved cache: (manifest bytes, tensors bytes). See the module docstring."""
    from importlib.metadata import PackageNotFoundError, version

    from safetensors.torch import save as st_save

    try:
        __version__ = version("attentionpack")
    except PackageNotFoundError:  # a source tree that was not installed
        __version__ = "unknown"

    w = _Writer()
    tree = _encode_cache(cache, w)
    tok = _tokens_tensor(tokens, cache)
    if tok is not None:
        w.tensor(tok, _TOKENS)
    data = st_save(w.tensors, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "attentionpack": __version__,
        "model": model_fingerprint(_model_of(cache)),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "config": _jsonable(config_fields(cache.config)),
        "config_sha256": config_sha256(cache.config),
        "seq_length": cache.get_seq_length(),
        "batch": _batch_of(cache),
        "tokens": None
        if tok is None
        else {"count": tok.shape[1], "batch": tok.shape[0], "sha256": _sha(_tensor_bytes(tok))},
        "nbytes": cache.nbytes(),
        "cache": tree,
        "classes": w.classes,
        "strides": w.strides,
        "file": {"name": TENSORS, "bytes": len(data), "sha256": _sha(data)},
        "extra": extra or {},
    }
    manifest["manifest_sha256"] = _sha(canonical_json(manifest))
    return canonical_json(manifest) + b"\n", data


def _model_of(cache: PackedCache) -> torch.nn.Module:
    model = cache.model_ref() if getattr(cache, "model_ref", None) is not None else None
    if model is None:
        raise ValueError("the model this cache was built for is gone; a cache is saved while its model is alive")
    return model


def _jsonable(fields: dict) -> dict:
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in fields.items()}


def write_files(folder: Path, manifest: bytes, data: bytes) -> None:
    """Write both files into a new folder (tensors first, then the manifest), each fsynced."""
    folder.mkdir(parents=True)
    _fsync_write(folder / TENSORS, data)
    _fsync_write(folder / MANIFEST, manifest)


def save_cache(
    cache: PackedCache, path: str | os.PathLike, tokens: Any = None, tokenizer: Any = None, extra: dict | None = None
) -> Path:
    """Save `cache` into the folder `path` (created; an existing saved cache there is replaced, anything else is an
    error). `tokens`: the (B, N) or (N,) token ids the cache covers (N = cache.get_seq_length()), recorded so a
    loader can check them; `tokenizer`: recorded as a fingerprint. Written to a temporary folder then renamed."""
    path = Path(path)
    if path.exists() and not (path.is_dir() and ((path / MANIFEST).exists() or not any(path.iterdir()))):
        raise ValueError(f"{path} exists and is not a saved cache; choose a new folder")
    manifest, data = build_files(cache, tokens, tokenizer, extra)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    write_files(tmp, manifest, data)
    if path.exists():
        trash = path.parent / f".{path.name}.old-{uuid.uuid4().hex}"
        os.rename(path, trash)
        os.rename(tmp, path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, path)
    return path


def load_cache(
    path: str | os.PathLike,
    model: torch.nn.Module,
    cache_class: Callable[..., Any],
    config: PackConfig | str | None = None,
    tokenizer: Any = None,
) -> LoadedCache:
    """Load the cache saved in folder `path` for `model` (and `config`: None uses the saved PackConfig, a given one
    must equal it); `cache_class` builds the empty cache (`PackedCache`). Raises CacheFileError (see module
    docstring) before building anything when the files are damaged or were written for another model, tokenizer
    (checked when both are known) or PackConfig."""
    from ..config import PackConfig

    path = Path(path)
    where = str(path)
    if config is not None and isinstance(config, str):
        config = PackConfig.preset(config)
    manifest = read_manifest(path)
    try:
        check_compatible(manifest, model, config, tokenizer, where)
        saved_config = stored_config(manifest, where)
        tensors = read_tensors(path, manifest, where)
        tokens = stored_tokens(manifest, tensors, where)
    except CacheFileError:
        raise
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as err:  # fields of the wrong type
        raise CacheFileError(
            "malformed", f"{where}: the manifest is inconsistent ({type(err).__name__}: {err})"
        ) from None
    device = next(iter(model.parameters())).device
    try:
        cache = cache_class(model, config if config is not None else saved_config)
        reader = _Reader(tensors, manifest["strides"], manifest["classes"], device)
        _decode_cache(cache, manifest["cache"], reader)
        if cache.get_seq_length() != manifest["seq_length"]:
            raise CacheFileError(
                "malformed",
                f"{where}: rebuilt {cache.get_seq_length()} tokens, the manifest says {manifest['seq_length']}",
            )
        for layer in cache.layers:  # every layer has seen every token (get_seq_length reads the first only)
            if layer.total != manifest["seq_length"]:
                raise CacheFileError(
                    "malformed",
                    f"{where}: layer {layer.layer_idx} counts {layer.total} tokens, the manifest says "
                    f"{manifest['seq_length']}",
                )
    except CacheFileError:
        raise
    except Exception as err:  # noqa: BLE001 - any inconsistency of a checksummed file is a writer bug or an edit
        raise CacheFileError(
            "malformed", f"{where}: the layout cannot be rebuilt ({type(err).__name__}: {err})"
        ) from None
    return LoadedCache(cache, tokens, manifest)
