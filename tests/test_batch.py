"""`attentionpack batch`: local vs Ray Data (with a worker dying), kill + resume, settings guard, bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from attentionpack.cli import app

ROOT = Path(__file__).resolve().parents[1]
TOPICS = [
    "France",
    "the sea",
    "apples",
    "winter",
    "music",
    "the moon",
    "trees",
    "bread",
    "rivers",
    "cats",
    "clocks",
    "rain",
]
N = ["-n", "8"]


def _rows(count: int = 24) -> list[dict]:
    rows: list[dict] = []
    for i in range(count):
        topic = TOPICS[i % len(TOPICS)]
        rid: str | int = i if i % 3 else f"q{i}"
        if i % 2:
            rows.append({"id": rid, "messages": [{"role": "user", "content": f"Tell me one fact about {topic}."}]})
        else:
            rows.append({"id": rid, "prompt": f"Write one short sentence about {topic}."})
    return rows


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _batch(*args: str):
    return CliRunner().invoke(app, ["batch", *args])


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The 24-row input and its uninterrupted local answers."""
    folder = tmp_path_factory.mktemp("batch")
    src = _write(folder / "in.jsonl", _rows())
    out = folder / "local.jsonl"
    result = _batch("--input", str(src), "--output", str(out), *N, "--threads", "1")
    assert result.exit_code == 0, result.output
    return src, out.read_text(encoding="utf-8")


def test_local_output_in_input_order(job):
    src, text = job
    answers = [json.loads(line) for line in text.splitlines()]
    assert [a["id"] for a in answers] == [r["id"] for r in _rows()]
    assert all(a["answer"].strip() and 1 <= a["tokens"] <= 8 and a["kv_bytes"] > 0 for a in answers)
    assert len({a["answer"] for a in answers}) > 4  # the prompts differ, so do the answers


def test_rerun_skips_finished_rows_and_is_identical(job, tmp_path):
    src, text = job
    out = tmp_path / "again.jsonl"
    first = _write(tmp_path / "first.jsonl", _rows()[:5])
    assert _batch("--input", str(first), "--output", str(out), *N).exit_code == 0
    result = _batch("--input", str(src), "--output", str(out), *N)
    assert result.exit_code == 0, result.output
    assert "(5 already done, 19 answered)" in result.output
    assert out.read_text(encoding="utf-8") == text


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs ray (pip install 'attentionpack[ray]')")
def test_ray_matches_local_with_a_worker_dying(job, tmp_path, monkeypatch):
    src, text = job
    marker = tmp_path / "died"
    monkeypatch.setenv("ATTENTIONPACK_BATCH_DIE_AT", "7")
    monkeypatch.setenv("ATTENTIONPACK_BATCH_DIE_MARKER", str(marker))
    out = tmp_path / "ray.jsonl"
    result = _batch("--input", str(src), "--output", str(out), *N, "--ray", "--workers", "2")
    assert result.exit_code == 0, result.output
    assert marker.exists()  # a worker really exited on row 7; its rows were retried on a restarted actor
    assert out.read_text(encoding="utf-8") == text


def test_killed_half_way_then_resumed_is_identical(job, tmp_path):
    src, text = job
    out = tmp_path / "killed.jsonl"
    journal = Path(f"{out}.journal")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "attentionpack", "batch", "--input", str(src), "--output", str(out), *N]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if journal.exists() and len(journal.read_text(encoding="utf-8").splitlines()) >= 1 + 6:
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finished = len(journal.read_text(encoding="utf-8").splitlines()) - 1
    assert 6 <= finished < 24, "the job was not killed half-way"
    assert not out.exists()  # the final file is only written at the end
    with open(journal, "a", encoding="utf-8") as f:  # a crash in the middle of writing a row
        f.write('{"digest": "x", "key": "99", "res')
    result = _batch("--input", str(src), "--output", str(out), *N)
    assert result.exit_code == 0, result.output
    assert f"({finished} already done, {24 - finished} answered)" in result.output
    assert out.read_text(encoding="utf-8") == text


