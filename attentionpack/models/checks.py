"""Checks of a local model folder or GGUF file before transformers reads it, so that a broken folder gives one line
naming the problem and the fix instead of a long traceback (or a misleading one: a folder without tokenizer files
makes transformers ask for sentencepiece or tiktoken)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "tiktoken.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.txt",
)


class ModelFolderError(ValueError):
    """A local model folder or file that cannot be loaded; the message names the problem and the fix."""


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (library errors can run to dozens of lines), shortened."""
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def read_config(folder: Path) -> dict:
    """The folder's config.json as a dict; ModelFolderError when it is missing, unreadable or not a JSON object."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFolderError(
            f"{folder} has no config.json; give a Hugging Face model folder (config.json, "
            "weights, tokenizer files) or a .gguf file"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ModelFolderError(
            f"cannot read {path}: {first_line(err)}; check the file's permissions or copy the model folder again"
        ) from None
    except json.JSONDecodeError as err:
        raise ModelFolderError(
            f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
            "restore the model's original config.json"
        ) from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelFolderError(
            f'{path} has no "model_type" (not a transformers model config); restore the model\'s original config.json'
        )
    return config


def check_folder(folder: Path, tokenizer: bool = True) -> dict:
    """Raise ModelFolderError unless `folder` has a valid config.json, weight files whose sizes match their headers
    (safetensors) and, when `tokenizer`, tokenizer files. Returns the config."""
    config = read_config(folder)
    weights = sorted({p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern)})
    if not weights:
        raise ModelFolderError(
            f"{folder} has no weights (no *.safetensors or pytorch_model*.bin file); copy the "
            "model's weight files into it"
        )
    for path in weights:
        if path.suffix == ".safetensors":
            check_safetensors(path)
    if tokenizer and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelFolderError(
            f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}...); copy the "
            "model's tokenizer files into it (e.g. tokenizer.save_pretrained(folder))"
        )
    return config


def check_safetensors(path: Path) -> None:
    """Raise ModelFolderError when a .safetensors file is shorter or longer than its header says (a cut download)
    or its header cannot be read. Reads only the header."""
    fix = "copy or download the file again"
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise ModelFolderError(f"{path} is not a readable safetensors file ({first_line(err)}); {fix}") from None
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        raise ModelFolderError(f"{path} is truncated: {size:,} bytes, its header describes {expected:,}; {fix}")


def gguf_problem(path: Path, err: BaseException) -> str:
    """What is wrong with a GGUF file the reader failed on (`err`), in a few words."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as os_err:
        return f"it cannot be read ({first_line(os_err)})"
    if size == 0:
        return "it is empty"
    if magic != b"GGUF":
        return "it is not a GGUF file (no GGUF magic at its start)"
    text = str(err)
    if (
        isinstance(err, (EOFError, struct.error))
        or "cannot reshape" in text
        or "out of bounds" in text
        or "buffer is smaller" in text
        or "beyond" in text
    ):
        return f"it is truncated ({size:,} bytes: its header describes more data than the file holds)"
    return f"its contents are damaged ({type(err).__name__}: {first_line(err)})"
