"""Per-head storage (RazorAttention retrieval heads, score-based eviction, demotion): segments that hold some KV
heads only, or token slots chosen per sample and head with a log multiplicity each.

- Attention on such segments, on each of its three paths (the fused one-token kernel, per part, dense), equals a
  float64 reference that lists every head's own keys, for exact, quantized and low-rank forms.
- Caches built with `retrieval_heads` / `keep` / `evicted_bits` free the bytes (`nbytes()` = the independent tensor
  walk), keep different tokens per sample of a batch without mixing them, survive save/load, and refuse models
  whose own attention cannot read them.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from helpers import storage_bytes, walk_tensors
from tiny_models import VOCAB, build_model

from attentionpack import PackConfig, PackedCache
from attentionpack.attention import LayerView, packed
from attentionpack.codecs import encode_keys, encode_values
from attentionpack.kernels.plan import DecodePlan
from attentionpack.parts import ExactPart, Segment

EXACT = dict(key_codec="exact", value_codec="exact", key_energy=None, value_energy=None)
FORMS = {
    "exact": PackConfig(**EXACT),
    "quant": PackConfig(
        key_codec="quant", key_bits=4, value_codec="quant", value_bits=2, key_energy=None, value_energy=None
    ).replace(quant_group=8),
    "lowrank": PackConfig(
        key_codec="lowrank",
        key_rank=6,
        key_bits=4,
        key_pre_rope=False,
        value_codec="lowrank",
        value_rank=6,
        value_bits=4,
        key_energy=None,
        value_energy=None,
        quant_group=8,
        fallback_exact=False,
    ),
}
SMALL = dict(window=16, chunk=16, min_span=8, sink=2)


def _no_rope(start, end, pos):
    raise AssertionError("no part here needs RoPE")


def _encode(x_k: torch.Tensor, x_v: torch.Tensor, cfg: PackConfig) -> tuple:
    ones = torch.ones(x_k.shape[0], x_k.shape[2], dtype=torch.bool)
    return encode_keys(x_k, ones, cfg, None, None), encode_values(x_v, ones, cfg)


def _layer(form: str, b: int = 2, h: int = 3, d: int = 16, seed: int = 0):
    """Segments in cache order: exact sinks [0, 2); heads (0, 2) of [2, 42) in `form`; head 1's compensation token
    for [2, 42) standing for 40 tokens; 12 slots per (sample, head) of [42, 82) in `form`, some empty; and an exact
    tail [82, 102)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    cfg = FORMS[form]
    segs = [Segment(0, 2, ExactPart(rand(b, h, 2, d)), ExactPart(rand(b, h, 2, d)), "sink")]
    k, v = _encode(rand(b, 2, 40, d), rand(b, 2, 40, d), cfg)
    segs.append(Segment(2, 42, k, v, "span", heads=(0, 2)))
    log40 = torch.full((b, 1, 1), math.log(40), dtype=torch.float16)
    segs.append(
        Segment(2, 42, ExactPart(rand(b, 1, 1, d)), ExactPart(rand(b, 1, 1, d)), "span", heads=(1,), slots=log40)
    )
    slots = torch.zeros(b, h, 16, dtype=torch.float16)
    slots[1, :, 12:] = float("-inf")  # the second sample has 12 real tokens, the first 16
    slots[0, 1, 3] = math.log(3.0)  # one slot standing for three tokens
    k, v = _encode(rand(b, h, 16, d), rand(b, h, 16, d), cfg)
    segs.append(Segment(42, 82, k, v, "span", slots=slots))
    tail = (rand(b, h, 20, d), rand(b, h, 20, d), 82)
    return segs, tail


def _reference(segs, tail, query: torch.Tensor, scale: float) -> torch.Tensor:
    """float64 attention, head by head: every segment that holds a KV head gives that head its keys, values and
    logit offsets; the queries are the last q tokens of the tail (causal inside it)."""
    b, hq, q, d = query.shape
    h = tail[0].shape[1]
    g = hq // h
    total = tail[2] + tail[0].shape[2]
    out = torch.zeros(b, q, hq, d, dtype=torch.float64)
    for j in range(h):
        ks, vs, bias = [], [], []
        for s in segs:
            held = list(s.heads) if s.heads is not None else list(range(h))
            if j not in held:
                continue
            lj = held.index(j)
            ks.append(s.keys.materialize(s.start, s.end, _no_rope)[:, lj].double())  # (B, n, d)
            vs.append(s.values.materialize(s.start, s.end, _no_rope)[:, lj].double())
            n = ks[-1].shape[1]
            offset = s.slots[:, lj].double() if s.slots is not None else torch.zeros(b, n, dtype=torch.float64)
            bias.append(offset[:, None, :].expand(b, q, n))
        ks.append(tail[0][:, j].double())
        vs.append(tail[1][:, j].double())
        rows = torch.arange(total - q, total)[:, None]
        cols = torch.arange(tail[2], total)[None, :]
        causal = torch.where(cols <= rows, 0.0, float("-inf")).double()  # (q, n_tail)
        bias.append(causal[None].expand(b, q, -1))
        keys, values, offsets = torch.cat(ks, 1), torch.cat(vs, 1), torch.cat(bias, 2)  # (B, N, d), (B, q, N)
        for i in range(g):
            qi = query[:, j * g + i].double()  # (B, q, d)
            logits = qi @ keys.transpose(1, 2) * scale + offsets
            out[:, :, j * g + i] = torch.softmax(logits, -1) @ values
    return out


