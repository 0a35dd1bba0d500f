"""The README's numbers come from what the code prints: its vision-language example is run as written and its
`# name bytes held vs ...` lines compared with the output; the `bench vlm` table with `attentionpack bench vlm`."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"
LINE = re.compile(r"^#?\s*(\w+)\s+([\d,]+) bytes held vs\s+([\d,]+) for DynamicCache", re.M)


def _block(marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"README: expected one python block with {marker!r}"
    return found[0]


def _numbers(text: str) -> dict[str, tuple[int, int]]:
    return {m[1]: (int(m[2].replace(",", "")), int(m[3].replace(",", ""))) for m in LINE.finditer(text)}


def test_readme_vlm_example_prints_the_readme_numbers(tmp_path):
    code = _block("save_tiny_llava")
    expected = _numbers("\n".join(line.strip() for line in code.splitlines() if line.strip().startswith("#")))
    assert set(expected) == {"exact", "text", "image"}, expected
    assert "/tmp/tiny-llava" in code
    out = io.StringIO()
    torch.manual_seed(0)
    with contextlib.redirect_stdout(out):
        exec(compile(code.replace("/tmp/tiny-llava", str(tmp_path / "tiny-llava")), "README.md", "exec"), {})
    assert _numbers(out.getvalue()) == expected, out.getvalue()


def test_readme_bench_vlm_table_matches_the_bench(tmp_path):
    from rich.console import Console

    from attentionpack.bench.vlm import run

    table = README.read_text(encoding="utf-8").split("| images | image ratio, one basis per image")[1]
    lines = table.splitlines()[2:]
    rows = [line.strip("|").split("|") for line in lines[: lines.index("")] if line.startswith("|")]  # this table
    assert [int(r[0]) for r in rows] == [1, 4, 16]
    got = {
        (r["images"], r["basis"], r["modality"]): f"{r['ratio']:.2f}x" for r in run(console=Console(file=io.StringIO()))
    }
    for r in rows:
        n = int(r[0])
        cells = [c.strip() for c in r[1:5]]
        assert cells == [
            got[n, "per_image", "image"],
            got[n, "shared", "image"],
            got[n, "per_image", "all"],
            got[n, "shared", "all"],
        ], (n, cells)
