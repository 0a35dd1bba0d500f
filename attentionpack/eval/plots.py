"""PNG plots of an evaluation run (matplotlib, headless): Pareto of memory vs perplexity change, needle heat maps,
decode speed vs context length, the budget's judged error vs measured KL. Each function takes the JSON-normal
results of `report.assemble`."""

from __future__ import annotations

from pathlib import Path

OURS, PEERS, REF = "#d62728", "#1f77b4", "#444444"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto(res: dict, path: Path, model: str | None = None) -> bool:
    """Bytes held vs perplexity change of each configuration of `model` (default: the first), the mean over every
    text and window of the main table."""
    model = model or next(iter(res["models"]), None)
    merged: dict = {}
    for r in res["table"]:
        if r["model"] == model and r.get("bytes_fraction") and r.get("ppl_change_pct") is not None:
            merged.setdefault(r["config"], []).append(r)
    rows = [
        {
            "config": name,
            "ours": got[0]["ours"],
            "bytes_fraction": sum(r["bytes_fraction"] for r in got) / len(got),
            "ppl_change_pct": sum(r["ppl_change_pct"] for r in got) / len(got),
        }
        for name, got in merged.items()
    ]
    if not rows:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 6))
    changes = [r["ppl_change_pct"] for r in rows]
    for r in rows:
        color = REF if r["config"] == "dynamic" else OURS if r["ours"] else PEERS
        ax.scatter(r["bytes_fraction"], r["ppl_change_pct"], color=color, s=40, zorder=3)
    ax.set_xscale("log")
    if max(changes) > 50:
        ax.set_yscale("symlog", linthresh=10)
    low, high = min(min(changes), 0), max(max(changes), 0)
    pad = 0.08 * (high - low or 1)
    bottom = low - pad if low < -1 else -min(max(0.05 * (high - low), 0.2), 3.0)
    ax.set_ylim(bottom, high * (1.6 if max(changes) > 50 else 1) + pad)
    fig.canvas.draw()
    boxes: list[tuple[float, float, float, float]] = []  # labels placed so far, in pixels
    for r in sorted(rows, key=lambda r: (r["ppl_change_pct"], r["bytes_fraction"])):
        color = REF if r["config"] == "dynamic" else OURS if r["ours"] else PEERS
        x, y = ax.transData.transform((r["bytes_fraction"], r["ppl_change_pct"]))
        w, h, dy = 6.2 * len(r["config"]), 11, 0
        while any(
            x + 6 < bx + bw and bx < x + 6 + w and y + dy < by + bh and by < y + dy + h for bx, by, bw, bh in boxes
        ):
            dy += h
        boxes.append((x + 6, y + dy, w, h))
        ax.annotate(
            r["config"],
            (r["bytes_fraction"], r["ppl_change_pct"]),
            textcoords="offset points",
            xytext=(6 * 72 / fig.dpi, dy * 72 / fig.dpi),
            fontsize=8,
            color=color,
            va="bottom",
            arrowprops=dict(arrowstyle="-", color=color, lw=0.5, alpha=0.6) if dy else None,
        )
    ax.axhline(0, color="#bbb", lw=0.8)
    ax.set_xlabel("cache bytes after prefill / DynamicCache bytes (log scale; left is smaller)")
    ax.set_ylabel("perplexity change vs DynamicCache, % (lower is better)")
    s = res["settings"]
    ax.set_title(
        f"{model}: memory vs quality, mean over texts and windows "
        f"({s['contexts'][0]} context tokens, {s['continuation']} scored)"
    )
    from matplotlib.lines import Line2D

    ax.legend(
        handles=[
            Line2D([], [], marker="o", ls="", color=OURS, label="AttentionPack"),
            Line2D([], [], marker="o", ls="", color=PEERS, label="peers"),
            Line2D([], [], marker="o", ls="", color=REF, label="DynamicCache"),
        ],
        loc="best",
    )
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def needle_maps(res: dict, path: Path) -> bool:
    entries = [
        (f"{model} {name}", e) for model, by in res["needle"].items() for name, e in by.items() if e.get("rates")
    ]
    if not entries:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(entries), figsize=(3.2 * len(entries) + 1, 3.6), squeeze=False)
    for ax, (name, entry) in zip(axes[0], entries, strict=False):
        rates = entry["rates"]
        lengths = sorted(rates, key=int)
        depths = sorted({d for by in rates.values() for d in by}, key=float)
        grid = [[float("nan") if rates[n].get(d) is None else rates[n][d] for n in lengths] for d in depths]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, "-" if v != v else f"{100 * v:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), lengths, fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{float(d):g}" for d in depths], fontsize=8)
        ax.set_xlabel("context length (tokens)")
        ax.set_title(f"{name}: {100 * entry['rate']:.0f}%" if entry.get("rate") is not None else name, fontsize=9)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="pass key retrieved (share)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def speed_plot(res: dict, path: Path) -> bool:
    speed = {f"{model} {name}": by for model, per in res["speed"].items() for name, by in per.items()}
    if not speed:
        return False
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.8))
    ours = {f"{r['model']} {r['config']}": r["ours"] for r in res["summary"]}
    for name, by in speed.items():
        ctx = sorted(by, key=int)
        x = [int(c) for c in ctx]
        style = dict(
            marker="o",
            label=name,
            ls="-" if ours.get(name) else "--",
            color=REF if name.endswith(" dynamic") else None,
            lw=2 if name.endswith(" dynamic") else 1.2,
        )
        a1.plot(x, [by[c]["decode_ms"] for c in ctx], **style)
        a2.plot(x, [by[c]["prefill_s"] for c in ctx], **style)
    for ax, label in ((a1, "decode ms/token (median)"), (a2, "prefill s (compression included)")):
        ax.set_xscale("log", base=2)
        ticks = sorted({int(c) for by in speed.values() for c in by})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    a1.set_title("Decode speed vs context (solid: AttentionPack, dashed: peers)")
    a2.set_title("Prefill time vs context")
    a1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def judge_plot(res: dict, path: Path) -> bool:
    """Judged error vs measured KL of every judge trial, one panel per model, one colour per text (log-log)."""
    judge = {m: {k: r for k, r in t.items() if "trials" in r} for m, t in res.get("judge", {}).items()}
    judge = {m: t for m, t in judge.items() if t}
    if not judge:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(judge), figsize=(6.5 * len(judge), 5.5), squeeze=False)
    for ax, (model, by_text) in zip(axes[0], judge.items(), strict=True):
        for i, (text, r) in enumerate(by_text.items()):
            pts = [(t["judged"], t["kl"]) for t in r["trials"] if t["label"] != "exact" and t["judged"] > 0 < t["kl"]]
            if pts:
                color = plt.get_cmap("tab10")(i)
                label = f"{text} (Spearman {r['spearman_pooled']:.2f})"
                ax.scatter(*zip(*pts, strict=True), s=14, color=color, label=label, alpha=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("judged error (relative window-output error x layer weight)")
        ax.set_ylabel("KL vs DynamicCache on the continuation (nats/token)")
        ax.set_title(f"{model}: each candidate encoding installed alone")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def make_plots(res: dict, out: Path) -> list[str]:
    """Write every plot that has data; returns the file names (relative to `out`)."""
    made = []
    for model in res["models"]:  # one Pareto plot per model
        name = f"pareto-{model}.png"
        if pareto(res, Path(out) / name, model):
            made.append(name)
    for name, fn in (("needle.png", needle_maps), ("speed.png", speed_plot), ("judge.png", judge_plot)):
        if fn(res, Path(out) / name):
            made.append(name)
    return made
