"""Peers measured in the same run: transformers QuantizedCache (optimum-quanto, HQQ; built by
`configs.make_cache`) and NVIDIA kvpress presses.

kvpress 0.5.5 requires transformers < 5.3, so it runs in its own virtual environment, created once under
~/.cache/attentionpack/kvpress-venv (or $ATTENTIONPACK_CACHE/kvpress-venv) and reused: torch is installed first at
this process's exact version (pip then takes the local CPU build instead of downloading CUDA packages), then kvpress
and transformers < 5.3 with torch pinned. `kvpress_worker.py` is run with that environment's python on the same
model folder, the same token ids and the same protocol.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ..resources import cache_root
from .child import EXACT_TIMED_STEPS, child_env, run_child
from .configs import KVPRESS_PRESSES, Spec

KVPRESS_VERSION = "0.5.5"
KVPRESS_TRANSFORMERS = "transformers<5.3"
WORKER = Path(__file__).with_name("kvpress_worker.py")


class KvpressUnavailable(RuntimeError):
    """The kvpress environment could not be created or does not work; the message says why."""


def venv_dir() -> Path:
    return cache_root() / "kvpress-venv"


def venv_python(root: Path | None = None) -> Path:
    return (root or venv_dir()) / "bin" / "python"


def _torch_pin() -> str:
    return "torch==" + torch.__version__.split("+")[0]


def kvpress_env_info(root: Path | None = None) -> dict | None:
    """Versions recorded when the environment was completed, or None if it is not ready."""
    marker = (root or venv_dir()) / "attentionpack-ready.json"
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return info if venv_python(root).exists() else None


@contextlib.contextmanager
def _lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


KVPRESS_ENV_SIZE = "about 1.4 GB"  # torch (CPU build), transformers, kvpress and dependencies (issue 19 measured it)


def kvpress_notice(specs) -> str:
    """What creating the kvpress environment installs, where, and how to skip it (printed before installing)."""
    names = ", ".join(sorted({sp.name for sp in specs}))
    return (
        f"note: {names} need(s) the kvpress environment, which is not installed yet: creating it now installs "
        f"torch, transformers and kvpress=={KVPRESS_VERSION} ({KVPRESS_ENV_SIZE} on disk) into {venv_dir()}, "
        "once (minutes). Pass --no-kvpress to leave these configurations out."
    )


def ensure_kvpress_env(
    log: Path | None = None, status: Callable[[str], None] | None = None, root: Path | None = None
) -> dict:
    """Create the kvpress environment if it is not ready (minutes, once); returns its versions.
    Raises KvpressUnavailable with the reason and the end of the pip log when it cannot be made."""
    root = root or venv_dir()
    info = kvpress_env_info(root)
    if info:
        return info
    log = log or root.with_name("kvpress-venv.log")
    with _lock(root.with_name("kvpress-venv.lock")):
        info = kvpress_env_info(root)  # another process may have finished it meanwhile
        if info:
            return info
        shutil.rmtree(root, ignore_errors=True)
        pin = _torch_pin()
        steps = [
            ("creating the virtual environment", [sys.executable, "-m", "venv", str(root)]),
            (f"installing {pin} (local CPU build)", [str(venv_python(root)), "-m", "pip", "install", pin]),
            (
                f"installing kvpress=={KVPRESS_VERSION}",
                [
                    str(venv_python(root)),
                    "-m",
                    "pip",
                    "install",
                    f"kvpress=={KVPRESS_VERSION}",
                    KVPRESS_TRANSFORMERS,
                    "-c",
                    "{constraints}",
                ],
            ),
        ]
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as c:
            c.write(pin + "\n")
        try:
            with open(log, "w") as out:
                for what, cmd in steps:
                    if status:
                        status(what)
                    cmd = [a.replace("{constraints}", c.name) for a in cmd]
                    out.write(f"$ {' '.join(cmd)}\n")
                    out.flush()
                    rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
                    if rc:
                        raise KvpressUnavailable(f"{what} failed (exit {rc}); see {log}:\n{_tail(log)}")
            probe = (
                "import json, torch, transformers, kvpress; from importlib.metadata import version; "
                "print(json.dumps({'torch': torch.__version__, 'transformers': transformers.__version__, "
                "'kvpress': version('kvpress')}))"
            )
            done = subprocess.run([str(venv_python(root)), "-c", probe], capture_output=True, text=True)
            if done.returncode:
                raise KvpressUnavailable(f"kvpress does not import in {root}:\n{done.stderr[-2000:]}")
            info = json.loads(done.stdout.strip().splitlines()[-1])
            if info["torch"].split("+")[0] != pin.split("==")[1]:
                raise KvpressUnavailable(f"the kvpress environment got torch {info['torch']}, not {pin}")
            (root / "attentionpack-ready.json").write_text(json.dumps(info))
            return info
        except OSError as err:
            raise KvpressUnavailable(f"cannot create the kvpress environment in {root}: {err}") from err
        finally:
            os.unlink(c.name)


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def model_folder(model: str | None) -> Path:
    """A transformers folder of the model, readable by kvpress's older transformers (GGUF: the converted copy,
    which exists once `load_model` has run)."""
    from ..models import converted_cache_dir, embedded_model_file

    if model is None:
        folder = converted_cache_dir(embedded_model_file(), torch.float32)
    else:
        path = Path(model).expanduser()
        if path.is_dir() and (path / "config.json").is_file():
            return path
        if path.is_dir():
            path = sorted(path.glob("*.gguf"))[0]
        folder = converted_cache_dir(path, torch.float32)
    if not (folder / "config.json").is_file():
        raise KvpressUnavailable(f"no converted model folder at {folder}; load the model once first")
    return folder


def _run_worker(job: dict, on_progress=None, on_item=None, log: Path | None = None, threads: int | None = None):
    fd, path = tempfile.mkstemp(prefix="attentionpack-kvpress-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(job, f)
        env = child_env(threads)
        env.pop("PYTHONPATH", None)
        return run_child([str(venv_python()), str(WORKER), path], on_progress, log, env=env, on_item=on_item)
    finally:
        os.unlink(path)


def kvpress_quality(
    spec: Spec | None,
    ids,
    context: int,
    continuation: int,
    model: str | None = None,
    logits_out: Path | None = None,
    threads: int | None = None,
    on_progress=None,
    log: Path | None = None,
) -> dict:
    """One kvpress configuration (None: the environment's own DynamicCache) through the continuation protocol,
    alone in a fresh process of the kvpress environment (so its peak RSS is its own)."""
    ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)][: context + continuation]
    job = {
        "mode": "quality",
        "model": str(model_folder(model)),
        "ids": ids,
        "context": context,
        "continuation": continuation,
        "logits_out": str(logits_out) if logits_out else None,
        "threads": threads,
        "timed_steps": EXACT_TIMED_STEPS,
        "press": KVPRESS_PRESSES[spec.press] if spec and spec.press else None,
        "ratio": spec.ratio if spec else None,
    }
    return _run_worker(job, on_progress, log=log, threads=threads)


def kvpress_needle(
    spec: Spec,
    prompts,
    eos,
    max_new_tokens: int,
    model: str | None = None,
    threads: int | None = None,
    on_item=None,
    log: Path | None = None,
) -> dict:
    """Greedy answers of needle prompts with a press on the context; `on_item` gets each answer as it comes."""
    if spec.press is None:
        raise ValueError(f"{spec.name} is not a kvpress configuration")
    job = {
        "mode": "needle",
        "model": str(model_folder(model)),
        "threads": threads,
        "eos": list(eos),
        "max_new_tokens": max_new_tokens,
        "press": KVPRESS_PRESSES[spec.press],
        "ratio": spec.ratio,
        "prompts": [{"context_ids": p.context_ids, "question_ids": p.question_ids} for p in prompts],
    }
    return _run_worker(job, on_item=on_item, log=log, threads=threads)
