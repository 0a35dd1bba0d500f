"""Sliding-window layers free the out-of-window tokens of a segment they still hold in part (parts/trim.py): every
stored form drops its oldest tokens (whole groups where it is quantized along the tokens) into new tensors that
rebuild the same remaining tokens; a decoding run gives the same logits with fewer bytes."""

from __future__ import annotations

import pytest
import torch
from helpers import storage_bytes
from tiny_models import VOCAB, build_model

from attentionpack import PackConfig, PackedCache
from attentionpack.cache import layer as layer_module
from attentionpack.parts import ExactPart, Factors, LowRankPart, QuantizedLowRankPart, QuantizedPart
from attentionpack.parts.trim import drop_front, front_granule

B, H, T, D = 2, 3, 40, 16


def _forms(gen: torch.Generator) -> dict[str, object]:
    x = torch.randn(B, H, T, D, generator=gen)
    coeffs, basis = torch.randn(B, T, 7, generator=gen), torch.randn(B, 7, H * D, generator=gen)
    return {
        "exact": ExactPart(x.clone()),
        "keys2": QuantizedPart.keys(x, 2, 8),
        "keys4": QuantizedPart.keys(x, 4, 8),
        "keys8": QuantizedPart.keys(x, 8, 8),
        "keys4-ragged": QuantizedPart.keys(x[:, :, :37], 4, 8),  # a last group padded
        "values2": QuantizedPart.values(x, 2, 8),
        "factors": LowRankPart(Factors(coeffs, basis), H),
        "factors4": QuantizedLowRankPart.from_factors(Factors(coeffs, basis), H, coeff_bits=4, coeff_group=8),
        "factors8": QuantizedLowRankPart.from_factors(Factors(coeffs, basis), H, coeff_bits=8, coeff_group=8),
    }


@pytest.mark.parametrize("form", list(_forms(torch.Generator().manual_seed(0))))
def test_dropping_the_oldest_tokens_keeps_the_rest(form):
    part = _forms(torch.Generator().manual_seed(0))[form]
    granule = front_granule(part)  # type: ignore[arg-type]
    assert granule == (8 if form.startswith(("keys", "factors4", "factors8")) else 1)
    whole = part.materialize(0, T, None)  # type: ignore[attr-defined]
    n = 16
    cut = drop_front(part, n)  # type: ignore[arg-type]
    got = cut.materialize(n, T, None)
    assert got.shape == (B, H, whole.shape[2] - n, D)
    torch.testing.assert_close(got, whole[:, :, n:], atol=1e-6, rtol=1e-6)
    assert storage_bytes(cut.tensors()) < storage_bytes(part.tensors())  # type: ignore[attr-defined]
    if granule > 1:
        with pytest.raises(ValueError, match="multiple of the group size"):
            drop_front(part, n + 1)  # type: ignore[arg-type]


@torch.inference_mode()
def _decode(model, config: PackConfig, steps: int) -> tuple[PackedCache, list[torch.Tensor], list[int]]:
    ids = torch.randint(0, VOCAB, (2, 200 + steps), generator=torch.Generator().manual_seed(5))
    cache = PackedCache(model, config)
    model(input_ids=ids[:, :200], past_key_values=cache, use_cache=True, logits_to_keep=1)
    logits, held = [], []
    for i in range(200, 200 + steps):
        logits.append(model(input_ids=ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits)
        held.append(cache.nbytes())
    return cache, logits, held


@pytest.mark.parametrize(
    "fields",
    [
        dict(key_codec="quant", key_bits=4, value_codec="quant", value_bits=4, quant_group=8),
        dict(key_codec="lowrank", key_rank=4, key_bits=4, key_pre_rope=False, value_rank=4, quant_group=8),
    ],
    ids=["quant", "factors"],
)
def test_sliding_layers_free_out_of_window_tokens(monkeypatch, fields):
    model = build_model("gemma3_text")  # layers 0 and 2 slide over 16 tokens
    config = PackConfig(**fields, sink=0, window=4, chunk=8, min_span=4)
    monkeypatch.setattr(layer_module, "TRIM_MIN", 10**9)
    whole, whole_logits, whole_held = _decode(model, config, 24)
    monkeypatch.setattr(layer_module, "TRIM_MIN", 8)
    cut, cut_logits, cut_held = _decode(model, config, 24)
    for a, b in zip(cut_logits, whole_logits, strict=True):  # masked tokens weigh nothing: the same attention
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert all(c <= w for c, w in zip(cut_held, whole_held, strict=True)) and cut_held != whole_held
    for a, b in zip(cut.layers, whole.layers, strict=True):
        if a.is_sliding:
            assert a.first_index >= b.first_index
            assert a.first_index >= a.total - (model.config.sliding_window - 1) - 7  # within a group of 8
        else:
            assert a.first_index == b.first_index


def test_generate_with_padding_aligns_every_sliding_layers_mask(monkeypatch):
    """`generate` with a padded batch builds one sliding mask from the first sliding layer; a layer that trimmed
    at another point reads it aligned to the newest token: the same tokens and logits as without trimming."""
    from helpers import greedy, padded_batch
    from transformers import LogitsProcessor

    model = build_model("gemma3_text")  # layers 0 and 2 slide over 16 tokens
    config = PackConfig(
        key_codec="quant",
        key_bits=4,
        value_codec="quant",
        value_bits=4,
        quant_group=8,
        sink=0,
        window=4,
        chunk=8,
        min_span=4,
    )
    ids, mask = padded_batch(60, pad=5, seed=3)
    drop = layer_module.PackedLayer._drop_outside_window

    def only_layer_0_trims(self):  # the two sliding layers then hold different oldest tokens
        keep = layer_module.TRIM_MIN
        if self.layer_idx != 0:
            layer_module.TRIM_MIN = 10**9
        try:
            drop(self)
        finally:
            layer_module.TRIM_MIN = keep

    class Firsts(LogitsProcessor):  # after every forward call: each sliding layer's oldest held token
        def __init__(self, cache):
            self.cache, self.seen = cache, []

        def __call__(self, input_ids, scores):
            self.seen.append(tuple(x.first_index for x in self.cache.layers if x.is_sliding))
            return scores

    monkeypatch.setattr(layer_module.PackedLayer, "_drop_outside_window", only_layer_0_trims)
    runs = {}
    for trim in (10**9, 8):
        monkeypatch.setattr(layer_module, "TRIM_MIN", trim)
        cache = PackedCache(model, config)
        firsts = Firsts(cache)
        runs[trim] = greedy(model, cache, ids, mask, new_tokens=40, recorder=firsts), firsts.seen
    (whole, _), (cut, seen) = runs[10**9], runs[8]
    assert any(a > b for a, b in seen), seen  # the first sliding layer (the mask's sizes) held fewer tokens
    assert torch.equal(whole.sequences, cut.sequences)
    for a, b in zip(whole.logits, cut.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
