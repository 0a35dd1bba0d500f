"""Byte-budget allocation (multiple-choice knapsack) and the attention-output error measure."""

from __future__ import annotations

import itertools
import random
import time

import pytest
import torch

from attentionpack.budget import BudgetError, Option, allocate
from attentionpack.scoring.observation import attention_output_error
from experiments.evict import kept_mask, select_tokens


def _brute(groups, budget):
    best = None
    for choice in itertools.product(*(range(len(g)) for g in groups)):
        nbytes = sum(groups[g][i][0] for g, i in enumerate(choice))
        if nbytes <= budget:
            err = sum(groups[g][i][1] for g, i in enumerate(choice))
            if best is None or err < best - 1e-12:
                best = err
    return best


@pytest.mark.parametrize("seed", range(40))
def test_optimal_against_brute_force(seed):
    rng = random.Random(seed)
    groups = [[(rng.randint(0, 60), rng.random()) for _ in range(rng.randint(1, 5))] for _ in range(rng.randint(1, 5))]
    low = sum(min(o[0] for o in g) for g in groups)
    high = sum(max(o[0] for o in g) for g in groups)
    budget = rng.randint(low, high)
    alloc = allocate(groups, budget)
    assert alloc.exact and alloc.nbytes <= budget
    assert alloc.error == pytest.approx(_brute(groups, budget), abs=1e-9)
    assert alloc.nbytes == sum(groups[g][i][0] for g, i in enumerate(alloc.choice))


@pytest.mark.parametrize("seed", range(10))
def test_rounded_grid_never_exceeds_budget(seed):
    rng = random.Random(seed)
    groups = [[Option(rng.randint(10_000, 2_000_000), rng.random(), f"o{i}") for i in range(6)] for _ in range(5)]
    low = sum(min(o.nbytes for o in g) for g in groups)
    budget = low + rng.randint(0, 4_000_000)
    alloc = allocate(groups, budget, resolution=64)
    assert alloc.nbytes <= budget
    assert alloc.exact == (budget - low <= 64)
    best = _brute([[(o.nbytes, o.error) for o in g] for g in groups], budget)
    fine = allocate(groups, budget, resolution=1 << 16)
    assert best <= fine.error + 1e-12 and fine.error <= alloc.error + 1e-12
    assert fine.error - best < 0.2  # rounding to a 65536 grid loses little
    assert allocate(groups, low).choice == tuple(min(range(6), key=lambda i: (g[i].nbytes, g[i].error)) for g in groups)


def test_fast_for_a_model():
    rng = random.Random(0)
    groups = [[Option(rng.randint(1, 10_000_000), rng.random()) for _ in range(20)] for _ in range(60)]
    budget = sum(sorted(o.nbytes for o in g)[10] for g in groups)
    allocate(groups, budget)
    start = time.perf_counter()
    for _ in range(5):
        alloc = allocate(groups, budget)
    per_call = (time.perf_counter() - start) / 5
    assert alloc.nbytes <= budget
    assert per_call < 0.05, per_call  # ~5 ms alone; loose because the cores are shared with benchmarks


def test_infeasible_and_bad_inputs():
    groups = [[(100, 0.0), (40, 1.0)], [(30, 0.5)]]
    with pytest.raises(BudgetError, match="at least 70"):
        allocate(groups, 69)
    assert allocate(groups, 70).choice == (1, 0)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="budget="):
            allocate(groups, bad)
    with pytest.raises(ValueError, match="group 1 has no options"):
        allocate([[(1, 0.0)], []], 10)
    with pytest.raises(ValueError, match="nbytes="):
        allocate([[(1.5, 0.0)]], 10)
    with pytest.raises(ValueError, match="nbytes="):
        allocate([[(-1, 0.0)]], 10)
    with pytest.raises(ValueError, match="error="):
        allocate([[(1, float("nan"))]], 10)
    with pytest.raises(ValueError, match="groups is empty"):
        allocate([], 10)
    with pytest.raises(ValueError, match="resolution="):
        allocate(groups, 100, resolution=0)


def test_attention_output_error():
    torch.manual_seed(0)
    b, hq, h, t, w, d = 2, 4, 2, 40, 6, 16
    q, k, v = torch.randn(b, hq, w, d), torch.randn(b, h, t, d), torch.randn(b, h, t, d)
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, :5] = False
    assert attention_output_error(q, k, v, k, v, valid).abs().max() < 1e-6
    # noise on padding tokens changes nothing
    k_pad = k.clone()
    k_pad[1, :, :5] += 100
    assert attention_output_error(q, k, v, k_pad, v, valid)[1] < 1e-6
    # a direct computation of the relative error
    v_hat = v + 0.1 * torch.randn_like(v)
    err = attention_output_error(q, k, v, k, v_hat, valid)
    kk = k.repeat_interleave(2, 1)
    logits = q @ kk.transpose(-1, -2) / d**0.5
    causal = torch.arange(t).view(1, t) <= torch.arange(t - w, t).view(w, 1)
    logits = logits.masked_fill(~(causal & valid.view(b, 1, 1, t)), float("-inf"))
    p = torch.softmax(logits, -1)
    o, o_hat = p @ v.repeat_interleave(2, 1), p @ v_hat.repeat_interleave(2, 1)
    expect = (o - o_hat).flatten(1).norm(dim=1) / o.flatten(1).norm(dim=1)
    torch.testing.assert_close(err, expect, atol=1e-5, rtol=1e-4)
    # eviction: keeping the most attended tokens hurts less than keeping the least attended ones
    scores = torch.softmax(logits, -1).sum(2).view(b, h, 2, t).mean(2)  # (B, H, T)
    best = kept_mask(select_tokens(scores, 0.5, 1, w, valid), t)
    worst = kept_mask(select_tokens(-scores, 0.5, 1, w, valid), t)
    e_best = attention_output_error(q, k, v, k, v, valid, valid_hat=best)
    e_worst = attention_output_error(q, k, v, k, v, valid, valid_hat=worst)
    assert (e_best < e_worst).all() and (e_best > 0).all()
    with pytest.raises(ValueError, match="share one"):
        attention_output_error(q, k, v, k[:, :, :-1], v, valid)


