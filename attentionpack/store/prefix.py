"""`PrefixStore`: a folder of saved compressed caches keyed by the token ids they cover, shared between processes.

A compressed cache covers exactly its token ids (it cannot be cut at an arbitrary token: compressed runs cannot be
removed), so an entry is reusable for a prompt when the entry's tokens are a prefix of the prompt; the longest such
entry wins. Matching is by hashes: every entry records the sha256 of its token ids (int32 little-endian); the prompt
is hashed cumulatively in fixed-size blocks (`block` tokens, default 256), keeping the hash state at every block
boundary, so the hash of the prompt's first L tokens for any entry length L costs at most one block more. The entry
is then loaded (every check of `cache.files.load_cache`) and its stored token ids compared with the prompt's.

Folder layout:
- `entries/<key>/manifest.json` and `tensors.safetensors`: one saved cache per entry (key: sha256 of the model,
  tokenizer and PackConfig fingerprints and the token ids). An entry is written in `tmp/` and renamed into
  `entries/` whole, so readers never see a partial entry; entries are never modified afterwards, and removal renames
  them into `trash/` first. The entry folder's modification time is its last use (least-recently-used eviction).
- `index.json`: key -> context, token count, token hash and bytes; written atomically (temporary file + os.replace).
  It is only a cache of the entries' manifests: a lost or damaged index is rebuilt from them, and entries added or
  removed by other processes are picked up at the next lookup.
- `lock`: a `filelock` lock taken by every change (adding, removing, evicting, rewriting the index).

A damaged entry (any `CacheFileError`) found while loading is counted as a miss, removed, and reported with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from filelock import FileLock

from ..cache import PackedCache, files
from ..cache.file_checks import read_manifest
from ..cache.files import LoadedCache, build_files, write_files
from ..cache.fingerprint import config_sha256, model_fingerprint, tokenizer_fingerprint
from ..cache.tree import CacheFileError, canonical_json

if TYPE_CHECKING:
    from ..config import PackConfig

INDEX = "index.json"
INDEX_VERSION = 1
STALE_TMP_SECONDS = 3600


@dataclass
class Entry:
    """One stored cache: its key, context (model/tokenizer/config digest), tokens covered, bytes on disk and last use
    (seconds since the epoch)."""

    key: str
    context: str
    tokens: int
    digest: str
    bytes: int
    last_used: float
    info: dict


def _token_bytes(tokens: torch.Tensor | Sequence[int]) -> bytes:
    t = torch.as_tensor(tokens)
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise ValueError(
            f"a prefix store keys single prompts: token ids of shape {tuple(t.shape)}, expected (N,) or (1, N)"
        )
    return np.asarray(t.tolist(), dtype="<i4").tobytes()


def prefix_digests(tokens: torch.Tensor | Sequence[int], lengths: Iterable[int], block: int = 256) -> dict[int, str]:
    """{L: sha256 of the first L token ids (int32 little-endian)} for every L in `lengths` (1 <= L <= len(tokens)): the
    prompt is hashed once in `block`-token blocks, keeping the hash state at every block boundary, so each L costs at
    most one block more. These are the keys entries are matched by, here and in the serving router."""
    raw = _token_bytes(tokens)
    wanted = sorted({int(n) for n in lengths if 0 < int(n) <= len(raw) // 4})
    if not wanted:
        return {}
    states, h = {}, hashlib.sha256()  # hash state at every block boundary of the prompt
    for start in range(0, wanted[-1] + 1, block):
        states[start] = h.copy()
        h.update(raw[4 * start : 4 * (start + block)])
    out = {}
    for length in wanted:
        base = length // block * block
        s = states[base].copy()
        s.update(raw[4 * base : 4 * length])
        out[length] = s.hexdigest()
    return out


def context_digest(model: torch.nn.Module, config: PackConfig, tokenizer: Any = None) -> str:
    """What an entry must share with a prompt besides its tokens: the model, the tokenizer and the PackConfig."""
    data = {
        "model": model_fingerprint(model),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "config": config_sha256(config),
    }
    return hashlib.sha256(canonical_json(data)).hexdigest()[:32]


class PrefixStore:
    """Saved caches in `folder` keyed by token ids, at most `max_bytes` on disk (least recently used removed first).

    `put(tokens, cache)` stores a single-prompt cache covering exactly `tokens`; `load(tokens, model, config)`
    returns the longest stored prefix of `tokens` for that model and config; `cache_for` turns it into a cache to
    prefill the rest of the prompt with. Safe for several processes using one folder (see the module docstring).
    """

    def __init__(self, folder: str | os.PathLike, max_bytes: int = 4 << 30, block: int = 256):
        if not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(f"max_bytes={max_bytes!r} is invalid: must be a positive number of bytes")
        if not isinstance(block, int) or block < 1:
            raise ValueError(f"block={block!r} is invalid: must be a positive number of tokens")
        self.folder = Path(folder)
        self.max_bytes, self.block = max_bytes, block
        for sub in ("entries", "tmp", "trash"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(str(self.folder / "lock"))
        self.hits = self.misses = self.damaged = 0

    # ---- index ------------------------------------------------------------------------------------------------
    @property
    def entries_dir(self) -> Path:
        return self.folder / "entries"

    def _read_index(self) -> dict | None:
        try:
            data = json.loads((self.folder / INDEX).read_text())
        except (OSError, ValueError):
            return None
        if (
            not isinstance(data, dict)
            or data.get("version") != INDEX_VERSION
            or not isinstance(data.get("entries"), dict)
        ):
            return None
        return data["entries"]

    def _write_index(self, rows: dict) -> None:
        tmp = self.folder / f".{INDEX}.{uuid.uuid4().hex}"
        tmp.write_text(json.dumps({"version": INDEX_VERSION, "entries": rows}, sort_keys=True))
        os.replace(tmp, self.folder / INDEX)

    def _row_from_files(self, key: str) -> dict | None:
        """An index row rebuilt from an entry's manifest; None (entry removed, with a warning) when it is damaged."""
        path = self.entries_dir / key
        try:
            manifest = read_manifest(path)
            store = manifest["extra"]["store"]
            row = {
                "context": str(store["context"]),
                "tokens": int(store["tokens"]),
                "digest": str(store["digest"]),
                "bytes": sum(f.stat().st_size for f in path.iterdir()),
                "info": dict(store.get("info", {})),
            }
        except CacheFileError as err:
            if err.reason == "missing" and not path.exists():
                return None
            self._discard(key, f"damaged entry {key} removed from the prefix store: {err}")
            return None
        except (KeyError, TypeError, ValueError, OSError) as err:
            self._discard(key, f"entry {key} of the prefix store has no store record ({err}); removed")
            return None
        return row

    def _rows(self) -> dict:
        """The index, synchronized with the entries folder (rebuilt from the files when lost)."""
        rows = self._read_index()
        on_disk = set(os.listdir(self.entries_dir))
        if rows is not None and set(rows) == on_disk:
            return rows
        with self.lock:
            rows = self._read_index() or {}
            on_disk = set(os.listdir(self.entries_dir))
            changed = False
            for key in list(rows):
                if key not in on_disk:
                    del rows[key]
                    changed = True
            for key in sorted(on_disk - set(rows)):
                row = self._row_from_files(key)
                if row is not None:
                    rows[key] = row
                changed = True
            if changed or not (self.folder / INDEX).exists():
                self._write_index(rows)
        return rows

    # ---- changes ----------------------------------------------------------------------------------------------
    def put(
        self, tokens: torch.Tensor | Sequence[int], cache: PackedCache, tokenizer: Any = None, info: dict | None = None
    ) -> str | None:
        """Store `cache`, which covers exactly `tokens` ((N,) or (1, N) ids of one prompt), and return its key
        (None when the entry alone exceeds max_bytes). Storing tokens already stored refreshes that entry's use."""
        model = cache.model_ref()
        if model is None:
            raise ValueError("PrefixStore.put: the cache's model is gone")
        raw = _token_bytes(tokens)
        n = len(raw) // 4
        if n != cache.get_seq_length() or n == 0:
            raise ValueError(f"PrefixStore.put: {n} token ids given for a cache holding {cache.get_seq_length()}")
        context = context_digest(model, cache.config, tokenizer)
        digest = hashlib.sha256(raw).hexdigest()
        key = hashlib.sha256(f"{context}:{digest}".encode()).hexdigest()[:32]
        if (self.entries_dir / key).exists():
            self._touch(key)
            return key
        ids = torch.from_numpy(np.frombuffer(raw, dtype="<i4").astype(np.int64))[None]
        store = {"context": context, "tokens": n, "digest": digest, "info": dict(info or {})}
        manifest, data = build_files(cache, ids, tokenizer, extra={"store": store})
        size = len(manifest) + len(data)
        if size > self.max_bytes:
            warnings.warn(
                f"prefix store: a cache of {size:,} bytes exceeds max_bytes={self.max_bytes:,}; not stored",
                stacklevel=2,
            )
            return None
        tmp = self.folder / "tmp" / uuid.uuid4().hex
        write_files(tmp, manifest, data)
        with self.lock:
            rows = self._read_index()
            if rows is None:
                rows = {}
                for k in os.listdir(self.entries_dir):
                    row = self._row_from_files(k)
                    if row is not None:
                        rows[k] = row
            try:
                os.rename(tmp, self.entries_dir / key)
            except OSError:  # another process stored the same tokens meanwhile
                shutil.rmtree(tmp, ignore_errors=True)
            rows[key] = {"context": context, "tokens": n, "digest": digest, "bytes": size, "info": store["info"]}
            self._evict(rows, keep=key)
            self._write_index(rows)
            self._clean_tmp()
        return key

    def remove(self, key: str) -> bool:
        """Remove one entry; False when there is none with this key."""
        with self.lock:
            gone = self._remove_locked(key)
            rows = self._read_index()
            if rows is not None and key in rows:
                del rows[key]
                self._write_index(rows)
        return gone

    def clear(self) -> int:
        """Remove every entry; returns how many."""
        keys = list(os.listdir(self.entries_dir))
        return sum(self.remove(k) for k in keys)

    def _remove_locked(self, key: str) -> bool:
        path = self.entries_dir / key
        trash = self.folder / "trash" / f"{key}.{uuid.uuid4().hex}"
        try:
            os.rename(path, trash)  # atomic: a reader sees the whole entry or none
        except OSError:
            return False
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def _discard(self, key: str, message: str) -> None:
        warnings.warn(message, stacklevel=3)
        self.damaged += 1
        with self.lock:
            self._remove_locked(key)
            rows = self._read_index()
            if rows is not None and key in rows:
                del rows[key]
                self._write_index(rows)

    def _evict(self, rows: dict, keep: str) -> None:
        total = sum(r["bytes"] for r in rows.values())
        if total <= self.max_bytes:
            return
        order = sorted((self._mtime(k), k) for k in rows if k != keep)
        for _, key in order:
            if total <= self.max_bytes:
                break
            self._remove_locked(key)
            total -= rows.pop(key)["bytes"]

    def _clean_tmp(self) -> None:
        now = time.time()
        for sub in ("tmp", "trash"):
            for name in os.listdir(self.folder / sub):
                path = self.folder / sub / name
                try:
                    if now - path.stat().st_mtime > STALE_TMP_SECONDS:
                        shutil.rmtree(path, ignore_errors=True)
                except OSError:
                    pass

    def _mtime(self, key: str) -> float:
        try:
            return (self.entries_dir / key).stat().st_mtime
        except OSError:
            return 0.0

    def _touch(self, key: str) -> None:
        try:
            os.utime(self.entries_dir / key)
        except OSError:
            pass

    # ---- lookups ----------------------------------------------------------------------------------------------
    def entries(self) -> list[Entry]:
        """Every entry, most recently used first."""
        rows = self._rows()
        out = [
            Entry(k, r["context"], r["tokens"], r["digest"], r["bytes"], self._mtime(k), r.get("info", {}))
            for k, r in rows.items()
        ]
        return sorted(out, key=lambda e: -e.last_used)

    def total_bytes(self) -> int:
        return sum(e.bytes for e in self.entries())

    def matches(
        self, tokens: torch.Tensor | Sequence[int], model: torch.nn.Module, config: PackConfig, tokenizer: Any = None
    ) -> list[tuple[int, str]]:
        """(tokens covered, key) of every entry for this model/config/tokenizer whose token ids are a prefix of
        `tokens` (by hash), longest first."""
        n = len(_token_bytes(tokens)) // 4
        context = context_digest(model, config, tokenizer)
        wanted: dict[int, list[tuple[str, str]]] = {}
        for key, row in self._rows().items():
            if row.get("context") == context and 0 < row.get("tokens", 0) <= n:
                wanted.setdefault(row["tokens"], []).append((key, row["digest"]))
        digests = prefix_digests(tokens, wanted, self.block)
        out = [(length, key) for length, rows in wanted.items() for key, d in rows if d == digests[length]]
        return sorted(out, reverse=True)

    def load(
        self, tokens: torch.Tensor | Sequence[int], model: torch.nn.Module, config: PackConfig, tokenizer: Any = None
    ) -> tuple[LoadedCache | None, int]:
        """The longest stored prefix of `tokens`: (LoadedCache, tokens covered), or (None, 0). Damaged entries met on
        the way are removed (with a warning) and the next longest is tried."""
        prompt = torch.as_tensor(tokens).reshape(-1)
        for length, key in self.matches(prompt, model, config, tokenizer):
            loaded, covered = self._load_key(key, length, prompt, model, config, tokenizer)
            if loaded is not None:
                self.hits += 1
                return loaded, covered
        self.misses += 1
        return None, 0

    def cache_for(
        self, tokens: torch.Tensor | Sequence[int], model: torch.nn.Module, config: PackConfig, tokenizer: Any = None
    ) -> tuple[PackedCache, int]:
        """(cache, covered): a PackedCache holding the longest stored prefix of `tokens` (its first `covered` ids),
        or a fresh one and 0. At least one token is always left to feed (the model needs a new token to give the
        next logits): an entry covering the whole prompt has its newest (exact) token dropped, and is skipped when
        that token is compressed. Feed `tokens[covered:]` next (`model.generate(input_ids=tokens, ...)` does)."""
        prompt = torch.as_tensor(tokens).reshape(-1)
        for length, key in self.matches(prompt, model, config, tokenizer):
            loaded, covered = self._load_key(key, length, prompt, model, config, tokenizer)
            if loaded is None:
                continue
            cache = loaded.cache
            if covered == prompt.numel():
                if any(layer.tail_length < 1 for layer in cache.layers):
                    continue
                cache.crop(-1)
                covered -= 1
            self.hits += 1
            return cache, covered
        self.misses += 1
        return PackedCache(model, config), 0

    def _load_key(
        self, key: str, length: int, prompt: torch.Tensor, model: torch.nn.Module, config: PackConfig, tokenizer: Any
    ) -> tuple[LoadedCache | None, int]:
        try:
            loaded = load_cache(self.entries_dir / key, model, config, tokenizer)
        except CacheFileError as err:
            if err.reason != "missing":
                self._discard(key, f"damaged entry {key} removed from the prefix store: {err}")
            return None, 0
        if loaded.tokens is None or not torch.equal(loaded.tokens[0], prompt[:length].to(loaded.tokens.dtype)):
            self._discard(key, f"entry {key} of the prefix store does not hold the tokens its index says; removed")
            return None, 0
        self._touch(key)
        return loaded, length


