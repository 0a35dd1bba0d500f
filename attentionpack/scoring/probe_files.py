"""Per-model probe results kept as files: read if usable, otherwise probed again and written atomically.

The retrieval heads (`retrieval_heads.py`) and the layer sensitivities (`sensitivity.py`) are measured once per
model and kept as JSON named by a fingerprint of the model; a file that is damaged, from another model or from
another probe setting is recomputed and overwritten, with a warning naming it (never used, never fatal).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

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


def parse_json(text: str, fmt: int, what: str, build: Callable[[dict[str, Any]], T]) -> T:
    """`build(data)` for the JSON object in `text` whose "format" is `fmt`; any problem (not JSON, another format,
    a missing or malformed field: `build` raises KeyError, TypeError or ValueError) becomes one ValueError
    naming `what` and the problem."""
    try:
        data = json.loads(text)
        if data.get("format") != fmt:
            raise ValueError(f"format {data.get('format')!r}, expected {fmt}")
        return build(data)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"not a valid {what} file ({err})") from err


def random_ids(config: Any, n: int, seed: int) -> torch.Tensor:
    """`n` random token ids (1-D LongTensor) of `config`'s vocabulary, none of its BOS/EOS/PAD ids."""
    special = {getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    special = {int(s) for v in special for s in (v if isinstance(v, (list, tuple)) else [v]) if s is not None}
    allowed = torch.tensor([i for i in range(config.vocab_size) if i not in special])
    gen = torch.Generator().manual_seed(seed)
    return allowed[torch.randint(len(allowed), (n,), generator=gen)]


def with_bos(config: Any, ids: torch.Tensor) -> torch.Tensor:
    """[BOS] + ids when `config` names one BOS id, else ids."""
    bos = getattr(config, "bos_token_id", None)
    head = torch.tensor([bos]) if isinstance(bos, int) else torch.empty(0, dtype=torch.long)
    return torch.cat([head, ids])
