"""Acceptance of `attentionpack batch` (issue 17): 200 prompts built from the Britannica article text, answered
locally, with --ray --workers 2, and killed half-way then rerun; prints wall times and whether the outputs match.

Run: PYTHONPATH=. OMP_NUM_THREADS=1 python tools/bench_batch.py [--rows 200] [--max-new-tokens 16]"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prompts(count: int) -> list[dict]:
    """`count` rows: a question about one sentence of the Britannica text each (every third as a chat row)."""
    from attentionpack.eval.data import britannica_text

    sentences = [s.strip() for s in britannica_text().replace("\n", " ").split(". ") if 60 < len(s.strip()) < 300]
    step = max(1, len(sentences) // count)
    rows: list[dict] = []
    for i in range(count):
        text = f"In one sentence, what is this about? {sentences[i * step]}."
        rows.append(
            {"id": f"b{i}", "messages": [{"role": "user", "content": text}]}
            if i % 3 == 0
            else {"id": f"b{i}", "prompt": text}
        )
    return rows


def batch(src: Path, out: Path, n: int, *extra: str) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "attentionpack", "batch", "--input", str(src), "--output", str(out), "-n", str(n)]
    start = time.perf_counter()
    subprocess.run([*cmd, *extra], env=env, check=True, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def killed_then_resumed(src: Path, out: Path, n: int, after: int) -> tuple[float, int]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "attentionpack", "batch", "--input", str(src), "--output", str(out), "-n", str(n)]
    journal = Path(f"{out}.journal")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        if journal.exists() and len(journal.read_text(encoding="utf-8").splitlines()) - 1 >= after:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    done = len(journal.read_text(encoding="utf-8").splitlines()) - 1
    subprocess.run(cmd, env=env, check=True, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    src = folder / "prompts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in prompts(args.rows)), encoding="utf-8")
    n = args.max_new_tokens
    local = batch(src, folder / "local.jsonl", n, "--threads", "1")
    ray = batch(src, folder / "ray.jsonl", n, "--ray", "--workers", str(args.workers))
    resumed, done = killed_then_resumed(src, folder / "resumed.jsonl", n, args.rows // 2)
    texts = {name: (folder / f"{name}.jsonl").read_text(encoding="utf-8") for name in ("local", "ray", "resumed")}
    rows = len(texts["local"].splitlines())
    print(f"{rows} prompts, --max-new-tokens {n}, files in {folder}")
    print(f"local (1 thread):             {local:7.1f} s")
    print(f"--ray --workers {args.workers}:            {ray:7.1f} s")
    print(f"killed after {done} rows + rerun: {resumed:7.1f} s (both runs)")
    print(f"ray output identical to local:     {texts['ray'] == texts['local']}")
    print(f"resumed output identical to local: {texts['resumed'] == texts['local']}")


if __name__ == "__main__":
    main()
