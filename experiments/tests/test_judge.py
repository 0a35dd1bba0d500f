"""experiments/judge.py: judged error vs measured KL — its pieces on known inputs and one window end to end on a
tiny random-weight model (code paths only; the measured correlations are real-model results)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from tiny_models import build_model  # noqa: E402

from experiments.judge import judged, kl, run_window, spearman  # noqa: E402
from experiments.suite import windows  # noqa: E402


def test_spearman_and_kl_on_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    p = torch.log_softmax(torch.tensor([[1.0, 2.0, 3.0]]), -1)
    q = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0]]), -1)
    assert kl(p, p) == pytest.approx(0.0, abs=1e-7)
    expected = float((p.exp() * (p - q)).sum())
    assert kl(p, q) == pytest.approx(expected) and expected > 0


def test_judged_sums_spans_and_leaves_out_the_window():
    report = {
        (0, 4): {"kind": "span", "keys": [("exact", 100, 0.0), ("q4", 30, 0.5)], "values": [("exact", 100, 0.0)]},
        (1, 4): {"kind": "span", "keys": [("exact", 100, 0.0), ("q4", 30, 0.25)], "values": [("exact", 100, 0.0)]},
        (0, 90): {"kind": "window", "keys": [("exact", 10, 0.0), ("q4", 3, 9.0)], "values": [("exact", 10, 0.0)]},
    }
    err, nbytes = judged(report, "q4", "q4")  # values have no q4 option here: exact, as fixed codecs store them
    assert err == pytest.approx(0.75) and nbytes == 30 + 30 + 100 + 100


def test_windows_are_disjoint_and_spread():
    ids = torch.arange(1000)
    ws = windows(ids, 3, 200)
    assert [int(w[0]) for w in ws] == [0, 400, 800] and all(w.numel() == 200 for w in ws)
    with pytest.raises(ValueError, match="fewer than"):
        windows(ids, 6, 200)


def test_one_window_end_to_end_on_a_tiny_model():
    model = build_model("llama")
    window = torch.randint(3, 128, (200,), generator=torch.Generator().manual_seed(0))
    lines: list[str] = []
    res = run_window(model, window, 192, lines.append, fractions=(0.5, 0.25))
    assert len(res["encodings"]) == 12 and len(res["budgets"]) == 2
    assert all(r["kl"] >= -1e-6 and r["judged"] >= 0 for r in res["encodings"] + res["budgets"])
    assert -1 <= res["spearman"] <= 1 and not math.isnan(res["spearman"])
    assert any("Spearman" in line for line in lines)
