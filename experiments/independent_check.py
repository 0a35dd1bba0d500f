"""Independent check of the quality claims on the one text kept out of all tuning and evaluation: the Python
standard library's `pydoc_data/topics.py` (Python's documentation topics). Same protocol as `suite.py` (disjoint
windows of a 2,048-token prefill and 256 tokens teacher-forced one at a time; perplexity change against
DynamicCache and size against it after the 256). Run it to check a claim, never to choose anything: a change made
because of its numbers would spend the held-out text.

Usage: python -m experiments.independent_check smollm2|gemma3|PATH 'PackConfig(budget=1/8)' '"max"' ... [--windows 4]
"""

from __future__ import annotations

import pydoc_data
from pathlib import Path

from experiments.suite import arguments, print_windows, setup


def main() -> None:
    a = arguments(__doc__, windows=4).parse_args()
    model, tokenizer, configs = setup(a)
    text = (Path(pydoc_data.__file__).parent / "topics.py").read_text(encoding="utf-8")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    print(f"{a.model}: pydoc_data/topics.py {ids.numel()} tokens", flush=True)
    print_windows(model, f"{a.model} pydoc", ids, configs, a)


if __name__ == "__main__":
    main()
