"""Demotion inside the budget (`PackConfig(budget=f, keep=s, evicted_bits=b)`): a span may keep a share of its
tokens per (sample, head) in any candidate encoding and store the rest at b bits, judged against the output the
judge's queries really get from such a span.

- `budget.eviction.evictions` with `demote`: the judged error of the demoted span equals the relative error of a
  softmax computed from scratch over the exact outside tokens, the kept tokens and the rest dequantized; the kept
  and demoted slots hold every real token once; the demoted bytes are counted in the option's bytes.
- A real cache: bytes within f and equal to the tensor walk, demoted spans stored as two slot segments, decoding on
  the fused step, save/load round trip.
"""

from __future__ import annotations

import torch
from helpers import storage_bytes, walk_tensors
from tiny_models import VOCAB, build_model

from attentionpack import PackConfig, PackedCache
from attentionpack.budget.eviction import evictions, joint_options
from attentionpack.budget.planner import _Context
from attentionpack.parts import ExactPart, QuantizedPart, storage_nbytes

SMALL = dict(window=16, chunk=16, min_span=8, sink=2)


def _context(b=1, h=2, t=96, d=16, m=6, seed=0) -> _Context:
    gen = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(b, h, t, d, generator=gen), torch.randn(b, h, t, d, generator=gen)
    queries = torch.randn(b, h, m, d, generator=gen)
    scaling = d**-0.5
    logits = queries @ keys.transpose(-1, -2) * scaling  # (B, H, M, T): every row sees every key
    top = logits.amax(-1, keepdim=True)
    weights = torch.exp(logits - top)
    total = weights.sum(-1, keepdim=True)
    out = weights @ values / total
    importance = torch.rand(b, h, t, generator=gen)
    valid = torch.ones(b, t, dtype=torch.bool)
    return _Context(
        0, keys, values, queries, logits, top, weights, total, out, float(out.square().sum()), scaling, None, valid,
        importance,
    )  # fmt: skip


def _errors(ctx: _Context):
    return lambda diffs: [float(x.square().sum()) / ctx.energy for x in diffs]


def _exact(x: torch.Tensor, is_key: bool):
    return [("exact", ExactPart(x.clone()))]


def test_demoted_span_judged_as_its_softmax_from_scratch():
    ctx = _context()
    a, b = 20, 84
    k, v = ctx.keys[..., a:b, :], ctx.values[..., a:b, :]
    valid = torch.ones(1, b - a, dtype=torch.bool)
    args = (ctx, a, b, k, v, valid, (0.5, 0.25), _exact, _errors(ctx), 64)
    dropped = {e.share: e for e in evictions(*args)}
    demoted = {e.share: e for e in evictions(*args, demote=(2, 8, 8))}
    for share, e in demoted.items():
        n, m = b - a, e.slots.shape[-1]
        assert m == int(share * n) and e.demoted is not None and e.demoted.slots.shape[-1] == n - m
        # the reference: every key and value of the span, the rest replaced by their 2-bit form
        order = ctx.importance[..., a:b].argsort(-1, descending=True)
        rest = order[..., m:].sort(-1).values  # (B, H, n - m)
        kq = QuantizedPart.keys(k.gather(2, rest[..., None].expand(-1, -1, -1, 16)), 2, 8).materialize(0, 0, None)
        vq = QuantizedPart.values(v.gather(2, rest[..., None].expand(-1, -1, -1, 16)), 2, 8).materialize(0, 0, None)
        keys, values = ctx.keys.clone(), ctx.values.clone()
        keys[..., a:b, :] = k.scatter(2, rest[..., None].expand(-1, -1, -1, 16), kq)
        values[..., a:b, :] = v.scatter(2, rest[..., None].expand(-1, -1, -1, 16), vq)
        p = torch.softmax(ctx.queries @ keys.transpose(-1, -2) * ctx.scaling, -1)
        want = float((p @ values - ctx.out).square().sum()) / ctx.energy
        assert abs(e.drop_error - want) <= 1e-4 * want
        # demoting loses less than dropping the same tokens, and its bytes are in the option's bytes
        assert e.drop_error < 0.5 * dropped[share].drop_error
        assert e.extra_bytes == storage_nbytes([e.slots] + e.demoted.tensors()) > storage_nbytes([e.slots])
        options = joint_options([("exact", ExactPart(k), 0, 0.0)], [("exact", ExactPart(v), 0, 0.0)], [e])
        assert any(nb == e.keys[0][2] + e.values[0][2] + e.extra_bytes for nb, _, _ in options)
        segs = e.segments(a, b, 0, 0)
        assert [s.length for s in segs] == [m, n - m] and all(s.start == a and s.end == b for s in segs)


def test_budget_demotes_spans_in_a_real_cache(cache_root, tmp_path, monkeypatch):
    """The budget's demotion choice installed: on a random-weight model attention is too diffuse for the judge
    to prefer a demoted span (measured), so the options offered are cut to the demoted ones (share < 1)."""
    from attentionpack.budget import planner

    joint = planner.joint_options
    monkeypatch.setattr(planner, "joint_options", lambda *a: [o for o in joint(*a) if o[2][0] < 1] or joint(*a))
    model = build_model("llama")
    ids = torch.randint(3, VOCAB, (2, 400), generator=torch.Generator().manual_seed(0))
    cfg = PackConfig(budget=0.15, keep=0.0625, evicted_bits=2, **SMALL)
    cache = PackedCache(model, cfg)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache)
    assert cache.nbytes() <= 0.15 * cache.dynamic_nbytes(steady=True)
    assert cache.nbytes() == storage_bytes(walk_tensors(cache.layers))
    report = cache.planner.report
    demoted = [(layer, start) for (layer, start), r in report.items() if r["share"] < 1]
    assert demoted, "at this budget some span keeps a share and demotes the rest"
    for layer, start in demoted:
        segs = [s for s in cache.layers[layer].segments if s.start == start]
        assert len(segs) == 2 and all(s.slots is not None for s in segs)
        assert segs[0].length + segs[1].length == segs[0].end - segs[0].start  # every token once
        assert segs[1].keys.describe()["bits"] == 2 and segs[1].values.describe()["bits"] == 2
    cache.save(tmp_path / "c")
    loaded = PackedCache.load(tmp_path / "c", model)
    with torch.no_grad():
        out = model(input_ids=ids[:, -1:], past_key_values=cache).logits
        again = model(input_ids=ids[:, -1:], past_key_values=loaded).logits
    assert torch.isfinite(out).all() and cache.stats()["attention_paths"]["fused"] > 0
    torch.testing.assert_close(again, out, rtol=0, atol=1e-5)
