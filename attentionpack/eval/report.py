"""Outputs of an evaluation run: results.json (every number, versions, settings, machine), report.md, PNG plots
(Pareto of memory vs perplexity, needle heat maps, decode speed vs context length) and index.html showing them."""

from __future__ import annotations

import html
import json
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ..threads import plural
from .formatting import fmt, md_table
from .settings import machine_info, settings_dict
from .targets import needle_targets, quality_targets, targets_md


def _load(load) -> str:
    """Load averages (1, 5, 15 minutes) as '3.49 / 2.95 / 2.10 (1 / 5 / 15 min)'; 'unknown' without them."""
    if not load:
        return "unknown"
    return " / ".join(f"{x:.2f}" for x in load) + " (1 / 5 / 15 min)"


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("attentionpack", "torch", "transformers", "optimum-quanto", "hqq", "matplotlib"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _ratio(a, b):
    return a / b if a is not None and b else None


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _windows(run, m_key: str, text: str) -> dict:
    """{window index: {config: result}} of one model and text at the first context."""
    return run.results_quality.get(m_key, {}).get(text, {}).get(str(run.s.contexts[0]), {})


def _change(r: dict, dyn: dict) -> float | None:
    return (100 * (r["ppl"] / dyn["ppl"] - 1)) if r.get("ppl") and dyn.get("ppl") else None


def table_rows(run) -> list[dict]:
    """The main table: one row per model x text x configuration at the first context. ppl_change_pct is the mean
    over windows of each window's change vs DynamicCache on that window, worst_change_pct the largest one;
    bytes_fraction / compression_x compare the mean bytes held after prefill, compression_end_x the bytes held
    after the continuation (the decoded tokens included)."""
    rows = []
    for m in run.models:
        for text in m.texts:
            by_w = _windows(run, m.key, text["id"])
            for sp in run.specs:
                per_w = [
                    (w, q.get(sp.name, {}), q.get("dynamic", {}))
                    for w, q in sorted(by_w.items(), key=lambda i: int(i[0]))
                ]
                changes = [_change(r, dyn) for _, r, dyn in per_w]
                known = [c for c in changes if c is not None]
                held = _mean([r.get("bytes_after_prefill") for _, r, _ in per_w])
                ref = _mean([dyn.get("bytes_after_prefill") for _, _, dyn in per_w])
                end = _ratio(
                    _mean([dyn.get("bytes_at_end") for _, _, dyn in per_w]),
                    _mean([r.get("bytes_at_end") for _, r, _ in per_w]),
                )
                rows.append(
                    {
                        "model": m.key,
                        "text": text["id"],
                        "config": sp.name,
                        "ours": sp.ours,
                        "windows": len(known),
                        "ppl_change_pct": _mean(known),
                        "worst_change_pct": max(known) if known else None,
                        "window_changes_pct": changes,
                        "bytes_after_prefill": held,
                        "bytes_fraction": _ratio(held, ref),
                        "compression_x": _ratio(ref, held),
                        "compression_end_x": end,
                        "error": next((r["error"] for _, r, _ in per_w if r.get("error")), None),
                    }
                )
    return rows


def summary_rows(run) -> list[dict]:
    """One row per model x configuration on the first text at the first context (means over its windows): memory,
    perplexity, agreement, RSS, speed and needle."""
    rows = []
    for m in run.models:
        by_w = _windows(run, m.key, m.texts[0]["id"]) if m.texts else {}
        qs = list(by_w.values())
        speed = run.results_speed.get(m.key, {})
        for sp in run.specs:
            rs = [q.get(sp.name, {}) for q in qs]
            dyns = [q.get("dynamic", {}) for q in qs]
            kvdyns = [q.get("kvpress-env-dynamic", {}) for q in qs]

            def mean(key: str, of: list[dict] = rs) -> float | None:
                return _mean([r.get(key) for r in of])

            row: dict = {"model": m.key, "config": sp.name, "kind": sp.kind, "ours": sp.ours}
            row["error"] = next((r["error"] for r in rs if r.get("error")), None)
            row["bytes_after_prefill"] = mean("bytes_after_prefill")
            row["compression_x"] = _ratio(mean("bytes_after_prefill", dyns), row["bytes_after_prefill"])
            row["bytes_fraction"] = _ratio(row["bytes_after_prefill"], mean("bytes_after_prefill", dyns))
            row["ppl"] = mean("ppl")
            row["ppl_change_pct"] = _mean([_change(r, d) for r, d in zip(rs, dyns, strict=True)])
            found = any(rs) and all(r.get("ppl") for r in rs)
            row["top1_agreement"] = 1.0 if sp.name == "dynamic" and found else mean("top1_agreement")
            row["mean_kl"] = 0.0 if sp.name == "dynamic" and found else mean("mean_kl")
            for key in ("peak_rss", "peak_rss_delta", "rss_after_load"):
                row[key] = mean(key)
            sp_speed = speed.get(sp.name, {}).get(int(run.s.contexts[0]))
            if sp_speed and "decode_ratio" in sp_speed:
                row.update(
                    decode_ms=sp_speed["decode_ms"],
                    decode_ratio=sp_speed["decode_ratio"],
                    prefill_s=sp_speed["prefill_s"],
                    prefill_ratio=sp_speed["prefill_ratio"],
                    speed_source="interleaved rounds",
                )
            else:
                ref = kvdyns if sp.kind == "kvpress" else dyns
                row.update(
                    decode_ms=mean("decode_ms"),
                    decode_ratio=_ratio(mean("decode_ms"), mean("decode_ms", ref)),
                    prefill_s=mean("prefill_s"),
                    prefill_ratio=_ratio(mean("prefill_s"), mean("prefill_s", ref)),
                    speed_source=(
                        "quality run vs DynamicCache in the kvpress environment"
                        if sp.kind == "kvpress"
                        else "quality run (not interleaved)"
                    ),
                )
            row["needle_rate"] = run.results_needle.get(m.key, {}).get(sp.name, {}).get("rate")
            rows.append(row)
    return rows


def assemble(run, started: float) -> dict:
    """Every number of the run as one JSON-normal dict (what results.json holds)."""
    s = run.s
    kv = dict(run.kvpress_env)
    for m in run.models[:1]:
        first: dict = next(iter(_windows(run, m.key, m.texts[0]["id"]).values()), {}) if m.texts else {}
        if "kvpress-env-dynamic" in first and first.get("dynamic", {}).get("ppl"):
            kv["dynamic_ppl"] = first["kvpress-env-dynamic"].get("ppl")
            if kv["dynamic_ppl"]:
                kv["dynamic_ppl_vs_main_pct"] = 100 * (kv["dynamic_ppl"] / first["dynamic"]["ppl"] - 1)
    return json.loads(
        json.dumps(
            {
                "tool": "attentionpack eval",
                "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                "wall_s": time.time() - started,
                "phase_s": run.phase_s,
                "cells": {"measured": run.cells.measured, "reused": run.cells.reused},
                "versions": _versions(),
                "machine": machine_info(s.threads),
                "settings": settings_dict(s),
                "models": {m.key: m.model_id for m in run.models},
                "texts": {
                    m.key: [
                        {"id": t["id"], "source": t["source"], "tokens": t["tokens"], "window_starts": t["starts"]}
                        for t in m.texts
                    ]
                    for m in run.models
                },
                "configs": {sp.name: sp.describe() for sp in run.specs},
                "table": (table := table_rows(run)),
                "targets": {"quality": quality_targets(table), "needle": needle_targets(run.results_needle)},
                "summary": summary_rows(run),
                "quality": run.results_quality,
                "speed": run.results_speed,
                "speed_rounds": run.speed_rounds,
                "needle": run.results_needle,
                "judge": getattr(run, "results_judge", {}),
                "kvpress_env": kv,
                "notes": run.notes,
            },
            default=str,
        )
    )  # JSON-normal: what report.md shows is exactly what results.json holds


# ---- formatting (report.md and index.html show exactly these strings) ------------------------------------------
COLUMNS = [  # (header, key, kind)
    ("model", "model", "str"),
    ("config", "config", "str"),
    ("cache MiB", "bytes_after_prefill", "mib"),
    ("smaller by", "compression_x", "x"),
    ("PPL", "ppl", "ppl"),
    ("PPL change", "ppl_change_pct", "pct"),
    ("top-1 agree", "top1_agreement", "share"),
    ("mean KL", "mean_kl", "kl"),
    ("peak RSS MiB", "peak_rss", "mib"),
    ("RSS after load MiB", "rss_after_load", "mib"),
    ("decode ms/tok", "decode_ms", "ms"),
    ("decode vs dynamic", "decode_ratio", "ratio"),
    ("prefill s", "prefill_s", "s"),
    ("prefill vs dynamic", "prefill_ratio", "ratio"),
    ("needle", "needle_rate", "share"),
]


TABLE_COLUMNS = [  # the main table: model x text x configuration
    ("model", "model", "str"),
    ("text", "text", "str"),
    ("config", "config", "str"),
    ("windows", "windows", "str"),
    ("PPL change (mean)", "ppl_change_pct", "pct2"),
    ("worst window", "worst_change_pct", "pct2"),
    ("cache MiB", "bytes_after_prefill", "mib"),
    ("bytes held", "bytes_fraction", "share"),
    ("smaller by", "compression_x", "x"),
    ("after decoding", "compression_end_x", "x"),
]


def main_table(rows: list[dict]) -> list[list[str]]:
    """The model x text x configuration table as strings (report.md and the command's output show these)."""
    return [[fmt(r.get(key), kind) for _, key, kind in TABLE_COLUMNS] for r in rows]


SEQUENTIAL = ("decode_ms", "decode_ratio", "prefill_s", "prefill_ratio")


def summary_table(rows: list[dict]) -> list[list[str]]:
    """The summary as strings; speed numbers not from interleaved rounds carry a '*'."""
    out = []
    for r in rows:
        mark = "*" if r.get("speed_source") != "interleaved rounds" else ""
        out.append(
            [
                fmt(r.get(key), kind) + (mark if key in SEQUENTIAL and r.get(key) is not None else "")
                for _, key, kind in COLUMNS
            ]
        )
    return out


def speed_table(speed: dict) -> tuple[list[str], list[list[str]]]:
    contexts = sorted({c for by in speed.values() for c in by}, key=int)
    static = "static" in speed  # transformers' StaticCache timed too: ratios to it as well
    vs = "(vs dynamic / static)" if static else "(vs dynamic)"
    header = ["config"] + [f"decode ms @{c} {vs}" for c in contexts] + [f"prefill s @{c}" for c in contexts]
    body = []
    for name, by in speed.items():
        cells = [
            f"{fmt(by[c]['decode_ms'], 'ms')} ({fmt(by[c].get('decode_ratio'), 'ratio')}"
            + (f" / {fmt(by[c].get('decode_ratio_static'), 'ratio')})" if static else ")")
            if c in by
            else "-"
            for c in contexts
        ]
        body.append([name] + cells + [fmt(by[c]["prefill_s"], "s") if c in by else "-" for c in contexts])
    return header, body


def judge_table(judge: dict) -> tuple[list[str], list[list[str]]]:
    """One row per model and text: Spearman correlation of judged error and measured KL (judge.py)."""
    header = ["model", "text", "layers", "trials", "pooled", "within layer (mean)", "keys", "values", "control KL"]
    body = []
    for model, by_text in judge.items():
        for text, r in by_text.items():
            if "error" in r:
                body.append([model, text, "-", "0", f"not measured: {r['error']}", "", "", "", ""])
                continue
            body.append(
                [model, text, ", ".join(map(str, r["layers"])), str(sum(t["label"] != "exact" for t in r["trials"]))]
                + [fmt(r[k], "ratio") for k in ("spearman_pooled", "spearman_within_layer_mean")]
                + [fmt(r[k], "ratio") for k in ("spearman_keys", "spearman_values")]
                + [f"{r['control_kl_max']:.1e}"]
            )
    return header, body


def needle_table(entry: dict) -> tuple[list[str], list[list[str]]]:
    rates = entry["rates"]  # {"length": {"depth": rate}} (JSON keys)
    lengths = sorted(rates, key=int)
    depths = sorted({d for by in rates.values() for d in by}, key=float)
    header = ["depth \\ length"] + lengths
    body = [[f"{float(d):g}"] + [fmt(rates[n].get(d), "share") for n in lengths] for d in depths]
    return header, body


def _token_counts(res: dict) -> dict[str, list[int]]:
    """{text source: [tokens under each model's tokenizer]}."""
    out: dict[str, list[int]] = {}
    for texts in res["texts"].values():
        for t in texts:
            out.setdefault(t["source"], []).append(t["tokens"])
    return out


def report_md(res: dict, images: list[str]) -> str:
    s, kv = res["settings"], res["kvpress_env"]
    out = [
        f"# AttentionPack evaluation ({res['started']})",
        "",
        "Models: "
        + "; ".join(f"{k} ({v})" for k, v in res["models"].items())
        + ". Texts (tokens under each model's tokenizer): "
        + "; ".join(f"{source} ({' / '.join(map(str, counts))})" for source, counts in _token_counts(res).items())
        + f". Protocol: in each of {s['windows']} disjoint windows per text, prefill {s['contexts'][0]} tokens "
        f"through the cache, teacher-force the next {s['continuation']} one at a time; PPL of those "
        f"{s['continuation']}. Memory: bytes held by the cache after prefill; peak RSS of a process that ran that "
        "configuration alone. Agreement and KL: vs DynamicCache on the same steps.",
        "",
        "## Perplexity change by model, text and configuration",
        "",
        md_table([c[0] for c in TABLE_COLUMNS], main_table(res["table"])),
        "",
        "PPL change: each window's perplexity vs DynamicCache's on the same window, then the mean over the windows "
        "(worst window: the largest); per-window numbers are in results.json (`table[].window_changes_pct`, "
        "`quality`). Bytes held: mean cache bytes after prefill vs DynamicCache's.",
        "",
        f"Wall time of this run: {res['wall_s']:.0f} s (cells measured {res['cells']['measured']}, reused "
        f"{res['cells']['reused']}). Machine: {res['machine']['cpu_count']} CPUs, "
        f"{plural(res['machine']['torch_threads'], 'torch thread')}, load average at the end "
        f"{_load(res['machine']['load_average'])}. Phases: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in res["phase_s"].items())
        + ".",
        "",
        "## Summary (first text, mean over its windows)",
        "",
        md_table([c[0] for c in COLUMNS], summary_table(res["summary"])),
        "",
        "Speed: from interleaved rounds (A B C A B C ...) at this context where the configuration was timed there; "
        "numbers marked * come from its quality run instead, compared with DynamicCache's quality run (kvpress: "
        "with DynamicCache in the kvpress environment): sequential, so a busy machine skews them. Peak RSS "
        "includes the prefill's activations, which at this context outweigh the cache.",
        "",
    ]
    out += ["## kvpress environment", "", f"Status: **{kv.get('status')}**."]
    if kv.get("reason"):
        out += ["", "```", kv["reason"][-1500:], "```"]
    if kv.get("versions"):
        out += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in kv["versions"].items()) + "."]
    if kv.get("dynamic_ppl") is not None:
        out += [
            "",
            f"DynamicCache in the kvpress environment: PPL {fmt(kv['dynamic_ppl'], 'ppl')} "
            f"({fmt(kv['dynamic_ppl_vs_main_pct'], 'pct')} vs this environment's).",
        ]
    for model, speed in res["speed"].items():
        if speed:
            h, b = speed_table(speed)
            out += ["", f"## Speed: {model} (interleaved rounds, median)", "", md_table(h, b)]
    for model, by_config in res["needle"].items():
        for name, entry in by_config.items():
            h, b = needle_table(entry)
            out += [
                "",
                f"## Needle retrieval: {model} {name} (overall {fmt(entry['rate'], 'share')})",
                "",
                md_table(h, b),
            ]
    if any(res.get("judge", {}).values()):
        h, b = judge_table(res["judge"])
        out += [
            "",
            f"## The budget's judge vs measured KL (budget {s['judge_budget']:g}, first window of each text)",
            "",
            md_table(h, b),
            "",
            "Each candidate encoding of the prompt span of the sampled layers, installed alone (every other span "
            "exact): its judged error (the planner's, window-output error times the layer's weight) and the KL "
            f"divergence from DynamicCache it causes over the {s['continuation']} continuation tokens. Spearman's rank "
            "correlation: pooled over all trials (what the budget compares), mean within a layer, and over the key "
            "or value candidates alone. Control KL: the largest over the sampled layers of the span left exact (the "
            "comparison's own floor). Every trial is in results.json (`judge`).",
        ]
    out += targets_md(res.get("targets", {}))
    if res["notes"]:
        out += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
    out += ["", "## Plots", ""] + [f"![{img}]({img})" for img in images]
    out += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + "."]
    return "\n".join(out) + "\n"


