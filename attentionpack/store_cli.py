"""`attentionpack cache put|ls|rm`: fill, list and empty a prefix store (attentionpack/store/prefix.py)."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer

if TYPE_CHECKING:
    pass

DEFAULT_STORE = Path.home() / ".cache" / "attentionpack" / "prefix-store"
DEFAULT_MAX_BYTES = 4 << 30

cache_app = typer.Typer(
    no_args_is_help=True,
    help="Saved compressed prompt caches (a prefix store) that `generate --prefix-store DIR` reuses.",
)

STORE_OPTION = typer.Option(DEFAULT_STORE, "--store", "-s", help="Prefix store folder.")


def _fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@cache_app.command("put")
def put(
    prompt_file: Path = typer.Option(..., "--prompt-file", "-f", help="Text file whose prompt cache to store."),
    preset: str = typer.Option("balanced", "--preset", "-p", help="lossless, balanced or max."),
    budget: float | None = typer.Option(
        None, "--budget", help="Byte budget, a fraction of DynamicCache's bytes (e.g. 0.125); replaces --preset."
    ),
    model: str | None = typer.Option(
        None, "--model", "-m", help="smollm2 (embedded, the default), gemma3, or a local model folder or .gguf file."
    ),
    chat: bool = typer.Option(True, help="Wrap the prompt in the model's chat template, as `generate` does."),
    store: Path = STORE_OPTION,
    max_bytes: int = typer.Option(DEFAULT_MAX_BYTES, "--max-bytes", min=1, help="Store size limit (LRU eviction)."),
) -> None:
    """Prefill a prompt file and store its compressed cache: the prompt's ids up to the end of its text (before the
    chat template's closing tokens), so `generate --prefix-store` with this file, or with this text followed by a
    question, prefills only the rest. `generate` must use the same --preset (a --budget cache is reused from Python:
    `PrefixStore.cache_for` with the same PackConfig)."""
    from .generation import encode_prompt
    from .models import load_model
    from .store.prefix import PrefixStore, prefill_prefix, reusable_prefix

    try:
        text = prompt_file.read_text(encoding="utf-8")
        from .generation import pack_config

        config = pack_config(preset, budget)
        lm, tokenizer = load_model(model)
        ids = encode_prompt(tokenizer, text, chat)
        keep = reusable_prefix(tokenizer, text, chat, encode_prompt)
        if keep < 1:
            _fail("the prompt is too short to store")
        from .cache import PackedCache

        cache = PackedCache(lm, config)
        start = time.perf_counter()
        prefill_prefix(lm, cache, ids[:, :keep])
        prefill_s = time.perf_counter() - start
        key = PrefixStore(store, max_bytes).put(
            ids[0, :keep], cache, tokenizer, info={"config": config.name, "source": prompt_file.name}
        )
    except (OSError, UnicodeDecodeError) as err:
        _fail(f"cannot read {prompt_file}: {err}")
    except (ValueError, FileNotFoundError, TypeError) as err:
        _fail(str(err))
    if key is None:
        _fail(f"the cache is larger than --max-bytes {max_bytes:,}; not stored")
    typer.echo(
        f"stored {keep:,} of the prompt's {ids.shape[1]:,} tokens as {key} ({cache.nbytes():,} bytes held, "
        f"prefill {prefill_s:.1f} s) in {store}"
    )


@cache_app.command("ls")
def ls(store: Path = STORE_OPTION) -> None:
    """List stored caches, most recently used first."""
    from .store.prefix import PrefixStore

    if not store.exists():
        typer.echo(f"{store}: no prefix store")
        return
    entries = PrefixStore(store).entries()
    typer.echo(f"{'key':<32}  {'tokens':>7}  {'bytes':>12}  {'last used':<19}  config / source")
    for e in entries:
        used = datetime.fromtimestamp(e.last_used).strftime("%Y-%m-%d %H:%M:%S")
        desc = " / ".join(str(e.info[k]) for k in ("config", "source") if k in e.info)
        typer.echo(f"{e.key:<32}  {e.tokens:>7,}  {e.bytes:>12,}  {used:<19}  {desc}")
    typer.echo(f"{len(entries)} entries, {sum(e.bytes for e in entries):,} bytes")


@cache_app.command("rm")
def rm(
    keys: list[str] | None = typer.Argument(None, help="Keys to remove (see `cache ls`)."),
    all_entries: bool = typer.Option(False, "--all", help="Remove every entry."),
    store: Path = STORE_OPTION,
) -> None:
    """Remove stored caches by key, or all of them."""
    from .store.prefix import PrefixStore

    if not keys and not all_entries:
        _fail("give entry keys (see `attentionpack cache ls`) or --all")
    if not store.exists():
        _fail(f"{store}: no prefix store")
    ps = PrefixStore(store)
    if all_entries:
        typer.echo(f"removed {ps.clear()} entries")
        return
    assert keys, "without --all, keys were given (checked above)"
    missing = [k for k in keys if not ps.remove(k)]
    typer.echo(f"removed {len(keys) - len(missing)} entries")
    if missing:
        _fail(f"no entry with key {', '.join(missing)}")
