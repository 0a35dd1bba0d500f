"""`attentionpack batch`: answer every row of a JSONL file, resumably, locally or on Ray Data.

Steps: read and validate every row (jobs.read_rows); open the journal (a rerun resumes it, other settings are
refused); load the model and encode every row not yet finished, checking its length against the model's context
(all before generating anything); answer the rest (local loop or Ray Data), journaling each row as it finishes;
write the output in input order."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from tqdm import tqdm

from ..generation import check_length, encode_messages, encode_prompt, pack_config
from .jobs import BatchError, Journal, Row, read_rows, write_output
from .local import Decoding, run_local


def job_settings(
    model_path: str | None,
    preset: str,
    budget: float | None,
    max_new_tokens: int,
    chat: bool,
    sample: bool,
    temperature: float,
    seed: int,
) -> dict:
    """What decides the answers, recorded in the journal: a rerun must match it to resume."""
    settings: dict = {
        "model": str(Path(model_path).resolve()) if model_path else "embedded",
        "cache": f"budget={budget:g}" if budget is not None else preset,
        "max_new_tokens": max_new_tokens,
        "chat": chat,
        "sample": sample,
    }
    if sample:
        settings.update(temperature=temperature, seed=seed)
    return settings


def encode_row(tokenizer, model, row: Row, chat: bool, max_new_tokens: int) -> list[int]:
    """The row's prompt token ids (as `generate` encodes a prompt; chat messages through the chat template)."""
    where = f"line {row.line} (id {row.key})"
    try:
        if row.messages is not None:
            ids = encode_messages(tokenizer, row.messages)
        else:
            ids = encode_prompt(tokenizer, row.prompt or "", chat)
        check_length(model, ids.shape[1], max_new_tokens)
    except ValueError as err:
        raise BatchError(f"{where}: {err}") from None
    return ids[0].tolist()


def run_batch(
    input_path: Path,
    output: Path,
    preset: str = "balanced",
    budget: float | None = None,
    model_path: str | None = None,
    max_new_tokens: int = 128,
    chat: bool = True,
    sample: bool = False,
    temperature: float = 0.7,
    seed: int = 0,
    overwrite: bool = False,
    ray: bool = False,
    workers: int = 2,
    threads: int | None = None,
) -> dict:
    """Run the job; returns `{"rows", "skipped", "answered", "seconds"}`. Raises BatchError (bad input, other
    settings than the journal's) before generating anything; every finished row is journaled at once."""
    from ..models import load_model
    from ..threads import apply_threads, choose_threads

    start = time.perf_counter()
    rows = read_rows(input_path)
    if Path(output).resolve() == Path(input_path).resolve():
        raise BatchError("--output is the input file; give another path")
    decoding = Decoding(pack_config(preset, budget), max_new_tokens, sample, temperature)
    settings = job_settings(model_path, preset, budget, max_new_tokens, chat, sample, temperature, seed)
    journal = Journal(output, settings, overwrite)
    journal.check(rows)
    pending = [i for i, row in enumerate(rows) if row.key not in journal.done]
    if ray and pending and importlib.util.find_spec("ray") is None:  # fail fast, before loading anything
        from .ray_data import RAY_MISSING

        raise BatchError(RAY_MISSING)
    if pending:
        if not ray:
            apply_threads(choose_threads(threads)[0])
        model, tokenizer = load_model(model_path)
        work = [
            (
                i,
                encode_row(tokenizer, model, rows[i], chat, max_new_tokens),
                rows[i].seed_or(seed),
            )
            for i in pending
        ]
        bar = tqdm(total=len(rows), initial=len(rows) - len(pending), desc="batch", unit="row")

        def done(index: int, result: dict) -> None:
            journal.record(rows[index], result)
            bar.update(1)

        try:
            if ray:
                from .ray_data import run_ray

                del model  # the workers hold their own copies
                run_ray(model_path, work, decoding, workers, done)
            else:
                run_local(model, tokenizer, work, decoding, done)
        finally:
            bar.close()
    written = write_output(output, rows, journal)
    return {
        "rows": written,
        "skipped": len(rows) - len(pending),
        "answered": len(pending),
        "seconds": time.perf_counter() - start,
    }
