"""The `attentionpack batch` command (registered in attentionpack/cli.py)."""

from __future__ import annotations

from pathlib import Path

import typer


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def batch_command(
    input: Path = typer.Option(..., "--input", help='JSONL rows {"id": ..., "prompt": "..."} or chat "messages".'),
    output: Path = typer.Option(..., "--output", help="JSONL answers in input order (a rerun resumes it)."),
    preset: str | None = typer.Option(None, "--preset", "-p", help="lossless, balanced or max (default: balanced)."),
    budget: float | None = typer.Option(
        None, "--budget", "-b", help="Byte budget F in (0, 1] of DynamicCache's bytes (not with --preset)."
    ),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Local model folder or .gguf file (default: embedded SmolLM2-135M-Instruct)."
    ),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", min=1, help="Tokens to generate at most."),
    chat: bool = typer.Option(True, help="Wrap plain prompts in the model's chat template when it has one."),
    sample: bool = typer.Option(False, help="Sample instead of greedy decoding (per-row seed: the row's or --seed)."),
    temperature: float = typer.Option(0.7, min=0.01, help="Sampling temperature (with --sample)."),
    seed: int = typer.Option(0, help='Seed of rows without their own "seed" (with --sample).'),
    overwrite: bool = typer.Option(False, help="Discard earlier answers in --output and start afresh."),
    ray: bool = typer.Option(False, "--ray", help="Run on Ray Data (needs the ray extra of the package)."),
    workers: int = typer.Option(2, "--workers", "-w", min=1, help="Ray actors, one model copy each (with --ray)."),
    threads: int | None = typer.Option(None, "--threads", "-t", min=1, help="Torch threads of a local run."),
):
    """Answer every row of a JSONL file with a compressed cache; resumable, order preserved, optionally on Ray."""
    from ..generation import check_cache_choice
    from .jobs import BatchError
    from .run import run_batch

    try:
        check_cache_choice(preset, budget)
        stats = run_batch(
            input,
            output,
            preset=preset or "balanced",
            budget=budget,
            model_path=model,
            max_new_tokens=max_new_tokens,
            chat=chat,
            sample=sample,
            temperature=temperature,
            seed=seed,
            overwrite=overwrite,
            ray=ray,
            workers=workers,
            threads=threads,
        )
    except (BatchError, ValueError, FileNotFoundError) as err:
        _fail(str(err))
    typer.echo(
        f"{stats['rows']} rows in {output} ({stats['skipped']} already done, {stats['answered']} answered) "
        f"in {stats['seconds']:.1f} s"
    )
