"""Per-model probe results kept as files: read if usable, otherwise probed again and written atomically.

The retrieval heads (`retrieval_heads.py`) and the layer sensitivities (`sensitivity.py`) are measured once per
model and kept as JSON named by a fingerprint of the model; a file that is damaged, from another model or from
another probe setting is recomputed and overwritten, with a warning naming it (never used, never fatal).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def load_or_probe(
    path: Path,
    what: str,
    parse: Callable[[str], T],
    check: Callable[[T], None],
    probe: Callable[[], T],
    dump: Callable[[T], str],
) -> T:
    """`parse(text of path)` if the file exists, parses and passes `check` (which raises ValueError naming what does
    not match); otherwise `probe()`, written to `path` through a temporary file and `os.replace`."""
    if path.is_file():
        try:
            stored = parse(path.read_text(encoding="utf-8"))
            check(stored)
            return stored
        except (OSError, UnicodeDecodeError, ValueError) as err:
            warnings.warn(f"{what} file {path} is unusable ({err}); probing the model again", stacklevel=3)
    result = probe()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(dump(result), encoding="utf-8")
    os.replace(tmp, path)
    return result
