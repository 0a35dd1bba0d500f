"""Observation-window importance against the attention probabilities transformers' eager attention returns."""

from __future__ import annotations

import pytest
import tiny_models
import torch
from helpers import padded_batch
from transformers import DynamicCache

from attentionpack.models.registry import ModelAdapter
from attentionpack.scoring.observation import attention_scaling, token_importance, window_attention, window_queries

WINDOW = 8


def _eager(name: str):
    model = tiny_models.build_model(name)
    model.set_attn_implementation("eager")
    return model


def _run(model, ids, mask):
    """Forward with captured attention inputs: per layer (hidden_states, (cos, sin)), keys, eager attentions."""
    captured = {}

    def hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        captured[module.layer_idx] = (hidden, kwargs["position_embeddings"])

    attn = ModelAdapter(model).attention_modules
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in attn]
    cache = DynamicCache()  # no config: every layer keeps all its keys (sliding ones too)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    try:
        with torch.no_grad():
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                past_key_values=cache,
                output_attentions=True,
                use_cache=True,
            )
    finally:
        for h in handles:
            h.remove()
    keys = [cache.layers[i].keys for i in range(len(attn))]
    return captured, keys, out.attentions, attn


def _importance(model, captured, keys, attn, layer, mask, **kw):
    hidden, pe = captured[layer]
    q = window_queries(attn[layer], hidden, pe, WINDOW)
    sw = ModelAdapter(model).layers[layer].sliding_window
    return token_importance(
        q, keys[layer], mask.bool(), scaling=attention_scaling(attn[layer]), sliding_window=sw, **kw
    )


@pytest.mark.parametrize("name", tiny_models.MODEL_NAMES)
def test_importance_is_sum_of_eager_attention(name):
    model = _eager(name)
    ids, mask = padded_batch(40, pad=6)
    captured, keys, attentions, attn = _run(model, ids, mask)
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    for layer in range(len(attn)):
        imp = _importance(model, captured, keys, attn, layer, mask)
        probs = attentions[layer][:, :, -WINDOW:, :].sum(2)  # (B, Hq, T)
        b, hq, t = probs.shape
        expected = probs.view(b, hq // groups, groups, t).mean(2)  # (B, H, T)
        torch.testing.assert_close(imp.per_head, expected, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(imp.per_token, expected.mean(1), atol=2e-5, rtol=1e-4)
        assert (imp.per_head[1, :, :6] == 0).all()  # padding scores 0
        summed = _importance(model, captured, keys, attn, layer, mask, group="sum").per_head
        torch.testing.assert_close(summed, expected * groups, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_batch_rows_rank_on_their_own(name):
    """A left-padded row scores exactly as the same sample alone, and the two rows rank tokens differently."""
    model = _eager(name)
    ids, mask = padded_batch(48, pad=10, seed=3)
    captured, keys, _, attn = _run(model, ids, mask)
    solo_ids, solo_mask = ids[1:, 10:], mask[1:, 10:]
    solo_captured, solo_keys, _, _ = _run(model, solo_ids, solo_mask)
    for layer in range(len(attn)):
        batch = _importance(model, captured, keys, attn, layer, mask)
        solo = _importance(model, solo_captured, solo_keys, attn, layer, solo_mask)
        torch.testing.assert_close(batch.per_head[1, :, 10:], solo.per_head[0], atol=2e-5, rtol=1e-4)
        common = slice(10, 48)
        top0 = set(batch.per_token[0, common].topk(8).indices.tolist())
        top1 = set(batch.per_token[1, common].topk(8).indices.tolist())
        assert top0 != top1


def test_pooling_and_window_validity():
    torch.manual_seed(1)
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 30, 16)
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, :7] = False
    raw = token_importance(q, k, valid).per_head
    pooled = token_importance(q, k, valid, pool_kernel=5).per_head
    expect = torch.nn.functional.max_pool1d(raw.view(4, 1, 30), 5, 1, 2).view(2, 2, 30) * valid.view(2, 1, 30)
    torch.testing.assert_close(pooled, expect)
    assert (pooled[1, :, :7] == 0).all() and (pooled >= raw).all()
    avg = token_importance(q, k, valid, pool_kernel=3, pool="avg").per_head
    torch.testing.assert_close(avg[0, :, 5], raw[0, :, 4:7].mean(-1))
    # each valid query row distributes one unit of probability (times G=2 query heads / 2 averaged)
    torch.testing.assert_close(raw.sum(-1), torch.full((2, 2), 5.0))
    wv = torch.tensor([[True] * 5, [False, False, True, True, True]])
    torch.testing.assert_close(
        token_importance(q, k, valid, window_valid=wv).per_head.sum(-1), torch.tensor([[5.0, 5.0], [3.0, 3.0]])
    )
    # per-head validity (evicted tokens of one head only)
    ph = valid.unsqueeze(1).repeat(1, 2, 1)
    ph[0, 1, 3] = False
    probs = window_attention(q, k, ph)
    assert (probs[0, 1, ..., 3] == 0).all() and (probs[0, 0, ..., 3] > 0).all()


def test_bad_inputs_are_named():
    q, k, valid = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 30, 16), torch.ones(1, 30, dtype=torch.bool)
    with pytest.raises(ValueError, match="pool_kernel"):
        token_importance(q, k, valid, pool_kernel=4)
    with pytest.raises(ValueError, match="pool="):
        token_importance(q, k, valid, pool="median")
    with pytest.raises(ValueError, match="multiple of H"):
        token_importance(torch.randn(1, 3, 5, 16), k, valid)
    with pytest.raises(ValueError, match="bool mask"):
        token_importance(q, k, valid.long())
    with pytest.raises(ValueError, match="longer than"):
        token_importance(torch.randn(1, 4, 31, 16), k, valid)
    with pytest.raises(ValueError, match="window="):
        window_queries(None, torch.randn(1, 30, 64), (torch.randn(1, 30, 16),) * 2, 0)
