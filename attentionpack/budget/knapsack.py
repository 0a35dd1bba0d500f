"""A byte budget: one encoding option per layer and tensor, minimizing the total error within the bytes.

Every group (e.g. layer 7's keys) offers candidate encodings, each with the bytes it would hold and the error it
would cause (measured on the prompt itself, e.g. `attention_output_error` of the observation window). Choosing
one option per group with total bytes <= budget and minimal total error is a multiple-choice knapsack. We solve it
by dynamic programming over the bytes *above each group's cheapest option* (so the cheapest mix is always
feasible), on a grid of at most `resolution` steps: exact when that slack is at most `resolution` bytes, otherwise
costs are rounded up to the grid (the budget is still never exceeded), the result is optimal for the rounded
costs, and a greedy pass then spends the bytes rounding left unused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Option:
    """One candidate encoding of a group: the bytes it holds and the error it causes."""

    nbytes: int
    error: float
    label: str = ""


@dataclass(frozen=True)
class Allocation:
    choice: tuple[int, ...]  # index of the chosen option in each group
    nbytes: int  # total bytes of the chosen options
    error: float  # total error of the chosen options
    exact: bool  # True when the knapsack was solved without rounding bytes to the grid


class BudgetError(ValueError):
    """The budget is below the fewest bytes any mix of options can hold."""


def _arrays(g: int, group: Sequence[Option | tuple]) -> tuple[np.ndarray, np.ndarray]:
    """nbytes (int64) and errors (float64) of one group's options, validated."""
    if len(group) == 0:
        raise ValueError(f"group {g} has no options: give at least one (nbytes, error) option per group")
    try:
        pairs = [(o.nbytes, o.error) if isinstance(o, Option) else (o[0], o[1]) for o in group]
        nbytes = np.array([p[0] for p in pairs])
        errors = np.array([p[1] for p in pairs], dtype=np.float64)
    except (TypeError, IndexError, ValueError) as err:
        raise ValueError(f"group {g}: every option must be an Option or (nbytes, error[, label]) ({err})") from err
    if nbytes.dtype.kind not in "iu" or (nbytes < 0).any():
        raise ValueError(f"group {g}: nbytes={nbytes.tolist()} is invalid: every nbytes must be an integer >= 0")
    if not np.isfinite(errors).all():
        raise ValueError(f"group {g}: error={errors.tolist()} is invalid: every error must be a finite number")
    return nbytes.astype(np.int64), errors


def _pareto(nbytes: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """Indices of the options no cheaper-or-equal option matches in error, ordered by bytes."""
    order = np.lexsort((errors, nbytes))
    e = errors[order]
    best_before = np.concatenate([[np.inf], np.minimum.accumulate(e)[:-1]])
    return order[e < best_before]


def allocate(groups: Sequence[Sequence[Option | tuple]], budget: int, resolution: int = 2048) -> Allocation:
    """Choose one option per group: total bytes <= `budget`, total error minimal (see the module doc).

    Raises BudgetError naming the minimum achievable bytes when even the cheapest mix does not fit."""
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0:
        raise ValueError(f"budget={budget!r} is invalid: must be a byte count (integer >= 0)")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution={resolution!r} is invalid: must be an integer >= 1")
    if len(groups) == 0:
        raise ValueError("groups is empty: give at least one group of options")
    arrays = [_arrays(g, group) for g, group in enumerate(groups)]
    floor = [int(nb.min()) for nb, _ in arrays]
    minimum = sum(floor)
    if budget < minimum:
        raise BudgetError(
            f"budget={budget} bytes is infeasible: the cheapest option of every group together hold "
            f"{minimum} bytes; raise the budget to at least {minimum} or offer cheaper options"
        )
    slack = int(budget) - minimum
    unit = max(1, -(-slack // resolution))
    cap = slack // unit
    dp = np.zeros(cap + 1)  # dp[c]: least error of the groups so far with at most c units of extra bytes
    steps = []
    for (nbytes, errors), low in zip(arrays, floor, strict=False):
        keep = _pareto(nbytes, errors)
        cost = -(-(nbytes[keep] - low) // unit)  # grid units above the group's cheapest option, rounded up
        cand = np.full((len(keep), cap + 1), np.inf)  # (options, cap + 1)
        for row, (w, e) in enumerate(zip(cost.tolist(), errors[keep].tolist(), strict=False)):
            if w <= cap:
                np.add(dp[: cap + 1 - w], e, out=cand[row, w:])
        dp = cand.min(axis=0)
        arg = (cand == dp).argmax(axis=0)  # (cap + 1,) first row reaching the minimum
        steps.append((keep, cost, arg))
    choice, c = [], cap
    for keep, cost, arg in reversed(steps):
        row = int(arg[c])
        choice.append(int(keep[row]))
        c -= int(cost[row])
    choice.reverse()
    if unit > 1:
        _spend_leftover(arrays, choice, int(budget))
    total = sum(int(nb[i]) for (nb, _), i in zip(arrays, choice, strict=False))
    error = sum(float(er[i]) for (_, er), i in zip(arrays, choice, strict=False))
    assert total <= budget, (total, budget)
    return Allocation(tuple(choice), total, error, exact=unit == 1)


def _spend_leftover(arrays: list[tuple[np.ndarray, np.ndarray]], choice: list[int], budget: int) -> None:
    """Greedy repair after a rounded grid: while some single-group switch fits the real leftover bytes and lowers
    the error, make the one lowering it most (recovers most of what rounding costs up to the grid left unused)."""
    width = max(len(nb) for nb, _ in arrays)
    nbytes = np.full((len(arrays), width), np.iinfo(np.int64).max // 4, dtype=np.int64)  # (G, K) padded
    errors = np.full((len(arrays), width), np.inf)
    for g, (nb, er) in enumerate(arrays):
        nbytes[g, : len(nb)], errors[g, : len(er)] = nb, er
    rows = np.arange(len(arrays))
    pick = np.array(choice)
    for _ in range(len(arrays) * width):  # each switch lowers the error: bounded, usually a few steps
        cur_b, cur_e = nbytes[rows, pick], errors[rows, pick]  # (G,)
        left = budget - int(cur_b.sum())
        gain = np.where(nbytes - cur_b[:, None] <= left, cur_e[:, None] - errors, -np.inf)  # (G, K)
        flat = int(gain.argmax())
        if not gain.flat[flat] > 0:
            break
        pick[flat // width] = flat % width
    choice[:] = pick.tolist()
