"""Padded decoding steps (`serve.row_padding`, `SequenceBatchCache(padding=...)`): rows of no sequence change no
sequence's tokens or cache, the engine pads where its measured table says so and still gives each sequence the
tokens it gets alone, the table is measured once per model, and the batch-wide float16 check leaves a row that
does not fit float16 to its own cache, as when it is decoded alone."""

from __future__ import annotations

import pytest
import tiny_models
import torch

from attentionpack import PackConfig, PackedCache
from attentionpack.attention.packed import enable
from attentionpack.serve import row_padding
from attentionpack.serve.batch_cache import SequenceBatchCache, layer_windows
from attentionpack.serve.engine import Engine
from attentionpack.serve.row_padding import RowPadding
from attentionpack.serve.sequence import SamplingParams, generate

BUDGET = PackConfig.preset("balanced").replace(window=16, chunk=16, min_span=8, budget=0.7, budget_strict=True)


def _prompts(n: int, seed: int = 4) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, tiny_models.VOCAB, (k,), generator=gen).tolist() for k in (90, 57, 120, 75)[:n]]


@torch.no_grad()
def _decode(model, prompts, steps: int, padding: int) -> tuple[list[list[int]], list[PackedCache]]:
    caches, tokens = [], []
    for p in prompts:
        cache = PackedCache(model, BUDGET)
        tokens.append(int(model(input_ids=torch.tensor([p]), past_key_values=cache).logits[0, -1].argmax()))
        caches.append(cache)
    out = [[t] for t in tokens]
    windows = layer_windows(model)
    for _ in range(steps):
        batch = SequenceBatchCache(caches, windows, padding)
        ids = torch.tensor(tokens + [tokens[-1]] * padding)[:, None]
        pos = torch.tensor([[c.get_seq_length()] for c in caches] + [[caches[-1].get_seq_length()]] * padding)
        logits = model(input_ids=ids, position_ids=pos, past_key_values=batch).logits
        assert not batch.failed and logits.shape[0] == len(caches) + padding
        tokens = logits[: len(caches), -1].argmax(-1).tolist()
        for seq, t in zip(out, tokens, strict=True):
            seq.append(t)
    return out, caches


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_padding_rows_change_no_sequence(name):
    model = tiny_models.build_model(name)
    enable(model)
    prompts = _prompts(3)
    plain, plain_caches = _decode(model, prompts, 30, 0)
    padded, padded_caches = _decode(model, prompts, 30, 5)
    assert padded == plain
    for a, b in zip(plain_caches, padded_caches, strict=True):
        assert a.get_seq_length() == b.get_seq_length() and a.nbytes() == b.nbytes()
    with pytest.raises(ValueError, match="padding"):
        SequenceBatchCache(plain_caches, layer_windows(model), -1)
    with pytest.raises(ValueError, match="2 padding"):  # the rows given must be the sequences' plus the padding
        batch = SequenceBatchCache(plain_caches, layer_windows(model), 2)
        batch.update(torch.zeros(4, 1, 1, 8), torch.zeros(4, 1, 1, 8), 0)


def test_engine_pads_steps_and_each_sequence_gets_its_tokens_alone(monkeypatch):
    model = tiny_models.build_model("gemma3_text")
    padded_steps = []
    original = SequenceBatchCache.__init__

    def spy(self, caches, windows, padding=0):
        padded_steps.append(padding)
        original(self, caches, windows, padding)

    monkeypatch.setattr(SequenceBatchCache, "__init__", spy)
    monkeypatch.setattr(RowPadding, "_measure", lambda self: [0, 1] + [self.max_rows] * (self.max_rows - 1))
    engine = Engine(model, BUDGET, kv_memory=64 << 20).start()
    try:
        params = SamplingParams(max_tokens=25, temperature=0)
        prompts = _prompts(4, seed=5)
        alone = [generate(engine, [p], params)[0] for p in prompts]
        together = generate(engine, prompts, params)
        snap = engine.snapshot()
    finally:
        engine.stop()
    assert together == alone and snap["max_running"] == len(prompts)
    # alone: one row, never padded; together: 2 to 4 sequences ran as 16 rows, 4 of them at first
    assert set(padded_steps) <= {0, 12, 13, 14} and 16 - len(prompts) in padded_steps
    steps = {f"{16 - p}->16": padded_steps.count(p) for p in set(padded_steps) - {0}}
    assert snap["padded_steps"] == steps  # the engine reports each padded step
    generated = sum(len(t) - 1 for t in alone + together)  # a sequence's first token comes from its prefill
    assert snap["decode_tokens"] == generated  # padding rows generate nothing


