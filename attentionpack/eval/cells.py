"""Finished measurements of an evaluation run, one JSON file per cell under OUT/cells, and the one loop that every
phase runs over them: reuse a cell whose settings match, else measure it and save it at once (so an interrupted run
keeps what it finished and a rerun with the same output folder skips it)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .settings import _norm


def _safe(key: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", key)
    return clean if clean == key else f"{clean}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def bar(enabled: bool, **kw: Any) -> Any:
    """A tqdm progress bar (silent when not `enabled`)."""
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, dynamic_ncols=True, **kw)


class Cells:
    """One JSON file per finished measurement under DIR/cells; a cell is reused only if its settings match."""

    def __init__(self, out: Path):
        self.root = out / "cells"
        self.root.mkdir(parents=True, exist_ok=True)
        self.reused = 0
        self.measured = 0

    def path(self, key: str, suffix: str = ".json") -> Path:
        return self.root / (_safe(key) + suffix)

    def get(self, key: str, settings: dict) -> Any:
        """The saved result of `key` if it was measured with exactly `settings`, else None."""
        try:
            data = json.loads(self.path(key).read_text())
        except (OSError, ValueError):
            return None
        if data.get("settings") != _norm(settings):
            return None
        self.reused += 1
        return data["result"]

    def put(self, key: str, settings: dict, result: dict) -> dict:
        """Save a finished cell atomically; returns the result as JSON would give it back."""
        path = self.path(key)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "key": key,
                    "settings": _norm(settings),
                    "result": result,
                    "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                },
                indent=1,
            )
        )
        os.replace(tmp, path)
        self.measured += 1
        return _norm(result)

    def cached(
        self, key: str, settings: dict, measure: Callable[[], dict], valid: Callable[[dict], bool] = lambda r: True
    ) -> dict:
        """The cell's saved result when its settings match and `valid(result)` holds; else `measure()`, saved.
        A measurement that returns {"error": ...} is kept in the results but not saved (it is retried next run)."""
        got = self.get(key, settings)
        if got is not None and valid(got):
            return got
        if got is not None:
            self.reused -= 1
        result = measure()
        if "error" in result:
            return result
        return self.put(key, settings, result)
