"""`evaluate()`: every metric for every configuration in one run, written cell by cell so that an interrupted run
keeps what it finished and a rerun with the same output folder skips it.

Phases: (1) quality and memory: each configuration alone in a child process through the continuation protocol
(perplexity, bytes held, peak RSS, per-step log-probabilities -> agreement with DynamicCache); kvpress presses in
their own environment. (2) speed: interleaved rounds of the in-process configurations. (3) needle retrieval grid for a
subset. Then results.json, report.md, plots and index.html (see report.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .. import BudgetError, cache_nbytes
from . import needle as needle_mod
from .agreement import compare_files
from .child import ChildError, measure_isolated
from .configs import DEFAULT_CONFIGS, Spec, check_available, make_cache, parse_config, parse_configs
from .peers import (
    KvpressUnavailable,
    ensure_kvpress_env,
    kvpress_env_info,
    kvpress_needle,
    kvpress_notice,
    kvpress_quality,
)
from .settings import Settings, _norm

# Defaults sized so that the whole default run fits in 20 minutes on 2 idle cores; any configuration can be added
# with --needle-configs / --speed-configs.
DEFAULT_NEEDLE = ("dynamic", "balanced", "max")
DEFAULT_SPEED = ("dynamic", "balanced", "max", "quanto-4")  # the others' decode speed: from their quality run
KVPRESS_BASELINE = "kvpress-env-dynamic"  # DynamicCache inside the kvpress environment: its own reference


def _safe(key: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", key)
    return clean if clean == key else f"{clean}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


class Cells:
    """One JSON file per finished measurement under DIR/cells; a cell is reused only if its settings match."""

    def __init__(self, out: Path):
        self.root = out / "cells"
        self.root.mkdir(parents=True, exist_ok=True)
        self.reused = 0
        self.measured = 0

    def path(self, key: str, suffix: str = ".json") -> Path:
        return self.root / (_safe(key) + suffix)

    def get(self, key: str, settings: dict):
        try:
            data = json.loads(self.path(key).read_text())
        except (OSError, ValueError):
            return None
        if data.get("settings") != _norm(settings):
            return None
        self.reused += 1
        return data["result"]

    def put(self, key: str, settings: dict, result: dict) -> dict:
        path = self.path(key)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "key": key,
                    "settings": _norm(settings),
                    "result": result,
                    "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                },
                indent=1,
            )
        )
        os.replace(tmp, path)
        self.measured += 1
        return _norm(result)


def _bar(enabled: bool, **kw):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, dynamic_ncols=True, **kw)


class Run:
    def __init__(self, s: Settings, out: Path, progress: bool = True):
        self.started = time.time()  # wall time counts model loading and tokenizing too
        self.s, self.out, self.progress = s, Path(out), progress
        self.notes: list[str] = []
        self.phase_s: dict[str, float] = {}
        self.specs = parse_configs(s.configs)
        names = {sp.name for sp in self.specs}
        if s.needle_configs is None:
            self.needle_specs = [parse_config(n) for n in DEFAULT_NEEDLE if parse_config(n).name in names]
        else:
            self.needle_specs = [parse_config(n) for n in s.needle_configs]
        if not s.kvpress:  # --no-kvpress: the peers that need their own environment are left out, said so
            skipped = sorted({sp.name for sp in self.specs + self.needle_specs if not sp.in_process})
            self.specs = [sp for sp in self.specs if sp.in_process]
            self.needle_specs = [sp for sp in self.needle_specs if sp.in_process]
            if skipped:
                self.notes.append(f"left out (--no-kvpress): {', '.join(skipped)}")
        if s.speed_configs is None:
            self.speed_specs = [sp for sp in self.specs if sp.name in DEFAULT_SPEED] or self.specs[:1]
        else:
            self.speed_specs = parse_configs(s.speed_configs)
        if any(not sp.in_process for sp in self.speed_specs):
            raise ValueError(
                "speed is measured in this process only; kvpress configurations cannot be in "
                "speed_configs (their decode speed comes from the quality run)"
            )
        for sp in {sp.name: sp for sp in self.specs + self.needle_specs + self.speed_specs}.values():
            why = check_available(sp)
            if why:
                raise ValueError(why)
        for name, values in (
            ("contexts", s.contexts),
            ("needle_lengths", s.needle_lengths),
            ("speed_contexts", s.speed_contexts),
        ):
            if any(not isinstance(v, int) or v < 16 for v in values):
                raise ValueError(f"{name}={list(values)} must be integers >= 16")
        if s.continuation < 2 or s.needle_trials < 0 or s.speed_repeats < 0 or s.speed_steps < 1:
            raise ValueError("continuation must be >= 2, needle_trials and speed_repeats >= 0, speed_steps >= 1")
        if any(not 0 <= d <= 1 for d in s.needle_depths):
            raise ValueError(f"needle_depths={list(s.needle_depths)} must lie in [0, 1]")
        self._choose_threads()
        self._load_inputs()
        self.cells = Cells(self.out)

    def _choose_threads(self) -> None:
        """threads=None: torch's default, unless the machine is already busy (1-minute load average >= CPUs - 0.5),
        where several threads per process stall each other; then 1 thread in every process of this run."""
        import torch

        from ..threads import busy_load

        s = self.s
        self._threads_before = torch.get_num_threads()
        busy = busy_load() if s.threads is None else None  # the one rule (attentionpack/threads.py)
        if busy is not None:
            load, cpus = busy
            self.s = s = Settings(**{**asdict(s), "threads": 1})
            self.notes.append(
                f"the machine was busy at the start (load average {load:.1f} on {cpus} CPUs): every "
                "process of this run used 1 torch thread (pass threads / --threads to choose)"
            )

    # ---- inputs: everything that can fail is checked here, before any long work -------------------------------
    def _load_inputs(self) -> None:
        from .data import read_text, token_ids

        s = self.s
        texts = []
        for path in s.texts:
            if path is not None and not Path(path).is_file():
                raise ValueError(f"text file {path} does not exist (or is not a file)")
            text = read_text(path)
            tid = "britannica" if path is None else f"{Path(path).stem}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
            texts.append((tid, str(path) if path else "britannica (1911 Encyclopaedia, 'Shakespeare')", text))
        from ..models import load_model

        self.model, self.tokenizer = load_model(s.model)
        self.model_id = "embedded SmolLM2-135M-Instruct" if s.model is None else str(Path(s.model).resolve())
        self.texts = []
        for i, (tid, source, text) in enumerate(texts):
            need = max(s.contexts) + s.continuation
            if i == 0:
                need = max(
                    need,
                    max(s.speed_contexts) + s.speed_steps if self.speed_specs and s.speed_repeats else 0,
                    max(s.needle_lengths) if self.needle_specs and s.needle_trials else 0,
                )
            ids = token_ids(self.tokenizer, text, need, source=source)
            self.texts.append({"id": tid, "source": source, "tokens": int(ids.numel()), "ids": ids})
        if self.needle_specs and s.needle_trials:  # builds every prompt once: a too-short length fails here
            self.prompts = needle_mod.grid_prompts(
                self.tokenizer,
                self.texts[0]["ids"].tolist(),
                s.needle_lengths,
                s.needle_depths,
                s.needle_trials,
                s.seed,
            )
        else:
            self.prompts = []

    # ---- phase 1: quality + memory -----------------------------------------------------------------------------
    def _quality_settings(self, text: dict, n: int, desc: dict) -> dict:
        return {
            "model": self.model_id,
            "text": text["id"],
            "context": n,
            "continuation": self.s.continuation,
            "config": desc,
        }

    def quality(self) -> None:
        s = self.s
        self.kvpress_env: dict[str, Any] = {"status": "not needed"}
        kv_specs = [sp for sp in self.specs if not sp.in_process]
        if kv_specs:
            if not kvpress_env_info():  # say what is about to be installed before installing it
                print(kvpress_notice(kv_specs), file=sys.stderr)
            try:
                self.kvpress_env = {
                    "status": "ok",
                    "versions": ensure_kvpress_env(
                        status=lambda what: print(f"kvpress environment: {what} (once) ...", file=sys.stderr)
                    ),
                }
            except KvpressUnavailable as err:
                self.kvpress_env = {"status": "unavailable", "reason": str(err)}
                self.notes.append(f"kvpress presses were not measured: {err}")
        self.results_quality: dict = {}
        for text in self.texts:
            for n in s.contexts:
                ref = self.cells.path(f"ref__{text['id']}__n{n}__m{s.continuation}", ".f32")
                row = self.results_quality.setdefault(text["id"], {}).setdefault(str(n), {})
                # order: DynamicCache (the reference), other in-process peers, kvpress (its environment's own
                # DynamicCache first), then ours; the report keeps the order of `configs`
                kv_jobs = [None] + kv_specs if kv_specs and self.kvpress_env["status"] == "ok" else []
                jobs = (
                    [sp for sp in self.specs if sp.in_process and not sp.ours]
                    + kv_jobs
                    + [sp for sp in self.specs if sp.ours]
                )
                for sp in jobs:
                    name = sp.name if sp else KVPRESS_BASELINE
                    desc: dict = (
                        sp.describe() if sp else {"name": name, "kind": "kvpress-env", **self.kvpress_env["versions"]}
                    )
                    key = f"quality__{text['id']}__n{n}__m{s.continuation}__{name}"
                    settings = self._quality_settings(text, n, desc)
                    got = self.cells.get(key, settings)
                    if got is not None and (name != "dynamic" or ref.exists()):
                        row[name] = got
                        continue
                    row[name] = self._quality_one(sp, name, text, n, ref, key, settings)

    def _quality_one(self, sp: Spec | None, name: str, text: dict, n: int, ref: Path, key: str, settings: dict):
        s = self.s
        logits = ref if name == "dynamic" else self.cells.path(key, ".f32")
        bar = _bar(self.progress, total=s.continuation - 1, desc=f"quality+memory {name} @{n}", unit="tok")
        tick = lambda k: bar.update(k - bar.n)  # noqa: E731
        log = self.cells.path(key, ".log")
        t0 = time.perf_counter()
        try:
            if sp is not None and sp.in_process and not s.isolate:
                res = self._quality_here(sp, text["ids"], n, logits, tick)
            elif sp is not None and sp.in_process:
                res = measure_isolated(
                    sp.name,
                    text["ids"],
                    n,
                    s.continuation,
                    model=s.model,
                    logits_out=logits,
                    threads=s.threads,
                    on_progress=tick,
                    log=log,
                )
            else:
                res = kvpress_quality(
                    sp,
                    text["ids"],
                    n,
                    s.continuation,
                    model=s.model,
                    logits_out=logits,
                    threads=s.threads,
                    on_progress=tick,
                    log=log,
                )
            tick(s.continuation - 1)  # done: the bar ends at N/N (ticking after closing it left it at 0/N)
        except ChildError as err:
            self.notes.append(f"{name} at context {n} failed: {str(err).splitlines()[0]} (log: {log})")
            return {"error": str(err)[-1500:]}
        finally:
            bar.close()
        res["config"] = name
        res["elapsed_s"] = time.perf_counter() - t0
        if name != "dynamic":
            if ref.exists():
                res.update(compare_files(ref, logits, self.model.config.vocab_size))
            logits.unlink(missing_ok=True)
        log.unlink(missing_ok=True)
        return self.cells.put(key, settings, res)

    def _quality_here(self, sp: Spec, ids, n: int, logits: Path, tick) -> dict:
        """The quality pass in this process (isolate=False): no peak RSS of its own."""
        from .child import LogprobWriter
        from .perplexity import continuation_perplexity

        caches, writer, done = [], LogprobWriter(logits), [0]

        def fresh():
            caches.append(make_cache(self.model, sp))
            return caches[-1]

        def step(k):
            done[0] += k
            tick(done[0])

        try:
            r = continuation_perplexity(self.model, ids, n, self.s.continuation, fresh, progress=step, on_logits=writer)
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

    # ---- phase 2: speed ----------------------------------------------------------------------------------------
    def speed(self) -> None:
        from .speed import speed_round, summarize, warm_up

        s = self.s
        self.speed_rounds = []
        if not self.speed_specs or not s.speed_repeats:
            self.results_speed = {}
            return
        makers = {sp.name: (lambda sp=sp: make_cache(self.model, sp)) for sp in self.speed_specs}
        settings = {
            "model": self.model_id,
            "text": self.texts[0]["id"],
            "contexts": list(s.speed_contexts),
            "steps": s.speed_steps,
            "configs": [sp.describe() for sp in self.speed_specs],
        }
        ids = self.texts[0]["ids"]
        bar = _bar(self.progress, total=s.speed_repeats * len(s.speed_contexts) * len(makers), desc="speed")
        warmed = False
        for r in range(s.speed_repeats):
            got = self.cells.get(f"speed__round{r}", settings)
            if got is None:
                if not warmed:
                    warm_up(self.model, ids, makers["dynamic"])
                    warmed = True

                def tick(name, ctx, finished, r=r):
                    if finished:
                        bar.update(1)
                    else:
                        bar.set_postfix_str(f"round {r + 1}: {name} @{ctx}")

                got = self.cells.put(
                    f"speed__round{r}",
                    settings,
                    speed_round(self.model, ids, makers, s.speed_contexts, s.speed_steps, tick),
                )
            else:
                bar.update(len(s.speed_contexts) * len(makers))
            self.speed_rounds.append(got)
        bar.close()
        self.results_speed = summarize(self.speed_rounds)

    # ---- phase 3: needle ---------------------------------------------------------------------------------------
    def needle(self) -> None:
        s = self.s
        self.results_needle = {}
        if not self.prompts:
            return
        eos = needle_mod.eos_ids(self.model, self.tokenizer)
        groups: dict = {}
        for p in self.prompts:
            groups.setdefault((p.length, p.depth), []).append(p)
        wording = hashlib.sha1(
            (needle_mod.INSTRUCTION + needle_mod.NEEDLE + needle_mod.QUESTION + needle_mod.ANSWER_START).encode()
        ).hexdigest()[:10]
        pending = {}  # spec name -> (rows, todo)
        for sp in self.needle_specs:
            if not sp.in_process and self.kvpress_env.get("status") != "ok":
                continue
            rows, todo = [], []
            for (length, depth), prompts in groups.items():
                key = f"needle__{sp.name}__L{length}__d{depth:g}"
                settings = {
                    "model": self.model_id,
                    "text": self.texts[0]["id"],
                    "config": sp.describe(),
                    "length": length,
                    "depth": depth,
                    "trials": s.needle_trials,
                    "seed": s.seed,
                    "max_new_tokens": s.needle_new_tokens,
                    "wording": wording,
                }
                got = self.cells.get(key, settings)
                if got is not None:
                    rows.extend(got["trials"])
                else:
                    todo.append((key, settings, prompts))
            pending[sp.name] = (sp, rows, todo)
        # DynamicCache and our caches attend exactly during prefill: one prefill per prompt serves them all
        shared = [name for name, (sp, _, todo) in pending.items() if sp.kind in ("dynamic", "pack") and todo]
        if shared:
            self._needle_shared({name: pending[name] for name in shared}, eos)
        for name, (sp, rows, todo) in pending.items():
            if name not in shared and todo:
                bar = _bar(self.progress, total=sum(len(t[2]) for t in todo), desc=f"needle {sp.name}", unit="prompt")
                if sp.in_process:
                    for key, settings, prompts in todo:
                        group = []

                        def fresh(sp: Spec = sp) -> object:
                            return make_cache(self.model, sp)

                        for p in prompts:
                            res = needle_mod.run_trial(self.model, self.tokenizer, p, fresh, s.needle_new_tokens)
                            group.append(self._trial_row(p, res.answer, res.hit, res.prefill_s))
                            bar.update(1)
                        rows.extend(self.cells.put(key, settings, {"trials": group})["trials"])
                else:
                    rows.extend(self._kvpress_needle(sp, todo, eos, bar))
                bar.close()
            rates = needle_mod.rates_of(rows)
            total = [r["hit"] for r in rows if r["hit"] is not None]
            skipped = [r for r in rows if r["hit"] is None]
            if skipped:
                lengths = sorted({r["length"] for r in skipped})
                self.notes.append(
                    f"needle {name}: {len(skipped)} prompt(s) of length {lengths} not run: {skipped[0]['error']}"
                )
            self.results_needle[name] = {
                "rates": rates,
                "rate": sum(total) / len(total) if total else None,
                "trials": rows,
            }

    def _needle_shared(self, pending: dict, eos) -> None:
        """Needle trials of DynamicCache-like configurations prompt by prompt, one prefill per prompt
        (`needle.greedy_answers_shared`); each finished (configuration, length, depth) cell is saved at once."""
        work: dict = {}  # prompt id -> (prompt, [(spec, key, settings, slot)])
        for sp, rows, todo in pending.values():
            for key, settings, prompts in todo:
                cell = {"rows": rows, "left": len(prompts), "group": [None] * len(prompts)}
                for i, p in enumerate(prompts):
                    work.setdefault(id(p), (p, []))[1].append((sp, key, settings, cell, i))
        names = ", ".join(pending)
        bar = _bar(self.progress, total=len(work), desc=f"needle {names} (shared prefill)", unit="prompt")
        for p, users in work.values():
            makers: dict = {
                sp.name: None if sp.kind == "dynamic" else (lambda sp=sp: make_cache(self.model, sp))
                for sp, *_ in users
            }
            answers = needle_mod.greedy_answers_shared(
                self.model, p.context_ids, p.question_ids, makers, self.s.needle_new_tokens, eos
            )
            for sp, key, settings, cell, i in users:
                got = answers[sp.name]
                if isinstance(got, BudgetError):  # the prompt is too short for this budget: no trial
                    cell["group"][i] = {
                        **self._trial_row(p, "", False, 0.0),
                        "hit": None,
                        "error": str(got).splitlines()[0],
                    }
                else:
                    answer, hit = needle_mod.score(self.tokenizer, p, got[0])
                    cell["group"][i] = self._trial_row(p, answer, hit, got[1])
                cell["left"] -= 1
                if cell["left"] == 0:
                    cell["rows"].extend(self.cells.put(key, settings, {"trials": cell["group"]})["trials"])
            bar.update(1)
        bar.close()

    def _trial_row(self, p, answer: str, hit: bool, prefill_s: float) -> dict:
        return {
            "length": p.length,
            "depth": p.depth,
            "passkey": p.passkey,
            "needle_at": p.needle_at,
            "answer": answer,
            "hit": bool(hit),
            "prefill_s": prefill_s,
        }

    def _kvpress_needle(self, sp: Spec, todo, eos, bar) -> list:
        flat = [(key, settings, p) for key, settings, prompts in todo for p in prompts]
        done: dict = {}
        rows = []

        def on_item(item):
            key, settings, p = flat[item["index"]]
            answer, hit = needle_mod.score(self.tokenizer, p, item["answer_ids"])
            done.setdefault(key, []).append(self._trial_row(p, answer, hit, item["prefill_s"]))
            bar.update(1)
            group = next(t for t in todo if t[0] == key)
            if len(done[key]) == len(group[2]):
                rows.extend(self.cells.put(key, settings, {"trials": done[key]})["trials"])

        log = self.cells.path(f"needle__{sp.name}", ".log")
        try:
            kvpress_needle(
                sp,
                [f[2] for f in flat],
                eos,
                self.s.needle_new_tokens,
                model=self.s.model,
                threads=self.s.threads,
                on_item=on_item,
                log=log,
            )
            log.unlink(missing_ok=True)
        except ChildError as err:
            self.notes.append(f"needle {sp.name} failed: {str(err).splitlines()[0]} (log: {log})")
        return rows

    # ---- all -----------------------------------------------------------------------------------------------------
    def results(self, started: float) -> dict:
        from .report import assemble

        return assemble(self, started)

    def go(self) -> dict:
        import torch

        if self.s.threads:
            torch.set_num_threads(self.s.threads)
        try:
            return self._go()
        finally:
            torch.set_num_threads(self._threads_before)

    def _go(self) -> dict:
        from .report import write_outputs

        started = self.started
        self.results_quality, self.results_speed, self.results_needle, self.speed_rounds = {}, {}, {}, []
        self.kvpress_env = {"status": "not reached"}
        try:
            for phase in ("quality", "speed", "needle"):
                t0 = time.perf_counter()
                getattr(self, phase)()
                self.phase_s[phase] = time.perf_counter() - t0
                write_outputs(self.results(started), self.out, plots=False)  # a partial report after every phase
        except KeyboardInterrupt:
            self.notes.append("interrupted: finished cells are kept; run again with the same output folder to resume")
            write_outputs(self.results(started), self.out, plots=False)
            raise
        results = self.results(started)
        write_outputs(results, self.out, plots=True)
        return results


def evaluate(
    out: str | os.PathLike = "attentionpack-eval",
    model: str | None = None,
    texts=None,
    configs=None,
    progress: bool = True,
    **settings,
) -> dict:
    """Measure quality, memory, speed and needle retrieval of each configuration against DynamicCache and the peers;
    write results.json, report.md, PNG plots and index.html to `out`. Settings: see `Settings` (contexts,
    continuation, needle_*, speed_*, threads, seed). Rerunning with the same `out` skips finished cells."""
    unknown = set(settings) - set(Settings.__dataclass_fields__)
    if unknown:
        raise TypeError(
            f"unknown evaluate() setting(s) {sorted(unknown)}; known: {sorted(Settings.__dataclass_fields__)}"
        )
    if isinstance(texts, (str, os.PathLike)):
        texts = [texts]
    if isinstance(configs, str):
        configs = [configs]
    tuples: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
    s = Settings(
        model=None if model is None else str(model),
        texts=tuple(texts) if texts else (None,),
        configs=tuple(configs) if configs else DEFAULT_CONFIGS,
        **tuples,
    )
    return Run(s, Path(out), progress).go()