@pytest.mark.parametrize("queries,path", [(1, "fused"), (1, "triton"), (4, "per_part"), (16, "dense")])
@pytest.mark.parametrize("form", list(FORMS))
def test_attention_on_per_head_segments_matches_float64(form, queries, path, monkeypatch):
    if path == "triton":  # the Triton step (on CPU in its interpreter: tests/conftest.py)
        pytest.importorskip("triton")
        monkeypatch.setenv("ATTENTIONPACK_DECODE", "triton")
    segs, tail = _layer(form)
    h, d = 3, 16
    plan = DecodePlan(h, d, segs)
    assert plan.blocked_at is None, plan.blocker
    paths: Counter[str] = Counter()
    view = LayerView.of(segs, (tail[0][:, :, :20], tail[1][:, :, :20], 82), 0, 102, h, _no_rope, plan, paths)
    query = torch.randn(2, 6, queries, d, generator=torch.Generator().manual_seed(3))
    out = packed.attend(view, query, None, None, None)  # (B, q, Hq, d)
    assert paths == Counter({path: 1})
    ref = _reference(segs, tail, query, d**-0.5)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


def _prompt(batch: int = 2, length: int = 90, seed: int = 5) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _decode(model, cache, ids: torch.Tensor, steps: int = 20) -> torch.Tensor:
    """Logits of a prefill and `steps` greedy one-token calls, (B, steps + 1, V)."""
    outs = []
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache)
        outs.append(out.logits[:, -1:])
        for _ in range(steps):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache)
            outs.append(out.logits[:, -1:])
    return torch.cat(outs, 1)


RAZOR = PackConfig(**EXACT, retrieval_heads=0.5, **SMALL)
KEEP = PackConfig(**EXACT, keep=0.25, **SMALL)
DEMOTE = PackConfig(**EXACT, keep=0.25, evicted_bits=2, **SMALL)


@pytest.mark.parametrize("config", ["razor", "keep", "demote"])
@pytest.mark.parametrize("name", ["llama", "qwen2_sliding", "gemma3_text"])
def test_per_head_caches_free_bytes_counted_by_the_walk(name, config, cache_root):
    model = build_model(name)
    cfg = {"razor": RAZOR, "keep": KEEP, "demote": DEMOTE}[config]
    cache = PackedCache(model, cfg)
    lossless = PackedCache(model, "lossless")
    ids = _prompt()
    _decode(model, cache, ids, steps=20)
    _decode(model, lossless, ids, steps=20)
    assert cache.nbytes() == storage_bytes(walk_tensors(cache.layers))
    # razor frees what its non-retrieval heads drop (how much depends on where the probe finds retrieval heads)
    assert cache.nbytes() < (1.0 if config == "razor" else 0.8) * lossless.nbytes()
    per_head = [s for layer in cache.layers for s in layer.segments if s.per_head]
    # (where the probe picks every head of the full layers, the sliding layers drop their spans with the window)
    whole = all(layer.is_sliding or layer.retrieval == (0, 1) for layer in cache.layers)
    assert per_head or (config == "razor" and whole), "some segment keeps its own tokens per head"
    assert cache.stats()["attention_paths"]["fused"] > 0


@pytest.mark.parametrize("kind,steps", [("span", 0), ("chunk", 40)])
def test_razor_keeps_every_token_on_retrieval_heads_only(kind, steps, cache_root):
    """Prompt spans and decode chunks alike: the other heads keep one compensation token each (a bounded window
    while generating)."""
    model = build_model("llama")
    cache = PackedCache(model, RAZOR)
    _decode(model, cache, _prompt(), steps=steps)
    for layer in cache.layers:
        assert layer.retrieval is not None
        spans = [s for s in layer.segments if s.kind == kind]
        assert spans
        others = tuple(i for i in range(2) if i not in layer.retrieval)
        if others:  # one compensation token per span on the other heads, standing for the span's tokens
            comp = [s for s in spans if s.slots is not None]
            assert {s.heads for s in comp} == {others}
            assert comp[0].length == 1
            log_n = torch.tensor(math.log(comp[0].end - comp[0].start))
            assert torch.allclose(comp[0].slots.float(), log_n, atol=2e-3)  # float16
        if layer.retrieval:
            whole = [s for s in spans if s.slots is None]
            assert whole and whole[0].length == whole[0].end - whole[0].start


