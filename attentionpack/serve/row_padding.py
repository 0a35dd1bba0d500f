"""How many rows a decoding step of n sequences runs as: n, or more when the model's matrix products are faster so.

A batched decoding step multiplies (n, in) activations by every weight matrix of the model. BLAS libraries pick
their kernels by the row count, and a smaller product is not always a faster one: on the 2-core AVX-512 machine of
the serving bench, MKL takes ~73 ms for SmolLM2's linears at 13 rows and ~60 ms at 16 (`docs/bench/serve/`). So the
engine pads a step with rows that belong to no sequence (`SequenceBatchCache(padding=...)`: no cache, zero attention,
logits ignored) up to the row count that is fastest, as measured once per model by its own one-token forward.

`RowPadding(model).rows(n)`: the measured choice for n sequences; measured once per model (`measure`, ~5 s for
SmolLM2 on 2 cores: a one-token forward at every row count up to `max_rows`, median of `repeats` rounds) and
cached. n above `max_rows` is never padded.
"""

from __future__ import annotations

import statistics
import time
import weakref
from typing import Any

import torch

__all__ = ["RowPadding"]

_MEASURED: weakref.WeakKeyDictionary[Any, list[int]] = weakref.WeakKeyDictionary()  # model -> rows by n


class RowPadding:
    """rows(n) >= n: the row count a decoding step of n sequences runs fastest at (see the module docstring)."""

    def __init__(self, model: Any, max_rows: int = 16, repeats: int = 5):
        if max_rows < 1 or repeats < 1:
            raise ValueError(f"max_rows={max_rows} and repeats={repeats} must be >= 1")
        self.model = model
        self.max_rows = max_rows
        self.repeats = repeats

    def rows(self, n: int) -> int:
        """The row count to run a step of n sequences at (measuring first if this model was not measured)."""
        if n < 2 or n > self.max_rows:
            return n
        return self.measure()[n]

    def measure(self) -> list[int]:
        """rows by n for n in 0 .. max_rows, measured once per model (the engine calls it before serving, so that
        no request waits for it)."""
        table = _MEASURED.get(self.model)
        if table is None or len(table) <= self.max_rows:
            table = _MEASURED[self.model] = self._measure()
        return table

    def _measure(self) -> list[int]:
        """table[n] for n in 0 .. max_rows: the m in [n, max_rows] whose one-token forward (no cache: what a step
        costs besides attention to the sequences' caches, which padding rows skip) is fastest, by the median of
        `repeats` rounds over every row count (a slow spell of a shared machine meets all of them); n itself
        unless m is faster by more than 5%."""
        device = next(self.model.parameters()).device
        times: list[list[float]] = [[] for _ in range(self.max_rows + 1)]
        with torch.inference_mode():
            for _ in range(self.repeats):
                for m in range(1, self.max_rows + 1):
                    ids = torch.zeros(m, 1, dtype=torch.long, device=device)
                    start = time.perf_counter()
                    self.model(input_ids=ids, use_cache=False)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    times[m].append(time.perf_counter() - start)
        seconds = [statistics.median(t) if t else 0.0 for t in times]
        table = [0]
        for n in range(1, self.max_rows + 1):
            pick = min(range(n, self.max_rows + 1), key=lambda m: seconds[m])
            table.append(pick if seconds[pick] < 0.95 * seconds[n] else n)
        return table
