"""What the engine serves: a `Sequence` (one generated choice of a request, with its sampling parameters, its
event queue and the engine's state for it), and `QueueFull`, the refusal when the waiting queue has no room.

Events put on a sequence's asyncio queue (thread-safe via its loop), each with the sequence's choice index:
("token", index, id), ("end", index, finish_reason) and ("error", index, http_status, message); see `serve.engine`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Cache


class QueueFull(Exception):
    """The waiting queue is full; retry after `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server's queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass(eq=False)
class Sequence:
    """One generated sequence (one `n` choice of a request). `prompt` is a list of token ids."""

    prompt: list[int]
    params: SamplingParams
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    index: int = 0
    arrival: float = field(default_factory=time.monotonic)
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False  # set by the handler (client gone, stop string seen); the engine frees it
    # engine state
    cache: Cache | None = None
    reserved: int = 0
    held: int = 0
    generated: int = 0
    last_token: int = 0
    length: int = 0  # tokens in the cache
    exact_fallback: bool = False  # a budget was infeasible for this prompt: DynamicCache instead
    prefilled: int = 0  # prompt tokens fed to the cache so far (a chunked prefill spans several loop turns)
    first: int | None = None  # the first sampled token while a prefilled sequence waits for room to decode
    generator: torch.Generator | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    # prefix reuse (an engine with a prefix store): save the cache once `store_at` prompt tokens are in it (0: never);
    # `cached_tokens` prompt tokens came from a stored cache instead of being prefilled
    store_at: int = 0
    cached_tokens: int = 0
    server: str | None = None  # the engine's name (a Ray replica's id), reported as the response's system_fingerprint

    def cancel(self) -> None:
        self.cancelled = True

    def emit(self, *event: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (event[0], self.index, *event[1:]))
        except RuntimeError:  # the event loop is closed: nobody listens any more
            self.cancelled = True
