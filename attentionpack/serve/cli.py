"""Typer commands `attentionpack serve` and `attentionpack bench serve` (mounted by attentionpack/cli.py); the
serving dependencies (the `serve` extra) are imported only when a command runs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from .options import ServeOptions


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def serve_command(
    model: str | None = typer.Option(
        None, "--model", "-m", help="smollm2 (embedded, the default), gemma3, or a local model folder or .gguf file."
    ),
    preset: str | None = typer.Option(
        None, "--preset", "-p", help="lossless, balanced (default), max, or dynamic (transformers' DynamicCache)."
    ),
    budget: str | None = typer.Option(
        None, "--budget", "-b", help="Byte budget as a fraction of DynamicCache, e.g. 1/8 (instead of --preset)."
    ),
    kv_memory: str = typer.Option("2GiB", "--kv-memory", help="Most KV cache bytes held by all requests together."),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to listen on (default: 127.0.0.1, this machine only)."
    ),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port (default: 8000; 0 picks a free one)."),
    max_queue: int = typer.Option(64, "--max-queue", min=1, help="Requests waiting for memory beyond this get 429."),
    max_tokens: int = typer.Option(256, "--default-max-tokens", min=1, help="max_tokens when a request gives none."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch threads (default: torch's)."),
    prefill_chunk: int = typer.Option(
        1024,
        "--prefill-chunk",
        min=0,
        help="Prompt tokens prefilled between two decoding steps of the running batch (0: whole prompts).",
    ),
    prefix_store: Path | None = typer.Option(
        None,
        "--prefix-store",
        help="Folder of stored prompt prefixes: a conversation's later turns start from its earlier turns' cache "
        "(shared by every server that sees the folder; with --ray, each replica keeps its own by default).",
    ),
    use_ray: bool = typer.Option(
        False, "--ray", help="Serve with Ray Serve: --replicas copies of the model behind one prefix-affinity router."
    ),
    replicas: int = typer.Option(2, "--replicas", min=1, help="Model replicas with --ray (default: 2)."),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="With --ray: a running cluster's address (default: $RAY_ADDRESS, else a local one)."
    ),
) -> None:
    """OpenAI-compatible server (chat/completions, streaming) with continuous batching over compressed KV caches."""
    from pydantic import ValidationError

    try:
        from .options import ServeOptions
    except ImportError as err:
        _fail(f"{err}; install the serving extra: pip install 'attentionpack[serve]'")
    try:
        options = ServeOptions(
            model=model,
            preset=preset,
            budget=budget,
            kv_memory=kv_memory,
            max_queue=max_queue,
            default_max_tokens=max_tokens,
            prefill_chunk=prefill_chunk,
            prefix_store=str(prefix_store) if prefix_store is not None else None,
            threads=threads,
        )
        options.spec()
    except ValidationError as err:
        _fail("; ".join(_option_error(e) for e in err.errors()))
    except ValueError as err:
        _fail(str(err))
    if use_ray:
        _serve_ray(options, replicas, host, port, ray_address)
        return
    _serve_local(options, host, port)


def _option_error(error: Any) -> str:
    """One pydantic error as a command-line message (our validators' messages already name the option)."""
    option = "--" + "-".join(map(str, error["loc"])).replace("_", "-")
    message = str(error["msg"])
    if message.startswith("Value error, "):
        message = message.removeprefix("Value error, ")
        return message if message.startswith("--") else f"{option}: {message}"
    return f"{option}: {message}"


def _serve_local(options: ServeOptions, host: str, port: int) -> None:
    import torch
    import uvicorn

    from ..models import load_model
    from .app import create_app
    from .metrics import ServerMetrics

    if options.threads:
        torch.set_num_threads(options.threads)
    try:
        lm, tokenizer = load_model(options.model)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    metrics = ServerMetrics()
    try:
        engine = options.engine(lm, tokenizer, metrics).start()
    except ValueError as err:
        _fail(str(err))
    spec = engine.cache_spec
    label = spec if isinstance(spec, str) else spec.name
    name = options.served_name()
    typer.echo(
        f"serving {name} with {label} caches, --kv-memory {engine.kv_memory:,} bytes, on http://{host}:{port}/v1"
    )
    try:
        uvicorn.run(
            create_app(engine, tokenizer, name, metrics, default_max_tokens=options.default_max_tokens),
            host=host,
            port=port,
            log_level="info",
        )
    finally:
        engine.stop()


def _serve_ray(options: ServeOptions, replicas: int, host: str, port: int, address: str | None) -> None:
    """Start (or join) a Ray cluster, run the application, and serve until interrupted."""
    import time

    try:
        import ray
        from ray import serve

        from .cluster import build_app
    except ImportError as err:
        _fail(f"{err}; install the Ray extra: pip install 'attentionpack[ray]'")
    ray.init(address=address, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    app = build_app({**options.model_dump(), "replicas": replicas})
    serve.run(app, name="attentionpack", route_prefix="/")
    typer.echo(f"serving {options.served_name()} on {replicas} Ray Serve replicas, on http://{host}:{port}/v1")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


def bench_serve_command(
    model: str | None = typer.Option(
        None, "--model", "-m", help="smollm2 (embedded, the default), gemma3, or a local model folder or .gguf file."
    ),
    configs: list[str] = typer.Option(
        ["dynamic", "balanced", "budget=1/8"], "--configs", "-c", help="dynamic, a preset, or budget=F."
    ),
    kv_memory: str | None = typer.Option(None, "--kv-memory", help="Default: room for two DynamicCache sequences."),
    prompt_tokens: int = typer.Option(
        4096, "--prompt-tokens", min=16, help="Tokens per request prompt (default: 4096)."
    ),
    max_tokens: int = typer.Option(32, "--max-tokens", min=1, help="Tokens each request generates (default: 32)."),
    requests: list[int] | None = typer.Option(
        None, "--requests", "-r", help="Requests per config, repeated (default 4, 6, 12)."
    ),
    duration: float = typer.Option(
        600.0, "--duration", min=1.0, help="Seconds after which a config's requests are cut."
    ),
    threads: int | None = typer.Option(
        None, "--threads", min=1, help="torch threads of the server (default: torch's)."
    ),
    out: Path = typer.Option(Path("serve-bench"), "--out", help="Folder for serve-bench.json and serve-bench.png."),
) -> None:
    """Load-test servers it starts on 127.0.0.1: sequences held, tokens/s, TTFT/ITL, failures, KV bytes vs cap."""
    try:
        from .bench import run
    except ImportError as err:
        _fail(f"{err}; install the serving extra: pip install 'attentionpack[serve]'")
    try:
        run(
            model_path=model,
            configs=configs,
            kv_memory=kv_memory,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            requests=requests,
            duration=duration,
            threads=threads,
            out=out,
        )
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
