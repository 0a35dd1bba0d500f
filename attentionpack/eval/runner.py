"""`evaluate()`: every metric for every model x text x window x configuration in one run, written cell by cell so
that an interrupted run keeps what it finished and a rerun with the same output folder skips it (cells.py).

Phases, per model: (1) quality and memory (quality_phase.py): each configuration alone in a child process through
the continuation protocol on K disjoint windows of every text; kvpress presses in their own environment. (2) speed:
interleaved rounds of the in-process configurations on the first text. (3) needle retrieval grids on the first text
(needle_phase.py): pass key and multi-key tasks, the question inside the prompt or asked after compression. (4) the
judge: on the first window of every text, each candidate encoding of a sample of layers installed alone, its judged
error beside the KL it causes on the continuation, and their rank correlation (judge.py). Then results.json,
report.md, plots and index.html (see report.py).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import needle as needle_mod
from .cells import Cells, bar
from .configs import DEFAULT_CONFIGS, check_available, make_cache, parse_config, parse_configs
from .needle_phase import needle
from .quality_phase import prepare_kvpress, quality
from .settings import DEFAULT_MODELS, DEFAULT_TEXTS, Settings

# Defaults sized so that the whole default run fits in 30 minutes on 2 idle cores (README: Evaluation); any
# configuration can be added with --needle-configs / --speed-configs.
DEFAULT_NEEDLE = ("dynamic", "budget-0.125", "balanced", "max")
DEFAULT_SPEED = ("dynamic", "budget-0.125", "balanced", "max", "quanto-4")  # others: decode speed of quality run


@dataclass
class ModelRun:
    """One model of a run: `key` labels its cells and results ("smollm2", "gemma3", or a path's name), `arg` is
    what `load_model` and the measurement children are given, `texts` carry token ids and window starts."""

    key: str
    arg: str | None
    model_id: str
    model: Any = None
    tokenizer: Any = None
    texts: list[dict] = field(default_factory=list)
    prompts: dict = field(default_factory=dict)  # needle task -> prompts


def _model_key(arg: str | None) -> tuple[str, str]:
    """(key, id recorded in cell settings) of a --model value."""
    from ..models import MODEL_NAMES, model_name

    name = model_name(arg)
    if name is not None:
        return name, f"{name}: {MODEL_NAMES[name]}"
    path = Path(str(arg)).resolve()
    return path.stem or path.name, str(path)


class Run:
    def __init__(self, s: Settings, out: Path, progress: bool = True):
        self.started = time.time()  # wall time counts model loading and tokenizing too
        self.s, self.out, self.progress = s, Path(out), progress
        self.notes: list[str] = []
        self.phase_s: dict[str, float] = {}
        self.kvpress_env: dict[str, Any] = {"status": "not reached"}
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
        static = sorted({sp.name for sp in self.specs + self.needle_specs if sp.kind == "static"})
        if static:
            raise ValueError(
                "'static' (StaticCache) is a speed baseline (its outputs equal DynamicCache's): "
                "give it in --speed-configs, not in --configs or --needle-configs"
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
        if not isinstance(s.windows, int) or s.windows < 1:
            raise ValueError(f"windows={s.windows!r} must be an integer >= 1")
        if s.continuation < 2 or s.needle_trials < 0 or s.speed_repeats < 0 or s.speed_steps < 1:
            raise ValueError("continuation must be >= 2, needle_trials and speed_repeats >= 0, speed_steps >= 1")
        if not isinstance(s.judge_layers, int) or s.judge_layers < 0 or not 0 < s.judge_budget <= 1:
            raise ValueError(
                f"judge_layers={s.judge_layers!r} must be an integer >= 0 (0 skips the judge phase) and "
                f"judge_budget={s.judge_budget!r} a fraction in (0, 1]"
            )
        if not s.needle_tasks or any(t not in needle_mod.TASKS for t in s.needle_tasks):
            raise ValueError(f"needle_tasks={list(s.needle_tasks)} must be among {list(needle_mod.TASKS)}")
        if not s.needle_modes or any(mode not in ("inside", "after") for mode in s.needle_modes):
            raise ValueError(f"needle_modes={list(s.needle_modes)} must be 'inside' and/or 'after'")
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
        from ..models import load_model
        from .data import TEXT_SOURCES, is_text_name, read_text, token_ids, windows

        s = self.s
        if not s.models:
            raise ValueError("no model given; use --model smollm2, --model gemma3 or a model path")
        if not s.texts:
            raise ValueError("no text given; use --text britannica, play, code or a file path")
        texts = []
        for t in s.texts:
            if not is_text_name(t) and not Path(str(t)).is_file():
                raise ValueError(
                    f"text file {t} does not exist (or is not a file), and {t!r} is not a text name; "
                    "use britannica, play, code or a .txt / .jsonl path"
                )
            text = read_text(t)
            sha = hashlib.sha1(text.encode()).hexdigest()[:8]
            tid = str(t) if is_text_name(t) else f"{Path(str(t)).stem}-{sha}"
            texts.append((tid, TEXT_SOURCES[str(t)] if is_text_name(t) else str(t), text, sha))
        self.models: list[ModelRun] = []
        keys: set[str] = set()
        for arg in dict.fromkeys(s.models):  # repeated --model: once
            key, model_id = _model_key(arg)
            if key in keys:
                key = f"{key}-{hashlib.sha1(model_id.encode()).hexdigest()[:6]}"
            keys.add(key)
            m = ModelRun(key=key, arg=arg, model_id=model_id)
            m.model, m.tokenizer = load_model(arg)
            for i, (tid, source, text, sha) in enumerate(texts):
                need = 0
                if i == 0:
                    need = max(
                        max(s.speed_contexts) + s.speed_steps if self.speed_specs and s.speed_repeats else 0,
                        max(s.needle_lengths) if self.needle_specs and s.needle_trials else 0,
                    )
                ids = token_ids(m.tokenizer, text, need, source=f"{source} ({m.key})")
                starts = {
                    str(n): windows(int(ids.numel()), s.windows, n + s.continuation, source=f"{source} ({m.key})")
                    for n in s.contexts
                }
                m.texts.append(
                    {"id": tid, "source": source, "sha": sha, "tokens": int(ids.numel()), "ids": ids, "starts": starts}
                )
            if self.needle_specs and s.needle_trials:  # builds every prompt once: a too-short length fails here
                hay = m.texts[0]["ids"].tolist()
                m.prompts = {
                    task: needle_mod.grid_prompts(
                        m.tokenizer, hay, s.needle_lengths, s.needle_depths, s.needle_trials, s.seed, task=task
                    )
                    for task in s.needle_tasks
                }
            self.models.append(m)

    # ---- phase 2: speed ----------------------------------------------------------------------------------------
    def speed(self, m: ModelRun) -> dict:
        from .speed import speed_round, summarize, warm_up

        """Interleaved speed rounds of one model on the first text: {"rounds": [...], "summary": {...}}."""
        s = self.s
        if not self.speed_specs or not s.speed_repeats:
            return {"rounds": [], "summary": {}}
        makers = {sp.name: (lambda n, sp=sp: make_cache(m.model, sp, n)) for sp in self.speed_specs}
        settings = {
            "model": m.model_id,
            "text": m.texts[0]["id"],
            "text_sha": m.texts[0]["sha"],
            "contexts": list(s.speed_contexts),
            "steps": s.speed_steps,
            "configs": [sp.describe() for sp in self.speed_specs],
        }
        ids = m.texts[0]["ids"]
        per_round = len(s.speed_contexts) * len(makers)
        progress = bar(self.progress, total=s.speed_repeats * per_round, desc=f"speed {m.key}")
        warmed, rounds = [False], []
        for r in range(s.speed_repeats):

            def tick(name, ctx, finished, r=r):
                if finished:
                    progress.update(1)
                else:
                    progress.set_postfix_str(f"round {r + 1}: {name} @{ctx}")

            def measure(tick=tick) -> dict:
                if not warmed[0]:
                    warm_up(m.model, ids, makers["dynamic"])
                    warmed[0] = True
                return speed_round(m.model, ids, makers, s.speed_contexts, s.speed_steps, tick)

            rounds.append(self.cells.cached(f"speed__{m.key}__round{r}", settings, measure))
            progress.update(per_round - (progress.n - r * per_round))
        progress.close()
        return {"rounds": rounds, "summary": summarize(rounds)}

    # ---- phase 4: the judge ---------------------------------------------------------------------------------------
    def judge(self, m: ModelRun) -> dict:
        """{text id: judge.summarize(...)} on each text's first window at the first context (judge.py)."""
        from .judge import judge_trials, summarize

        s = self.s
        if not s.judge_layers:
            return {}
        context = s.contexts[0]
        out = {}
        progress = bar(self.progress, total=len(m.texts), desc=f"judge {m.key}")
        for text in m.texts:
            start = text["starts"][str(context)][0]
            ids = text["ids"][start : start + context + s.continuation][None]  # (1, context + continuation)
            settings = {
                "model": m.model_id,
                "text": text["id"],
                "text_sha": text["sha"],
                "start": start,
                "context": context,
                "continuation": s.continuation,
                "layers": s.judge_layers,
                "budget": s.judge_budget,
            }

            def measure(ids=ids) -> dict:
                try:
                    return summarize(judge_trials(m.model, ids, context, s.judge_layers, s.judge_budget))
                except ValueError as err:  # e.g. a budget infeasible for this prompt: said in the report
                    return {"error": str(err)}

            out[text["id"]] = self.cells.cached(f"judge__{m.key}__{text['id']}", settings, measure)
            progress.update(1)
        progress.close()
        return out

    # ---- all -----------------------------------------------------------------------------------------------------
    def results(self, started: float) -> dict:
        from .report import assemble

        return assemble(self, started)

    def _speed_into(self, m: ModelRun) -> None:
        got = self.speed(m)
        self.speed_rounds[m.key], self.results_speed[m.key] = got["rounds"], got["summary"]

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
        self.results_quality: dict = {}
        self.results_speed: dict = {}
        self.results_needle: dict = {}
        self.results_judge: dict = {}
        self.speed_rounds: dict = {}
        phases = {
            "quality": lambda m: self.results_quality.__setitem__(m.key, quality(self, m)),
            "speed": lambda m: self._speed_into(m),
            "needle": lambda m: self.results_needle.__setitem__(m.key, needle(self, m)),
            "judge": lambda m: self.results_judge.__setitem__(m.key, self.judge(m)),
        }
        try:
            prepare_kvpress(self)
            for m in self.models:
                for phase, go in phases.items():
                    t0 = time.perf_counter()
                    go(m)
                    self.phase_s[f"{phase} {m.key}"] = time.perf_counter() - t0
                    write_outputs(self.results(started), self.out, plots=False)  # a partial report after each
        except KeyboardInterrupt:
            self.notes.append("interrupted: finished cells are kept; run again with the same output folder to resume")
            write_outputs(self.results(started), self.out, plots=False)
            raise
        results = self.results(started)
        write_outputs(results, self.out, plots=True)
        return results


def evaluate(
    out: str | os.PathLike = "attentionpack-eval",
    model: str | os.PathLike | list | tuple | None = None,
    texts=None,
    configs=None,
    progress: bool = True,
    **settings,
) -> dict:
    """Measure quality, memory, speed and needle retrieval of each configuration against DynamicCache and the peers,
    for every model (`model`: a name "smollm2" / "gemma3", a path, or a list of them; default both names) and every
    text (`texts`: names "britannica" / "play" / "code" or file paths; default all three names) on `windows`
    disjoint windows; write results.json, report.md, PNG plots and index.html to `out`. Settings: see `Settings`
    (contexts, continuation, windows, needle_*, speed_*, threads, seed). Rerunning with the same `out` skips
    finished cells."""
    unknown = set(settings) - set(Settings.__dataclass_fields__)
    if unknown:
        raise TypeError(
            f"unknown evaluate() setting(s) {sorted(unknown)}; known: {sorted(Settings.__dataclass_fields__)}"
        )
    if isinstance(texts, (str, os.PathLike)):
        texts = [texts]
    if isinstance(model, (str, os.PathLike)):
        model = [model]
    if isinstance(configs, str):
        configs = [configs]
    tuples: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
    s = Settings(
        models=tuple(str(m) for m in model) if model else DEFAULT_MODELS,
        texts=tuple(str(t) for t in texts) if texts else DEFAULT_TEXTS,
        configs=tuple(configs) if configs else DEFAULT_CONFIGS,
        **tuples,
    )
    return Run(s, Path(out), progress).go()
