"""The `attentionpack` command line: generate with a compressed cache, benchmarks, evaluation."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Memory-efficient transformer decoding.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print ratios measured in one run.")
app.add_typer(bench_app, name="bench")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def generate(
    prompt_file: Path = typer.Option(..., "--prompt-file", "-f", help="Text file with the prompt ('-' for stdin)."),
    preset: str | None = typer.Option(
        None, "--preset", "-p", help="lossless, balanced or max (default: balanced; not with --budget)."
    ),
    budget: float | None = typer.Option(
        None,
        "--budget",
        "-b",
        help="Byte budget F in (0, 1]: hold at most F x "
        "DynamicCache's bytes after the prompt, e.g. 0.25 (not with --preset).",
    ),
    model: str | None = typer.Option(
        None, "--model", "-m", help="smollm2 (embedded, the default), gemma3, or a local model folder or .gguf file."
    ),
    image: list[Path] | None = typer.Option(
        None,
        "--image",
        "-i",
        help="Image file(s) for a vision-language model "
        "folder (LLaVA, Qwen2-VL, Qwen2.5-VL, "
        "Idefics3/SmolVLM); repeat for several.",
    ),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", min=1, help="Tokens to generate at most."),
    chat: bool = typer.Option(True, help="Wrap the prompt in the model's chat template when it has one."),
    sample: bool = typer.Option(False, help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(0.7, min=0.01, help="Sampling temperature (with --sample)."),
    seed: int = typer.Option(0, help="Random seed (with --sample)."),
    threads: int | None = typer.Option(
        None,
        "--threads",
        "-t",
        min=1,
        help="Threads for torch and the kernels (default: torch's, or 1 when the machine is already busy).",
    ),
    prefix_store: Path | None = typer.Option(
        None,
        "--prefix-store",
        help="Reuse the longest stored prefix of the prompt from this folder, or store the prompt's for next time.",
    ),
    prefill_chunk: int = typer.Option(
        4096,
        "--prefill-chunk",
        min=0,
        help="Prefill a longer prompt in chunks of this many tokens, each compressed before the next, so peak "
        "memory follows the compressed cache (0: one call).",
    ),
    device: str = typer.Option(
        "cpu", help="cpu, or cuda[:N]: the model and cache on a GPU, decoding steps on the Triton kernels."
    ),
):
    """Answer a (long) prompt with a compressed KV cache, then show the bytes held vs DynamicCache."""
    from .generation import check_cache_choice, run_generate

    try:
        check_cache_choice(preset, budget)
    except ValueError as err:
        _fail(str(err))

    try:
        stdin = str(prompt_file) == "-"
        text = typer.get_text_stream("stdin").read() if stdin else prompt_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        _fail(f"cannot read prompt file {prompt_file}: {err}")
    try:
        run_generate(
            text,
            preset=preset or "balanced",
            model_path=model,
            max_new_tokens=max_new_tokens,
            chat=chat,
            sample=sample,
            temperature=temperature,
            seed=seed,
            images=image or (),
            budget=budget,
            threads=threads,
            prefix_store=prefix_store,
            prefill_chunk=prefill_chunk,
            device=device,
        )
    except (ValueError, FileNotFoundError, TypeError) as err:
        _fail(str(err))


@bench_app.command("long-prompt")
def bench_long_prompt(
    model: str | None = typer.Option(
        None, "--model", "-m", help="Local model folder or .gguf file (default: embedded SmolLM2-135M-Instruct)."
    ),
    context: int = typer.Option(8192, min=16, help="Prompt tokens prefilled (the Britannica article)."),
    continuation: int = typer.Option(256, min=2, help="Tokens teacher-forced and scored after the prompt."),
    configs: list[str] = typer.Option(
        ["max", "budget-0.125"], "--configs", "-c", help="Configurations beside DynamicCache (eval's names)."
    ),
    chunk: int = typer.Option(2048, min=1, help="Tokens per prefill call of the compressed caches."),
    chunk_dynamic: bool = typer.Option(False, help="Prefill DynamicCache in chunks too (default: one call)."),
    threads: int = typer.Option(2, min=1, help="torch threads of each child process."),
    batch: int = typer.Option(1, min=1, help="Samples prefilled at once (different passages of the article)."),
):
    """Peak process memory and perplexity of one long prefill per configuration, each in its own process."""
    from .bench.long_prompt import run

    try:
        run(configs, context, continuation, chunk, model, threads, chunk_dynamic, echo=typer.echo, batch=batch)
    except (ValueError, RuntimeError) as err:
        _fail(str(err))


@bench_app.command("quality")
def bench_quality(
    model: str | None = typer.Option(
        None, "--model", "-m", help="smollm2 (embedded, the default), gemma3, or a local model folder or .gguf file."
    ),
    context: int = typer.Option(2048, min=16, help="Prompt tokens prefilled into each cache."),
    continuation: int = typer.Option(
        256, min=2, help="Tokens teacher-forced and scored after the prompt (perplexity)."
    ),
    sweep: bool = typer.Option(True, help="Also sweep K and V ranks."),
    rss: bool = typer.Option(True, help="Also measure peak RSS at batch x context in separate processes."),
    rss_batch: int = typer.Option(8, min=1, help="Batch of the peak-RSS measurement."),
    rss_context: int = typer.Option(4096, min=16, help="Tokens per sequence of the peak-RSS measurement."),
    out: Path | None = typer.Option(None, help="Write the rows as JSON here."),
):
    """Memory, perplexity and decode speed of DynamicCache, each preset and a K/V rank sweep, in one run."""
    from .bench.quality import run_quality_bench

    try:
        run_quality_bench(
            model_path=model,
            context=context,
            continuation=continuation,
            sweep=sweep,
            rss=rss,
            rss_batch=rss_batch,
            rss_context=rss_context,
            out=out,
        )
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))


@bench_app.command("speed")
def bench_speed(
    model: str | None = typer.Option(
        None, "--model", "-m", help="smollm2 (embedded, the default), gemma3, or a local model folder or .gguf file."
    ),
    configs: list[str] = typer.Option(
        list(("dynamic", "static", "balanced", "max", "budget-0.125", "quanto-4")),
        "--configs",
        "-c",
        help="Caches to time (repeat the option for several); 'static' is transformers' StaticCache.",
    ),
    contexts: list[int] = typer.Option([2048, 8192], "--context", "-n", help="Context lengths (repeat for several)."),
    batches: list[int] = typer.Option([1, 8], "--batch", "-b", help="Batch sizes (repeat for several)."),
    steps: int = typer.Option(8, min=1, help="Timed one-token decode steps per measurement."),
    repeats: int = typer.Option(2, min=1, help="Interleaved rounds (the median is reported)."),
    budget_gib: float = typer.Option(1.0, min=0.0, help="KV budget of the throughput test (0 skips it)."),
    budget_context: int = typer.Option(4096, min=16, help="Tokens per sequence in the throughput test."),
    threads: int | None = typer.Option(
        None, min=1, help="Threads for torch and the kernels (default: torch's, or 1 when the machine is already busy)."
    ),
    dtype: str = typer.Option(
        "float32", help="Model dtype: float32, bfloat16 or float16 (every cache stores that dtype's states)."
    ),
    device: str = typer.Option(
        "cpu", help="cpu, or cuda[:N]: the model and caches on a GPU, decoding steps on the Triton kernels."
    ),
    out: Path | None = typer.Option(None, help="Write every number as JSON here."),
):
    """Prefill and decode speed vs DynamicCache and StaticCache (interleaved, one run), and throughput at a fixed KV
    budget."""
    from .bench.speed import run

    try:
        run(
            model_path=model,
            dtype=dtype,
            configs=configs,
            contexts=contexts,
            batches=batches,
            steps=steps,
            repeats=repeats,
            budget_gib=budget_gib,
            budget_context=budget_context,
            threads=threads,
            out=out,
            device=device,
        )
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))


@bench_app.command("vlm")
def bench_vlm(
    rank: int = typer.Option(8, min=1, help="Rank of the image groups' factors (D = 32 on the tiny model)."),
    image_size: int = typer.Option(64, min=8, help="Image side in pixels: (side / 8)^2 tokens per image."),
):
    """Bytes held per modality vs DynamicCache on a tiny random LLaVA for prompts with 1, 4 and 16 images."""
    from .bench.vlm import run

    run(rank=rank, image_size=image_size)


from .eval.cli import eval_command  # noqa: E402  (the evaluation harness: attentionpack/eval/)

app.command("eval")(eval_command)
from .serve.cli import bench_serve_command, serve_command  # noqa: E402  (attentionpack/serve/)

app.command("serve")(serve_command)
bench_app.command("serve")(bench_serve_command)

from .batch.cli import batch_command  # noqa: E402  (offline JSONL jobs: attentionpack/batch/)

app.command("batch")(batch_command)
from .store_cli import cache_app  # noqa: E402  (saved caches, a prefix store: attentionpack/store/)

app.add_typer(cache_app, name="cache")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
