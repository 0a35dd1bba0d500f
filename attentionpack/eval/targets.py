"""The quality targets the project states (issue 13's acceptance limits), checked on a run's own numbers.

A target names a configuration, the most perplexity change allowed as the mean over a text's windows (no single
window may exceed twice that), and the fewest times smaller than DynamicCache its cache must be after the prefill
(a budget `budget-f`: 1/f, the fraction it names); the size after the decoded continuation is checked apart. It
holds on a model x text pair measured on at least
`MIN_WINDOWS` windows; fewer windows are reported as not judged. The needle target: per model, task and mode, the
budget `NEEDLE_CONFIG` answers at least as many trials as DynamicCache on the same prompts.

Inputs are the JSON-normal rows of `report.table_rows` and the needle results (`report.assemble`); what this
module returns is stored in results.json (`targets`) and shown in report.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from .formatting import fmt, md_table


@dataclass(frozen=True)
class Target:
    config: str  # eval configuration name (eval/configs.py)
    mean_pct: float  # most perplexity change, mean over a text's windows; a window may reach twice this
    stated_x: float | None = None  # fewest times smaller than DynamicCache after the prefill (None: a budget's 1/f)

    @property
    def smaller_x(self) -> float:
        return self.stated_x if self.stated_x is not None else 1 / float(self.config.removeprefix("budget-"))


TARGETS = (
    Target("budget-0.25", 0.5),
    Target("budget-0.125", 2.0),
    Target("budget-0.0625", 5.0),
    Target("balanced", 1.0, 5.0),
    Target("max", 3.0, 6.5),
)
WORST_FACTOR = 2.0  # no window beyond this times the mean's limit
MIN_WINDOWS = 4  # the protocol: at least 4 disjoint windows per text
NEEDLE_CONFIG = "budget-0.125"
SIZE_SLACK = 1e-3  # relative: a budget's bytes are rounded to whole storages


def quality_targets(table: list[dict]) -> list[dict]:
    """One row per (model, text, target configuration) present in `table` (`report.table_rows`): the numbers, the
    limits and `holds` (True / False, None: fewer than MIN_WINDOWS windows or a failed cell), with `why` naming
    each limit missed; `holds_after_decoding`: the size also holds against DynamicCache after the continuation
    (generated tokens wait in the exact tail, and a sliding-window model's DynamicCache holds its whole prompt
    right after the prefill but only its window later)."""
    by_name = {t.config: t for t in TARGETS}
    out = []
    for row in table:
        target = by_name.get(row["config"])
        if target is None:
            continue
        mean, worst, smaller = row.get("ppl_change_pct"), row.get("worst_change_pct"), row.get("compression_x")
        why = []
        if row.get("error") or mean is None or worst is None or smaller is None:
            holds = None
            why.append(f"not measured: {row.get('error') or 'no perplexity or bytes'}")
        elif row.get("windows", 0) < MIN_WINDOWS:
            holds = None
            why.append(f"{row.get('windows', 0)} windows (the protocol needs {MIN_WINDOWS})")
        else:
            if mean > target.mean_pct:
                why.append(f"mean {mean:+.2f}% > {target.mean_pct:g}%")
            if worst > WORST_FACTOR * target.mean_pct:
                why.append(f"worst window {worst:+.2f}% > {WORST_FACTOR * target.mean_pct:g}%")
            if smaller < target.smaller_x * (1 - SIZE_SLACK):
                why.append(f"{smaller:.2f}x smaller < {target.smaller_x:g}x")
            holds = not why
        end = row.get("compression_end_x")
        holds_end = None if holds is None or end is None else holds and end >= target.smaller_x * (1 - SIZE_SLACK)
        out.append(
            {
                "model": row["model"],
                "text": row["text"],
                "config": row["config"],
                "windows": row.get("windows", 0),
                "mean_pct": mean,
                "mean_limit_pct": target.mean_pct,
                "worst_pct": worst,
                "worst_limit_pct": WORST_FACTOR * target.mean_pct,
                "smaller_x": smaller,
                "smaller_limit_x": target.smaller_x,
                "smaller_end_x": end,
                "holds": holds,
                "holds_after_decoding": holds_end,
                "why": "; ".join(why),
            }
        )
    return out


def _hits(entry: dict) -> dict[tuple[int, float, int], bool]:
    """{(length, depth, trial number within the cell): hit} of one needle entry's trials (unscored trials left
    out)."""
    seen: dict[tuple[int, float], int] = {}
    out = {}
    for t in entry.get("trials", []):
        cell = (int(t["length"]), float(t["depth"]))
        k = seen[cell] = seen.get(cell, -1) + 1
        if t.get("hit") is not None:
            out[cell + (k,)] = bool(t["hit"])
    return out


def needle_targets(needle: dict) -> list[dict]:
    """Per model and needle variant (task and mode: the suffix of the result names, "" for the pass key asked in
    the prompt): trials answered by DynamicCache and by NEEDLE_CONFIG on the trials both scored; `holds` when the
    budget answers at least as many."""
    out = []
    for model, by_name in needle.items():
        for name, entry in by_name.items():
            if not name.startswith(NEEDLE_CONFIG):
                continue
            variant = name[len(NEEDLE_CONFIG) :].strip()
            reference = by_name.get(("dynamic " + variant).strip())
            if reference is None:
                continue
            ours, theirs = _hits(entry), _hits(reference)
            both = sorted(set(ours) & set(theirs))
            got, want = sum(ours[k] for k in both), sum(theirs[k] for k in both)
            out.append(
                {
                    "model": model,
                    "variant": ("multikey" if "multikey" in variant else "passkey")
                    + (", asked after compression" if "(after)" in variant else ", asked in the prompt"),
                    "trials": len(both),
                    "dynamic_hits": want,
                    "hits": got,
                    "holds": got >= want if both else None,
                }
            )
    return out


def _verdict(holds: bool | None) -> str:
    return {True: "holds", False: "**misses**", None: "not judged"}[holds]


def targets_md(targets: dict) -> list[str]:
    """The targets section of report.md (`targets.quality_targets` / `needle_targets` rows); empty without any."""
    quality, needle = targets.get("quality", []), targets.get("needle", [])
    if not quality and not needle:
        return []
    out = ["", "## Targets (issue 13's acceptance limits)", ""]
    if quality:
        header = ["model", "text", "config", "windows", "mean (limit)", "worst (limit)", "smaller by (need)"]
        header += ["after decoding", "verdict", "after decoding too"]
        body = [
            [r["model"], r["text"], r["config"], str(r["windows"])]
            + [f"{fmt(r['mean_pct'], 'pct2')} ({r['mean_limit_pct']:g}%)"]
            + [f"{fmt(r['worst_pct'], 'pct2')} ({r['worst_limit_pct']:g}%)"]
            + [f"{fmt(r['smaller_x'], 'x')} ({r['smaller_limit_x']:g}x)", fmt(r["smaller_end_x"], "x")]
            + [_verdict(r["holds"]) + (f": {r['why']}" if r["why"] else ""), _verdict(r["holds_after_decoding"])]
            for r in quality
        ]
        held = sum(r["holds"] is True for r in quality)
        held_end = sum(r["holds_after_decoding"] is True for r in quality)
        out += [
            md_table(header, body),
            "",
            f"{held} of {len(quality)} model x text x configuration cells hold, {held_end} also after decoding. A "
            f"cell holds with a mean over at least {MIN_WINDOWS} windows within the limit, no window above twice "
            "it, and its cache after the prefill at least that many times smaller than DynamicCache's then (a "
            "budget: 1/f). After decoding: the same size against DynamicCache after the continuation (the decoded "
            "tokens wait in an exact tail; a sliding-window model's DynamicCache holds the whole prompt right after "
            "the prefill, its window only later).",
        ]
    if needle:
        body = [
            [r["model"], r["variant"], str(r["trials"]), str(r["dynamic_hits"]), str(r["hits"]), _verdict(r["holds"])]
            for r in needle
        ]
        header = ["model", "needle", "trials", "DynamicCache answered", f"{NEEDLE_CONFIG} answered", "verdict"]
        out += ["", md_table(header, body), "", f"Needle: {NEEDLE_CONFIG} answers at least as often as DynamicCache."]
    return out
