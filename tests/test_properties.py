"""Property tests of the low-rank codec and the RoPE undo/redo."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attentionpack.codecs.lowrank import RankRule, energy_rank, factorize, spectrum_and_basis
from attentionpack.rope import apply_rope, rotate_half, undo_rope

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def blocks(draw, dtype=torch.float64):
    """Random (B, T, D) blocks: gaussian, exactly low-rank plus noise, or with zero (padding) rows, any scale."""
    b = draw(st.integers(1, 3))
    t = draw(st.integers(1, 40))
    d = draw(st.integers(1, 24))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["gaussian", "lowrank", "padded"]))
    scale = draw(st.sampled_from([1e-3, 1.0, 37.0]))
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(b, t, d, generator=gen, dtype=torch.float64)
    if kind == "lowrank":
        k = draw(st.integers(1, d))
        m = torch.randn(b, t, k, generator=gen, dtype=torch.float64) @ torch.randn(
            b, k, d, generator=gen, dtype=torch.float64
        )
        m = m + 1e-4 * torch.randn(b, t, d, generator=gen, dtype=torch.float64)
    elif kind == "padded":
        pad = draw(st.integers(0, t))
        m[:, :pad] = 0
    return (m * scale).to(dtype)


@SETTINGS
@given(m=blocks(), data=st.data())
def test_truncation_error_equals_discarded_energy_float64(m, data):
    """||M - C B||_F^2 == sum of the discarded squared singular values (Eckart-Young), per sample.

    Tolerance: the Gram matrix M^T M carries absolute eigenvalue errors ~ eps64 * ||M||_F^2, so the comparison is
    made relative to the total energy ||M||_F^2 (1e-9 of it, far above float64 round-off) rather than to the
    possibly tiny discarded energy itself."""
    d = m.shape[-1]
    r = data.draw(st.integers(1, d), label="rank")
    factors, ranks, spectrum = factorize(m, RankRule(rank=r))
    assert ranks == [r] * m.shape[0]
    assert factors.coeffs.shape == (*m.shape[:2], r) and factors.basis.shape == (m.shape[0], r, d)
    assert factors.coeffs.dtype == m.dtype and factors.basis.dtype == m.dtype
    err = ((m - factors.reconstruct()) ** 2).sum(dim=(1, 2))
    sv2 = torch.linalg.svdvals(m.to(torch.float64)) ** 2  # (B, min(T, D)) descending
    discarded = sv2[:, r:].sum(dim=-1)
    total = (m.to(torch.float64) ** 2).sum(dim=(1, 2))
    assert torch.all((err - discarded).abs() <= 1e-9 * total + 1e-300), (err, discarded, total)
    # the spectrum the codec reports is the squared singular values (padded with zeros up to D)
    full = torch.zeros(m.shape[0], d, dtype=torch.float64)
    full[:, : sv2.shape[1]] = sv2
    assert torch.all((spectrum - full).abs() <= 1e-9 * total.unsqueeze(-1) + 1e-300)


@SETTINGS
@given(m=blocks(dtype=torch.float32), data=st.data())
def test_truncation_error_equals_discarded_energy_float32(m, data):
    """Same in the cache dtype fp32: coefficients and basis are rounded to fp32, so allow ~1e-5 of the energy."""
    r = data.draw(st.integers(1, m.shape[-1]), label="rank")
    factors, _, _ = factorize(m, RankRule(rank=r))
    err = ((m.double() - factors.reconstruct().double()) ** 2).sum(dim=(1, 2))
    sv2 = torch.linalg.svdvals(m.double()) ** 2
    discarded = sv2[:, r:].sum(dim=-1)
    total = (m.double() ** 2).sum(dim=(1, 2))
    assert torch.all((err - discarded).abs() <= 1e-5 * total + 1e-30), (err, discarded, total)


@SETTINGS
@given(m=blocks())
def test_basis_is_orthonormal(m):
    _, vecs = spectrum_and_basis(m)
    eye = torch.eye(m.shape[-1], dtype=torch.float64).expand_as(vecs)
    torch.testing.assert_close(vecs.transpose(1, 2) @ vecs, eye, rtol=0, atol=1e-10)


spectra = st.lists(
    st.one_of(st.just(0.0), st.floats(1e-6, 1e6, allow_nan=False, allow_infinity=False)), min_size=1, max_size=64
).map(lambda xs: torch.tensor(sorted(xs, reverse=True), dtype=torch.float64))
energies = st.one_of(st.floats(1e-6, 1.0, allow_nan=False), st.sampled_from([0.5, 0.9, 0.95, 0.99, 0.999, 1.0]))


@SETTINGS
@given(spectrum=spectra, energy=energies)
def test_energy_rank_is_smallest_rank_meeting_threshold(spectrum, energy):
    r = energy_rank(spectrum, energy)
    d = spectrum.shape[0]
    assert 1 <= r <= d
    total = float(spectrum.sum())
    if total <= 0:
        assert r == 1
        return
    cum = [float(x) for x in torch.cumsum(spectrum, 0)]
    slack = 1e-9 * total  # the implementation tolerates 1e-12 of round-off so that energy=1.0 is reachable
    assert cum[r - 1] >= energy * total - slack, "rank r does not reach the requested energy"
    if r > 1:
        assert cum[r - 2] < energy * total + slack, "rank r - 1 already reaches it: r is not the smallest"
    # strict version where the threshold is clear of round-off
    if r > 1 and abs(cum[r - 2] - energy * total) > slack:
        assert cum[r - 2] < energy * total


@SETTINGS
@given(spectrum=spectra, energy=energies, cap=st.floats(0.01, 1.0), data=st.data())
def test_rank_rule_choose(spectrum, energy, cap, data):
    d = spectrum.shape[0]
    assert RankRule(energy=energy, max_fraction=cap).choose(spectrum) == min(
        energy_rank(spectrum, energy), max(1, round(cap * d))
    )
    rank = data.draw(st.integers(1, 100))
    assert RankRule(rank=rank).choose(spectrum) == min(rank, d)
    frac = data.draw(st.floats(0.001, 1.0))
    chosen = RankRule(fraction=frac).choose(spectrum)
    assert 1 <= chosen <= d


# ---- RoPE --------------------------------------------------------------------------------------------------------


@functools.cache
def _rotary(kind: str):
    from transformers import Gemma3TextConfig, LlamaConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    common = dict(hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=4096)
    if kind == "default":
        return LlamaRotaryEmbedding(LlamaConfig(**common)), None
    if kind == "yarn":  # attention_factor = 0.1 ln(4) + 1 ~ 1.139: cos^2 + sin^2 = 1.296 != 1
        rot = LlamaRotaryEmbedding(
            LlamaConfig(
                **common,
                rope_parameters={
                    "rope_type": "yarn",
                    "rope_theta": 10000.0,
                    "factor": 4.0,
                    "original_max_position_embeddings": 1024,
                },
            )
        )
        assert abs(rot.attention_scaling - 1) > 0.1
        return rot, None
    if kind == "gemma3_local":
        cfg = Gemma3TextConfig(**common, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
        return Gemma3RotaryEmbedding(cfg), "sliding_attention"
    raise KeyError(kind)


def _cos_sin(kind: str, positions: torch.Tensor, dtype: torch.dtype, scale: float):
    rot, layer_type = _rotary(kind)
    probe = torch.empty(0, dtype=dtype)
    with torch.no_grad():
        cos, sin = rot(probe, positions, layer_type) if layer_type else rot(probe, positions)
    return cos * scale, sin * scale


@SETTINGS
@given(
    kind=st.sampled_from(["default", "yarn", "gemma3_local"]),
    batch=st.integers(1, 3),
    heads=st.integers(1, 3),
    t=st.integers(1, 12),
    scale=st.sampled_from([1.0, 0.5, 1.7]),  # extra cos/sin scaling emulating an attention factor
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**31 - 1),
)
def test_undo_rope_inverts_apply_rope(kind, batch, heads, t, scale, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 4000, (batch, t), generator=gen)
    cos, sin = _cos_sin(kind, positions, dtype, scale)
    assert cos.shape == (batch, t, 16) and cos.dtype == dtype
    k = torch.randn(batch, heads, t, 16, generator=gen, dtype=torch.float64).to(dtype) * 3
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(undo_rope(apply_rope(k, cos, sin), cos, sin), k, **tol)
    torch.testing.assert_close(apply_rope(undo_rope(k, cos, sin), cos, sin), k, **tol)


@pytest.mark.parametrize("kind", ["default", "yarn", "gemma3_local"])
def test_apply_rope_matches_transformers(kind):
    """apply_rope is exactly what the models do to keys (transformers' apply_rotary_pos_emb)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    positions = torch.arange(50).unsqueeze(0).expand(2, 50)
    cos, sin = _cos_sin(kind, positions, torch.float32, 1.0)
    k = torch.randn(2, 3, 50, 16)
    q = torch.randn(2, 3, 50, 16)
    _, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(apply_rope(k, cos, sin), k_ref)
    assert torch.equal(rotate_half(rotate_half(k)), -k)
