"""One-call decoding steps, C (kernels/plan.py, kernels/decode.c) and Triton (kernels/triton_decode.py), against
dense attention over the materialized pieces: every stored form they take, half-precision models, padding masks,
softcap, batches, pieces longer than a work item or block."""

from __future__ import annotations

import pytest
import torch
from decode_cases import B, D, G, H, Piece, c_step, keys, layer_pieces, reference, triton_step, values

from attentionpack import kernels
from attentionpack.kernels.plan import DecodePlan
from attentionpack.parts import ExactPart, Factors, LowRankPart


@pytest.fixture(params=["c", "triton"])
def step(request):
    """One backend's one-call decoding step (see decode_cases): C (kernels/decode.c) or Triton
    (kernels/triton_decode.py, in its interpreter without a GPU)."""
    if request.param == "c":
        if kernels.library() is None:
            pytest.skip("no C compiler: the torch path is used")
        return c_step
    pytest.importorskip("triton", reason="Triton is not installed (pip install 'attentionpack[gpu]')")
    return triton_step


@pytest.mark.parametrize(
    "key_kind", ["exact", "channel4", "channel2", "channel2g128", "factors16-4", "factors32-8", "factors8-4"]
)
@pytest.mark.parametrize(
    "value_kind", ["exact", "quant4", "quant8", "quant2", "quant2g64", "factors16-4", "factors8-8"]
)
def test_every_stored_form_matches_dense_attention(key_kind, value_kind, step):
    gen = torch.Generator().manual_seed(hash((key_kind, value_kind)) % 1000)
    pieces = layer_pieces(
        gen, key_kind, value_kind, [4, 600, 33, 37]
    )  # 600: several work items and blocks, a partial one
    query = torch.randn(B, H * G, 1, D, generator=gen)
    got = step(pieces, 0, query, None, D**-0.5, None)
    torch.testing.assert_close(got, reference(pieces, query, None, D**-0.5, None), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("key_kind", ["channel4g64", "channel2g64", "channel8g64", "channel4g32", "factors16-4"])
def test_decode_chunks_match_dense_attention(key_kind, step):
    """A layer that has decoded a while: many 64-token pieces (a budget's decode chunks), whose 4-bit planes hold
    32 tokens and 2-bit planes 16, shorter than the kernel's widest block of tokens (64)."""
    gen = torch.Generator().manual_seed(5)
    pieces = layer_pieces(gen, key_kind, "quant4g64", [4, 64, 64, 128, 64, 64, 20])
    query = torch.randn(B, H * G, 1, D, generator=gen)
    got = step(pieces, 0, query, None, D**-0.5, None)
    torch.testing.assert_close(got, reference(pieces, query, None, D**-0.5, None), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("tail_dtype", [torch.float16, torch.bfloat16])
def test_float32_model_with_a_half_precision_tail(tail_dtype, step):
    """A float32 model whose exact tail is stored in 16 bits (`PackConfig.tail_dtype`): the step reads the tail's
    rows as stored, beside float32 queries and pieces."""
    gen = torch.Generator().manual_seed(7)
    pieces = layer_pieces(gen, "channel4", "quant4", [4, 300, 37])
    tail = pieces[-1]
    assert isinstance(tail.keys, ExactPart) and isinstance(tail.values, ExactPart)
    half = ExactPart(tail.keys.data.to(tail_dtype)), ExactPart(tail.values.data.to(tail_dtype))
    pieces[-1] = Piece(*half, tail.start, tail.end)
    query = torch.randn(B, H * G, 1, D, generator=gen)
    got = step(pieces, 0, query, None, D**-0.5, None)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference(pieces, query, None, D**-0.5, None), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "key_kind, value_kind",
    [("exact", "exact"), ("channel4", "quant4"), ("factors32-4", "factors32-8"), ("factors8-4", "factors16-4")],
)
def test_half_precision_models(dtype, key_kind, value_kind, step):
    """bfloat16/float16 models: the kernel reads their exact rows, factor bases and queries as they are, sums in
    float32 and returns the query's dtype. Tolerance: 2 units in the last place of the output (2^-7 for bfloat16,
    2^-10 for float16) relative, and ulp/4 absolute because the reference rebuilds quantized and factored pieces
    in the model's dtype (each element rounded once) where the kernel keeps them in float32."""
    gen = torch.Generator().manual_seed(11)
    pieces = layer_pieces(gen, key_kind, value_kind, [4, 300, 33, 37], dtype=dtype)
    query = torch.randn(B, H * G, 1, D, generator=gen).to(dtype)
    allowed = torch.ones(B, 1, 1, 374, dtype=torch.bool)
    allowed[1, ..., :50] = False
    got = step(pieces, 0, query, allowed, D**-0.5, None)
    assert got is not None and got.dtype == dtype
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    want = reference(pieces, query, allowed, D**-0.5, None)
    torch.testing.assert_close(got.float(), want, atol=ulp / 4, rtol=2 * ulp)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_padding_mask_and_softcap(softcap, step):
    gen = torch.Generator().manual_seed(7)
    pieces = layer_pieces(gen, "factors16-4", "quant4", [4, 300, 20])
    pieces.insert(2, Piece(keys("channel4", gen, 40), values("factors32-4", gen, 40), 304, 344))
    pieces[-1].start, pieces[-1].end = 344, 364
    for p in pieces:  # the mask covers cache indices from `first` on
        p.start, p.end = p.start + 5, p.end + 5
    query = torch.randn(B, H * G, 1, D, generator=gen)
    allowed = torch.ones(B, 1, 1, 364, dtype=torch.bool)
    allowed[0, ..., :200] = False  # sample 0 left-padded over the sink and into the span
    allowed[2, ..., 100:164] = False  # sample 2: a masked run inside the span
    want = reference(pieces, query, allowed, 0.2, softcap)
    allowed[1] = False  # sample 1 may attend to nothing: zeros
    want[1] = 0
    got = step(pieces, 5, query, allowed, 0.2, softcap)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_odd_head_dim_and_single_sample_mask_row(step):
    gen = torch.Generator().manual_seed(3)
    pieces = [
        Piece(keys("channel4", gen, 90, 40), values("quant4", gen, 90, 40), 0, 90),
        Piece(keys("exact", gen, 5, 40), values("exact", gen, 5, 40), 90, 95),
    ]
    query = torch.randn(B, H * G, 1, 40, generator=gen)
    allowed = torch.ones(1, 1, 1, 95, dtype=torch.bool)  # broadcast over the batch
    allowed[..., 7] = False
    got = step(pieces, 0, query, allowed, 0.3, None)
    torch.testing.assert_close(got, reference(pieces, query, allowed, 0.3, None), atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(kernels.library() is None, reason="no C compiler: the torch path is used")
def test_forms_it_does_not_take_fall_back():
    gen = torch.Generator().manual_seed(1)
    pieces = layer_pieces(gen, "exact", "exact", [4, 50, 10])
    query = torch.randn(B, H * G, 1, D, generator=gen)
    assert c_step(pieces, 0, query.double(), None, 0.1, None) is None  # float64 queries
    assert c_step(pieces, 0, torch.randn(B, H * G, 2, D), None, 0.1, None) is None  # two query tokens
    pre_rope = LowRankPart(
        Factors(torch.randn(B, 50, 8), torch.randn(B, 8, H * D)),
        H,
        positions=torch.arange(50, dtype=torch.int32).expand(B, -1),
    )
    pieces[1] = Piece(pre_rope, pieces[1].values, 4, 54)  # keys that must be rotated per token
    assert c_step(pieces, 0, query, None, 0.1, None) is None
    plan = DecodePlan(H, D, pieces[:-1])
    assert "before RoPE" in plan.why_not(query, pieces[-1].keys.data, plan.count)
    assert plan.why_not(query, pieces[-1].keys.data, 1) == ""  # a snapshot taken before the segment froze


def test_many_sequences_in_one_call_equal_each_alone():
    """`DecodePlan.run_many` (a serving step: one C call, the threads sharing the sequences) returns exactly what
    each sequence's own `run` returns: sequences of different forms, lengths, masks, dtypes."""
    if kernels.library() is None:
        pytest.skip("no C compiler: the torch path is used")
    gen = torch.Generator().manual_seed(5)
    forms = [("channel4", "quant4", 600), ("factors16-4", "factors8-8", 300), ("exact", "quant2", 90)]
    steps = []
    for i, (key_kind, value_kind, n) in enumerate(forms * 2):
        dtype = torch.bfloat16 if i == 4 else torch.float32
        pieces = layer_pieces(gen, key_kind, value_kind, [4, n, 33, 37 + i], dtype=dtype)
        for p in pieces:  # one sample per sequence
            p.map_batch(lambda t: t[:1].clone())
        plan = DecodePlan(H, D, pieces[:-1])
        tail = pieces[-1]
        query = torch.randn(1, H * G, 1, D, generator=gen).to(dtype)
        allowed = None
        if i % 2:
            allowed = torch.ones(1, 1, 1, tail.end, dtype=torch.bool)
            allowed[..., 10 : 20 + i] = False
        steps.append((plan, plan.count, (tail.keys.data, tail.values.data, tail.start), 0, query, allowed))
    for softcap in (None, 30.0):
        together = DecodePlan.run_many(steps, D**-0.5, softcap)
        for got, (plan, count, tail, first, query, allowed) in zip(together, steps, strict=True):
            alone = plan.run(count, tail, first, query, allowed, D**-0.5, softcap)
            assert got.dtype == query.dtype
            assert torch.equal(got, alone)
