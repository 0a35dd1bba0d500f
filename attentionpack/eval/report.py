"""Outputs of an evaluation run: results.json (every number, versions, settings, machine), report.md, PNG plots
(Pareto of memory vs perplexity, needle heat maps, decode speed vs context length) and index.html showing them."""

from __future__ import annotations

import html
import json
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ..threads import plural
from .settings import machine_info, settings_dict

MIB = 1024 * 1024


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


def summary_rows(run) -> list[dict]:
    """One row per configuration at the first text and first context (the protocol of peers.md)."""
    s = run.s
    text, n = run.texts[0]["id"], str(s.contexts[0])
    q = run.results_quality.get(text, {}).get(n, {})
    dyn, kvdyn = q.get("dynamic", {}), q.get("kvpress-env-dynamic", {})
    rows = []
    for sp in run.specs:
        r = q.get(sp.name, {})
        row = {"config": sp.name, "kind": sp.kind, "ours": sp.ours, "error": r.get("error")}
        row["bytes_after_prefill"] = r.get("bytes_after_prefill")
        row["compression_x"] = _ratio(dyn.get("bytes_after_prefill"), r.get("bytes_after_prefill"))
        row["bytes_fraction"] = _ratio(r.get("bytes_after_prefill"), dyn.get("bytes_after_prefill"))
        row["ppl"] = r.get("ppl")
        row["ppl_change_pct"] = (100 * (r["ppl"] / dyn["ppl"] - 1)) if r.get("ppl") and dyn.get("ppl") else None
        row["top1_agreement"] = r.get("top1_agreement", 1.0 if sp.name == "dynamic" and r else None)
        row["mean_kl"] = r.get("mean_kl", 0.0 if sp.name == "dynamic" and r else None)
        row["peak_rss"] = r.get("peak_rss")
        row["peak_rss_delta"] = r.get("peak_rss_delta")
        row["rss_after_load"] = r.get("rss_after_load")
        sp_speed = run.results_speed.get(sp.name, {}).get(int(n))
        if sp_speed and "decode_ratio" in sp_speed:
            row.update(
                decode_ms=sp_speed["decode_ms"],
                decode_ratio=sp_speed["decode_ratio"],
                prefill_s=sp_speed["prefill_s"],
                prefill_ratio=sp_speed["prefill_ratio"],
                speed_source="interleaved rounds",
            )
        else:
            ref = kvdyn if sp.kind == "kvpress" else dyn
            row.update(
                decode_ms=r.get("decode_ms"),
                decode_ratio=_ratio(r.get("decode_ms"), ref.get("decode_ms")),
                prefill_s=r.get("prefill_s"),
                prefill_ratio=_ratio(r.get("prefill_s"), ref.get("prefill_s")),
                speed_source=(
                    "quality run vs DynamicCache in the kvpress environment"
                    if sp.kind == "kvpress"
                    else "quality run (not interleaved)"
                ),
            )
        row["needle_rate"] = run.results_needle.get(sp.name, {}).get("rate")
        rows.append(row)
    return rows


def assemble(run, started: float) -> dict:

    s = run.s
    quality = run.results_quality
    base = quality.get(run.texts[0]["id"], {}).get(str(s.contexts[0]), {}) if run.texts else {}
    kv = dict(run.kvpress_env)
    if "kvpress-env-dynamic" in base and "dynamic" in base and base["dynamic"].get("ppl"):
        kv["dynamic_ppl"] = base["kvpress-env-dynamic"].get("ppl")
        kv["dynamic_ppl_vs_main_pct"] = 100 * (kv["dynamic_ppl"] / base["dynamic"]["ppl"] - 1)
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
                "model": run.model_id,
                "texts": [{k: t[k] for k in ("id", "source", "tokens")} for t in run.texts],
                "configs": {sp.name: sp.describe() for sp in run.specs},
                "summary": summary_rows(run),
                "quality": quality,
                "speed": run.results_speed,
                "speed_rounds": run.speed_rounds,
                "needle": run.results_needle,
                "kvpress_env": kv,
                "notes": run.notes,
            },
            default=str,
        )
    )  # JSON-normal: what report.md shows is exactly what results.json holds


# ---- formatting (report.md and index.html show exactly these strings) ------------------------------------------
FORMATS = {  # kind -> (scale, format)
    "mib": (1 / MIB, "{:.1f}"),
    "x": (1, "{:.2f}x"),
    "pct": (1, "{:+.1f}%"),
    "ppl": (1, "{:.2f}"),
    "share": (100, "{:.1f}%"),
    "kl": (1, "{:.4f}"),
    "ms": (1, "{:.1f}"),
    "s": (1, "{:.2f}"),
    "ratio": (1, "{:.2f}"),
}


def fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    if kind not in FORMATS:
        return str(value)
    scale, form = FORMATS[kind]
    return form.format(value * scale)


COLUMNS = [  # (header, key, kind)
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


def _md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def speed_table(speed: dict) -> tuple[list[str], list[list[str]]]:
    contexts = sorted({c for by in speed.values() for c in by}, key=int)
    header = ["config"] + [f"decode ms @{c} (vs dynamic)" for c in contexts] + [f"prefill s @{c}" for c in contexts]
    body = []
    for name, by in speed.items():
        cells = [
            f"{fmt(by[c]['decode_ms'], 'ms')} ({fmt(by[c].get('decode_ratio'), 'ratio')})" if c in by else "-"
            for c in contexts
        ]
        body.append([name] + cells + [fmt(by[c]["prefill_s"], "s") if c in by else "-" for c in contexts])
    return header, body


def needle_table(entry: dict) -> tuple[list[str], list[list[str]]]:
    rates = entry["rates"]  # {"length": {"depth": rate}} (JSON keys)
    lengths = sorted(rates, key=int)
    depths = sorted({d for by in rates.values() for d in by}, key=float)
    header = ["depth \\ length"] + lengths
    body = [[f"{float(d):g}"] + [fmt(rates[n].get(d), "share") for n in lengths] for d in depths]
    return header, body


def report_md(res: dict, images: list[str]) -> str:
    s, kv = res["settings"], res["kvpress_env"]
    out = [
        f"# AttentionPack evaluation ({res['started']})",
        "",
        f"Model: {res['model']}. Text: {res['texts'][0]['source']} ({res['texts'][0]['tokens']} tokens). "
        f"Protocol: prefill {s['contexts'][0]} tokens through the cache, teacher-force the next {s['continuation']} "
        f"one at a time; PPL of those {s['continuation']}. Memory: bytes held by the cache after prefill; peak RSS of "
        "a process that ran that configuration alone. Agreement and KL: vs DynamicCache on the same steps.",
        "",
        f"Wall time of this run: {res['wall_s']:.0f} s (cells measured {res['cells']['measured']}, reused "
        f"{res['cells']['reused']}). Machine: {res['machine']['cpu_count']} CPUs, "
        f"{plural(res['machine']['torch_threads'], 'torch thread')}, load average at the end "
        f"{_load(res['machine']['load_average'])}. Phases: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in res["phase_s"].items())
        + ".",
        "",
        "## Summary",
        "",
        _md_table([c[0] for c in COLUMNS], summary_table(res["summary"])),
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
    if res["speed"]:
        h, b = speed_table(res["speed"])
        out += ["", "## Speed (interleaved rounds, median)", "", _md_table(h, b)]
    for name, entry in res["needle"].items():
        h, b = needle_table(entry)
        out += ["", f"## Needle retrieval: {name} (overall {fmt(entry['rate'], 'share')})", "", _md_table(h, b)]
    if len(res["texts"]) > 1 or len(s["contexts"]) > 1:
        out += [
            "",
            "## Perplexity by text and context",
            "",
            _md_table(
                ["text", "context", "config", "PPL"],
                [
                    [t, n, c, fmt(r.get("ppl"), "ppl")]
                    for t, by_n in res["quality"].items()
                    for n, by_c in by_n.items()
                    for c, r in by_c.items()
                ],
            ),
        ]
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
        f"<h1>AttentionPack evaluation</h1><p>{html.escape(res['started'])} &middot; {html.escape(res['model'])}"
        f" &middot; wall time {res['wall_s']:.0f} s &middot; <a href='report.md'>report.md</a> &middot; "
        "<a href='results.json'>results.json</a></p>",
        "<h2>Summary</h2>",
        table([c[0] for c in COLUMNS], summary_table(res["summary"])),
        f"<p>kvpress environment: <b>{html.escape(str(res['kvpress_env'].get('status')))}</b></p>",
    ]
    if res["kvpress_env"].get("reason"):
        parts.append(f"<pre>{html.escape(res['kvpress_env']['reason'][-1500:])}</pre>")
    if res["speed"]:
        parts += ["<h2>Speed</h2>", table(*speed_table(res["speed"]))]
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
