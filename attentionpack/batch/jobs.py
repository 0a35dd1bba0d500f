"""Batch job files: read and validate the input JSONL, the resumable journal of finished rows, the final output.

Input rows: `{"id": ..., "prompt": "..."}` or `{"id": ..., "messages": [{"role": ..., "content": ...}, ...]}`,
optionally `"seed": int` (sampling). Ids are JSON strings or integers, unique in the file.

Journal (`<output>.journal`): the first line records the settings, then one line per finished row, appended in
the order rows finish and flushed + fsynced per row, so a crash loses no finished row. A last line cut short by
a crash is dropped (and truncated away) on resume. The final output is rewritten from the journal in input order
(atomically: a temporary file renamed over it) at the end of every run, so it is identical between runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class BatchError(ValueError):
    """A problem with the job's input, output or settings; the message is one line naming it and the fix."""


@dataclass(frozen=True)
class Row:
    """One input row: its 1-based line number, id, and either a prompt or chat messages."""

    line: int
    id: str | int
    prompt: str | None
    messages: list[dict] | None
    seed: int | None

    def seed_or(self, default: int) -> int:
        """The row's own sampling seed, else `default` (the job's --seed)."""
        return default if self.seed is None else self.seed

    @property
    def key(self) -> str:
        """The id as JSON: the key that matches a row with its journal entry (1 and "1" differ)."""
        return json.dumps(self.id)

    @property
    def digest(self) -> str:
        """A hash of what is asked, so a resumed job notices a row whose id stayed but whose prompt changed."""
        what = json.dumps([self.prompt, self.messages, self.seed], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(what.encode()).hexdigest()[:16]


def _where(path: Path, line: int) -> str:
    return f"{path} line {line}"


def read_rows(path: Path) -> list[Row]:
    """Every row of the input JSONL (blank lines skipped), validated; BatchError names the first bad line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BatchError(f"input file {path} does not exist; give --input a JSONL file of prompt rows") from None
    except (OSError, UnicodeDecodeError) as err:
        raise BatchError(f"cannot read input file {path}: {err}; give a UTF-8 JSONL file") from None
    rows: list[Row] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as err:
            raise BatchError(f"{_where(path, number)} is not valid JSON ({err.msg}); fix or remove that line") from None
        row = _row(path, number, obj)
        if row.key in seen:
            raise BatchError(
                f"{_where(path, number)}: id {row.key} repeats line {seen[row.key]}; give every row a unique id"
            )
        seen[row.key] = number
        rows.append(row)
    if not rows:
        raise BatchError(f"input file {path} has no rows; give one JSON object per line")
    return rows


def _row(path: Path, number: int, obj: Any) -> Row:
    where = _where(path, number)
    if not isinstance(obj, dict):
        raise BatchError(f'{where} is not a JSON object; give {{"id": ..., "prompt": "..."}}')
    rid = obj.get("id")
    if isinstance(rid, bool) or not isinstance(rid, str | int):
        raise BatchError(f'{where} has no valid "id" (a string or integer); give every row one')
    prompt, messages, seed = obj.get("prompt"), obj.get("messages"), obj.get("seed")
    if (prompt is None) == (messages is None):
        raise BatchError(f'{where} (id {json.dumps(rid)}) needs exactly one of "prompt" or "messages"')
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise BatchError(f'{where} (id {json.dumps(rid)}) has an empty or non-text "prompt"; give some text')
    if messages is not None and not _valid_messages(messages):
        raise BatchError(
            f'{where} (id {json.dumps(rid)}) has invalid "messages": give a non-empty list of '
            '{"role": ..., "content": "..."} with some text'
        )
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BatchError(f'{where} (id {json.dumps(rid)}) has a non-integer "seed"; give a whole number')
    return Row(number, rid, prompt, messages, seed)


def _valid_messages(messages: Any) -> bool:
    if not isinstance(messages, list) or not messages:
        return False
    ok = all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    )
    return ok and any(m["content"].strip() for m in messages)


def journal_path(output: Path) -> Path:
    """Where the finished rows of a job writing `output` are journaled."""
    return Path(f"{output}.journal")


class Journal:
    """The append-only record of finished rows of one job (see the module docstring).

    `Journal(output, settings, overwrite)` opens or starts it: an existing journal with other settings raises
    BatchError unless `overwrite` (which starts afresh; so does a journal without any finished row); `done` maps
    row keys to their recorded results."""

    def __init__(self, output: Path, settings: dict, overwrite: bool = False):
        self.path = journal_path(output)
        self.settings = settings
        self.done: dict[str, dict] = {}
        if overwrite:
            self.path.unlink(missing_ok=True)
            Path(output).unlink(missing_ok=True)
        elif self.path.exists():
            self._load(output)
        elif Path(output).exists():
            raise BatchError(
                f"{output} exists but has no journal {self.path} (not written by this tool, or the journal was "
                "removed); pass --overwrite to replace it or choose another --output"
            )
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append(json.dumps({"settings": settings}, sort_keys=True))

    def _load(self, output: Path) -> None:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        good = len(data)
        if lines and lines[-1]:  # a last line without its newline: cut short by a crash
            good -= len(lines[-1])
        lines = lines[:-1]
        entries = []
        for number, raw in enumerate(lines, start=1):
            try:
                entries.append(json.loads(raw))
            except json.JSONDecodeError:
                if number == len(lines):  # newline written, line torn: drop it too
                    good -= len(raw) + 1
                    break
                raise BatchError(
                    f"journal {self.path} line {number} is damaged; pass --overwrite to start the job afresh"
                ) from None
        if not entries or not isinstance(entries[0], dict) or "settings" not in entries[0]:
            raise BatchError(f"journal {self.path} has no settings line; pass --overwrite to start the job afresh")
        if entries[0]["settings"] != self.settings and len(entries) == 1:  # nothing finished: start afresh
            self.path.unlink()
            return
        if entries[0]["settings"] != self.settings:
            old, new = entries[0]["settings"], self.settings
            diff = ", ".join(
                f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
                for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)
            )
            raise BatchError(
                f"{output} was started with other settings ({diff}); rerun with the same settings to resume, "
                "or pass --overwrite to start afresh"
            )
        if good < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)
        for entry in entries[1:]:
            self.done[entry["key"]] = entry

    def check(self, rows: list[Row]) -> None:
        """BatchError when a finished row's prompt changed since (same id, other prompt/messages/seed)."""
        for row in rows:
            entry = self.done.get(row.key)
            if entry is not None and entry.get("digest") != row.digest:
                raise BatchError(
                    f"line {row.line}: row id {row.key} was answered for a different prompt; give it a new id, "
                    "or pass --overwrite to start afresh"
                )

    def _append(self, line: str) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def record(self, row: Row, result: dict) -> None:
        """Append one finished row (flushed and fsynced before returning); a row already recorded is ignored."""
        if row.key in self.done:
            return
        entry = {"key": row.key, "digest": row.digest, "result": result}
        self._append(json.dumps(entry, ensure_ascii=False))  # keeps the result's field order
        self.done[row.key] = entry


def write_output(output: Path, rows: list[Row], journal: Journal) -> int:
    """Write the answers of `rows` in input order (atomically); returns how many rows were written.

    Each line: `{"id": ..., "answer": "...", "tokens": n, "prompt_tokens": n, "kv_bytes": n, ...}`."""
    tmp = Path(f"{output}.tmp")
    written = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            entry = journal.done.get(row.key)
            if entry is None:
                continue
            f.write(json.dumps({"id": row.id, **entry["result"]}, ensure_ascii=False) + "\n")
            written += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, output)
    return written
