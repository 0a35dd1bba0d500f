"""`ModelServer`: one replica of a Ray Serve application: the model, one `Engine` (continuous batching, admission by
KV bytes, prefix store) and a streaming `generate` method that the ingress's `RemoteEngine` calls once per request.

Events streamed by `generate` are the engine's ((kind, choice index, ...), see `serve.engine`), preceded for each
choice by ("meta", index, {"server": replica id, "cached_tokens": prompt tokens loaded from a stored prefix}) and
followed by nothing once every choice ended. A request the engine can never admit or has no room for ends with one
("error", index, status, message) per choice (400 or 429), as the one-process server answers it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import AsyncIterator
from typing import Any

import torch

from ..accounting import NeverFits
from ..options import ServeOptions
from ..sequence import QueueFull, SamplingParams, Sequence

log = logging.getLogger("attentionpack.serve")


class ModelServer:
    """A replica: load the model, start the engine. `options`: a `ServeOptions` as a dict."""

    def __init__(self, options: dict[str, Any]) -> None:
        from ray import serve

        from ...models import load_model

        self.options = ServeOptions(**options)
        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        self.model, self.tokenizer = load_model(self.options.model)
        context = serve.get_replica_context()
        self.name = f"{context.deployment}#{context.replica_id.unique_id}"
        self.engine = self.options.engine(self.model, self.tokenizer, name=self.name, private_prefixes=True).start()
        log.info("replica %s serving %s (pid %d)", self.name, self.options.served_name(), os.getpid())

    def info(self) -> dict[str, Any]:
        """What the ingress needs: admission limits, prefix block, the model id, the replica's name and pid."""
        return {
            "limits": self.engine.limits,
            "prefix_block": self.engine.prefix_block,
            "model_name": self.options.served_name(),
            "server": self.name,
            "pid": os.getpid(),
        }

    def tokenizer_object(self) -> Any:
        """The tokenizer (pickled to the ingress, which tokenizes and detokenizes)."""
        return self.tokenizer

    def stats(self) -> dict[str, Any]:
        return {"server": self.name, "pid": os.getpid(), **self.engine.snapshot()}

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine thread died is restarted."""
        thread = self.engine._thread
        if thread is None or not thread.is_alive():
            raise RuntimeError(f"replica {self.name}: the engine thread is not running")

    async def generate(self, payload: dict[str, Any]) -> AsyncIterator[tuple]:
        """Stream the events of one request (`RemoteEngine.payload`): prompt ids, one SamplingParams dict per
        choice, `store_at`."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        prompt, store_at = list(payload["prompt"]), int(payload.get("store_at", 0))
        seqs = [
            Sequence(prompt, SamplingParams(**p), queue, loop, index=i, store_at=store_at)
            for i, p in enumerate(payload["params"])
        ]
        try:
            self.engine.check(len(prompt), seqs[0].params.max_tokens)
            self.engine.submit(seqs)
        except (NeverFits, QueueFull) as err:
            status = 400 if isinstance(err, NeverFits) else 429
            for s in seqs:
                yield ("error", s.index, status, str(err))
            return
        open_, announced = {s.index for s in seqs}, set()
        try:
            while open_:
                event = await queue.get()
                kind, index = event[0], event[1]
                if kind == "token" and index not in announced:  # the prefill is done: its prefix reuse is known
                    announced.add(index)
                    yield ("meta", index, {"server": self.name, "cached_tokens": seqs[index].cached_tokens})
                if kind in ("end", "error"):
                    open_.discard(index)
                yield event
        finally:  # finished, or cancelled by the ingress (client gone): free what is left
            for s in seqs:
                s.cancel()
            self.engine.wake()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is None:
            return
        engine.stop()
        store = engine.prefix_store
        if store is not None and self.options.prefix_store is None:  # this replica's private folder
            shutil.rmtree(store.folder, ignore_errors=True)
