"""One thread policy for generate, eval and bench (attentionpack/threads.py): torch's default, one thread on a
busy machine, --threads always wins; the eval report's wording."""

from __future__ import annotations

import os

import pytest

from attentionpack import threads


@pytest.mark.parametrize(
    "load,cpus,busy", [(1.6, 2, True), (1.49, 2, False), (7.0, 16, False), (16.0, 16, True), (5.0, 1, False)]
)
def test_busy_rule(monkeypatch, load, cpus, busy):
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    chosen, note = threads.choose_threads(None)
    assert (chosen, note is not None) == ((1, True) if busy else (None, False))
    if busy:
        assert f"load average {load:.1f} on {cpus} CPUs" in note and "--threads" in note
    assert threads.choose_threads(3) == (3, None)  # asked for: always wins


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_thread_counts(bad):
    with pytest.raises(ValueError, match="threads"):
        threads.choose_threads(bad)


def test_apply_threads_sets_torch_and_restores():
    import torch

    before = torch.get_num_threads()
    try:
        assert threads.apply_threads(1) == 1 == torch.get_num_threads()
        assert threads.apply_threads(None) == 1  # None leaves it as it is
    finally:
        torch.set_num_threads(before)


def test_report_wording():
    from attentionpack.eval.report import _load

    assert threads.plural(1, "torch thread") == "1 torch thread"
    assert threads.plural(2, "torch thread") == "2 torch threads"
    assert _load((3.4912, 2.95, 2.1)) == "3.49 / 2.95 / 2.10 (1 / 5 / 15 min)"
    assert _load(None) == "unknown"
