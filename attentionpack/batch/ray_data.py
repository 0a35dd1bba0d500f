"""`batch --ray`: the rows not yet finished answered on Ray Data, one model copy per actor (`--workers N`).

`map_batches` with an actor class and `ActorPoolStrategy(size=N)`; each actor loads the model once and uses one
torch thread. Results stream back to the driver (`iter_rows`) and are journaled as they arrive. Ray Data restarts
an actor that dies and retries its rows (`max_restarts=-1`, `max_task_retries=-1`, its defaults for actor pools).

Fault injection for tests: `$ATTENTIONPACK_BATCH_DIE_AT=<row index>` with `$ATTENTIONPACK_BATCH_DIE_MARKER=<file>`
makes the actor that reaches that row exit at once the first time (the marker file records that it happened)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable

from .local import Decoding

RAY_MISSING = "--ray needs Ray Data: pip install 'attentionpack[ray]'"


class _Answerer:
    """A Ray Data actor: one model copy; answers each row of a batch alone (see local.answer_row)."""

    def __init__(self, model_path: str | None, decoding: Decoding, die_at: int | None, marker: str | None):
        import torch

        from ..models import load_model

        torch.set_num_threads(1)
        self.model, self.tokenizer = load_model(model_path)
        self.decoding = decoding
        self.die_at, self.marker = die_at, marker

    def __call__(self, batch: dict) -> dict:
        from .local import answer_row

        results = []
        for index, ids, seed in zip(batch["index"], batch["ids"], batch["seed"], strict=True):
            if self.die_at == int(index) and self.marker and not os.path.exists(self.marker):
                open(self.marker, "w").close()
                os._exit(1)  # a worker dying mid-job: Ray Data must restart it and retry these rows
            results.append(
                json.dumps(answer_row(self.model, self.tokenizer, json.loads(ids), int(seed), self.decoding))
            )
        return {"index": batch["index"], "result": results}


def run_ray(
    model_path: str | None,
    work: list[tuple[int, list[int], int]],
    decoding: Decoding,
    workers: int,
    done: Callable[[int, dict], None],
) -> None:
    """Answer each `(index, ids, seed)` on a pool of `workers` actors, calling `done(index, result)` in the driver as
    results arrive (any order). Uses Ray if already initialized, else the cluster at $RAY_ADDRESS when set, else
    starts a local one with `workers + 1` CPUs (and shuts down what it started or joined)."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise RuntimeError(RAY_MISSING) from None
    if not work:
        return
    started = not ray.is_initialized()
    if started and os.environ.get("RAY_ADDRESS"):  # an existing cluster
        ray.init(log_to_driver=False, logging_level=logging.ERROR)
    elif started:
        ray.init(num_cpus=workers + 1, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the job's own bar counts rows
        context.print_on_execution_start = False
        items = [{"index": i, "ids": json.dumps(ids), "seed": seed} for i, ids, seed in work]
        die_at = os.environ.get("ATTENTIONPACK_BATCH_DIE_AT")
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _Answerer,
            fn_constructor_kwargs=dict(
                model_path=model_path,
                decoding=decoding,
                die_at=int(die_at) if die_at else None,
                marker=os.environ.get("ATTENTIONPACK_BATCH_DIE_MARKER"),
            ),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=1,
        )
        for row in ds.iter_rows():
            done(int(row["index"]), json.loads(row["result"]))
    finally:
        if started:
            ray.shutdown()
