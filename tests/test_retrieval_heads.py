"""Retrieval heads: probe scores against eager attention, choice, persistence, fingerprints."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import tiny_models
import torch

from attentionpack.scoring import retrieval_heads as rh

LENGTH = 24


@pytest.mark.parametrize("name", ["llama", "gemma3_text", "qwen2_sliding"])
def test_scores_match_eager_attention(name):
    model = tiny_models.build_model(name)
    model.set_attn_implementation("eager")
    seeds = (0, 1)
    induction, echo = rh.probe_scores(model, LENGTH, seeds)
    n_layers, h = model.config.num_hidden_layers, model.config.num_key_value_heads
    assert induction.shape == echo.shape == (n_layers, h)
    ids = torch.stack([rh.probe_tokens(model.config, LENGTH, s) for s in seeds])
    assert ids.shape == (2, 1 + 2 * LENGTH) and (ids[:, 1 : 1 + LENGTH] == ids[:, 1 + LENGTH :]).all()
    with torch.no_grad():
        att = model(input_ids=ids, output_attentions=True).attentions  # L x (B, Hq, T, T)
    g = model.config.num_attention_heads // h
    j = torch.arange(LENGTH)
    for layer in range(n_layers):
        rows = att[layer][:, :, 1 + LENGTH + j]  # (B, Hq, LENGTH, T)
        ind = rows[:, :, j, 1 + j + 1].mean((0, 2)).view(h, g).amax(-1)
        ech = rows[:, :, j, 1 + j].mean((0, 2)).view(h, g).amax(-1)
        np.testing.assert_allclose(induction[layer], ind.double().numpy(), atol=2e-6)
        np.testing.assert_allclose(echo[layer], ech.double().numpy(), atol=2e-6)


def test_choice_determinism_and_fraction(tiny_model):
    model = tiny_model("qwen2_sliding")  # 4 layers x 2 KV heads
    a = rh.find_retrieval_heads(model, fraction=0.25, length=LENGTH, seeds=(0, 1))
    b = rh.find_retrieval_heads(model, fraction=0.25, length=LENGTH, seeds=(0, 1))
    np.testing.assert_array_equal(a.induction, b.induction)
    assert a.chosen == b.chosen and len(a.chosen) == 2 and a.fingerprint == b.fingerprint
    scores = a.scores
    worst_chosen = min(scores[layer, h] for layer, h in a.chosen)
    assert all(scores[layer, h] <= worst_chosen for layer in range(4) for h in range(2) if (layer, h) not in a.chosen)
    assert a.mask().sum() == 2 and a.top(1)[0][:2] in a.chosen
    assert len(a.with_fraction(0.0).chosen) == 0 and len(a.with_fraction(1.0).chosen) == 8
    assert len(a.with_fraction(0.3).chosen) == 3  # ceil(0.3 * 8)
    c = rh.find_retrieval_heads(model, fraction=0.25, length=LENGTH, seeds=(5,))
    assert not np.array_equal(a.induction, c.induction)
    with pytest.raises(ValueError, match="fraction="):
        rh.find_retrieval_heads(model, fraction=1.5)
    with pytest.raises(ValueError, match="length="):
        rh.probe_scores(model, length=2)
    with pytest.raises(ValueError, match="seeds="):
        rh.probe_scores(model, seeds=())


def test_fingerprint_follows_weights(tiny_model):
    model = tiny_model("llama")
    other = copy.deepcopy(model)
    assert rh.model_fingerprint(model) == rh.model_fingerprint(other)
    with torch.no_grad():
        other.model.layers[1].self_attn.q_proj.weight[0, 0] += 1.0
    assert rh.model_fingerprint(model) != rh.model_fingerprint(other)


def test_persistence_in_user_cache(tiny_model, cache_root, monkeypatch):
    model = tiny_model("llama")
    first = rh.load_or_find(model, fraction=0.5, length=LENGTH, seeds=(0,))
    path = rh.heads_path(model, length=LENGTH, seeds=(0,))
    assert path.parent == cache_root / "heads" and path.is_file()
    assert json.loads(path.read_text())["chosen"] == sorted(list(p) for p in first.chosen)

    def no_probe(*a, **k):
        raise AssertionError("probed although a valid file exists")

    monkeypatch.setattr(rh, "probe_scores", no_probe)
    again = rh.load_or_find(model, fraction=0.5, length=LENGTH, seeds=(0,))
    np.testing.assert_array_equal(again.induction, first.induction)
    assert again.chosen == first.chosen
    assert len(rh.load_or_find(model, fraction=0.25, length=LENGTH, seeds=(0,)).chosen) == 1  # re-chosen
    monkeypatch.undo()
    monkeypatch.setenv("ATTENTIONPACK_CACHE", str(cache_root))
    # another probe setting has its own file; both stay valid
    other = rh.load_or_find(model, fraction=0.5, length=LENGTH, seeds=(1,))
    assert other.probe["seeds"] == [1] and len(list(path.parent.glob("*.json"))) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rh.load_or_find(model, fraction=0.5, length=LENGTH, seeds=(0,))


@pytest.mark.parametrize("damage", ["{not json", json.dumps({"format": 1}), "", json.dumps({"format": 99})])
def test_corrupt_file_is_recomputed_with_warning(tiny_model, cache_root, damage):
    model = tiny_model("llama")
    good = rh.load_or_find(model, fraction=0.5, length=LENGTH, seeds=(0,))
    path = rh.heads_path(model, length=LENGTH, seeds=(0,))
    path.write_text(damage)
    with pytest.warns(UserWarning, match="unusable"):
        fixed = rh.load_or_find(model, fraction=0.5, length=LENGTH, seeds=(0,))
    assert fixed.chosen == good.chosen
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rh.load_or_find(model, fraction=0.5, length=LENGTH, seeds=(0,))  # the file was rewritten
    with pytest.raises(ValueError, match="not a valid retrieval-heads file"):
        rh.RetrievalHeads.from_json(damage)


def test_beside_model_folder(tiny_model, tmp_path, cache_root):
    model = copy.deepcopy(tiny_model("llama"))
    with pytest.raises(ValueError, match="not a local folder"):
        rh.load_or_find(model, length=LENGTH, seeds=(0,), beside_model=True)
    model.name_or_path = str(tmp_path)
    heads = rh.load_or_find(model, fraction=0.5, length=LENGTH, seeds=(0,), beside_model=True)
    files = list(tmp_path.glob("attentionpack-heads-*.json"))
    assert len(files) == 1 and not (cache_root / "heads").exists()
    assert rh.RetrievalHeads.from_json(files[0].read_text()).chosen == heads.chosen


@pytest.mark.real_model
def test_real_model_retrieval_heads(real_model, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTIONPACK_CACHE", str(tmp_path))
    model, _ = real_model
    heads = rh.load_or_find(model, fraction=0.15, length=256, seeds=(0, 1))
    assert heads.scores.shape == (30, 3) and len(heads.chosen) == 14
    print("\nlayer head induction echo")
    for layer, head, ind, ech in heads.top(14):
        print(f"{layer:5d} {head:4d} {ind:9.3f} {ech:5.3f}")
    # SmolLM2 copies: its best heads put most of their attention on the induction target
    assert heads.top(1)[0][2] > 0.3
    assert heads.scores.mean() < 0.5 * heads.top(1)[0][2]


@pytest.mark.parametrize("cut", ["layer", "head"])
def test_right_fingerprint_wrong_shape_is_recomputed(tiny_model, cache_root, cut):
    """A file with this model's fingerprint and probe but scores of another shape (edited, or written by a buggy
    version) is rejected and probed again, not used."""
    model = tiny_model("llama")
    good = rh.load_or_find(model, fraction=0.5, length=LENGTH, seeds=(0,))
    path = rh.heads_path(model, length=LENGTH, seeds=(0,))
    data = json.loads(path.read_text())
    for key in ("induction", "echo"):
        data[key] = data[key][:-1] if cut == "layer" else [row[:-1] for row in data[key]]
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="unusable.*scores are"):
        fixed = rh.load_or_find(model, fraction=0.5, length=LENGTH, seeds=(0,))
    assert fixed.scores.shape == good.scores.shape == rh.expected_shape(model)
    assert fixed.chosen == good.chosen