def test_row_padding_is_measured_once_per_model_and_never_shrinks(monkeypatch):
    model = tiny_models.build_model("llama")
    calls = []
    measure = RowPadding._measure

    def counted(self):
        calls.append(1)
        return measure(self)

    monkeypatch.setattr(RowPadding, "_measure", counted)
    monkeypatch.setattr(row_padding, "_MEASURED", type(row_padding._MEASURED)())
    rp = RowPadding(model, max_rows=8, repeats=1)
    table = rp.measure()
    assert len(table) == 9 and all(n <= table[n] <= 8 for n in range(1, 9))
    assert rp.rows(1) == 1 and rp.rows(9) == 9 and rp.rows(100) == 100
    assert [RowPadding(model, max_rows=8).rows(n) for n in range(2, 9)] == table[2:]
    assert len(calls) == 1  # the second RowPadding of the same model did not measure again
    with pytest.raises(ValueError, match="max_rows"):
        RowPadding(model, max_rows=0)


@torch.no_grad()
def test_a_row_beyond_float16_switches_only_its_own_tail():
    """The batch checks float16 once for all rows; when a row does not fit, each cache checks its own row: the
    overflowing row's tail turns bfloat16 and the others stay float16, as when each is decoded alone."""
    model = tiny_models.build_model("llama")
    enable(model)
    caches = []
    for p in _prompts(3):
        cache = PackedCache(model, BUDGET)
        model(input_ids=torch.tensor([p]), past_key_values=cache)
        caches.append(cache)
    layer = caches[0].layers[0]
    assert layer.tail is not None and layer.tail.keys.dtype == torch.float16
    h, d = layer.spec.num_kv_heads, layer.spec.head_dim
    keys, values = torch.randn(3, h, 1, d), torch.randn(3, h, 1, d)
    keys[1, 0, 0, 0] = 1e6  # beyond float16's range
    batch = SequenceBatchCache(caches, layer_windows(model))
    batch.update(keys, values, 0)
    assert [c.layers[0].tail.keys.dtype for c in caches] == [torch.float16, torch.bfloat16, torch.float16]
    batch = SequenceBatchCache([caches[0], caches[2]], layer_windows(model))
    batch.update(torch.randn(2, h, 1, d), torch.randn(2, h, 1, d), 1)  # every row fits: all stay float16
    assert [c.layers[1].tail.keys.dtype for c in (caches[0], caches[2])] == [torch.float16, torch.float16]


def test_serve_bench_reports_padded_steps(monkeypatch):
    """`bench serve`'s row for one configuration (a real server and client on loopback): every request served,
    and the padded steps the engine ran are in its row and its printed line."""
    from serve_helpers import ByteTokenizer

    from attentionpack.serve import bench

    model = tiny_models.build_model("llama")
    monkeypatch.setattr(RowPadding, "_measure", lambda self: [0, 1] + [self.max_rows] * (self.max_rows - 1))
    monkeypatch.setattr(row_padding, "_MEASURED", type(row_padding._MEASURED)())
    prompts = _prompts(3, seed=6)
    row = bench.bench_config(model, ByteTokenizer(), "dynamic", prompts, 64 << 20, 8, 120.0, sample_every=0.05)
    assert row["failed"] == 0 and row["generated_tokens"] <= 3 * 8 and row["max_concurrent_sequences"] >= 2
    assert row["padded_steps"] and all(k.endswith("->16") for k in row["padded_steps"])
    assert sum(row["padded_steps"].values()) <= row["decode_steps"]
    assert "padded steps " in bench._line(row) and "->16" in bench._line(row)
