"""`RemoteEngine`: what `serve.app.create_app` needs from an engine, served by `ModelServer` replicas through a Ray
Serve handle. The ingress keeps the whole HTTP side (validation, tokenizing, stop strings, streaming, errors); each
request becomes one streaming `generate` call whose events are the local engine's (see `serve.engine`).

A replica that dies mid-request ends the call with an error: every open choice gets an ("error", 503, ...) event, so
the client gets an error body (or an SSE error event) at once instead of waiting. A client that leaves, or whose stop
strings ended every choice, cancels the call, and the replica frees its sequences.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from ...store.prefix import prefix_digests
from ..accounting import Limits
from ..metrics import ServerMetrics
from ..sequence import Sequence

log = logging.getLogger("attentionpack.serve")


class RemoteEngine:
    """The engine interface of `create_app` over a deployment handle to `ModelServer` replicas. `info` is
    `ModelServer.info()`: the limits the replicas admit by, their prefix block and the model's name."""

    metrics: ServerMetrics | None = None  # the ingress app keeps its own HTTP metrics; replicas keep the engines'

    def __init__(self, handle: Any, info: dict[str, Any]) -> None:
        self.handle = handle
        self.limits: Limits = info["limits"]
        self.max_context = self.limits.max_context
        self.prefix_block: int = info["prefix_block"]
        self.calls: dict[asyncio.Task, list[Sequence]] = {}
        self.failed_calls = 0

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        self.limits.check(prompt_tokens, max_tokens)

    def submit(self, seqs: list[Sequence]) -> None:
        """Start one streaming call for the sequences of one request (they share prompt and queue)."""
        task = asyncio.get_running_loop().create_task(self._call(seqs))
        self.calls[task] = seqs
        task.add_done_callback(lambda t: self.calls.pop(t, None))

    def wake(self) -> None:
        """Called after the app cancels sequences: calls whose sequences are all cancelled are cancelled."""
        for task, seqs in list(self.calls.items()):
            if all(s.cancelled for s in seqs):
                task.cancel()

    def snapshot(self) -> dict[str, Any]:
        return {"in_flight_requests": len(self.calls), "failed_calls": self.failed_calls}

    def payload(self, seqs: list[Sequence]) -> dict[str, Any]:
        prompt, block = seqs[0].prompt, self.prefix_block
        keys = prefix_digests(prompt, range(block, len(prompt), block), block) if block else {}
        return {
            "prompt": prompt,
            "params": [dataclasses.asdict(s.params) for s in seqs],
            "store_at": seqs[0].store_at,
            "prefix_keys": sorted(keys.items()),
        }

    async def _call(self, seqs: list[Sequence]) -> None:
        open_ = {s.index for s in seqs}
        by_index = {s.index: s for s in seqs}
        stream = self.handle.options(stream=True).generate.remote(self.payload(seqs))
        try:
            async for kind, index, *rest in stream:
                seq = by_index[index]
                if kind == "meta":  # who serves it, and how much of the prompt came from a stored prefix
                    seq.server, seq.cached_tokens = rest[0]["server"], rest[0]["cached_tokens"]
                    continue
                if kind in ("end", "error"):
                    open_.discard(index)
                seq.emit(kind, *rest)
        except asyncio.CancelledError:
            stream.cancel()
            raise
        except Exception as err:  # noqa: BLE001 - the replica died or refused: fail the open choices now
            self.failed_calls += 1
            log.warning("a generate call failed: %s: %s", type(err).__name__, err)
            for index in open_:
                by_index[index].emit(
                    "error", 503, f"the replica serving this request failed ({type(err).__name__}); retry it"
                )
            return
        for index in open_:  # the stream ended without an end event
            by_index[index].emit("error", 503, "the replica ended the request without finishing it; retry it")
