"""`ServeOptions`: what `attentionpack serve` is configured with, validated once (pydantic), whether one process
serves or a Ray Serve application of many replicas does (`serve.cluster`, whose builder takes the same fields)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..generation import check_cache_choice
from .accounting import cache_spec_from, parse_bytes, parse_fraction

if TYPE_CHECKING:
    from ..config import PackConfig
    from .engine import Engine
    from .metrics import ServerMetrics


class ServeOptions(BaseModel):
    """Server settings. `budget` is a fraction ("1/8", "0.125"), `kv_memory` a size ("2GiB"); `prefix_store` a
    folder (None: no prefix reuse; in a Ray application, a private folder per replica)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = None
    preset: str | None = None
    budget: str | None = None
    kv_memory: str = "2GiB"
    max_queue: int = Field(default=64, ge=1)
    default_max_tokens: int = Field(default=256, ge=1)
    prefill_chunk: int = Field(default=1024, ge=0)
    prefix_store: str | None = None
    prefix_block: int = Field(default=256, ge=1)
    threads: int | None = Field(default=None, ge=1)

    @field_validator("kv_memory")
    @classmethod
    def _size(cls, v: str) -> str:
        parse_bytes(v)
        return v

    @field_validator("budget")
    @classmethod
    def _fraction(cls, v: str | None) -> str | None:
        if v is not None:
            check_cache_choice(None, parse_fraction(v))
        return v

    def spec(self) -> str | PackConfig:
        """ "dynamic" or the PackConfig of --preset / --budget (ValueError when both are given)."""
        return cache_spec_from(self.preset, parse_fraction(self.budget) if self.budget is not None else None)

    def served_name(self) -> str:
        """The model id the API reports."""
        return Path(self.model).name if self.model else "smollm2-135m-instruct"

    def engine(
        self,
        model: Any,
        tokenizer: Any,
        metrics: ServerMetrics | None = None,
        name: str | None = None,
        private_prefixes: bool = False,
    ) -> Engine:
        """An Engine (not started) for `model` with these settings. `private_prefixes` (a Ray replica): without a
        shared `prefix_store` folder, prefixes are kept in a fresh folder of this process's own."""
        from ..store import PrefixStore
        from .engine import Engine

        spec = self.spec()
        folder = self.prefix_store
        if folder is None and private_prefixes and not isinstance(spec, str):
            folder = tempfile.mkdtemp(prefix=f"attentionpack-prefixes-{os.getpid()}-")
        store = PrefixStore(folder, block=self.prefix_block) if folder is not None else None
        return Engine(
            model,
            spec,
            kv_memory=parse_bytes(self.kv_memory),
            max_queue=self.max_queue,
            metrics=metrics,
            prefill_chunk=self.prefill_chunk,
            prefix_store=store,
            tokenizer=tokenizer,
            name=name,
        )