def write_outputs(res: dict, out: Path, plots: bool = True) -> list[str]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    if plots:
        from .plots import make_plots

        images = make_plots(res, out)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "report.md").write_text(report_md(res, images))
    (out / "index.html").write_text(index_html(res, images))
    return images


def index_html(res: dict, images: list[str]) -> str:
    def table(header, body):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"

    parts = [
        f"<h1>AttentionPack evaluation</h1><p>{html.escape(res['started'])} &middot; "
        f"{html.escape(', '.join(res['models']))}"
        f" &middot; wall time {res['wall_s']:.0f} s &middot; <a href='report.md'>report.md</a> &middot; "
        "<a href='results.json'>results.json</a></p>",
        "<h2>Perplexity change by model, text and configuration</h2>",
        table([c[0] for c in TABLE_COLUMNS], main_table(res["table"])),
        "<h2>Summary (first text)</h2>",
        table([c[0] for c in COLUMNS], summary_table(res["summary"])),
        f"<p>kvpress environment: <b>{html.escape(str(res['kvpress_env'].get('status')))}</b></p>",
    ]
    if res["kvpress_env"].get("reason"):
        parts.append(f"<pre>{html.escape(res['kvpress_env']['reason'][-1500:])}</pre>")
    for model, speed in res["speed"].items():
        if speed:
            parts += [f"<h2>Speed: {html.escape(model)}</h2>", table(*speed_table(speed))]
    if any(res.get("judge", {}).values()):
        parts += ["<h2>The budget's judge vs measured KL (Spearman)</h2>", table(*judge_table(res["judge"]))]
    parts += [f"<h2>{html.escape(img)}</h2><img src='{html.escape(img)}' alt='{html.escape(img)}'>" for img in images]
    if res["notes"]:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in res["notes"]) + "</ul>")
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:first-child{text-align:left}"
        "img{max-width:100%;border:1px solid #eee}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>AttentionPack evaluation</title>"
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n"
    )
