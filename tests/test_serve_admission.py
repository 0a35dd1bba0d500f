"""Admission by KV bytes: a full queue answers 429 with Retry-After, a request that could never fit answers 400
naming the limit, and under load the bytes held never exceed --kv-memory (tiny random Llama, real server)."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
import tiny_models
from serve_helpers import ByteTokenizer, running_server

from attentionpack import PackConfig
from attentionpack.serve.accounting import KVAccounting

PROMPT = "Admission is decided by the bytes each sequence can hold. " * 5  # 290 characters = tokens


@pytest.fixture(scope="module")
def model():
    return tiny_models.build_model("llama")


def _wait(srv, key: str, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(srv.url + "/health").json()[key] < n:
        assert time.monotonic() < deadline, f"{key} never reached {n}"
        time.sleep(0.02)


def _post_all(srv, bodies: list[dict]) -> list[httpx.Response]:
    out: list = [None] * len(bodies)

    def call(i):
        out[i] = httpx.post(srv.url + "/v1/completions", json=bodies[i], timeout=120)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    return threads, out


def test_full_queue_answers_429_with_retry_after(model):
    with running_server(model, ByteTokenizer(), "dynamic", max_queue=2, start_engine=False) as (srv, engine):
        body = {"prompt": "hello there", "max_tokens": 4, "temperature": 0}
        threads, results = _post_all(srv, [body, body])
        _wait(srv, "queued", 2)
        r = httpx.post(srv.url + "/v1/completions", json=body)
        assert r.status_code == 429, r.text
        assert int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="tiny", prompt="hi", max_tokens=2)
        r = httpx.post(srv.url + "/v1/completions", json={**body, "n": 2})  # all n choices need room at once
        assert r.status_code == 429
        engine.start()
        for t in threads:
            t.join()
        assert [r.status_code for r in results] == [200, 200]


def test_a_request_that_can_never_fit_answers_400_naming_the_limit(model):
    with running_server(model, ByteTokenizer(), "dynamic", kv_memory=20_000) as (srv, engine):
        per_token = KVAccounting(model, "dynamic").per_token  # 2 layers x K,V x 2 heads x 16 x 4 bytes = 512
        assert per_token == 512
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x" * 30, "max_tokens": 8})
        assert r.status_code == 200  # (30 + 8) x 512 = 19,456 bytes fit
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x" * 100, "max_tokens": 8})
        assert r.status_code == 400
        message = r.json()["error"]["message"]
        assert "--kv-memory" in message and "20000" in message and str(108 * 512) in message


def _load(model, spec, kv_memory: int, requests: int = 10, prompt: str = PROMPT):
    """All requests queued before the engine starts, so only the KV memory limits how many run at once."""
    bodies = [{"prompt": f"{i:02d} " + prompt, "max_tokens": 16, "temperature": 0} for i in range(requests)]
    with running_server(model, ByteTokenizer(), spec, kv_memory=kv_memory, max_queue=requests, start_engine=False) as (
        srv,
        engine,
    ):
        threads, results = _post_all(srv, bodies)
        _wait(srv, "queued", requests)
        engine.start()
        for t in threads:
            t.join()
        snap = engine.snapshot()
    assert [r.status_code for r in results] == [200] * requests, [r.text for r in results if r.status_code != 200]
    return snap, [r.json()["choices"][0]["text"] for r in results]


def test_bytes_held_never_exceed_the_cap_and_compression_admits_more(model):
    kv = 2 * (300 + 16) * 512  # two DynamicCache sequences of a 300-token prompt + 16 new tokens
    small = dict(window=16, chunk=16, min_span=8)
    dyn, dyn_texts = _load(model, "dynamic", kv)
    budget, _ = _load(model, PackConfig.preset("balanced").replace(**small, budget=0.25, budget_strict=True), kv)
    lossless, lossless_texts = _load(model, PackConfig.preset("lossless"), kv)
    for snap in (dyn, budget, lossless):
        assert 0 < snap["kv_bytes_held_max"] <= kv, snap
        assert snap["reservation_violations"] == 0 and snap["kv_bytes_reserved"] == 0, snap
        assert snap["exact_fallbacks"] == 0
    assert dyn["max_running"] == 2 and lossless["max_running"] == 2
    assert budget["max_running"] >= 2 * dyn["max_running"], (budget, dyn)
    assert lossless_texts == dyn_texts  # lossless: the same greedy text as DynamicCache


def test_short_prompts_under_a_budget_are_reserved_as_exact(model):
    """A prompt shorter than sink + window + min_span is not compacted, so the budget's f x DynamicCache bound does
    not apply to it: its reservation must cover it exact (no reservation is ever exceeded)."""
    small = dict(window=16, chunk=16, min_span=8)
    snap, _ = _load(
        model,
        PackConfig.preset("balanced").replace(**small, budget=0.125, budget_strict=True),
        1 << 20,
        requests=6,
        prompt="short one",
    )
    assert snap["reservation_violations"] == 0 and 0 < snap["kv_bytes_held_max"] <= 1 << 20, snap


def test_a_budget_from_the_command_line_is_strict():
    """`--budget` is a guarantee the admission counts on (f x the prompt reserved), not a preset's target."""
    from attentionpack.serve.accounting import cache_spec_from

    spec = cache_spec_from(None, 0.125)
    assert isinstance(spec, PackConfig) and spec.budget == 0.125 and spec.budget_strict
    assert cache_spec_from("dynamic", None) == "dynamic" and cache_spec_from(None, None).name == "balanced"


