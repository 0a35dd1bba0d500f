"""How many threads a run uses: one choice for `generate`, `eval` and `bench`.

torch's intra-op pool and the fused kernels share one OpenMP pool (kernels/common.h: the kernels are built against
torch's libgomp and follow `torch.set_num_threads`). On a machine whose cores are already busy, several threads per
process stall each other at every parallel region (OpenMP threads spin at barriers), which slows compressed
prefill (many short parallel regions) far more than DynamicCache's. So the default is torch's unless the machine
is busy, then one thread; `--threads N` overrides it."""

from __future__ import annotations

import os


def busy_load() -> tuple[float, int] | None:
    """(1-minute load average, CPUs) when the machine is already busy (load >= CPUs - 0.5 on more than one CPU),
    else None (also where the load average is unknown)."""
    if not hasattr(os, "getloadavg"):
        return None
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    return (load, cpus) if cpus > 1 and load >= cpus - 0.5 else None


def choose_threads(requested: int | None) -> tuple[int | None, str | None]:
    """(threads to use, or None for torch's default; a note saying why when it was chosen for a busy machine).
    `requested` (>= 1) always wins."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"threads={requested!r} is invalid: give a whole number >= 1 (or nothing for the default)")
        return requested, None
    busy = busy_load()
    if busy is None:
        return None, None
    load, cpus = busy
    return 1, (
        f"the machine is busy (load average {load:.1f} on {cpus} CPUs): using 1 thread (pass --threads N to choose)"
    )


def apply_threads(threads: int | None) -> int:
    """Set torch's (and so the kernels') thread count when `threads` is given; returns the count in effect."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def plural(n: int, word: str) -> str:
    """'1 thread', '2 threads'."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
