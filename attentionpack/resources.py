"""Files shipped inside PyPI data packages (the embedded model, the evaluation text), found without importing
those packages (their `__init__` may need dependencies we do not install)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def cache_root() -> Path:
    """The user cache folder of converted models, compiled kernels, probes and environments:
    $ATTENTIONPACK_CACHE, or ~/.cache/attentionpack."""
    return Path(os.environ.get("ATTENTIONPACK_CACHE") or Path.home() / ".cache" / "attentionpack")


def packaged_file(package: str, relative: str, what: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{what} is not installed. Install it with: {install_hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall {what}: {install_hint}")
    return path
