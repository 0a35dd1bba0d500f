"""One row's answer (shared by the local loop and the Ray Data workers) and the local loop itself.

Every row is generated alone (batch 1, its own PackedCache, `torch.manual_seed(seed)` first), so its answer does
not depend on which rows run beside it, in which process, or in which order: local and Ray runs agree."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..cache import PackedCache
from ..config import PackConfig
from ..generation import decoding_kwargs


@dataclass(frozen=True)
class Decoding:
    """How every row is answered (the part of a job's settings that the workers need)."""

    config: PackConfig
    max_new_tokens: int
    sample: bool
    temperature: float


def answer_row(model, tokenizer, ids: list[int], seed: int, decoding: Decoding) -> dict:
    """Generate for one prompt of token ids; returns `{"answer", "tokens", "prompt_tokens", "kv_bytes",
    "dynamic_kv_bytes"}` (bytes held by the PackedCache and by DynamicCache for the same tokens)."""
    input_ids = torch.tensor([ids], dtype=torch.long)
    cache = PackedCache(model, decoding.config)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            past_key_values=cache,
            max_new_tokens=decoding.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            **decoding_kwargs(decoding.sample, decoding.temperature),
        )
    new = out[0, len(ids) :]
    return {
        "answer": tokenizer.decode(new, skip_special_tokens=True).strip(),
        "tokens": int(new.numel()),
        "prompt_tokens": len(ids),
        "kv_bytes": int(cache.nbytes()),
        "dynamic_kv_bytes": int(cache.dynamic_nbytes()),
    }


def run_local(
    model, tokenizer, work: list[tuple[int, list[int], int]], decoding: Decoding, done: Callable[[int, dict], None]
) -> None:
    """Answer each `(index, ids, seed)` in turn in this process, calling `done(index, result)` after each."""
    for index, ids, seed in work:
        done(index, answer_row(model, tokenizer, ids, seed, decoding))
