"""`PackConfig(budget=f)`: the cache holds at most f x DynamicCache's bytes after a prefill, with clear errors."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import dynamic_cache, greedy, padded_batch

from attentionpack import PackConfig, PackedCache
from attentionpack.budget import BudgetError

SMALL = dict(window=16, min_span=16)  # tiny prompts: a short exact window leaves most tokens to the budget


def _prefill(model, cache, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("name", ["llama", "qwen2_sliding", "gemma3_text"])
@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.3, 0.2])
def test_budget_is_respected(tiny_model, name, fraction):
    model = tiny_model(name)
    ids, mask = padded_batch(300, pad=7)  # batch of 2, the second left-padded
    cache = PackedCache(model, PackConfig(budget=fraction, **SMALL))
    out = _prefill(model, cache, ids, mask)
    assert cache.nbytes() <= fraction * cache.dynamic_nbytes()
    ref = _prefill(model, dynamic_cache(model), ids, mask)  # prefill attention stays exact
    torch.testing.assert_close(out.logits[mask.bool()], ref.logits[mask.bool()], rtol=1e-4, atol=1e-4)
    chosen = [layer for layer in cache.layers if layer.budget_choice]
    assert chosen
    for layer in chosen:  # decode chunks will use the chosen encoding (a low-rank choice's: 4-bit codes)
        cfg = layer.codecs["text"]
        for choice, codec, bits in zip(
            layer.budget_choice, (cfg.key_codec, cfg.value_codec), (cfg.key_bits, cfg.value_bits)
        ):
            assert codec == ("exact" if choice == "exact" else "quant"), (choice, codec)
            if choice.startswith("lr"):
                assert bits == 4


def test_tighter_budgets_hold_fewer_bytes(tiny_model):
    model = tiny_model("llama")
    ids, mask = padded_batch(300, pad=0, batch=1)
    held = []
    for fraction in (0.8, 0.4, 0.2):
        cache = PackedCache(model, PackConfig(budget=fraction, **SMALL))
        _prefill(model, cache, ids, mask)
        held.append(cache.nbytes())
    assert held[0] > held[1] > held[2]


def test_generate_with_a_budget(tiny_model):
    model = tiny_model("qwen2")
    ids, mask = padded_batch(200, pad=5)
    cache = PackedCache(model, PackConfig(budget=0.25, chunk=32, **SMALL))
    # the prompt's window is frozen with the spans, so the tail refills: window + chunk steps compress a chunk
    out = greedy(model, cache, ids, mask, new_tokens=52)
    assert out.sequences.shape == (2, 252)
    assert [s.kind for s in cache.layers[0].segments][-3:] == ["span", "window", "chunk"]
    assert cache.layers[0].tail_length == 16 + 3


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, True, "0.125", float("nan")])
def test_invalid_budgets_are_rejected(bad):
    with pytest.raises(ValueError, match=r"PackConfig\.budget=.*must be None or a fraction"):
        PackConfig(budget=bad)


def test_budget_with_modality_overrides_is_rejected():
    with pytest.raises(ValueError, match=r"PackConfig\.budget=.*modality overrides"):
        PackConfig(budget=0.25, image={"value_bits": 2, "value_codec": "quant"})


def test_too_small_budget_names_the_smallest_feasible_fraction(tiny_model):
    model = tiny_model("llama")
    ids, mask = padded_batch(300, pad=0, batch=1)
    with pytest.raises(BudgetError, match=r"PackConfig\.budget=0\.01 is infeasible.*use budget >= ") as err:
        _prefill(model, PackedCache(model, PackConfig(budget=0.01, **SMALL)), ids, mask)
    smallest = float(re.search(r"use budget >= ([0-9.]+)", str(err.value)).group(1))
    assert 0.01 < smallest < 0.3
    cache = PackedCache(model, PackConfig(budget=smallest, **SMALL))
    _prefill(model, cache, ids, mask)  # the named fraction fits
    assert cache.nbytes() <= smallest * cache.dynamic_nbytes()


def test_ingest_needs_the_queries(tiny_model):
    model = tiny_model("llama")
    ids, mask = padded_batch(300, pad=0, batch=1)
    dyn = dynamic_cache(model)
    _prefill(model, dyn, ids, mask)
    with pytest.raises(ValueError, match="budget needs the prompt's last queries"):
        PackedCache(model, PackConfig(budget=0.25, **SMALL)).ingest(dyn)


def test_first_components_equal_a_lower_rank_encoding():
    from attentionpack.budget.candidates import first_components as _first_components
    from attentionpack.codecs import spectrum_and_basis
    from attentionpack.parts import Factors, QuantizedLowRankPart

    x = torch.randn(2, 300, 48)
    _, vecs = spectrum_and_basis(x)
    f = Factors((x.double() @ vecs[:, :, :40]).float(), vecs[:, :, :40].transpose(1, 2).float().contiguous())
    full = QuantizedLowRankPart.from_factors(f, 3, None, (), coeff_bits=4, basis_bits=16)
    cut = _first_components(full, 17, (17, 17))
    low = QuantizedLowRankPart.from_factors(
        Factors(f.coeffs[:, :, :17].contiguous(), f.basis[:, :17].contiguous()),
        3,
        None,
        (17, 17),
        coeff_bits=4,
        basis_bits=16,
    )
    assert torch.equal(cut.materialize(0, 300, None), low.materialize(0, 300, None))
    assert [t.shape for t in cut.tensors()] == [t.shape for t in low.tensors()]
    assert sum(t.untyped_storage().nbytes() for t in cut.tensors()) == sum(
        t.untyped_storage().nbytes() for t in low.tensors()
    )


def test_candidate_mixes_equal_each_candidates_own_mix():
    """The planner mixes the low-rank value candidates through one product with the shared coefficients; each
    equals that candidate's own mix (and the quantized ones are the kernels' mixes)."""
    from attentionpack.budget.candidates import VALUE_CANDIDATES, candidate_mixes, encode_candidates
    from attentionpack.kernels import ops

    g = torch.Generator().manual_seed(3)
    v = torch.randn(2, 3, 400, 64, generator=g)  # (B, H, T, d): long enough for low-rank candidates
    values = encode_candidates(v, False, VALUE_CANDIDATES, PackConfig())
    assert sum(label.startswith("lr") for label, _ in values) >= 2
    p = torch.softmax(torch.randn(2, 3, 5, 400, generator=g), -1)
    mixes = candidate_mixes(values, p)
    assert set(mixes) == {label for label, _ in values if label != "exact"}
    for label, part in values:
        if label != "exact":
            torch.testing.assert_close(mixes[label], ops.mix(part, p).float(), atol=1e-5, rtol=1e-5)


def test_candidate_scores_equal_each_candidates_own_scores():
    """The planner scores the low-rank key candidates of one width component by component over one projection of
    the queries; each candidate's logits equal its own (`ops.scores`), every candidate but exact once, in any
    order of ranks (with distinct ranks, so a family that reused one candidate's logits for the next fails), in
    chunks of any size (a family split between chunks restarts from component 0)."""
    from attentionpack.budget.candidates import KEY_CANDIDATES, candidate_scores, encode_candidates
    from attentionpack.kernels import ops

    g = torch.Generator().manual_seed(4)
    k = torch.randn(2, 3, 400, 32, generator=g) * torch.linspace(3, 0.1, 32)  # (B, H, T, d): a decaying spectrum
    keys = encode_candidates(k, True, KEY_CANDIDATES, PackConfig())
    ranks = [part.coeffs.shape[2] for label, part in keys if label.startswith("lr")]
    assert len(set(ranks)) >= 3, ranks
    q = torch.randn(2, 3, 7, 32, generator=g)
    parts = dict(keys)
    for block in (1, 2, 4, len(keys)):  # chunks that split a family, and one chunk for all
        scored = [  # each chunk copied: the next one reuses its buffer
            (label, logits[:, :, i].clone())
            for labels, logits in candidate_scores(keys[::-1], q, 0, 400, block)
            for i, label in enumerate(labels)
        ]
        assert sorted(label for label, _ in scored) == sorted(label for label, _ in keys if label != "exact")
        for label, logits in scored:
            want = ops.scores(parts[label], q, 0, 400, None).float()
            torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)


def test_budget_config_names():
    from attentionpack.eval.configs import parse_config

    spec = parse_config("budget-0.125")
    assert spec.name == "budget-0.125" and spec.ours and spec.pack.budget == 0.125
    for bad in ("budget-0", "budget-1.5", "budget-1.2.3"):
        with pytest.raises(ValueError, match="budget must be a fraction"):
            parse_config(bad)


def test_shared_needle_prefill_prefills_a_budget_cache_itself(tiny_model):
    from attentionpack.eval.needle import greedy_answers_shared

    model = tiny_model("llama")
    ids, _ = padded_batch(300, pad=0, batch=1)
    context, question = ids[0, :280].tolist(), ids[0, 280:].tolist()
    made = []

    def budgeted():
        made.append(PackedCache(model, PackConfig(budget=0.3, **SMALL)))
        return made[-1]

    out = greedy_answers_shared(model, context, question, {"budget": budgeted, "dynamic": None}, max_new_tokens=4)
    assert len(out["budget"][0]) == 4 and len(out["dynamic"][0]) == 4
    assert made[0].nbytes() > 0 and any(layer.budget_choice for layer in made[0].layers)


def test_errors_match_the_attention_output_error(tiny_model):
    """The planner's value error of a span is attention_output_error² of the window queries, computed apart."""
    from attentionpack.budget.candidates import WIDE_GROUP
    from attentionpack.budget.planner import QUERIES
    from attentionpack.models.registry import ModelAdapter
    from attentionpack.parts import QuantizedPart
    from attentionpack.scoring.observation import attention_output_error, attention_scaling, window_queries

    model = tiny_model("llama")
    ids, mask = padded_batch(300, pad=0, batch=1)
    cfg = PackConfig(budget=0.3, layer_weights=False, **SMALL)  # the raw error (weights: test_layer_weights.py)
    cache = PackedCache(model, cfg)
    _prefill(model, cache, ids, mask)
    attn = ModelAdapter(model).attention_modules[1]
    seen = {}
    handle = attn.register_forward_pre_hook(
        lambda m, a, k: seen.update(q=window_queries(m, k["hidden_states"], k["position_embeddings"], QUERIES)),
        with_kwargs=True,
    )
    dyn = dynamic_cache(model)
    try:
        _prefill(model, dyn, ids, mask)
    finally:
        handle.remove()
    keys, values = dyn.layers[1].keys, dyn.layers[1].values  # (1, H, 300, d)
    (layer, start), report = next((k, r) for k, r in cache.planner.report.items() if k[0] == 1)
    end = 300 - cfg.window
    errors = dict((label, err) for label, _, err in report["values"])
    assert errors["exact"] == 0 and 0 < errors["q8"] < errors["q4"] < errors["q2"]
    v_hat = values.clone()
    v_hat[:, :, start:end] = QuantizedPart.values(values[:, :, start:end], 4, cfg.quant_group).materialize(0, 0, None)
    valid = torch.ones(1, 300, dtype=torch.bool)
    ref = attention_output_error(seen["q"], keys, values, keys, v_hat, valid, scaling=attention_scaling(attn))
    assert errors["q4"] == pytest.approx(float(ref) ** 2, rel=1e-3)
    key_errors = dict((label, err) for label, _, err in report["keys"])
    k_hat = keys.clone()
    k_hat[:, :, start:end] = QuantizedPart.keys(keys[:, :, start:end], 2, cfg.quant_group).materialize(0, 0, None)
    ref = attention_output_error(seen["q"], keys, values, k_hat, values, valid, scaling=attention_scaling(attn))
    assert key_errors["q2"] == pytest.approx(float(ref) ** 2, rel=1e-3)
    k_hat[:, :, start:end] = QuantizedPart.keys(keys[:, :, start:end], 2, WIDE_GROUP).materialize(0, 0, None)
    ref = attention_output_error(seen["q"], keys, values, k_hat, values, valid, scaling=attention_scaling(attn))
    assert key_errors["q2g128"] == pytest.approx(float(ref) ** 2, rel=1e-3)  # a wider group: a candidate of its own
    # low-rank keys (scored as one family, component by component): each the error of its own stored keys
    from attentionpack.budget.candidates import KEY_CANDIDATES, encode_candidates

    parts = dict(encode_candidates(keys[:, :, start:end], True, KEY_CANDIDATES, cfg))
    assert {"lr0.98c4", "lr0.8c4"} <= set(parts) and set(parts) == set(key_errors)
    for label in ("lr0.98c4", "lr0.8c4"):
        k_hat[:, :, start:end] = parts[label].materialize(start, end, None)
        ref = attention_output_error(seen["q"], keys, values, k_hat, values, valid, scaling=attention_scaling(attn))
        assert key_errors[label] == pytest.approx(float(ref) ** 2, rel=1e-3)
    # the recent window is a candidate span too: its key error, from the softmax's span share only, is the same
    window = cache.planner.report[1, end]
    assert window["keys"][0][0] == "exact"
    # shorter than H*d: quantization candidates only; no wider groups than quant_group along its tokens either
    assert cfg.window <= cfg.quant_group and {label for label, _, _ in window["keys"]} == {"exact", "q8", "q4", "q2"}
    k_hat = keys.clone()
    k_hat[:, :, end:] = QuantizedPart.keys(keys[:, :, end:], 4, cfg.quant_group).materialize(0, 0, None)
    ref = attention_output_error(seen["q"], keys, values, k_hat, values, valid, scaling=attention_scaling(attn))
    assert dict((label, err) for label, _, err in window["keys"])["q4"] == pytest.approx(float(ref) ** 2, rel=1e-3)


def test_the_recent_window_is_weighed_by_the_budget(tiny_model):
    """A loose budget keeps the prompt's window exact; a tight one encodes it rather than starve older tokens.
    Decode chunks follow the layer's longest span, not its window."""
    model = tiny_model("llama")
    ids, mask = padded_batch(300, pad=0, batch=1)
    kinds = {}
    for fraction in (1.0, 0.15):
        cache = PackedCache(model, PackConfig(budget=fraction, window=48, min_span=16))
        _prefill(model, cache, ids, mask)
        assert cache.nbytes() <= fraction * cache.dynamic_nbytes()
        layer = cache.layers[0]
        assert layer.tail_length == 0 and layer.segments[-1].kind == "window"
        assert (layer.segments[-1].start, layer.segments[-1].end) == (252, 300)
        kinds[fraction] = [type(layer.segments[-1].keys).__name__ for layer in cache.layers]
        span = cache.planner.report[0, 4]["choice"]
        assert layer.budget_choice == span
    assert set(kinds[1.0]) == {"ExactPart"}
    assert "ExactPart" not in set(kinds[0.15])
