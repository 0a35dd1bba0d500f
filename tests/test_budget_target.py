"""Target budgets (`PackConfig.budget_strict=False`, the `balanced` and `max` presets): the cache holds f x
DynamicCache's bytes, or what its codec fields would hold when that is more (short prompts), chosen by the
budget's errors; prompts a budget cannot serve (image/video tokens, `ingest`) use the codec fields; never raises
where a strict budget would."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_model
from transformers import DynamicCache

from attentionpack import BudgetError, PackConfig, PackedCache

SMALL = dict(window=8, chunk=16, min_span=8, key_max_rank_fraction=0.25, value_max_rank_fraction=0.25)


def _prefill(model, config, n: int, seed: int = 0) -> PackedCache:
    ids = torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))
    cache = PackedCache(model, config)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    return cache


def test_presets_are_targets_with_their_codec_fields_behind():
    for name, fraction in (("balanced", 0.2), ("max", 0.15)):
        cfg = PackConfig.preset(name)
        assert cfg.budget == fraction and cfg.budget_strict is False
        assert cfg.key_codec == "lowrank" and cfg.value_codec == "quant"  # what image/video tokens get
        assert cfg.replace(budget=None).budget is None  # the fixed settings stay reachable


def test_a_target_too_small_for_a_short_prompt_holds_what_the_codecs_would():
    model = build_model("llama")
    strict = PackConfig.preset("max").replace(**SMALL, budget=0.05, budget_strict=True)
    with pytest.raises(BudgetError):
        _prefill(model, strict, 120)
    fixed = _prefill(model, PackConfig.preset("max").replace(**SMALL, budget=None), 120)
    target = _prefill(model, strict.replace(budget_strict=False), 120)
    # about the codec fields' bytes: the limit is the size of the candidates matching them (energy rule without
    # the fixed config's rank cap here: 5% more seen)
    assert target.nbytes() <= fixed.nbytes() * 1.1
    assert target.nbytes() < target.dynamic_nbytes()


def test_a_reachable_target_holds_at_most_f():
    model = build_model("llama")
    cfg = PackConfig.preset("balanced").replace(**SMALL, budget=0.5)
    cache = _prefill(model, cfg, 300)
    assert cache.nbytes() <= 0.5 * cache.dynamic_nbytes()


def test_ingest_under_a_target_uses_the_codec_fields():
    model = build_model("llama")
    ids = torch.randint(3, 128, (1, 200), generator=torch.Generator().manual_seed(2))
    source = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=source, use_cache=True)
    strict = PackConfig.preset("max").replace(**SMALL, budget_strict=True)
    with pytest.raises(ValueError, match="queries"):
        PackedCache(model, strict).ingest(source)
    cache = PackedCache(model, strict.replace(budget_strict=False)).ingest(source)
    fixed = PackedCache(model, strict.replace(budget=None, tail_dtype="float16")).ingest(source)  # a budget's tail
    assert cache.nbytes() == fixed.nbytes()  # the same stored forms as the fixed settings


def test_budget_strict_must_be_a_bool():
    with pytest.raises(ValueError, match="budget_strict"):
        PackConfig(budget=0.2, budget_strict="no")  # type: ignore[arg-type]
