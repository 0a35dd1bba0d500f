"""Half-precision models (float16, bfloat16): every stored form scores and mixes within half-precision rounding of
a float64 reference, on the fused kernels and on the torch path, also when the queries' dtype differs from the
cache's (a byte budget measures errors with float32 queries on a half-precision cache)."""

from __future__ import annotations

import pytest
import torch

from attentionpack import kernels
from attentionpack.codecs import RankRule, factorize
from attentionpack.kernels import ops
from attentionpack.parts import Quantized, QuantizedLowRankPart, QuantizedPart, dequantize_native

HALF = [torch.float16, torch.bfloat16]
# relative rounding of one half-precision number (the result is rounded once to its dtype; inputs carry the rest)
EPS = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(got).all(), "non-finite values"
    err = (got.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= 4 * EPS[dtype] * scale, f"max error {err:.3g} vs reference scale {scale:.3g} ({dtype})"


def _exact64(q: Quantized) -> torch.Tensor:
    """The stored tensor dequantized in float64 (no rounding to the cache dtype), original layout."""
    return dequantize_native(q, torch.float64).movedim(-1, q.axis)


def _lowrank64(part: QuantizedLowRankPart) -> torch.Tensor:
    """(B, H, T, d) of the stored factors in float64."""
    coeffs = dequantize_native(part.coeffs, torch.float64).transpose(1, 2)  # (B, T, r)
    basis = _exact64(part.basis) if isinstance(part.basis, Quantized) else part.basis.double()
    b, t, _ = coeffs.shape
    return (coeffs @ basis).view(b, t, part.num_heads, -1).transpose(1, 2)


@pytest.fixture(params=["kernels", "torch"])
def path(request, monkeypatch):
    if request.param == "kernels" and kernels.library() is None:
        pytest.skip("no C compiler: the torch path is used")
    if request.param == "torch":
        monkeypatch.setattr(ops, "usable", lambda *t: False)
    return request.param


def _inputs(dtype: torch.dtype, tokens: int = 300, d: int = 64):
    g = torch.Generator().manual_seed(tokens + d)
    k = torch.randn(1, 3, tokens, d, generator=g).to(dtype)
    v = torch.randn(1, 3, tokens, d, generator=g).to(dtype)
    q = torch.randn(1, 3, 6, d, generator=g).to(dtype)
    p = torch.softmax(torch.randn(1, 3, 6, tokens, generator=g) * 3, -1).to(dtype)
    return k, v, q, p


@pytest.mark.parametrize("cache_dtype", HALF)
@pytest.mark.parametrize("query_dtype", ["same", torch.float32])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantized_part_half_precision(cache_dtype, query_dtype, bits, path):
    query_dtype = cache_dtype if query_dtype == "same" else query_dtype
    k, v, q, p = _inputs(cache_dtype)
    q, p = q.to(query_dtype), p.to(query_dtype)
    keys, values = QuantizedPart.keys(k, bits, 32), QuantizedPart.values(v, bits, 32)
    ref_scores = q.double() @ _exact64(keys.q).transpose(-1, -2)
    ref_mix = p.double() @ _exact64(values.q)
    scores, mixed = ops.scores(keys, q, 0, 300, None), ops.mix(values, p)
    assert scores.dtype == query_dtype and mixed.dtype == query_dtype
    _close(scores, ref_scores, query_dtype)
    _close(mixed, ref_mix, query_dtype)


@pytest.mark.parametrize("cache_dtype", HALF)
@pytest.mark.parametrize("query_dtype", ["same", torch.float32])
@pytest.mark.parametrize("basis_bits", [16, 8, None])
@pytest.mark.parametrize("coeff_bits", [4, 8])
def test_quantized_lowrank_part_half_precision(cache_dtype, query_dtype, basis_bits, coeff_bits, path):
    query_dtype = cache_dtype if query_dtype == "same" else query_dtype
    k, v, q, p = _inputs(cache_dtype)
    q, p = q.to(query_dtype), p.to(query_dtype)
    parts = []
    for x in (k, v):
        b, h, t, d = x.shape
        factors, ranks, _ = factorize(x.transpose(1, 2).reshape(b, t, h * d), RankRule(rank=24))
        assert factors.coeffs.dtype == cache_dtype
        parts.append(
            QuantizedLowRankPart.from_factors(
                factors, h, None, tuple(ranks), coeff_bits=coeff_bits, basis_bits=basis_bits
            )
        )
    keys, values = parts
    ref_scores = q.double() @ _lowrank64(keys).transpose(-1, -2)
    ref_mix = p.double() @ _lowrank64(values)
    scores, mixed = ops.scores(keys, q, 0, 300, None), ops.mix(values, p)
    assert scores.dtype == query_dtype and mixed.dtype == query_dtype
    _close(scores, ref_scores, query_dtype)
    _close(mixed, ref_mix, query_dtype)


@pytest.mark.skipif(kernels.library() is None, reason="no C compiler: the torch path is used")
@pytest.mark.parametrize("dtype", HALF)
def test_kernel_wrappers_read_half_activations_as_float32(dtype):
    """The C code reads float32: half-precision activations are converted at the call, results are float32."""
    g = torch.Generator().manual_seed(1)
    v = torch.randn(2, 3, 100, 64, generator=g)
    qv = QuantizedPart.values(v, 4, 32).q
    p = torch.softmax(torch.randn(2, 3, 4, 100, generator=g), -1).to(dtype)
    got = kernels.mix_rows(qv.codes, qv.scales, qv.mins, p, 4, qv.group_size, 64)
    assert got.dtype == torch.float32
    _close(got, p.double() @ _exact64(qv), torch.float32)
    qk = QuantizedPart.keys(v, 4, 32).q
    x = torch.randn(2, 3, 4, 64, generator=g).to(dtype)
    got = kernels.scores_cols(qk.codes, qk.scales, qk.mins, x, 4, qk.group_size, 100)
    assert got.dtype == torch.float32
    _close(got, x.double() @ _exact64(qk).transpose(-1, -2), torch.float32)
