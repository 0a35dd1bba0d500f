"""The settings of an evaluation run and the machine it ran on (recorded in results.json)."""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict, dataclass
from typing import Any

from .configs import DEFAULT_CONFIGS, FULL_CONFIGS

DEFAULT_MODELS = ("smollm2", "gemma3")
DEFAULT_TEXTS = ("britannica", "play", "code")


@dataclass
class Settings:
    """What one `evaluate()` run measures (recorded in results.json; cells are reused only with equal settings)."""

    models: tuple = DEFAULT_MODELS  # model names (models/names.py) or paths
    texts: tuple = DEFAULT_TEXTS  # text names (data.TEXT_NAMES) or file paths
    configs: tuple = DEFAULT_CONFIGS
    contexts: tuple = (2048,)
    continuation: int = 256
    windows: int = 2  # disjoint windows of context + continuation tokens per text (data.windows)
    needle_configs: tuple | None = None  # None: DEFAULT_NEEDLE among `configs`
    needle_lengths: tuple = (1024, 2048)
    needle_depths: tuple = (0.0, 0.5, 1.0)
    needle_tasks: tuple = ("passkey",)  # "passkey": one key; "multikey": four doors' keys, one asked
    needle_modes: tuple = ("inside",)  # "inside": question in the prompt; "after": asked after compression
    needle_trials: int = 1
    needle_new_tokens: int = 10
    speed_configs: tuple | None = None  # None: DEFAULT_SPEED among `configs`
    speed_contexts: tuple = (2048,)
    speed_steps: int = 8
    speed_repeats: int = 2
    judge_layers: int = 3  # layers whose candidates are each installed alone to measure their KL (0: skip; judge.py)
    judge_budget: float = 0.125  # the budget whose candidates (and judged errors) are recorded
    threads: int | None = None
    seed: int = 0
    isolate: bool = True  # quality+memory of each in-process configuration in its own child process
    kvpress: bool = True  # False: leave out the configurations that need the kvpress environment (a ~1.4 GB install)


# --full: the acceptance protocol of issue 13 (both models, every text, 4 windows of 2,048 + 256, the budgets and
# presets, needle grids 1k/2k/4k x 5 depths); explicit settings still win.
FULL_SETTINGS: dict[str, Any] = {
    "models": DEFAULT_MODELS,
    "texts": DEFAULT_TEXTS,
    "configs": FULL_CONFIGS,
    "contexts": (2048,),
    "continuation": 256,
    "windows": 4,
    "needle_lengths": (1024, 2048, 4096),
    "needle_depths": (0.0, 0.25, 0.5, 0.75, 1.0),
    "needle_modes": ("inside", "after"),
    "needle_tasks": ("passkey", "multikey"),
    "judge_layers": 6,
}


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
