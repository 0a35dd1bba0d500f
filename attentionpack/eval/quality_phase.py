"""Phase 1 of `evaluate()`: quality and memory. Each configuration alone in a child process through the
continuation protocol (perplexity, bytes held, peak RSS, per-step log-probabilities -> agreement with DynamicCache),
for every model x text x window x context; kvpress presses in their own environment."""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import cache_nbytes
from . import cells as cells_mod
from .agreement import compare_files
from .child import ChildError, measure_isolated
from .configs import Spec, make_cache
from .peers import KvpressUnavailable, ensure_kvpress_env, kvpress_env_info, kvpress_notice, kvpress_quality

if TYPE_CHECKING:
    from .runner import ModelRun, Run

KVPRESS_BASELINE = "kvpress-env-dynamic"  # DynamicCache inside the kvpress environment: its own reference


def prepare_kvpress(run: Run) -> None:
    """Create (once) the kvpress environment when a kvpress configuration is asked for; record its status."""
    run.kvpress_env = {"status": "not needed"}
    kv_specs = [sp for sp in run.specs if not sp.in_process]
    if not kv_specs:
        return
    if not kvpress_env_info():  # say what is about to be installed before installing it
        print(kvpress_notice(kv_specs), file=sys.stderr)
    try:
        run.kvpress_env = {
            "status": "ok",
            "versions": ensure_kvpress_env(
                status=lambda what: print(f"kvpress environment: {what} (once) ...", file=sys.stderr)
            ),
        }
    except KvpressUnavailable as err:
        run.kvpress_env = {"status": "unavailable", "reason": str(err)}
        run.notes.append(f"kvpress presses were not measured: {err}")


def _jobs(run: Run) -> list[Spec | None]:
    """Order: DynamicCache (the reference), other in-process peers, kvpress (its environment's own DynamicCache
    first, as None), then ours; the report keeps the order of `configs`."""
    kv_specs = [sp for sp in run.specs if not sp.in_process]
    kv_jobs: list[Spec | None] = [None, *kv_specs] if kv_specs and run.kvpress_env["status"] == "ok" else []
    return [sp for sp in run.specs if sp.in_process and not sp.ours] + kv_jobs + [sp for sp in run.specs if sp.ours]


def quality(run: Run, m: ModelRun) -> dict:
    """{text: {context: {window index: {config: result}}}} for one model; every cell saved as it finishes."""
    s = run.s
    out: dict = {}
    for text in m.texts:
        for n in s.contexts:
            for w, start in enumerate(text["starts"][str(n)]):
                ids = text["ids"][start : start + n + s.continuation]
                where = f"{m.key}__{text['id']}__n{n}__m{s.continuation}__w{w}"
                ref = run.cells.path(f"ref__{where}", ".f32")
                row = out.setdefault(text["id"], {}).setdefault(str(n), {}).setdefault(str(w), {})
                for sp in _jobs(run):
                    name = sp.name if sp else KVPRESS_BASELINE
                    desc: dict = (
                        sp.describe() if sp else {"name": name, "kind": "kvpress-env", **run.kvpress_env["versions"]}
                    )
                    settings = {
                        "model": m.model_id,
                        "text": text["id"],
                        "text_sha": text["sha"],
                        "context": n,
                        "continuation": s.continuation,
                        "window_start": start,
                        "config": desc,
                    }
                    key = f"quality__{where}__{name}"
                    measure = functools.partial(_one, run, m, sp, name, ids, n, ref, key, f"{text['id']} w{w}")
                    exact = functools.partial(_has_reference, name, ref)
                    row[name] = run.cells.cached(key, settings, measure, valid=exact)
    return out


def _has_reference(name: str, ref: Path, result: dict) -> bool:
    """A DynamicCache cell is reused only while its logits file (the reference of the window's agreement) exists."""
    return name != "dynamic" or ref.exists()


def _one(run: Run, m: ModelRun, sp: Spec | None, name: str, ids, n: int, ref: Path, key: str, where: str) -> dict:
    s = run.s
    logits = ref if name == "dynamic" else run.cells.path(key, ".f32")
    bar = cells_mod.bar(run.progress, total=s.continuation - 1, desc=f"quality {m.key} {where} {name} @{n}", unit="tok")
    tick = lambda k: bar.update(k - bar.n)  # noqa: E731
    log = run.cells.path(key, ".log")
    t0 = time.perf_counter()
    try:
        if sp is not None and sp.in_process and not s.isolate:
            res = _here(m, sp, ids, n, s.continuation, logits, tick)
        elif sp is not None and sp.in_process:
            res = measure_isolated(
                sp.name,
                ids,
                n,
                s.continuation,
                model=m.arg,
                logits_out=logits,
                threads=s.threads,
                on_progress=tick,
                log=log,
            )
        else:
            res = kvpress_quality(
                sp,
                ids,
                n,
                s.continuation,
                model=m.arg,
                logits_out=logits,
                threads=s.threads,
                on_progress=tick,
                log=log,
            )
        tick(s.continuation - 1)  # done: the bar ends at N/N (ticking after closing it left it at 0/N)
    except ChildError as err:
        run.notes.append(f"{m.key} {where} {name} at context {n} failed: {str(err).splitlines()[0]} (log: {log})")
        return {"error": str(err)[-1500:]}
    finally:
        bar.close()
    res["config"] = name
    res["elapsed_s"] = time.perf_counter() - t0
    if name != "dynamic":
        if ref.exists():
            res.update(compare_files(ref, logits, m.model.config.vocab_size))
        logits.unlink(missing_ok=True)
    log.unlink(missing_ok=True)
    return res


def _here(m: ModelRun, sp: Spec, ids, n: int, continuation: int, logits: Path, tick) -> dict[str, Any]:
    """The quality pass in this process (isolate=False): no peak RSS of its own."""
    from .child import LogprobWriter
    from .perplexity import continuation_perplexity

    caches: list = []
    writer, done = LogprobWriter(logits), [0]

    def fresh():
        caches.append(make_cache(m.model, sp))
        return caches[-1]

    def step(k):
        done[0] += k
        tick(done[0])

    try:
        r = continuation_perplexity(m.model, ids, n, continuation, fresh, progress=step, on_logits=writer)
    finally:
        writer.close()
    return {
        "config": sp.name,
        "ppl": r.ppl,
        "nll": r.nll,
        "tokens_scored": r.tokens_scored,
        "prefill_s": r.prefill_s,
        "decode_ms": r.decode_ms,
        "bytes_after_prefill": r.bytes_after_prefill,
        "bytes_at_end": cache_nbytes(caches[-1]),
        "isolated": False,
    }
