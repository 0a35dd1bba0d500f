"""Continuous batching: greedy tokens of sequences decoded together in one forward per step equal the tokens of
the same sequences decoded alone, for DynamicCache and PackedCache configurations, on every supported tiny
architecture (Llama, Qwen2/3, sliding-window Qwen2 and Mistral, Gemma 3 with sliding layers) and on the embedded
SmolLM2-135M (lossless, balanced, budget=1/8)."""

from __future__ import annotations

import pytest
import tiny_models
import torch
from transformers import DynamicCache

from attentionpack import PackConfig, PackedCache
from attentionpack.attention.packed import enable
from attentionpack.serve import batch_cache
from attentionpack.serve.batch_cache import RowsView, SequenceBatchCache, layer_windows
from attentionpack.serve.engine import Engine
from attentionpack.serve.sequence import SamplingParams, generate

SMALL = dict(window=16, chunk=16, min_span=8)
CONFIGS = {
    "dynamic": "dynamic",
    "lossless": PackConfig.preset("lossless"),
    "balanced": PackConfig.preset("balanced").replace(**SMALL),
    "max_sliding_too": PackConfig.preset("max").replace(**SMALL, compress_sliding_layers=True),
    "budget": PackConfig.preset("balanced").replace(
        **SMALL, budget=0.7, budget_strict=True
    ),  # tiny Gemma: 0.5 of its decoding size is infeasible
}


def _make(model, spec):
    return DynamicCache(config=model.config) if spec == "dynamic" else PackedCache(model, spec)


def _solo(model, spec, prompt: list[int], steps: int) -> list[int]:
    cache, out = _make(model, spec), []
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True).logits[0, -1]
        for _ in range(steps):
            out.append(int(logits.argmax()))
            logits = model(input_ids=torch.tensor([[out[-1]]]), past_key_values=cache, use_cache=True).logits[0, -1]
    return out


@pytest.mark.parametrize("name", tiny_models.MODEL_NAMES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_batched_rows_equal_solo_decoding(name, config, monkeypatch):
    """SequenceBatchCache directly: 3 prompts of different lengths, 40 greedy steps; the rows over stored pieces
    attend in one call (`attend_many`)."""
    _check_batched_rows(name, config, False, monkeypatch)


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_rows_attend_one_by_one_when_the_shared_call_fails(name, monkeypatch):
    """When the one call for every row raises, each row attends on its own: the same tokens, no failed row."""
    _check_batched_rows(name, "budget", True, monkeypatch)


def _check_batched_rows(name, config, together_fails, monkeypatch):
    model = tiny_models.build_model(name)
    enable(model)
    spec = CONFIGS[config]
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, tiny_models.VOCAB, (n,), generator=gen).tolist() for n in (90, 57, 120)]
    alone = [_solo(model, spec, p, 40) for p in prompts]

    views = []
    original_row, original_many = RowsView._attend_row, batch_cache.attend_many

    def many(steps, scaling, softcap):
        if together_fails:
            raise RuntimeError("one call for every row failed")
        views.extend(True for _ in steps)
        return original_many(steps, scaling, softcap)

    def row(self, q, k, v, scaling, softcap):
        views.append(not isinstance(k, torch.Tensor))
        return original_row(self, q, k, v, scaling, softcap)

    monkeypatch.setattr(batch_cache, "attend_many", many)
    monkeypatch.setattr(RowsView, "_attend_row", row)
    caches, tokens = [], []
    with torch.no_grad():
        for p in prompts:
            cache = _make(model, spec)
            tokens.append(int(model(input_ids=torch.tensor([p]), past_key_values=cache).logits[0, -1].argmax()))
            caches.append(cache)
        together = [[t] for t in tokens]
        windows = layer_windows(model)
        for _ in range(39):
            batch = SequenceBatchCache(caches, windows)
            pos = torch.tensor([[c.get_seq_length()] for c in caches])
            logits = model(input_ids=torch.tensor(tokens)[:, None], position_ids=pos, past_key_values=batch).logits
            assert not batch.failed
            tokens = logits[:, -1].argmax(-1).tolist()
            for seq, t in zip(together, tokens):
                seq.append(t)
    assert together == alone
    compressed = config not in ("dynamic", "lossless")
    assert any(views) == compressed  # compressed rows were attended on their stored form (PackedView)


@pytest.mark.parametrize("config", ["dynamic", "balanced", "budget"])
def test_engine_concurrent_equals_alone_tiny(config):
    model = tiny_models.build_model("gemma3_text")
    engine = Engine(model, CONFIGS[config], kv_memory=64 << 20).start()
    try:
        gen = torch.Generator().manual_seed(2)
        prompts = [torch.randint(3, tiny_models.VOCAB, (n,), generator=gen).tolist() for n in (80, 33, 140, 61)]
        params = SamplingParams(max_tokens=30, temperature=0)
        alone = [generate(engine, [p], params)[0] for p in prompts]
        assert engine.snapshot()["max_running"] == 1
        together = generate(engine, prompts, params)
        assert engine.snapshot()["max_running"] == len(prompts)
        assert together == alone
        assert engine.snapshot()["exact_fallbacks"] == 0
    finally:
        engine.stop()


@pytest.mark.real_model
@pytest.mark.parametrize("config", ["lossless", "balanced", "budget=1/8"])
def test_engine_concurrent_equals_alone_smollm2(real_model, config):
    """The embedded model, 3 Britannica prompts of 300-700 tokens, 16 greedy tokens each: served together (one
    forward per step for all) they give exactly the tokens each gives alone."""
    from attentionpack.eval.data import britannica_text, token_ids

    model, tokenizer = real_model
    spec = (
        PackConfig.preset("balanced").replace(budget=0.125, budget_strict=True)
        if config.startswith("budget")
        else PackConfig.preset(config)
    )
    ids = token_ids(tokenizer, britannica_text(), 2000).tolist()
    prompts = [ids[0:700], ids[700:1000], ids[1000:1500]]
    engine = Engine(model, spec, kv_memory=1 << 30).start()
    try:
        params = SamplingParams(max_tokens=16, temperature=0)
        alone = [generate(engine, [p], params)[0] for p in prompts]
        together = generate(engine, prompts, params)
        snap = engine.snapshot()
    finally:
        engine.stop()
    assert snap["max_running"] == len(prompts) and snap["exact_fallbacks"] == 0
    assert snap["reservation_violations"] == 0
    assert together == alone
