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
@pytest.mark.parametrize("d,group", [(64, 32), (64, 64), (128, 32), (256, 32), (256, 128), (80, 32), (64, 16)])
@pytest.mark.parametrize("tokens", [1, 37, 256])
@pytest.mark.parametrize("rows", [3, 4, 6])  # weight rows per head: one register pass (3, 4) or two (6 = 4 + 2)
def test_mix_rows_equals_dequantized_matmul(bits, d, group, tokens, rows):
    g = torch.Generator().manual_seed(bits * 1000 + d + tokens)
    v = torch.randn(2, 3, tokens, d, generator=g)
    q = Q.quantize_values(v, bits, group)
    probs = torch.softmax(torch.randn(2, 3, rows, tokens + 9, generator=g), -1)
    p = probs[..., 5 : 5 + tokens]  # a strided column slice, as attention hands it over
    got = kernels.mix_rows(q.codes, q.scales, q.mins, p, bits, q.group_size, d)
    torch.testing.assert_close(got, p @ Q.dequantize(q), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("tokens", [1, 33, 1000, 1024, 1100])
@pytest.mark.parametrize("group", [32, 16, 128])
@pytest.mark.parametrize("rows", [20, 256])  # 256: a tile of fewer tokens (Gemma 3's per-channel keys)
@pytest.mark.parametrize("queries", [3, 5, 9])  # query rows: one register pass, or two (9 = 5 + 4)
def test_scores_cols_equals_dequantized_matmul(bits, tokens, group, rows, queries):
    g = torch.Generator().manual_seed(bits * 7 + tokens + group + rows)
    coeffs = torch.randn(2, tokens, rows, generator=g)  # (B, T, r), quantized along T as the cache does
    q = Q.quantize(coeffs, bits, group, axis=1)
    x = torch.randn(2, queries, rows, generator=g)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape,axis,group",
    [
        ((2, 3, 300, 64), 2, 32),  # keys per channel
        ((2, 3, 300, 64), 3, 32),  # values per token
        ((1, 3, 77, 64), 3, 24),  # a group that does not divide the row
        ((1, 2, 45, 80), 2, 32),  # the last group padded by repeating the last element
        ((1, 530, 98), 1, 32),  # low-rank coefficients along tokens
        ((3, 5, 7), -1, 8),  # a row shorter than the group
        ((1, 3, 40, 64), 2, 16),
        ((1, 2, 2100, 16), 2, 32),  # rows of 66 groups (the C pass takes such rows one at a time), the last padded
        ((1, 1, 7, 1000), 3, 16),  # 63 groups a row, 7 rows: one block of rows that ends early
    ],
)
def test_quantize_widths_equals_the_torch_reference_bit_for_bit(dtype, shape, axis, group):
    g = torch.Generator().manual_seed(sum(shape) + group)
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    x.view(-1)[::7] = 0.0  # zero extremes in some groups (the sign of zero the reference keeps)
    fast, ref = ops.quantize_widths(x, (8, 4, 2), group, axis), Q.quantize_widths(x, (8, 4, 2), group, axis)
    for bits in (8, 4, 2):
        a, b = fast[bits], ref[bits]
        assert (a.shape, a.dtype, a.axis, a.group_size, a.bits) == (b.shape, b.dtype, b.axis, b.group_size, b.bits)
        assert torch.equal(a.codes, b.codes)
        for t, u in ((a.scales, b.scales), (a.mins, b.mins)):
            assert torch.equal(t.view(torch.int16), u.view(torch.int16))  # the stored float16 bits


@pytest.mark.parametrize("scale", [1.0, 1e-6, 3e3])
def test_quantize_widths_rounds_ties_and_tiny_ranges_as_the_reference(scale):
    """Codes a half from two levels (the C pass multiplies by 1 / scale and divides only near a half), minimums and
    scales in float16's subnormal range, and ranges near its top: the same bits as the reference."""
    g = torch.Generator().manual_seed(11)
    x = torch.randint(0, 33, (2, 3, 96, 64), generator=g).float() * 0.125 * scale  # many exact halves of a level
    x[0, :, :5] = torch.randn(3, 5, 64, generator=g) * scale
    for axis in (2, 3):
        fast, ref = ops.quantize_widths(x, (8, 4, 2), 32, axis), Q.quantize_widths(x, (8, 4, 2), 32, axis)
        for bits in (8, 4, 2):
            assert torch.equal(fast[bits].codes, ref[bits].codes)
            assert torch.equal(fast[bits].scales.view(torch.int16), ref[bits].scales.view(torch.int16))
            assert torch.equal(fast[bits].mins.abs(), ref[bits].mins.abs())


def test_quantize_groups_is_quantize_widths_per_group():
    x = torch.randn(1, 3, 130, 64, generator=torch.Generator().manual_seed(2))
    both = ops.quantize_groups(x, {32: (8, 2), 128: (4,)}, axis=2)
    for group, widths in ((32, (8, 2)), (128, (4,))):
        one = ops.quantize_widths(x, widths, group, 2)
        assert all(torch.equal(both[group][b].codes, one[b].codes) for b in widths)


def test_scores_cols_writes_into_a_slot_of_a_buffer():
    """`out`: each (M, T) matrix contiguous, spaced evenly (a slot of a (B, H, K, M, T) buffer); anything else is
    refused with the layout it needs."""
    g = torch.Generator().manual_seed(3)
    q = Q.quantize(torch.randn(2, 3, 100, 16, generator=g), 4, 32, axis=2)  # (B, H, T, d) keys per channel
    x = torch.randn(2, 3, 5, 16, generator=g)
    want = kernels.scores_cols(q.codes, q.scales, q.mins, x, 4, q.group_size, 100)
    buf = torch.full((2, 3, 4, 5, 100), float("nan"))
    got = kernels.scores_cols(q.codes, q.scales, q.mins, x, 4, q.group_size, 100, out=buf[:, :, 2])
    assert got.data_ptr() == buf[:, :, 2].data_ptr() and torch.equal(buf[:, :, 2], want)
    assert buf[:, :, [0, 1, 3]].isnan().all()  # the other slots untouched
    with pytest.raises(ValueError, match="contiguous"):
        kernels.scores_cols(q.codes, q.scales, q.mins, x, 4, q.group_size, 100, out=buf[:, :, 2].transpose(-1, -2))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e6])
def test_quantize_widths_refuses_what_float16_cannot_hold(bad):
    x = torch.randn(2, 3, 64, 64)
    x[1, 2, 5, 7] = bad
    with pytest.raises(ValueError, match="finite, with groups inside the float16 range"):
        ops.quantize_widths(x, (4,), 32, 2)
    with pytest.raises(ValueError, match="bits"):
        ops.quantize_widths(torch.randn(4, 64), (3,), 32, -1)


def test_quantize_widths_without_kernels_is_the_reference(monkeypatch):
    x = torch.randn(2, 3, 50, 64)
    monkeypatch.setattr(ops, "library", lambda: None)
    got, ref = ops.quantize_widths(x, (4, 2), 32, 3), Q.quantize_widths(x, (4, 2), 32, 3)
    assert all(torch.equal(got[b].codes, ref[b].codes) and torch.equal(got[b].scales, ref[b].scales) for b in (4, 2))


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
