"""The engine prefills a long prompt in chunks (`Engine(prefill_chunk=...)`), one chunk per loop turn with a
decoding step of the running batch in between: outputs equal a whole-prompt prefill's (exact caches: same greedy
tokens; a compressing cache stays within its byte bound at every step boundary), running sequences keep decoding
while a long prompt is admitted, and a request cancelled mid-prefill frees its reservation."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import tiny_models
import torch

from attentionpack import PackConfig
from attentionpack.serve.engine import Engine
from attentionpack.serve.sequence import SamplingParams, Sequence, generate

SMALL = dict(window=16, chunk=16, min_span=8)


@pytest.mark.parametrize("spec", ["dynamic", PackConfig.preset("lossless")], ids=["dynamic", "lossless"])
@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_chunked_prefill_gives_the_whole_prompt_tokens(name, spec):
    model = tiny_models.build_model(name)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, tiny_models.VOCAB, (n,), generator=gen).tolist() for n in (150, 37, 96)]
    params = SamplingParams(max_tokens=12, temperature=0)
    outputs = []
    for chunk in (0, 32):
        engine = Engine(model, spec, kv_memory=1 << 30, prefill_chunk=chunk).start()
        try:
            outputs.append(generate(engine, prompts, params))
        finally:
            engine.stop()
    assert outputs[0] == outputs[1]


def test_budget_cache_holds_its_bound_between_chunks():
    model = tiny_models.build_model("llama")
    spec = PackConfig.preset("balanced").replace(**SMALL, budget=0.5, budget_strict=True)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, tiny_models.VOCAB, (n,), generator=gen).tolist() for n in (200, 180)]
    engine = Engine(model, spec, kv_memory=1 << 30, prefill_chunk=48).start()
    try:
        out = generate(engine, prompts, SamplingParams(max_tokens=8, temperature=0))
        snap = engine.snapshot()
    finally:
        engine.stop()
    assert [len(o) for o in out] == [8, 8]
    assert snap["reservation_violations"] == 0 and snap["exact_fallbacks"] == 0


def test_running_batch_decodes_while_a_long_prompt_is_prefilled(monkeypatch):
    model = tiny_models.build_model("llama")
    engine = Engine(model, "dynamic", kv_memory=1 << 30, prefill_chunk=16)
    order: list[str] = []
    prefill, decode = engine._prefill, engine._decode_step
    monkeypatch.setattr(engine, "_prefill", lambda seq: (order.append(f"p{len(seq.prompt)}"), prefill(seq))[1])
    monkeypatch.setattr(engine, "_decode_step", lambda: (order.append("d"), decode())[1])
    engine.start()
    try:
        gen = torch.Generator().manual_seed(6)
        short, long = (torch.randint(3, tiny_models.VOCAB, (n,), generator=gen).tolist() for n in (8, 160))
        out = generate(engine, [short, long], SamplingParams(max_tokens=20, temperature=0))
    finally:
        engine.stop()
    assert [len(o) for o in out] == [20, 20]
    long_turns = [i for i, e in enumerate(order) if e == "p160"]
    assert len(long_turns) == 10  # 160 tokens in chunks of 16
    between = order[long_turns[0] : long_turns[-1]]
    assert between.count("d") >= 9  # the short request decoded between every two chunks of the long one


def test_cancelled_mid_prefill_frees_its_reservation(monkeypatch):
    model = tiny_models.build_model("llama")
    engine = Engine(model, "dynamic", kv_memory=1 << 30, prefill_chunk=8)
    chunks = threading.Event()
    prefill = engine._prefill

    def slow(seq):
        prefill(seq)
        chunks.set()
        time.sleep(0.05)

    monkeypatch.setattr(engine, "_prefill", slow)
    engine.start()
    try:
        loop = asyncio.new_event_loop()
        seq = Sequence(list(range(3, 123)), SamplingParams(max_tokens=4, temperature=0), asyncio.Queue(), loop)
        engine.submit([seq])
        assert chunks.wait(30)
        seq.cancel()
        engine.wake()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (engine.snapshot()["kv_bytes_reserved"] or engine.prefilling):
            time.sleep(0.02)
        assert engine.snapshot()["kv_bytes_reserved"] == 0 and engine.prefilling is None
        assert seq.cache is None and 0 < seq.prefilled < 120
        loop.close()
    finally:
        engine.stop()


def test_negative_prefill_chunk_is_refused():
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(tiny_models.build_model("llama"), "dynamic", prefill_chunk=-1)