def test_a_wide_group_choice_reaches_the_decode_chunks():
    """A choice of 4-bit keys in groups of 128 configures the layer's decode chunks so (key_group), and reads back
    as the same candidate labels (what the planner reports for fixed codecs)."""
    from attentionpack import PackConfig
    from attentionpack.budget.candidates import WIDE_GROUP, candidate_config, codec_labels
    from attentionpack.parts import ExactPart, Segment

    cfg = candidate_config(PackConfig(budget=0.125), "q4g128", "q2")
    assert (cfg.key_codec, cfg.key_bits, cfg.key_group) == ("quant", 4, WIDE_GROUP)
    assert (cfg.value_codec, cfg.value_bits, cfg.value_group, cfg.group(False)) == ("quant", 2, None, 32)
    span = Segment(4, 100, ExactPart(torch.zeros(1, 1, 96, 8)), ExactPart(torch.zeros(1, 1, 96, 8)), "span")
    assert codec_labels(cfg, span) == ("q4g128", "q2")
    assert codec_labels(candidate_config(PackConfig(budget=0.125), "q2", "q8g128"), span) == ("q2", "q8g128")
    # a user's own group is what "q4" was quantized in: decode chunks keep it; a low-rank choice's decode chunks
    # are 4-bit codes in the config's group (a 64-token chunk would pay a whole basis for few tokens)
    own = candidate_config(PackConfig(budget=0.125, key_group=64), "q4", "lr0.9c4")
    assert (own.key_group, own.group(True)) == (64, 64) and codec_labels(own, span) == ("q4", "q4")
    assert (own.value_codec, own.value_bits, own.value_energy, own.group(False)) == ("quant", 4, None, 32)


def test_judged_errors_equal_a_direct_softmax():
    """`budget.errors`: a key candidate's judged output (only the span's share of each softmax recomputed, on the
    stored form, with hidden keys) and a value candidate's mix equal a softmax over every key computed directly."""
    from attentionpack.budget.candidates import KEY_CANDIDATES, VALUE_CANDIDATES, encode_candidates
    from attentionpack.budget.errors import Rest, key_errors, value_errors
    from attentionpack.config import PackConfig

    g = torch.Generator().manual_seed(5)
    b, h, m, t, d, lo, hi = 2, 2, 6, 300, 16, 40, 260  # the span: keys [lo, hi) of t
    q, k, v = (torch.randn(b, h, n, d, generator=g) for n in (m, t, t))
    hidden = torch.rand(b, h, m, t, generator=g) < 0.1  # keys some rows cannot see
    logits = (q @ k.transpose(-1, -2) / d**0.5).masked_fill(hidden, float("-inf"))
    exact = torch.softmax(logits, -1) @ v  # (B, H, M, d)
    top = logits.amax(-1, keepdim=True)
    w = torch.exp(logits - top)
    outside = torch.cat([w[..., :lo], w[..., hi:]], -1), torch.cat([v[..., :lo, :], v[..., hi:, :]], -2)
    rest = Rest(top, outside[0].sum(-1, keepdim=True), outside[0] @ outside[1])
    sq = lambda diffs: diffs.square().sum(tuple(range(1, diffs.dim()))).tolist()  # noqa: E731
    keys = encode_candidates(k[..., lo:hi, :], True, KEY_CANDIDATES, PackConfig())
    found = key_errors(keys, q, (lo, hi), d**-0.5, rest, v[..., lo:hi, :], hidden[..., lo:hi], exact, sq, block=3)
    assert set(found) == {label for label, _ in keys} - {"exact"} and any(lab.startswith("lr") for lab in found)
    for label, part in keys:
        if label != "exact":
            k_hat = torch.cat([k[..., :lo, :], part.materialize(lo, hi, None), k[..., hi:, :]], -2)
            out = torch.softmax((q @ k_hat.transpose(-1, -2) / d**0.5).masked_fill(hidden, float("-inf")), -1) @ v
            assert found[label] == pytest.approx((out - exact).square().sum().item(), rel=1e-3, abs=1e-9), label
    values = encode_candidates(v[..., lo:hi, :], False, VALUE_CANDIDATES, PackConfig())
    probs = torch.softmax(logits, -1)[..., lo:hi]
    found = value_errors(values, probs, v[..., lo:hi, :], sq)
    for label, part in values:
        if label != "exact":
            v_hat = torch.cat([v[..., :lo, :], part.materialize(lo, hi, None), v[..., hi:, :]], -2)
            out = torch.softmax(logits, -1) @ v_hat
            assert found[label] == pytest.approx((out - exact).square().sum().item(), rel=1e-3, abs=1e-9), label