def _engine_run(model, spec, kv_memory: int, prompts: list[list[int]], max_tokens: int):
    from attentionpack.serve.engine import Engine
    from attentionpack.serve.sequence import SamplingParams, generate

    engine = Engine(model, spec, kv_memory=kv_memory).start()
    try:
        out = generate(engine, prompts, SamplingParams(max_tokens=max_tokens, temperature=0))
        return out, engine.snapshot()
    finally:
        engine.stop()


def test_decoded_tokens_are_reserved_in_the_encodings_the_prefill_chose(model):
    """Before its prefill a sequence reserves its prompt's bound only; after it, its bytes plus the bound of its
    decoded tokens in the encodings the prefill chose (`after_prefill`), and it decodes only once that fits. Under a
    cap below two worst cases but above two after-prefill bounds, two sequences decode at once; under a cap that
    fits one bound plus a second prompt, the second is prefilled, waits holding its prompt, and decodes after the
    first: the same greedy tokens as each served alone, and the cap never exceeded."""
    import torch

    from attentionpack import PackedCache
    from attentionpack.serve.engine import Engine

    spec = PackConfig.preset("balanced").replace(window=16, chunk=16, min_span=8, budget=0.25, budget_strict=True)
    prompts = [[ord(c) for c in f"{i:02d} " + PROMPT] for i in range(3)]
    new = 64
    Engine(model, spec, kv_memory=1 << 30)  # switches the model to the packed attention (as a server does)
    acc = KVAccounting(model, spec)
    bounds = []
    for p in prompts:
        cache = PackedCache(model, spec)
        with torch.no_grad():
            model(input_ids=torch.tensor([p]), past_key_values=cache, use_cache=True)
        bounds.append(acc.after_prefill(cache, cache.nbytes(), new - 1))
    worst = acc.worst_case(len(prompts[0]), new)
    alone = [_engine_run(model, spec, 1 << 30, [p], new)[0][0] for p in prompts]

    kv = 2 * max(bounds) + 64
    assert kv < 2 * worst and 3 * min(bounds) > kv  # reserved at their worst case, only one would decode
    out, snap = _engine_run(model, spec, kv, prompts, new)
    assert snap["max_running"] == 2 and snap["reservation_violations"] == 0, snap
    assert 0 < snap["kv_bytes_held_max"] <= kv and snap["kv_bytes_reserved"] == 0, snap
    assert out == alone

    kv = max(bounds) + acc.before_prefill(len(prompts[0])) + 64
    assert kv < 2 * min(bounds)
    out, snap = _engine_run(model, spec, kv, prompts[:2], new)
    assert snap["max_running"] == 1 and snap["reservation_violations"] == 0, snap
    # both caches were held at once (the second prefilled while the first decoded), within the cap
    assert max(bounds) < snap["kv_bytes_held_max"] <= kv, snap
    assert out == alone[:2]


def test_a_sequence_waiting_to_decode_hears_of_a_shutdown(model):
    """A prefilled sequence waiting for room to decode is told 503 when the engine stops (not left hanging). The
    test drives the engine's steps itself, then lets its thread see the stop."""
    import asyncio

    import torch

    from attentionpack import PackedCache
    from attentionpack.serve.engine import Engine, SamplingParams, Sequence

    spec = PackConfig.preset("balanced").replace(window=16, chunk=16, min_span=8, budget=0.25, budget_strict=True)
    prompt, new = [ord(c) for c in PROMPT], 200
    probe = Engine(model, spec, kv_memory=1 << 30)  # switches the model to the packed attention
    cache = PackedCache(model, spec)
    with torch.no_grad():
        model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True)
    bound = probe.accounting.after_prefill(cache, cache.nbytes(), new - 1)
    engine = Engine(model, spec, kv_memory=bound + probe.accounting.before_prefill(len(prompt)) + 64)
    loop, queue = asyncio.new_event_loop(), asyncio.Queue()
    seqs = [Sequence(list(prompt), SamplingParams(max_tokens=new, temperature=0), queue, loop, index=i) for i in (0, 1)]
    engine.submit(seqs)
    for s in seqs:
        with engine._lock:
            assert engine._admit() is s
        with torch.no_grad():  # as on the engine's thread
            engine._prefill(s)
    assert engine.active == [seqs[0]] and engine.prefilling is seqs[1] and seqs[1].first is not None
    engine._stop = True
    engine.start()
    engine.stop()
    loop.run_until_complete(asyncio.sleep(0.05))
    events = []
    while not queue.empty():
        events.append(queue.get_nowait())
    assert {e[1] for e in events if e[0] == "error" and e[2] == 503} == {0, 1}, events
    assert engine.prefilling is None and engine.snapshot()["kv_bytes_reserved"] == 0
    loop.close()