def load_cache(
    path: str | os.PathLike, model: torch.nn.Module, config: PackConfig | str | None = None, tokenizer: Any = None
) -> LoadedCache:
    """`cache.files.load_cache` building a `PackedCache` (see there: every check, `CacheFileError`)."""
    return files.load_cache(path, model, PackedCache, config, tokenizer)


def reusable_prefix(tokenizer: Any, text: str, chat: bool, encode: Callable[[Any, str, bool], torch.Tensor]) -> int:
    """How many leading ids of the encoded prompt `text` stay the same when more text follows it (a question after a
    document): the ids up to the end of the text, before a chat template's closing tokens. Computed as the common
    prefix of the encodings of `text` and of `text` followed by a paragraph, less one token of margin."""
    a = encode(tokenizer, text, chat)[0].tolist()
    b = encode(tokenizer, text + "\n\nQuestion: what is it?", chat)[0].tolist()
    common = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return max(0, min(common - 1, len(a) - 1))


def prefill_prefix(model: torch.nn.Module, cache: PackedCache, ids: torch.Tensor) -> None:
    """Feed ids (1, n) through `model` into `cache` (a prefill; logits of the last position only)."""
    with torch.no_grad():
        model(
            input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, use_cache=True, logits_to_keep=1
        )


def cache_from_store(
    folder: str | os.PathLike,
    model: torch.nn.Module,
    tokenizer: Any,
    ids: torch.Tensor,
    config: PackConfig,
    text: str,
    chat: bool,
    encode: Callable[[Any, str, bool], torch.Tensor],
    max_bytes: int = 4 << 30,
) -> tuple[PackedCache, int, str]:
    """The cache `attentionpack generate --prefix-store DIR` starts from: the longest stored prefix of the prompt ids
    (1, N), or on a miss the prompt's reusable prefix (`reusable_prefix`) prefilled now and stored for next time.
    Returns (cache, tokens covered, a one-line note)."""
    store = PrefixStore(folder, max_bytes)
    cache, covered = store.cache_for(ids[0], model, config, tokenizer)
    n = ids.shape[1]
    if covered:
        return cache, covered, f"prefix store: reused a cache of {covered:,} of the {n:,} prompt tokens"
    keep = reusable_prefix(tokenizer, text, chat, encode)
    if keep < 1:
        return cache, 0, "prefix store: miss (prompt too short to store)"
    prefill_prefix(model, cache, ids[:, :keep])
    key = store.put(ids[0, :keep], cache, tokenizer, info={"config": config.name})
    stored = f"stored {keep:,} tokens as {key}" if key else "not stored (larger than the store)"
    return cache, keep, f"prefix store: miss; {stored}"
