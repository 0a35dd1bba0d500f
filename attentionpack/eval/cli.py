"""`attentionpack eval`: the evaluation harness from the command line (registered in attentionpack/cli.py).
Kept light to import: the runner (torch, transformers) is imported when the command runs."""

from __future__ import annotations

from pathlib import Path

import typer


def _words(values: list[str] | None) -> list[str] | None:
    """Repeated options and space-separated lists both work: --configs 'dynamic max' --configs quanto-4."""
    if not values:
        return None
    return [w for v in values for w in v.split()]


def _numbers(values: list[str] | None, cast, name: str):
    words = _words(values)
    if words is None:
        return None
    try:
        return tuple(cast(w.strip(",")) for w in words if w.strip(","))
    except ValueError:
        raise typer.BadParameter(f"{name} takes numbers, got {' '.join(words)!r}") from None


def eval_command(
    out: Path = typer.Option(Path("attentionpack-eval"), "--out", "-o", help="Output folder (rerun = resume)."),
    model: list[str] | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Model(s), repeatable: smollm2 (embedded), gemma3, a local folder or .gguf (default: smollm2 gemma3).",
    ),
    text: list[str] | None = typer.Option(
        None,
        "--text",
        "-t",
        help="Text(s), repeatable: britannica, play, code, or a .txt / .jsonl file (default: all three names).",
    ),
    windows: int | None = typer.Option(
        None, "--windows", "-k", min=1, help="Disjoint windows of context + continuation per text (default: 2)."
    ),
    full: bool = typer.Option(
        False,
        "--full",
        help="The acceptance protocol: both models, every text, 4 windows, budgets 1/4 1/8 1/16 and presets, "
        "needle grids 1k/2k/4k x 5 depths (hours on 2 cores; options given explicitly still win).",
    ),
    configs: list[str] | None = typer.Option(
        None,
        "--configs",
        "-c",
        help="Configurations: dynamic lossless balanced max budget-<fraction> quanto-4 quanto-2 hqq-4 "
        "kvpress-<press>-<ratio> 'pack:key=value,...', 'peers' for every peer "
        "(default: dynamic budget-0.125 balanced).",
    ),
    context: list[str] | None = typer.Option(
        None, "--context", "-n", help="Context length(s) N of the perplexity protocol (default: 2048)."
    ),
    continuation: int | None = typer.Option(
        None, "--continuation", "-M", help="Tokens M teacher-forced and scored after the context (default: 256)."
    ),
    needle_configs: list[str] | None = typer.Option(
        None,
        help="Configurations for the needle grid (default: dynamic budget-0.125 balanced max, those in --configs); "
        "'none' to skip.",
    ),
    needle_lengths: list[str] | None = typer.Option(None, help="Needle prompt lengths (default: 1024 2048)."),
    needle_depths: list[str] | None = typer.Option(None, help="Needle depths from 0 to 1 (default: 0 0.5 1)."),
    needle_modes: list[str] | None = typer.Option(
        None,
        help="Needle modes: inside (the question in the prompt), after (document compressed alone, the question "
        "asked in a second call) (default: inside; --full: both).",
    ),
    needle_tasks: list[str] | None = typer.Option(
        None,
        help="Needle tasks: passkey (one key), multikey (four doors' keys, the question asks one) "
        "(default: passkey; --full: both).",
    ),
    needle_trials: int = typer.Option(1, min=0, help="Trials per needle cell (0: skip the needle grid)."),
    speed_configs: list[str] | None = typer.Option(
        None,
        help="Configurations timed in interleaved rounds, 'static' (StaticCache) among them if wanted "
        "(default: dynamic budget-0.125 balanced); 'none' to skip.",
    ),
    speed_contexts: list[str] | None = typer.Option(None, help="Context lengths of the speed rounds (default: 2048)."),
    speed_steps: int = typer.Option(8, min=1, help="Decode steps timed per speed measurement."),
    speed_repeats: int = typer.Option(2, min=0, help="Interleaved speed rounds (0: skip)."),
    judge_layers: int | None = typer.Option(
        None,
        min=0,
        help="Layers whose budget candidates are each installed alone to compare judged error and measured KL "
        "(first window of each text; default 3, --full 6; 0: skip).",
    ),
    threads: int | None = typer.Option(
        None, min=1, help="torch threads in every process (default: torch's, or 1 when the machine is already busy)."
    ),
    seed: int = typer.Option(0, help="Seed of the needle pass keys and haystack offsets."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    kvpress: bool = typer.Option(
        True,
        help="Run the kvpress configurations (their own environment: a one-time "
        "install of about 1.4 GB, announced first); --no-kvpress leaves them out.",
    ),
):
    """Evaluate compressed caches against DynamicCache and the peers: perplexity, agreement, memory, speed, needle
    retrieval. Writes results.json, report.md, plots and index.html to --out; finished cells are kept and reused."""
    settings = {
        "contexts": _numbers(context, int, "--context"),
        "needle_lengths": _numbers(needle_lengths, int, "--needle-lengths"),
        "needle_depths": _numbers(needle_depths, float, "--needle-depths"),
        "speed_contexts": _numbers(speed_contexts, int, "--speed-contexts"),
        "speed_configs": tuple(_words(speed_configs) or ()) if speed_configs else None,
        "needle_modes": tuple(_words(needle_modes) or ()) if needle_modes else None,
        "needle_tasks": tuple(_words(needle_tasks) or ()) if needle_tasks else None,
    }
    settings = {k: v for k, v in settings.items() if v is not None}
    if windows is not None:
        settings["windows"] = windows
    if continuation is not None:
        settings["continuation"] = continuation
    if judge_layers is not None:
        settings["judge_layers"] = judge_layers
    models, texts, config_names = _words(model), _words(text), _words(configs)
    if full:
        from .settings import FULL_SETTINGS

        settings = {**{k: v for k, v in FULL_SETTINGS.items() if k not in ("models", "texts", "configs")}, **settings}
        models = models or list(FULL_SETTINGS["models"])
        texts = texts or list(FULL_SETTINGS["texts"])
        config_names = config_names or list(FULL_SETTINGS["configs"])
    speeds = _words(speed_configs) if speed_configs else None
    if speeds is not None and [w.lower() for w in speeds] == ["none"]:
        speed_repeats = 0  # no speed rounds
        settings.pop("speed_configs", None)
    needles = _words(needle_configs)
    if needles is not None:
        settings["needle_configs"] = () if [w.lower() for w in needles] == ["none"] else tuple(needles)
    import signal

    from .runner import evaluate

    def stop(signum, frame):  # `kill` (SIGTERM) ends a run as cleanly as Ctrl-C: finished cells and a report stay
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background by a shell
        signal.signal(signal.SIGINT, stop)
    try:
        res = evaluate(
            out,
            model=models,
            texts=texts,
            configs=config_names,
            progress=progress,
            needle_trials=needle_trials,
            speed_steps=speed_steps,
            speed_repeats=speed_repeats,
            threads=threads,
            seed=seed,
            kvpress=kvpress,
            **settings,
        )
    except (ValueError, FileNotFoundError, TypeError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.secho(
            f"\ninterrupted: finished cells are kept in {out / 'cells'}; run the same command again to resume",
            fg=typer.colors.YELLOW,
            err=True,
        )
        raise typer.Exit(130) from None
    from .report import TABLE_COLUMNS, main_table

    typer.echo(f"\nwrote {out}/results.json, report.md, index.html and plots in {res['wall_s']:.0f} s")
    rows = [[c[0] for c in TABLE_COLUMNS]] + main_table(res["table"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_COLUMNS))]
    for r in rows:
        typer.echo("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=False)))
    for note in res["notes"]:
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW)
