"""The judge phase (eval/judge.py): Spearman's rank correlation, and judge_trials on a tiny random model — every
recorded candidate of the sampled layers installed alone, a control trial at the KL floor, coarser codes costing
more KL than finer ones."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import VOCAB, build_model

from attentionpack.eval.judge import judge_trials, spearman, summarize


def test_spearman_ranks_with_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(1.5 / math.sqrt(3))  # tied ranks take their mean
    assert math.isnan(spearman([1, 2], [1, 2])) and math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="equal lengths"):
        spearman([1, 2, 3], [1, 2])


@torch.inference_mode()
def test_judge_trials_install_each_candidate_alone():
    model = build_model("llama")
    ids = torch.randint(3, VOCAB, (1, 300 + 24), generator=torch.Generator().manual_seed(4))
    trials = judge_trials(model, ids, 300, layers=2, budget=0.25)
    layers = sorted({t.layer for t in trials})
    assert layers == [0, 1]  # both layers of the tiny model, each with its prompt span's candidates
    for layer in layers:
        mine = [t for t in trials if t.layer == layer]
        (control,) = [t for t in mine if t.label == "exact"]
        assert abs(control.kl) < 1e-6 and control.judged == 0  # the span as stored: DynamicCache's distributions
        labels = {(t.tensor, t.label) for t in mine if t.label != "exact"}
        assert {("keys", "q8"), ("keys", "q2"), ("values", "q8"), ("values", "q2")} <= labels
        kl = {(t.tensor, t.label): t.kl for t in mine}
        for tensor in ("keys", "values"):  # 2-bit codes cost more than 8-bit ones, by judge and by KL
            assert kl[tensor, "q2"] > kl[tensor, "q8"] >= -1e-7
        assert all(t.nbytes > 0 and t.judged >= 0 for t in mine)
    summary = summarize(trials)
    assert summary["layers"] == [0, 1] and summary["control_kl_max"] < 1e-6
    assert -1 <= summary["spearman_pooled"] <= 1 and len(summary["trials"]) == len(trials)


def test_judge_trials_reject_too_short_inputs():
    model = build_model("llama")
    with pytest.raises(ValueError, match="context"):
        judge_trials(model, torch.zeros(1, 301, dtype=torch.long), 300)