def test_other_settings_refused_unless_overwrite(tmp_path):
    src = _write(tmp_path / "in.jsonl", _rows(2))
    out = tmp_path / "out.jsonl"
    assert _batch("--input", str(src), "--output", str(out), "-n", "4").exit_code == 0
    before = out.read_text(encoding="utf-8")
    refused = _batch("--input", str(src), "--output", str(out), "-n", "5")
    assert refused.exit_code == 2
    assert "other settings (max_new_tokens: 4 -> 5)" in refused.output and "--overwrite" in refused.output
    assert out.read_text(encoding="utf-8") == before
    changed = _write(tmp_path / "changed.jsonl", [{"id": "q0", "prompt": "Something else entirely."}])
    refused = _batch("--input", str(changed), "--output", str(out), "-n", "4")
    assert refused.exit_code == 2 and "different prompt" in refused.output
    again = _batch("--input", str(src), "--output", str(out), "-n", "5", "--overwrite")
    assert again.exit_code == 0 and "(0 already done, 2 answered)" in again.output
    fresh = tmp_path / "fresh.jsonl"  # a first run that stopped before any row: its settings bind nothing
    too_long = _write(tmp_path / "long.jsonl", [{"id": 1, "prompt": LONG}])
    assert _batch("--input", str(too_long), "--output", str(fresh), "-n", "4").exit_code == 2
    assert _batch("--input", str(src), "--output", str(fresh), "-n", "3").exit_code == 0
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text("keep me\n", encoding="utf-8")
    refused = _batch("--input", str(src), "--output", str(foreign))
    assert refused.exit_code == 2 and "has no journal" in refused.output
    assert foreign.read_text(encoding="utf-8") == "keep me\n"


def test_sampling_is_reproducible_per_row(tmp_path):
    rows = _rows(3)
    rows[1]["seed"] = 5
    src = _write(tmp_path / "in.jsonl", rows)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for out in (a, b):
        assert _batch("--input", str(src), "--output", str(out), *N, "--sample", "--seed", "3").exit_code == 0
    assert a.read_text(encoding="utf-8") == b.read_text(encoding="utf-8")


LONG = "word " * 9000  # past SmolLM2's 8192 positions
BAD = [  # each case follows the good row "kept" (line 1), so its rows start at line 2
    ([{"id": 1, "prompt": "hi"}, "{not json"], "bad.jsonl line 3 is not valid JSON"),
    ([{"id": 1, "prompt": "hi"}, {"id": 1, "prompt": "again"}], "line 3: id 1 repeats line 2"),
    ([{"id": 1, "text": "hi"}], 'needs exactly one of "prompt" or "messages"'),
    ([{"id": 1, "prompt": "   "}], 'empty or non-text "prompt"'),
    ([{"id": 1, "messages": []}], 'invalid "messages"'),
    ([{"prompt": "no id"}], 'no valid "id"'),
    ([{"id": 1, "prompt": LONG}], "exceeds the model's limit of 8192 positions"),
]


@pytest.mark.parametrize("rows, message", BAD, ids=[m.split()[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_input_is_one_clear_line_and_loses_nothing(tmp_path, rows, message):
    good = _write(tmp_path / "good.jsonl", [{"id": "kept", "prompt": "Say yes."}])
    out = tmp_path / "out.jsonl"
    assert _batch("--input", str(good), "--output", str(out), "-n", "2").exit_code == 0
    before, journal = out.read_text(encoding="utf-8"), Path(f"{out}.journal").read_text(encoding="utf-8")
    src = _write(tmp_path / "bad.jsonl", [{"id": "kept", "prompt": "Say yes."}, *rows])
    result = _batch("--input", str(src), "--output", str(out), "-n", "2")
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert out.read_text(encoding="utf-8") == before
    assert Path(f"{out}.journal").read_text(encoding="utf-8") == journal


def test_missing_input_and_missing_ray(tmp_path, monkeypatch):
    result = _batch("--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o.jsonl"))
    assert result.exit_code == 2 and "does not exist" in result.output
    src = _write(tmp_path / "in.jsonl", _rows(1))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    result = _batch("--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--ray")
    assert result.exit_code == 2 and "pip install 'attentionpack[ray]'" in result.output


def test_cli_import_stays_light():
    code = "import sys, attentionpack.cli; print(any(m == 'ray' or m.startswith('ray.') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True)
    assert out.stdout.decode().strip() == "False", out.stderr.decode()