@pytest.mark.parametrize("config", ["keep", "demote", "razor"])
def test_batch_samples_keep_their_own_tokens(config, cache_root):
    """Each sample of a batch is ranked on its own: batched logits equal each sample's alone."""
    model = build_model("qwen3")
    cfg = {"razor": RAZOR, "keep": KEEP, "demote": DEMOTE}[config]
    ids = _prompt(batch=2)
    batched = _decode(model, PackedCache(model, cfg), ids, steps=8)
    for i in range(2):
        alone = _decode(model, PackedCache(model, cfg), ids[i : i + 1], steps=8)
        torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-4, rtol=1e-4)
    if config != "razor":  # the two samples kept different tokens (per head), so their slots' keys differ
        cache = PackedCache(model, cfg)
        _decode(model, cache, torch.stack([ids[0], ids[0]]), steps=0)
        cache_b = PackedCache(model, cfg)
        _decode(model, cache_b, ids, steps=0)
        kept = [s for s in cache_b.layers[0].segments if s.slots is not None][0]
        assert kept.length == math.ceil(0.25 * (kept.end - kept.start))


def test_left_padding_is_never_kept(cache_root):
    """Spans start after the longest left padding (the sinks are each sample's first real tokens), so every kept
    slot holds a real token of its sample; decoding takes the fused kernel."""
    model = build_model("llama")
    ids = _prompt()
    mask = torch.ones_like(ids)
    mask[1, :30] = 0
    cache = PackedCache(model, KEEP)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    kept = [s for s in cache.layers[0].segments if s.slots is not None][0]
    assert kept.start >= 30 and bool(torch.isfinite(kept.slots).all())
    with torch.no_grad():
        model(input_ids=ids[:, -1:], attention_mask=torch.cat([mask, mask[:, -1:]], 1), past_key_values=cache)
    assert cache.stats()["attention_paths"]["fused"] == len(cache.layers)


@pytest.mark.parametrize("config", ["razor", "demote"])
def test_save_and_load_continue_exactly(config, tmp_path, cache_root):
    model = build_model("llama")
    cfg = {"razor": RAZOR, "demote": DEMOTE}[config]
    ids = _prompt(batch=1)
    cache = PackedCache(model, cfg)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache)
    cache.save(tmp_path / "c")
    loaded = PackedCache.load(tmp_path / "c", model)
    nxt = torch.tensor([[7]])
    with torch.no_grad():
        a = model(input_ids=nxt, past_key_values=cache).logits
        b = model(input_ids=nxt, past_key_values=loaded).logits
    torch.testing.assert_close(a, b)


def test_damaged_retrieval_heads_file_is_probed_again(cache_root):
    from attentionpack.scoring.retrieval_heads import heads_path

    model = build_model("llama")
    PackedCache(model, RAZOR)
    path = heads_path(model)
    path.write_text("{ not json", encoding="utf-8")
    with pytest.warns(UserWarning, match="unusable"):
        cache = PackedCache(model, RAZOR)
    _decode(model, cache, _prompt(batch=1), steps=2)
    other = build_model("llama", seed=1)  # another model: its own probe, its own file
    assert heads_path(other) != path
    PackedCache(other, RAZOR)
    assert heads_path(other).is_file()


def test_models_without_packed_attention_are_refused(cache_root):
    model = build_model("llama")
    model.set_attn_implementation("eager")
    cache = PackedCache(model, KEEP)
    with pytest.raises(RuntimeError, match="attn_implementation='sdpa'"):
        _decode(model, cache, _prompt(batch=1), steps=1)


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(keep=0.0), "keep"),
        (dict(keep=1.5), "keep"),
        (dict(retrieval_heads=2), "retrieval_heads"),
        (dict(evicted_bits=2), "unless keep"),
        (dict(keep=0.5, evicted_bits=3), "evicted_bits"),
        (dict(retrieval_heads=0.2, budget=0.25), "budget"),
        (dict(retrieval_heads=0.2, compressed_attention=False), "compressed_attention"),
    ],
)
def test_bad_settings_name_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        PackConfig(**fields)


def test_budget_with_keep_evicts_below_the_encodings_floor(cache_root):
    """`PackConfig(budget=f, keep=s)`: eviction shares are candidates of the budget, so a budget below the
    cheapest encoding of every token becomes feasible; bytes stay within f and decoding takes the fused kernel."""
    from attentionpack.budget import BudgetError

    model = build_model("qwen3")
    ids = torch.randint(3, VOCAB, (2, 400), generator=torch.Generator().manual_seed(0))
    with pytest.raises(BudgetError, match="infeasible"):
        with torch.no_grad():
            model(input_ids=ids, past_key_values=PackedCache(model, PackConfig(budget=0.05, **SMALL)))
    cache = PackedCache(model, PackConfig(budget=0.05, keep=0.0625, **SMALL))
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache)
    assert cache.nbytes() <= 0.05 * cache.dynamic_nbytes(steady=True)
    assert cache.nbytes() == storage_bytes(walk_tensors(cache.layers))
    report = cache.planner.report.values()
    assert min(r["share"] for r in report) < 1 and all(r["evictions"] for r in report if r["kind"] == "span")
    logits = _decode(model, cache, ids[:, -1:], steps=3)
    assert torch.isfinite(logits).all() and cache.stats()["attention_paths"]["fused"] > 0
