"""What the engine serves: a `Sequence` (one generated choice of a request, with its sampling parameters, its
event queue and the engine's state for it), `QueueFull`, the refusal when the waiting queue has no room, and
`generate`, a blocking client that submits sequences to a started engine and collects their tokens.

Events put on a sequence's asyncio queue (thread-safe via its loop), each with the sequence's choice index:
("token", index, id), ("end", index, finish_reason) and ("error", index, http_status, message); see `serve.engine`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers import Cache

if TYPE_CHECKING:
    from .engine import Engine


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
    dynamic: int = 0  # what a DynamicCache would hold for its tokens (measured with `held`)
    generated: int = 0
    last_token: int = 0
    length: int = 0  # tokens in the cache
    exact_fallback: bool = False  # a budget was infeasible for this prompt: DynamicCache instead
    prefilled: int = 0  # prompt tokens fed to the cache so far (a chunked prefill spans several loop turns)
    first: int | None = None  # the first sampled token while a prefilled sequence waits for room to decode
    need: int = 0  # what it reserves to decode to its last token (set after its prefill)
    generator: torch.Generator | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    # prefix reuse (an engine with a prefix store): save the cache once `store_at` prompt tokens are in it (0: never);
    # `cached_tokens` prompt tokens came from a stored cache instead of being prefilled
    store_at: int = 0
    cached_tokens: int = 0
    server: str | None = None  # the engine's name (a Ray replica's id), reported as the response's system_fingerprint

    def sample(self, logits: torch.Tensor) -> int:
        """logits (V,) -> a token id: argmax at temperature 0, else top-p sampling with the sequence's generator."""
        p = self.params
        if p.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < p.top_p  # always keeps the top token
            sorted_probs = sorted_probs * keep
            choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=self.generator)
            return int(order[choice])
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def cancel(self) -> None:
        self.cancelled = True

    def emit(self, *event: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (event[0], self.index, *event[1:]))
        except RuntimeError:  # the event loop is closed: nobody listens any more
            self.cancelled = True


def generate(
    engine: Engine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], timeout: float = 600.0
) -> list[list[int]]:
    """Submit all prompts at once to a started engine and return each one's generated token ids (blocking).

    Served concurrently (continuous batching); pass one prompt at a time to serve it alone."""
    plist = params if isinstance(params, list) else [params] * len(prompts)

    async def run() -> list[list[int]]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        seqs = [
            Sequence(list(p), dataclasses.replace(pp), queue, loop, index=i)
            for i, (p, pp) in enumerate(zip(prompts, plist, strict=False))
        ]
        engine.submit(seqs)
        out: list[list[int]] = [[] for _ in seqs]
        open_ = set(range(len(seqs)))
        while open_:
            kind, idx, *payload = await asyncio.wait_for(queue.get(), timeout)
            if kind == "token":
                out[idx].append(payload[0])
            elif kind == "end":
                open_.discard(idx)
            else:
                raise RuntimeError(f"sequence {idx} failed: {payload}")
        return out

    return asyncio.run(run())
