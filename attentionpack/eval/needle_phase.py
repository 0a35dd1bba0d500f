"""Phase 3 of `evaluate()`: the needle retrieval grid (length x depth) of each needle configuration, per model, on
the first text, in each needle mode: "inside" (the question inside the prompt) and "after" (the document prefilled
and compressed alone, the question appended in a second call: the prefix-reuse setting; results named
"<config> (after)"). DynamicCache and our caches share one prefill per prompt; each finished (configuration, mode,
length, depth) cell is saved at once."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from .. import BudgetError
from . import cells as cells_mod
from . import needle as needle_mod
from .child import ChildError
from .configs import Spec, make_cache
from .peers import kvpress_needle

if TYPE_CHECKING:
    from .runner import ModelRun, Run

WORDING = hashlib.sha1(
    (needle_mod.INSTRUCTION + needle_mod.NEEDLE + needle_mod.QUESTION + needle_mod.ANSWER_START).encode()
).hexdigest()[:10]


def needle(run: Run, m: ModelRun) -> dict:
    """{result name: {"rates", "rate", "trials"}} for one model; the name is the configuration's, plus " multikey"
    for the multi-key task and " (after)" for the question asked after compression."""
    results: dict = {}
    for task, prompts in m.prompts.items():
        for mode in run.s.needle_modes:
            _grid(run, m, task, prompts, mode == "after", results)
    return results


def result_name(config: str, task: str, after: bool) -> str:
    """The name of a needle grid in results.json and the report."""
    return config + ("" if task == "passkey" else f" {task}") + (" (after)" if after else "")


def _grid(run: Run, m: ModelRun, task: str, all_prompts: list, after: bool, results: dict) -> None:
    s = run.s
    eos = needle_mod.eos_ids(m.model, m.tokenizer)
    groups: dict = {}
    for p in all_prompts:
        groups.setdefault((p.length, p.depth), []).append(p)
    pending = {}  # spec name -> (spec, rows, todo)
    for sp in run.needle_specs:
        if not sp.in_process and (after or run.kvpress_env.get("status") != "ok"):
            continue  # kvpress: its own protocol (it compresses the context without the question), inside only
        rows, todo = [], []
        for (length, depth), prompts in groups.items():
            key = f"needle__{m.key}__{sp.name}__L{length}__d{depth:g}" + ("" if task == "passkey" else f"__{task}")
            key += "__after" if after else ""
            settings = {
                "model": m.model_id,
                "text": m.texts[0]["id"],
                "text_sha": m.texts[0]["sha"],
                "config": sp.describe(),
                "length": length,
                "depth": depth,
                "trials": s.needle_trials,
                "seed": s.seed,
                "max_new_tokens": s.needle_new_tokens,
                "wording": WORDING,
                "mode": "after" if after else "inside",
                "task": task,
            }
            got = run.cells.get(key, settings)
            if got is not None:
                rows.extend(got["trials"])
            else:
                todo.append((key, settings, prompts))
        pending[result_name(sp.name, task, after)] = (sp, rows, todo)
    # DynamicCache and our caches attend exactly during prefill: one prefill per prompt serves them all
    shared = [name for name, (sp, _, todo) in pending.items() if sp.kind in ("dynamic", "pack") and todo]
    if shared:
        _shared(run, m, {name: pending[name] for name in shared}, eos, after)
    for name, (sp, rows, todo) in pending.items():
        if name not in shared and todo:
            bar = cells_mod.bar(
                run.progress, total=sum(len(t[2]) for t in todo), desc=f"needle {m.key} {name}", unit="prompt"
            )
            if sp.in_process:
                for key, settings, prompts in todo:
                    group = []

                    def fresh(sp: Spec = sp) -> object:
                        return make_cache(m.model, sp)

                    for p in prompts:
                        res = needle_mod.run_trial(m.model, m.tokenizer, p, fresh, s.needle_new_tokens, after)
                        group.append(_row(p, res.answer, res.hit, res.prefill_s))
                        bar.update(1)
                    rows.extend(run.cells.put(key, settings, {"trials": group})["trials"])
            else:
                rows.extend(_kvpress(run, m, sp, task, todo, eos, bar))
            bar.close()
        total = [r["hit"] for r in rows if r["hit"] is not None]
        skipped = [r for r in rows if r["hit"] is None]
        if skipped:
            lengths = sorted({r["length"] for r in skipped})
            run.notes.append(
                f"needle {m.key} {name}: {len(skipped)} prompt(s) of length {lengths} not run: {skipped[0]['error']}"
            )
        results[name] = {
            "rates": needle_mod.rates_of(rows),
            "rate": sum(total) / len(total) if total else None,
            "trials": rows,
        }


def _shared(run: Run, m: ModelRun, pending: dict, eos, after: bool) -> None:
    """Needle trials of DynamicCache-like configurations prompt by prompt, one prefill per prompt
    (`needle.greedy_answers_shared`); each finished (configuration, length, depth) cell is saved at once."""
    work: dict = {}  # prompt id -> (prompt, [(spec, key, settings, cell, slot)])
    for sp, rows, todo in pending.values():
        for key, settings, prompts in todo:
            cell = {"rows": rows, "left": len(prompts), "group": [None] * len(prompts)}
            for i, p in enumerate(prompts):
                work.setdefault(id(p), (p, []))[1].append((sp, key, settings, cell, i))
    names = ", ".join(pending)
    bar = cells_mod.bar(run.progress, total=len(work), desc=f"needle {m.key} {names} (shared prefill)", unit="prompt")
    for p, users in work.values():
        makers: dict = {
            sp.name: None if sp.kind == "dynamic" else (lambda sp=sp: make_cache(m.model, sp)) for sp, *_ in users
        }
        answers = needle_mod.greedy_answers_shared(
            m.model, p.context_ids, p.question_ids, makers, run.s.needle_new_tokens, eos, after
        )
        for sp, key, settings, cell, i in users:
            got = answers[sp.name]
            if isinstance(got, BudgetError):  # the prompt is too short for this budget: no trial
                cell["group"][i] = {**_row(p, "", False, 0.0), "hit": None, "error": str(got).splitlines()[0]}
            else:
                answer, hit = needle_mod.score(m.tokenizer, p, got[0])
                cell["group"][i] = _row(p, answer, hit, got[1])
            cell["left"] -= 1
            if cell["left"] == 0:
                cell["rows"].extend(run.cells.put(key, settings, {"trials": cell["group"]})["trials"])
        bar.update(1)
    bar.close()


def _row(p, answer: str, hit: bool, prefill_s: float) -> dict:
    return {
        "length": p.length,
        "depth": p.depth,
        "passkey": p.passkey,
        "needle_at": p.needle_at,
        "answer": answer,
        "hit": bool(hit),
        "prefill_s": prefill_s,
    }


def _kvpress(run: Run, m: ModelRun, sp: Spec, task: str, todo, eos, bar) -> list:
    flat = [(key, settings, p) for key, settings, prompts in todo for p in prompts]
    done: dict = {}
    rows: list = []

    def on_item(item):
        key, settings, p = flat[item["index"]]
        answer, hit = needle_mod.score(m.tokenizer, p, item["answer_ids"])
        done.setdefault(key, []).append(_row(p, answer, hit, item["prefill_s"]))
        bar.update(1)
        group = next(t for t in todo if t[0] == key)
        if len(done[key]) == len(group[2]):
            rows.extend(run.cells.put(key, settings, {"trials": done[key]})["trials"])

    log = run.cells.path(f"needle__{m.key}__{sp.name}__{task}", ".log")
    try:
        kvpress_needle(
            sp,
            [f[2] for f in flat],
            eos,
            run.s.needle_new_tokens,
            model=m.arg,
            threads=run.s.threads,
            on_item=on_item,
            log=log,
        )
        log.unlink(missing_ok=True)
    except ChildError as err:
        run.notes.append(f"needle {m.key} {sp.name} failed: {str(err).splitlines()[0]} (log: {log})")
    return rows
