"""Memory: bytes held by a cache, and the peak RSS of a process that runs one configuration alone.

Each configuration runs in a fresh child process (`python -m attentionpack.eval.child JOB.json`) so that one
configuration's allocations cannot hide another's: the child loads the model, records its RSS, prefills `context`
tokens through the cache under test and teacher-forces `continuation` more (the continuation-perplexity protocol, so
the same child also yields perplexity, timings and, with `logits_out`, the per-step log-probabilities that
`agreement.py` compares), then reports the cache's bytes and the process's peak RSS (getrusage ru_maxrss).

The child talks on stdout in lines: `@progress N` and one final `@result {json}`; the kvpress worker speaks the same
(plus `@item {json}` lines).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .. import cache_nbytes
from .perplexity import continuation_perplexity


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss() -> int | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class ChildError(RuntimeError):
    """A measurement child process failed; the message carries the end of its error output."""


def run_child(
    cmd: list[str],
    on_progress: Callable[[int], None] | None = None,
    log: Path | None = None,
    env: dict | None = None,
    on_item: Callable[[dict], None] | None = None,
) -> dict:
    """Run a measurement child speaking the `@progress N` / `@item {json}` / `@result {json}` line protocol; its
    stderr goes to `log`. Returns the result object; a failure raises ChildError with the end of the log."""
    log = Path(log) if log else Path(tempfile.mkstemp(prefix="attentionpack-child-", suffix=".log")[1])
    result = None
    with open(log, "w", encoding="utf-8") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        assert proc.stdout is not None  # stdout=PIPE
        try:
            for line in proc.stdout:
                if line.startswith("@progress ") and on_progress:
                    on_progress(int(line.split()[1]))
                elif line.startswith("@item ") and on_item:
                    on_item(json.loads(line[len("@item ") :]))
                elif line.startswith("@result "):
                    result = json.loads(line[len("@result ") :])
            proc.wait()
        except BaseException:  # Ctrl-C: do not leave the child running
            proc.kill()
            proc.wait()
            raise
    if proc.returncode != 0 or result is None:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise ChildError(f"{' '.join(map(str, cmd[:3]))} ... failed (exit {proc.returncode}); log {log}:\n{tail}")
    return result


def child_env(threads: int | None = None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def measure_isolated(
    config: str,
    ids,
    context: int,
    continuation: int,
    model: str | None = None,
    logits_out: str | Path | None = None,
    threads: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    log: Path | None = None,
) -> dict:
    """Run one configuration alone in a child process; returns bytes held, RSS, perplexity and timings.

    `ids`: 1-D token ids (>= context + continuation). `model`: None for the embedded model, or a local path."""
    ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
    if len(ids) < context + continuation:
        raise ValueError(f"need {context + continuation} token ids, got {len(ids)}")
    job = {
        "config": config,
        "ids": ids[: context + continuation],
        "context": context,
        "continuation": continuation,
        "model": None if model is None else str(model),
        "logits_out": str(logits_out) if logits_out else None,
        "threads": threads,
    }
    fd, path = tempfile.mkstemp(prefix="attentionpack-job-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(job, f)
        return run_child(
            [sys.executable, "-m", "attentionpack.eval.child", path], on_progress, log, env=child_env(threads)
        )
    finally:
        os.unlink(path)


def measure_memory(
    config: str, ids, context: int, continuation: int = 16, model: str | None = None, threads: int | None = None
) -> dict:
    """Bytes held after prefill and peak RSS of one configuration, measured alone in a child process."""
    return measure_isolated(config, ids, context, continuation, model=model, threads=threads)


class LogprobWriter:
    """Writes each step's next-token log-probabilities (batch row 0, float32) to a raw file, row by row, so that
    recording them does not add to the measured process's memory."""

    def __init__(self, path: str | Path):
        self.file = open(path, "wb")
        self.rows = 0

    def __call__(self, logits: torch.Tensor) -> None:
        row = torch.log_softmax(logits[0].float(), dim=-1)
        self.file.write(row.numpy().tobytes())
        self.rows += 1

    def close(self) -> None:
        self.file.close()


def exit_with_parent() -> None:
    """End this child process when its parent goes away (a killed harness must not leave measurements running)."""
    import threading

    parent = os.getppid()

    def watch():
        while True:
            time.sleep(2)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


EXACT_TIMED_STEPS = 16  # one-token steps timed for caches that keep decoded tokens exact (see perplexity.py)


def _child(job_path: str) -> None:
    exit_with_parent()
    started = time.perf_counter()
    job = json.loads(Path(job_path).read_text())
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    from ..models import load_model
    from .configs import make_cache, parse_config

    spec = parse_config(job["config"])
    model, _ = load_model(job["model"])
    rss_after_load, peak_after_load = current_rss(), peak_rss()
    load_s = time.perf_counter() - started
    ids = torch.tensor(job["ids"], dtype=torch.long)
    caches = []

    def fresh():
        caches.append(make_cache(model, spec))
        return caches[-1]

    writer = LogprobWriter(job["logits_out"]) if job.get("logits_out") else None
    step = [0]

    def progress(n):
        step[0] += n
        if step[0] % 16 == 0:
            print(f"@progress {step[0]}", flush=True)

    try:
        res = continuation_perplexity(
            model,
            ids,
            job["context"],
            job["continuation"],
            fresh,
            progress=progress,
            on_logits=writer,
            timed_steps=EXACT_TIMED_STEPS if spec.kind == "dynamic" else None,
        )
    finally:
        if writer:
            writer.close()
    peak = peak_rss()
    out = {
        "config": spec.name,
        "ppl": res.ppl,
        "nll": res.nll,
        "tokens_scored": res.tokens_scored,
        "prefill_s": res.prefill_s,
        "decode_ms": res.decode_ms,
        "bytes_after_prefill": res.bytes_after_prefill,
        "bytes_at_end": cache_nbytes(caches[-1]),
        "rss_after_load": rss_after_load,
        "peak_rss_after_load": peak_after_load,
        "peak_rss": peak,
        "peak_rss_delta": peak - (rss_after_load or peak_after_load),
        "load_s": load_s,
        "threads": torch.get_num_threads(),
        "logits_rows": writer.rows if writer else 0,
    }
    print("@result " + json.dumps(out), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m attentionpack.eval.child JOB.json")
    _child(sys.argv[1])
