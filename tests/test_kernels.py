"""Fused C kernels (attentionpack/kernels): same results as the torch paths, for every bit width, group size,
padding and strided input; a clean fallback when they are disabled."""

from __future__ import annotations

import pytest
import torch

from attentionpack import kernels
from attentionpack.kernels import ops
from attentionpack.parts import quant as Q

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="no C compiler: the torch path is used")


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("d,group", [(64, 32), (64, 64), (128, 32), (80, 32), (64, 16)])
@pytest.mark.parametrize("tokens", [1, 37, 256])
def test_mix_rows_equals_dequantized_matmul(bits, d, group, tokens):
    g = torch.Generator().manual_seed(bits * 1000 + d + tokens)
    v = torch.randn(2, 3, tokens, d, generator=g)
    q = Q.quantize_values(v, bits, group)
    probs = torch.softmax(torch.randn(2, 3, 4, tokens + 9, generator=g), -1)
    p = probs[..., 5 : 5 + tokens]  # a strided column slice, as attention hands it over
    got = kernels.mix_rows(q.codes, q.scales, q.mins, p, bits, q.group_size, d)
    torch.testing.assert_close(got, p @ Q.dequantize(q), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("tokens", [1, 33, 1000, 1024, 1100])
@pytest.mark.parametrize("group", [32, 16])
def test_scores_cols_equals_dequantized_matmul(bits, tokens, group):
    g = torch.Generator().manual_seed(bits * 7 + tokens + group)
    coeffs = torch.randn(2, tokens, 20, generator=g)  # (B, T, r), quantized along T as the cache does
    q = Q.quantize(coeffs, bits, group, axis=1)
    x = torch.randn(2, 5, 20, generator=g)
    got = kernels.scores_cols(q.codes, q.scales, q.mins, x, bits, q.group_size, tokens)
    torch.testing.assert_close(got, x @ Q.dequantize_native(q), atol=1e-4, rtol=1e-5)


def test_parts_agree_with_and_without_kernels(monkeypatch):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, 3, 300, 64, generator=g)
    k = torch.randn(1, 3, 300, 64, generator=g)
    p = torch.softmax(torch.randn(1, 3, 6, 300, generator=g), -1)
    qry = torch.randn(1, 3, 6, 64, generator=g)
    values, keys = Q.QuantizedPart.values(v, 4, 32), Q.QuantizedPart.keys(k, 4, 32)
    fast = ops.mix(values, p), ops.scores(keys, qry, 0, 300, None)
    monkeypatch.setattr(ops, "usable", lambda *t: False)
    slow = ops.mix(values, p), ops.scores(keys, qry, 0, 300, None)
    torch.testing.assert_close(slow[0], values.mix(p))  # the parts' own torch reference
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_disabled_kernels_fall_back(monkeypatch):
    monkeypatch.setenv("ATTENTIONPACK_KERNELS", "0")
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_lib", None)
    assert kernels.library() is None and not kernels.usable(torch.zeros(1))


def test_missing_compiler_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTENTIONPACK_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="fused kernels|torch path"):
        try:
            lib = kernels._build()
        except FileNotFoundError:
            pytest.fail("a missing compiler must not raise")
    assert lib is None
