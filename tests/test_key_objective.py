"""`key_objective="scores"`: low-rank keys factored to minimize the attention-score error under the prompt's own
queries (codecs.lowrank.score_weighting), instead of the keys' own error."""

from __future__ import annotations

import pytest
import torch
from helpers import dynamic_cache, greedy, padded_batch
from tiny_models import MODEL_NAMES

from attentionpack import PackConfig, PackedCache
from attentionpack.codecs import RankRule, factorize
from attentionpack.codecs.lowrank import score_weighting
from attentionpack.scoring.observation import query_moments

SCORES_FULL_RANK = PackConfig(
    key_rank_fraction=1.0,
    key_pre_rope=False,
    key_objective="scores",
    value_codec="exact",
    value_energy=None,
    fallback_exact=False,
    window=8,
    chunk=16,
    min_span=4,
)


def _score_error(x: torch.Tensor, xhat: torch.Tensor, queries: torch.Tensor, d: int) -> float:
    """Squared score error summed over heads: x, xhat (B, T, H*d), queries (B, H, n, d)."""
    err = 0.0
    for h in range(queries.shape[1]):
        e = (x - xhat)[..., h * d : (h + 1) * d].double()
        err += float((e @ queries[:, h].double().transpose(-1, -2)).square().sum())
    return err


def test_weighted_factors_trade_key_error_for_score_error():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 300, 8, generator=gen) @ torch.randn(8, 32, generator=gen)
    x = x + 0.3 * torch.randn(2, 300, 32, generator=gen)
    queries = torch.randn(2, 2, 400, 16, generator=gen) * torch.tensor([4.0] * 4 + [0.2] * 12)  # anisotropic
    moments = queries.double().transpose(-1, -2) @ queries.double() / 400  # (B, H, d, d)
    weighting = score_weighting(moments)
    for b in range(2):  # L Lᵀ = the block-diagonal moments (up to the small ridge)
        torch.testing.assert_close(
            weighting[b] @ weighting[b].T,
            torch.block_diag(*moments[b]),
            rtol=0,
            atol=1e-3 * float(moments[b].diagonal(dim1=-2, dim2=-1).mean()),
        )
    plain, _, _ = factorize(x, RankRule(rank=6))
    weighted, _, _ = factorize(x, RankRule(rank=6), weighting)
    assert weighted.coeffs.shape == plain.coeffs.shape and weighted.basis.shape == plain.basis.shape
    plain_err = _score_error(x, plain.reconstruct(), queries, 16)
    weighted_err = _score_error(x, weighted.reconstruct(), queries, 16)
    assert weighted_err < 0.5 * plain_err  # what attention sees
    assert (x - weighted.reconstruct()).norm() > (x - plain.reconstruct()).norm()  # the keys themselves: worse


def test_full_rank_weighted_factors_are_exact():
    x = torch.randn(1, 50, 32, dtype=torch.float64)
    moments = torch.randn(1, 2, 16, 40, dtype=torch.float64)
    moments = moments @ moments.transpose(-1, -2) / 40
    f, ranks, _ = factorize(x, RankRule(fraction=1.0), score_weighting(moments))
    assert ranks == [32]
    torch.testing.assert_close(f.reconstruct(), x, rtol=1e-9, atol=1e-9)


def test_query_moments_leave_out_padding(tiny_model):
    model = tiny_model("llama")
    attn = model.model.layers[0].self_attn
    hidden = torch.randn(2, 40, model.config.hidden_size)
    hidden[1, :10] = 100.0  # padding rows with huge activations: must not count
    cos, sin = model.model.rotary_emb(hidden, torch.arange(40)[None].expand(2, -1))
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, :10] = False
    m = query_moments(attn, hidden, (cos, sin), model.config.num_key_value_heads, valid)
    assert m.shape == (2, model.config.num_key_value_heads, 16, 16) and m.dtype == torch.float64
    alone = query_moments(attn, hidden[1:, 10:], (cos[1:, 10:], sin[1:, 10:]), model.config.num_key_value_heads)
    torch.testing.assert_close(m[1], alone[0], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_scores_objective_at_full_rank_matches_dynamic_cache(tiny_model, name):
    model = tiny_model(name)
    ids, mask = padded_batch(60, pad=9, seed=5)
    ref = greedy(model, dynamic_cache(model), ids, mask, 24)
    cache = PackedCache(model, SCORES_FULL_RANK)
    out = greedy(model, cache, ids, mask, 24)
    assert any(layer.query_moments is not None for layer in cache.layers)
    assert any(r["keys"]["codec"] == "lowrank" for layer in cache.stats()["layers"] for r in layer["runs"])
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), atol=2e-4, rtol=0)


def test_budget_with_scores_objective_respects_the_budget(tiny_model):
    model = tiny_model("llama")
    ids, mask = padded_batch(200, pad=0, seed=2)
    cache = PackedCache(model, PackConfig(budget=0.25, key_objective="scores"))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    assert cache.nbytes() <= 0.25 * cache.dynamic_nbytes()


def test_bad_key_objective_is_refused():
    with pytest.raises(ValueError, match=r"key_objective='energy' is invalid: must be one of \('keys', 'scores'\)"):
        PackConfig(key_objective="energy")
