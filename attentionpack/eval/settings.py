"""The settings of an evaluation run and the machine it ran on (recorded in results.json)."""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict, dataclass
from typing import Any

from .configs import DEFAULT_CONFIGS


@dataclass
class Settings:
    model: str | None = None
    texts: tuple = (None,)
    configs: tuple = DEFAULT_CONFIGS
    contexts: tuple = (2048,)
    continuation: int = 256
    needle_configs: tuple | None = None  # None: DEFAULT_NEEDLE among `configs`
    needle_lengths: tuple = (1024, 2048, 4096)
    needle_depths: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    needle_trials: int = 1
    needle_new_tokens: int = 10
    speed_configs: tuple | None = None  # None: DEFAULT_SPEED among `configs`
    speed_contexts: tuple = (1024, 2048)
    speed_steps: int = 8
    speed_repeats: int = 2
    threads: int | None = None
    seed: int = 0
    isolate: bool = True  # quality+memory of each in-process configuration in its own child process
    kvpress: bool = True  # False: leave out the configurations that need the kvpress environment (a ~1.4 GB install)


def _norm(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True))


def machine_info(threads: int | None) -> dict:
    import torch

    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads or torch.get_num_threads(),
        "ram_bytes": mem,
        "python": sys.version.split()[0],
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def settings_dict(s: Settings) -> dict:
    return _norm(asdict(s))
