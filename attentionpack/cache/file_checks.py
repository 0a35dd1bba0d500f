"""The checks a saved cache's files pass before anything is built from them (`files.load_cache`, the prefix store):
the manifest parses, is canonical and matches its checksum, names this format and version; it was written by this
model, tokenizer and PackConfig; the tensors file has the recorded size and sha256 (naming the damaged tensors when
it does not), holds exactly the tensors the layout refers to, with possible strides; the stored token ids match.
Every failure is a `CacheFileError` naming the reason. The format itself: `files.py`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .fingerprint import config_fields, config_sha256, model_fingerprint, tokenizer_fingerprint
from .tree import CacheFileError, _sha, _stride_is_dense, _tensor_bytes, canonical_json

if TYPE_CHECKING:
    from ..config import PackConfig

FORMAT = "attentionpack.cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
_TOKENS = "tokens"


def read_manifest(path: str | os.PathLike) -> dict:
    """The validated manifest of the saved cache in folder `path` (format, version, checksum); CacheFileError
    otherwise."""
    path = Path(path)
    try:
        raw = (path / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise CacheFileError("missing", f"{path} holds no {MANIFEST}: not a saved cache, or removed") from None
    except OSError as err:
        raise CacheFileError("missing", f"cannot read {path / MANIFEST}: {err}") from None
    return parse_manifest(raw, str(path))


def parse_manifest(raw: bytes, where: str = "manifest") -> dict:
    """Validate manifest bytes: JSON, format, version, canonical form, checksum."""
    try:
        manifest = json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise CacheFileError("damaged", f"{where}: the manifest is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CacheFileError("format", f"{where}: not an attentionpack saved cache (format {got!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CacheFileError(
            "format",
            f"{where}: written in cache format version {version!r}; this attentionpack reads version {FORMAT_VERSION}",
        )
    try:
        canonical = canonical_json(manifest) + b"\n"
    except (TypeError, ValueError) as err:
        raise CacheFileError("damaged", f"{where}: the manifest holds values JSON cannot express ({err})") from None
    if canonical != raw:
        raise CacheFileError(
            "damaged", f"{where}: the manifest is not in its written (canonical) form: edited or damaged"
        )
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    if manifest.get("manifest_sha256") != _sha(canonical_json(body)):
        raise CacheFileError(
            "damaged", f"{where}: the manifest checksum does not match its contents: edited or damaged"
        )
    for key, kind in (
        ("model", dict),
        ("config", dict),
        ("cache", dict),
        ("classes", dict),
        ("strides", dict),
        ("file", dict),
        ("seq_length", int),
        ("config_sha256", str),
    ):
        if not isinstance(manifest.get(key), kind):
            raise CacheFileError("malformed", f"{where}: manifest field {key!r} is missing or not a {kind.__name__}")
    return manifest


def check_compatible(
    manifest: dict,
    model: torch.nn.Module,
    config: PackConfig | None = None,
    tokenizer: Any = None,
    where: str = "cache",
) -> None:
    """Refuse (CacheFileError) a manifest written by another model, tokenizer or PackConfig."""
    fp = model_fingerprint(model)
    stored = manifest["model"]
    for key, what in (
        ("architecture", "architecture"),
        ("config_sha256", "model config"),
        ("weights_sha256", "weights"),
    ):
        if stored.get(key) != fp[key]:
            detail = f" ({stored.get(key)} vs {fp[key]})" if key == "architecture" else ""
            raise CacheFileError("model", f"{where} was written by another model: its {what} differs{detail}")
    recorded = manifest.get("tokenizer")
    if tokenizer is not None and recorded is not None and recorded != tokenizer_fingerprint(tokenizer):
        raise CacheFileError(
            "tokenizer",
            f"{where} was written with another tokenizer ({recorded.get('class')}, different vocabulary or templates)",
        )
    if config is not None and config_sha256(config) != manifest["config_sha256"]:
        mine = config_fields(config)
        theirs = manifest["config"]
        differ = sorted(k for k in set(mine) | set(theirs) if k != "name" and mine.get(k) != theirs.get(k))
        raise CacheFileError(
            "config",
            f"{where} was written with another PackConfig: "
            + ", ".join(f"{k}={theirs.get(k)!r} (yours {mine.get(k)!r})" for k in differ),
        )


def stored_config(manifest: dict, where: str) -> PackConfig:
    from ..config import PackConfig

    try:
        config = PackConfig(**manifest["config"])
    except (TypeError, ValueError) as err:
        raise CacheFileError("config", f"{where}: its PackConfig cannot be rebuilt here ({err})") from None
    if config_sha256(config) != manifest["config_sha256"]:
        raise CacheFileError("config", f"{where}: its PackConfig does not match its recorded checksum")
    return config


def read_tensors(path: Path, manifest: dict, where: str) -> dict[str, torch.Tensor]:
    """Read and verify the tensors file (size, sha256, dtypes, shapes) -> name -> tensor (CPU)."""
    from safetensors.torch import load as st_load

    info = manifest["file"]
    try:
        with open(path / TENSORS, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CacheFileError("missing", f"{where}: {TENSORS} is missing") from None
    except OSError as err:
        raise CacheFileError("missing", f"{where}: cannot read {TENSORS}: {err}") from None
    if len(data) != info.get("bytes"):
        raise CacheFileError(
            "truncated",
            f"{where}: {TENSORS} has {len(data):,} bytes, the manifest says "
            f"{info.get('bytes')!r}: truncated or overwritten",
        )
    if _sha(data) != info.get("sha256"):
        raise CacheFileError(
            "damaged",
            f"{where}: {TENSORS} does not match the manifest's sha256"
            f"{_damaged_names(data, manifest)}: damaged, or from another save",
        )
    try:
        tensors = st_load(data)
    except Exception as err:  # noqa: BLE001 - the checksum matched, so this is a malformed writer's file
        raise CacheFileError("malformed", f"{where}: {TENSORS} cannot be parsed ({err})") from None
    expected = set(tensor_checksums(manifest)) | ({_TOKENS} if manifest.get("tokens") is not None else set())
    if set(tensors) != expected:
        raise CacheFileError("malformed", f"{where}: {TENSORS} holds other tensors than the layout refers to")
    for name, stride in manifest["strides"].items():
        t = tensors.get(name)
        if t is None or not (
            isinstance(stride, list) and len(stride) == t.dim() and _stride_is_dense(list(t.shape), stride)
        ):
            raise CacheFileError("malformed", f"{where}: tensor {name}'s stride {stride!r} is impossible")
    return tensors


def tensor_checksums(manifest: dict) -> dict[str, str]:
    """Every tensor the layout stores: name -> first 8 hex digits of the sha256 of its bytes."""
    classes = manifest.get("classes") or {}
    out: dict[str, str] = {}

    def walk(node: Any, name: str) -> None:
        if isinstance(node, str):
            if node.startswith("#"):
                out[name] = node[1:]
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{name}.{k}")
        elif isinstance(node, list) and node and isinstance(node[0], str):
            tag, items = node[0], node[1:]
            keys = range(len(items)) if tag in ("(", "[") else (classes.get(tag) or {}).get("fields")
            if keys is None or len(keys) != len(items):
                raise CacheFileError("malformed", f"layout node {tag!r} at {name} is not described in the manifest")
            for k, x in zip(keys, items, strict=False):
                walk(x, f"{name}.{k}")

    try:
        tree = manifest["cache"]
        walk(tree["labels"], "labels")
        for k, span in enumerate(tree["spans"]):
            walk(span, f"span.{k}")
        for i, layer in enumerate(tree["layers"]):
            for j, seg in enumerate(layer["segments"]):
                walk(seg, f"{i}.{j}")
            for key in ("keys", "values", "positions", "valid"):
                if layer["tail"] is not None:
                    walk(layer["tail"][key], f"{i}.tail.{key}")
            if layer.get("query_moments") is not None:
                walk(layer["query_moments"], f"{i}.query_moments")
    except CacheFileError:
        raise
    except (KeyError, TypeError, AttributeError) as err:
        raise CacheFileError("malformed", f"the layout is incomplete ({type(err).__name__}: {err})") from None
    return out


def _damaged_names(data: bytes, manifest: dict) -> str:
    """' (tensors a, b differ)' when the file still parses: names the damaged tensors for the error message."""
    from safetensors.torch import load as st_load

    try:
        tensors = st_load(data)
    except Exception:  # noqa: BLE001
        return " (its header is damaged)"
    try:
        sums = tensor_checksums(manifest)
    except CacheFileError:
        return ""
    bad = [n for n, t in tensors.items() if n in sums and _sha(_tensor_bytes(t))[:8] != sums[n]]
    return (
        f" (tensor{'s' if len(bad) > 1 else ''} {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''} differ)"
        if bad
        else ""
    )


def stored_tokens(manifest: dict, tensors: dict, where: str) -> torch.Tensor | None:
    info = manifest.get("tokens")
    if info is None:
        return None
    tok = tensors.get(_TOKENS)
    if (
        not isinstance(info, dict)
        or tok is None
        or tok.dim() != 2
        or list(tok.shape) != [info.get("batch"), info.get("count")]
        or info.get("count") != manifest["seq_length"]
        or _sha(_tensor_bytes(tok)) != info.get("sha256")
    ):
        raise CacheFileError("tokens", f"{where}: the stored token ids do not match the manifest")
    return tok.to(torch.long)
