"""Start-up cost: the command line and `import attentionpack` load neither torch nor transformers until a command
needs them (their imports take seconds; `--help` and usage errors must not)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


HEAVY = "sorted(m for m in ('torch', 'transformers', 'hqq', 'torch._dynamo') if m in sys.modules)"


def test_cli_import_is_light():
    done = _run(f"import sys, attentionpack.cli; print({HEAVY})")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"import attentionpack.cli imported {done.stdout.strip()}"


def test_package_import_is_light_and_names_resolve_on_use():
    done = _run(
        f"import sys, attentionpack; print({HEAVY}); from attentionpack import PackConfig, PRESETS; "
        f"print({HEAVY}); print(PackConfig.preset('max').key_codec, sorted(PRESETS)[0]); "
        "print(attentionpack.PackedCache.__name__, 'transformers' in sys.modules)"
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")
    assert lines[0] == "[]" and lines[1] == "[]", done.stdout  # the config is pure Python
    assert lines[3] == "PackedCache True"


def test_help_and_usage_errors_do_not_import_torch():
    for args in ("['--help']", "['generate']", "['bench', '--help']"):
        done = _run(
            f"import sys\nfrom attentionpack.cli import app\ntry:\n    app({args})\nexcept SystemExit as e:\n"
            f"    print('exit', e.code, {HEAVY})"
        )
        assert done.stdout.strip().splitlines()[-1].endswith("[]"), (args, done.stdout, done.stderr)


def test_unknown_name_is_an_attribute_error():
    done = _run("import attentionpack\ntry:\n    attentionpack.nope\nexcept AttributeError as e:\n    print(e)")
    assert "has no attribute 'nope'" in done.stdout, done.stderr


def test_every_module_imports_first():
    """Lazy package attributes must not expose an import cycle: each module imports in a fresh package state."""
    code = (
        "import importlib, pkgutil, sys, attentionpack\n"
        "names = [m.name for m in pkgutil.walk_packages(attentionpack.__path__, 'attentionpack.')\n"
        "         if not m.name.endswith(('__main__', 'kvpress_worker', '.child'))]\n"
        "bad = []\n"
        "for name in names:\n"
        "    for k in [k for k in sys.modules if k == 'attentionpack' or k.startswith('attentionpack.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as err:\n"
        "        bad.append(f'{name}: {err}')\n"
        "print(len(names), bad)\n"
    )
    done = _run(code)
    assert done.returncode == 0, done.stderr[-2000:]
    count, bad = done.stdout.strip().split(" ", 1)
    assert int(count) > 30 and bad == "[]", done.stdout
