"""The targets check of an eval run (`eval/targets.py`): each limit of issue 13's protocol is what decides the
verdict, cells short of the protocol are not judged, needle counts compare the same trials."""

from __future__ import annotations

import pytest

from attentionpack.eval.targets import WORST_FACTOR, needle_targets, quality_targets, targets_md


def _row(config="budget-0.125", changes=(0.5, 1.0, 1.5, 0.2), smaller=8.0, end=8.0, error=None):
    known = [c for c in changes if c is not None]
    return {
        "model": "m",
        "text": "t",
        "config": config,
        "windows": len(known),
        "ppl_change_pct": sum(known) / len(known) if known else None,
        "worst_change_pct": max(known) if known else None,
        "compression_x": smaller,
        "compression_end_x": end,
        "error": error,
    }


@pytest.mark.parametrize(
    "row,holds,why",
    [
        (_row(), True, ""),
        (_row(changes=(2.5, 2.5, 2.5, 0.0)), True, ""),  # windows above the mean's limit, the mean within
        (_row(changes=(3.0, 2.0, 2.0, 2.0)), False, "mean +2.25% > 2%"),
        (_row(changes=(4.5, 0.0, 0.0, 0.0)), False, "worst window +4.50% > 4%"),
        (_row(smaller=7.5), False, "7.50x smaller < 8x"),
        (_row(smaller=7.995), True, ""),  # a budget's bytes rounded to whole storages
        (_row(changes=(0.1, 0.1, 0.1, None)), None, "3 windows"),
        (_row(error="BudgetError: infeasible"), None, "not measured: BudgetError"),
        (_row(config="balanced", changes=(0.9, 0.9, 0.9, 0.9), smaller=5.0), True, ""),
        (_row(config="balanced", changes=(1.1, 1.1, 1.1, 1.1), smaller=5.0), False, "mean +1.10% > 1%"),
        (_row(config="max", changes=(1.0, 1.0, 1.0, 6.5), smaller=6.5), False, "worst window +6.50% > 6%"),
        (_row(config="max", changes=(1.0,) * 4, smaller=6.0), False, "6.00x smaller < 6.5x"),
    ],
)
def test_each_limit_decides(row, holds, why):
    (got,) = quality_targets([row])
    assert got["holds"] is holds and why in got["why"] and (why or not got["why"])
    assert got["worst_limit_pct"] == WORST_FACTOR * got["mean_limit_pct"]


def test_size_after_decoding_is_checked_apart_and_other_configs_have_no_target():
    rows = [_row(end=6.8), _row(config="dynamic"), _row(config="budget-0.25", changes=(0.1,) * 4, smaller=4.0, end=4)]
    got = quality_targets(rows)
    assert [r["config"] for r in got] == ["budget-0.125", "budget-0.25"]
    assert got[0]["holds"] is True and got[0]["holds_after_decoding"] is False
    assert got[1]["holds"] is True and got[1]["holds_after_decoding"] is True
    md = "\n".join(targets_md({"quality": got, "needle": []}))
    assert "2 of 2 model x text x configuration cells hold, 1 also after decoding" in md


def _trials(hits):
    """Needle trials of one length, one per depth (None: not scored)."""
    return {"trials": [{"length": 1024, "depth": i / 4, "hit": h} for i, h in enumerate(hits)]}


def test_needle_compares_the_same_trials_per_task_and_mode():
    needle = {
        "m": {
            "dynamic": _trials([True, True, False, True]),
            "budget-0.125": _trials([True, False, True, True]),  # 3 vs 3: holds
            "dynamic (after)": _trials([True, True, True, None]),
            "budget-0.125 (after)": _trials([True, True, False, True]),  # the unscored trial left out: 2 vs 3
            "dynamic multikey": _trials([False, False, True, True]),
            "budget-0.125 multikey": _trials([False, False, True, True]),
            "max": _trials([False] * 4),  # no target
        }
    }
    got = {r["variant"]: r for r in needle_targets(needle)}
    assert set(got) == {
        "passkey, asked in the prompt",
        "passkey, asked after compression",
        "multikey, asked in the prompt",
    }
    assert got["passkey, asked in the prompt"]["holds"] is True
    after = got["passkey, asked after compression"]
    assert (after["trials"], after["dynamic_hits"], after["hits"], after["holds"]) == (3, 3, 2, False)
    assert got["multikey, asked in the prompt"]["holds"] is True
    assert "**misses**" in "\n".join(targets_md({"quality": [], "needle": list(got.values())}))
