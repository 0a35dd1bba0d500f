"""Byte accounting of the serving engine: what a sequence's cache can hold at most (its reservation), the `--kv-memory`
size parser, and the cache a command line's --preset / --budget names."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Cache

from ..cache import cache_nbytes
from ..cache.growth import META_BYTES
from ..cache.layer import TAIL_GRANULE as GRANULE
from ..config import PackConfig
from ..generation import check_cache_choice, pack_config


class KVAccounting:
    """Byte bounds of one model's caches under one configuration (`cache_spec`: "dynamic" or a PackConfig).

    `per_token`: bytes a DynamicCache holds per token over all layers (2 * H_kv * d * element size each).
    """

    def __init__(self, model: Any, cache_spec: str | PackConfig) -> None:
        cfg = model.config.get_text_config(decoder=True)
        heads = cfg.num_key_value_heads or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        elem = torch.empty((), dtype=model.dtype).element_size()
        self.layers = cfg.num_hidden_layers
        self.per_token = 2 * heads * head_dim * elem * self.layers
        self.spec = cache_spec
        self.compressing = isinstance(cache_spec, PackConfig) and not cache_spec.is_lossless
        self.slot = self.per_token + (META_BYTES * self.layers if self.compressing else 0)

    def growth(self, tokens: int) -> int:
        """Most bytes `tokens` more decoded tokens can add to a cache: each adds its exact K/V (and tail metadata)
        to the exact tail, whose capacity exceeds its live tokens by less than GRANULE; compacting tail tokens into
        a segment never grows the bytes (spans whose encoding would not be smaller stay exact)."""
        if not self.compressing:
            return self.per_token * tokens
        return self.slot * (tokens + GRANULE)

    def worst_case(self, prompt: int, max_tokens: int, exact_fallback: bool = False) -> int:
        """An upper bound, known before the prefill, of the bytes held at any step boundary until the last token
        (what `Limits.check` compares with the cap: every request it admits can run alone).

        DynamicCache (and the exact fallback): prompt + max_tokens tokens at full size. A byte budget f: a prefill
        that compacts (prompt >= sink + window + min_span) leaves at most f x DynamicCache bytes of the prompt
        (PackConfig.budget, enforced by the cache or raised as BudgetError), plus `growth(max_tokens)`; a shorter
        prompt stays exact. Other PackConfigs: every token exact plus tail metadata."""
        if self.spec == "dynamic" or exact_fallback:
            return self.per_token * (prompt + max_tokens)
        # the only string spec is "dynamic" (handled above); anything else is a PackConfig
        assert isinstance(self.spec, PackConfig), f"cache spec {self.spec!r} is neither 'dynamic' nor a PackConfig"
        budget = self.spec.budget
        # a target budget (the presets) may keep a prompt exact (PackConfig.budget_strict): reserved as exact until
        # its prefill has measured what it holds
        strict = budget is not None and self.spec.budget_strict
        if strict and prompt >= self.spec.sink + self.spec.window + self.spec.min_span:
            return math.ceil(budget * self.per_token * prompt) + self.growth(max_tokens)
        if not self.compressing:
            return self.per_token * (prompt + max_tokens)
        return self.slot * (prompt + max_tokens + GRANULE)

    def before_prefill(self, prompt: int, exact_fallback: bool = False) -> int:
        """Reservation for the prefill: the most bytes the prompt's cache holds at its chunks' ends (`worst_case`
        without decoded tokens). The decoded tokens are reserved after it (`after_prefill`), from the encodings
        the prefill chose; the engine lets the sequence decode only once that reservation fits."""
        return self.worst_case(prompt, 0, exact_fallback)

    def after_prefill(self, cache: Cache, held: int, remaining: int) -> int:
        """Reservation once the prompt is stored and holds `held` bytes, for `remaining` more decoded tokens: held
        plus `growth(remaining)`, or the cache's own tighter bound (`PackedCache.decode_bytes_bound`: its decode
        chunks at their encodings' size, its exact tail at most window + chunk tokens) when it has one."""
        bound = held + self.growth(remaining)
        own = getattr(cache, "decode_bytes_bound", None)
        if callable(own):
            tighter = own(remaining)
            if tighter is not None:
                bound = min(bound, int(tighter))
        return bound

    def dynamic_equivalent(self, cache: Cache) -> int:
        return int(cache.dynamic_nbytes()) if hasattr(cache, "dynamic_nbytes") else cache_nbytes(cache)


class NeverFits(ValueError):
    """The request could never be admitted (its KV reservation exceeds --kv-memory, or it exceeds the context)."""


@dataclass(frozen=True)
class Limits:
    """What a server admits: the model's context, the KV byte cap and the accounting that bounds a request's bytes.
    Plain numbers and a PackConfig: the engine checks with it, and so does a Ray ingress that holds no model."""

    max_context: int
    kv_memory: int
    accounting: KVAccounting

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise NeverFits when a request of this size could never be served."""
        if prompt_tokens + max_tokens > self.max_context:
            raise NeverFits(
                f"prompt of {prompt_tokens} tokens + max_tokens {max_tokens} exceeds the model's context "
                f"of {self.max_context} tokens"
            )
        need = self.accounting.worst_case(prompt_tokens, max_tokens)
        if need > self.kv_memory:
            raise NeverFits(
                f"prompt of {prompt_tokens} tokens with max_tokens {max_tokens} needs up to {need} bytes "
                f"of KV cache, over the server's --kv-memory limit of {self.kv_memory} bytes"
            )


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1.5GB', '1000000' -> bytes."""
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 1 << 10,
        "MIB": 1 << 20,
        "GIB": 1 << 30,
        "TIB": 1 << 40,
        "K": 1 << 10,
        "M": 1 << 20,
        "G": 1 << 30,
    }
    s = str(text).strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num) :]
    if unit not in units or not num:
        raise ValueError(f"cannot read {text!r} as a size: use e.g. 2GiB, 512MiB, 1.5GB or a number of bytes")
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a size: use e.g. 2GiB, 512MiB, 1.5GB or a number of bytes") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return int(value * units[unit])


def parse_fraction(text: str) -> float:
    """'1/8', '0.125' -> 0.125 (a byte budget as given on a command line)."""
    num, _, den = str(text).partition("/")
    try:
        return float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"budget {text!r}: give a fraction such as 0.125 or 1/8") from None


def cache_spec_from(preset: str | None, budget: float | None) -> str | PackConfig:
    """CLI choice -> cache spec: "dynamic", a preset's PackConfig, or balanced with a byte budget."""
    check_cache_choice(preset, budget)
    if preset == "dynamic":
        return "dynamic"
    config = pack_config(preset or "balanced", budget)  # a budget is strict: admission counts on its bound
    return config if budget is None else config.replace(name=f"budget={budget:g}")
