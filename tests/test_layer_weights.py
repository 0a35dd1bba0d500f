"""Layer sensitivity (scoring/sensitivity.py) and the budget's per-layer error weights (PackConfig.layer_weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import padded_batch

from attentionpack import PackConfig, PackedCache
from attentionpack.scoring import sensitivity as S

SMALL = dict(window=16, min_span=16)
FAST = dict(length=64, last=16)  # a short probe: code paths on tiny random models


def test_probe_is_deterministic_and_sees_every_layer(tiny_model):
    model = tiny_model("llama")
    a, b = S.probe_sensitivity(model, **FAST), S.probe_sensitivity(model, **FAST)
    assert a.kl.shape == (len(model.model.layers),) and np.isfinite(a.kl).all() and (a.kl > 0).all()
    np.testing.assert_array_equal(a.kl, b.kl)
    np.testing.assert_allclose(a.weights(), np.sqrt(a.kl / a.kl.mean()))
    more = S.probe_sensitivity(model, **FAST, eps=0.04)  # 4x the noise energy: about 4x the KL (small noise)
    assert (more.kl > 2 * a.kl).all()
    flat = S.LayerSensitivity(np.zeros(3), {}, "x")
    np.testing.assert_array_equal(flat.weights(), np.ones(3))
    with pytest.raises(ValueError, match=r"last=.*must be in \[1, length"):
        S.probe_sensitivity(model, length=16, last=16)


def test_file_is_kept_and_a_damaged_or_foreign_file_is_probed_again(tiny_model, cache_root, monkeypatch):
    model = tiny_model("llama")
    first = S.load_or_probe_sensitivity(model, **FAST)
    files = list((cache_root / "sensitivity").glob("*.json"))
    assert len(files) == 1
    calls = []
    real = S.probe_sensitivity
    monkeypatch.setattr(S, "probe_sensitivity", lambda *a, **k: calls.append(1) or real(*a, **k))
    np.testing.assert_array_equal(S.load_or_probe_sensitivity(model, **FAST).kl, first.kl)
    assert not calls  # read from the file
    data = json.loads(files[0].read_text())
    for damage in (
        b"\x00garbage",
        json.dumps({**data, "kl": [1.0]}).encode(),
        json.dumps({**data, "kl": [-1] * len(data["kl"])}).encode(),
        json.dumps({**data, "fingerprint": "another model"}).encode(),
    ):
        files[0].write_bytes(damage)
        with pytest.warns(UserWarning, match="layer-sensitivity file .* is unusable"):
            again = S.load_or_probe_sensitivity(model, **FAST)
        np.testing.assert_array_equal(again.kl, first.kl)
    assert len(calls) == 4
    assert json.loads(files[0].read_text()) == data  # rewritten whole


def test_budget_errors_are_weighted_per_layer(tiny_model, cache_root, monkeypatch):
    """Every judged error of layer l is the unweighted one times weight l; a layer weighed far above the others
    gets an encoding at least as faithful as without weights."""
    model = tiny_model("llama")
    layers = len(model.model.layers)
    weights = np.ones(layers)
    weights[0] = 1000.0
    fake = S.LayerSensitivity(weights**2, {}, "x")  # weights() = sqrt(kl / mean): proportional to `weights`
    monkeypatch.setattr("attentionpack.cache.packed_cache.load_or_probe_sensitivity", lambda model: fake)
    ids, mask = padded_batch(300, pad=7)
    reports = {}
    for on in (False, True):
        cache = PackedCache(model, PackConfig(budget=0.3, layer_weights=on, **SMALL))
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        assert cache.nbytes() <= 0.3 * cache.dynamic_nbytes()
        reports[on] = cache.planner.report
    scale = fake.weights()
    for (layer, start), row in reports[True].items():
        plain = reports[False][layer, start]
        for kind in ("keys", "values"):
            for (label, nb, err), (label0, nb0, err0) in zip(row[kind], plain[kind], strict=True):
                assert (label, nb) == (label0, nb0)
                assert err == pytest.approx(err0 * scale[layer], rel=1e-6, abs=1e-12)

    def chosen_error(report, layer):  # unweighted error of what layer `layer` got
        plain = reports[False]
        return sum(
            next(e for lab, _, e in plain[key][kind] if lab == row["choice"][i])
            for key, row in report.items()
            if key[0] == layer
            for i, kind in enumerate(("keys", "values"))
        )

    assert chosen_error(reports[True], 0) <= chosen_error(reports[False], 0)
    assert chosen_error(reports[False], 0) > 0  # the plain budget did compress layer 0


def test_a_model_without_o_proj_is_refused_with_the_fix(tiny_model, monkeypatch):
    model = tiny_model("llama")
    monkeypatch.delattr(model.model.layers[1].self_attn, "o_proj")  # put back after the test
    with pytest.raises(ValueError, match=r"layer 1's attention .* has no o_proj.*layer_weights=False"):
        S.probe_sensitivity(model, **FAST)
