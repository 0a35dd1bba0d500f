"""`attentionpack serve` over HTTP: a real uvicorn server on 127.0.0.1, called with the official `openai` client
(chat, completion, streaming) and with raw HTTP (httpx) for the error cases, on a tiny random Llama."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
import tiny_models
import torch
from serve_helpers import ByteTokenizer, running_server
from transformers import DynamicCache

from attentionpack import PackConfig


@pytest.fixture(scope="module")
def model():
    return tiny_models.build_model("llama")


@pytest.fixture(scope="module")
def server(model):
    config = PackConfig.preset("balanced").replace(window=16, chunk=16, min_span=8)
    with running_server(model, ByteTokenizer(), config, kv_memory=64 << 20) as (srv, engine):
        yield srv, engine


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _wait_idle(srv, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(srv.url + "/health").json()
        if health["running"] == 0 and health["queued"] == 0 and health["kv_bytes_reserved"] == 0:
            return health
        assert time.monotonic() < deadline, f"the server did not go idle: {health}"
        time.sleep(0.05)


def _wait_queued(srv, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(srv.url + "/health").json()["queued"] < n:
        assert time.monotonic() < deadline, "requests were not queued"
        time.sleep(0.02)


PROMPT = "The quick brown fox jumps over the lazy dog; " * 3


def test_openai_client_chat_completion_and_streaming(server):
    srv, engine = server
    client = _client(srv)
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=24, temperature=0
    )
    choice = chat.choices[0]
    assert choice.finish_reason in ("length", "stop") and choice.message.role == "assistant"
    assert chat.usage.prompt_tokens > len(PROMPT) and 1 <= chat.usage.completion_tokens <= 24

    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, reasons, usage = [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            reasons.append(c.finish_reason)
    assert "".join(pieces) == choice.message.content  # greedy: streamed text == non-streamed text
    assert reasons[-1] == choice.finish_reason and usage.completion_tokens == chat.usage.completion_tokens

    comp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0, stream=True)
    )
    assert comp.choices[0].text == streamed and comp.object == "text_completion"
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    _wait_idle(srv)


def test_sampling_seed_n_and_stop(server):
    srv, _ = server
    client = _client(srv)
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, n=3)
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # same seed, same samples
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert len({c.text for c in a.choices}) > 1  # choices use seeds seed+i: they differ
    greedy = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    assert len(greedy) >= 4, greedy
    stop = greedy[2:4]
    cut = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == greedy[: greedy.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stop=stop, stream=True
        )
    )
    assert streamed == cut.choices[0].text
    _wait_idle(srv)


def test_health_and_metrics(server):
    srv, _ = server
    _client(srv).completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)
    health = httpx.get(srv.url + "/health").json()
    assert health["status"] == "ok" and health["kv_bytes_limit"] == 64 << 20
    text = httpx.get(srv.url + "/metrics").text
    for name in (
        "attentionpack_kv_bytes_held ",
        "attentionpack_kv_bytes_dynamic_equivalent ",
        "attentionpack_requests_running ",
        "attentionpack_requests_queued ",
        "attentionpack_tokens_per_second ",
        "attentionpack_time_to_first_token_seconds_count ",
        "process_resident_memory_bytes ",
    ):
        assert name in text, name
    count = [line for line in text.splitlines() if line.startswith("attentionpack_generated_tokens_total ")]
    assert count and float(count[0].split()[1]) >= 4


BAD_REQUESTS = [
    ("/v1/completions", b'{"prompt": "hi", ', "not valid JSON"),
    ("/v1/completions", b"[1, 2, 3]", "body"),
    ("/v1/completions", json.dumps({"prompt": "hi", "frobnicate": 1}).encode(), "unknown field: frobnicate"),
    ("/v1/completions", json.dumps({"prompt": "hi", "max_tokens": "8"}).encode(), "max_tokens"),
    ("/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 0}).encode(), "max_tokens"),
    ("/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 10**9}).encode(), "context"),
    ("/v1/completions", json.dumps({"prompt": "hi", "temperature": 7}).encode(), "temperature"),
    ("/v1/completions", json.dumps({"prompt": "hi", "top_p": 0}).encode(), "top_p"),
    ("/v1/completions", json.dumps({"prompt": "hi", "n": 1000}).encode(), "n"),
    ("/v1/completions", json.dumps({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}).encode(), "stop"),
    ("/v1/completions", json.dumps({"prompt": ""}).encode(), "empty"),
    ("/v1/completions", json.dumps({"prompt": "   "}).encode(), "empty"),
    ("/v1/completions", json.dumps({"prompt": [5, 500]}).encode(), "token ids"),
    ("/v1/completions", json.dumps({"prompt": "x" * 600}).encode(), "context"),
    ("/v1/completions", json.dumps({}).encode(), "prompt"),
    ("/v1/chat/completions", json.dumps({"messages": []}).encode(), "messages"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": ""}]}).encode(), "empty"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), "role"),
    ("/v1/chat/completions", json.dumps({"messages": "hi"}).encode(), "messages"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), "content"),
    (
        "/v1/chat/completions",
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}).encode(),
        "stream",
    ),
]


@pytest.mark.parametrize("path,body,needle", BAD_REQUESTS)
def test_bad_input_is_400_with_openai_error_body(server, path, body, needle):
    srv, _ = server
    r = httpx.post(srv.url + path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and needle in err["message"], err


def test_other_errors(server):
    srv, _ = server
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "model": "gpt-9"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.get(srv.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(srv.url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()
    r = httpx.post(srv.url + "/v1/completions", content=b"x" * (9 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "error" in r.json()
    with pytest.raises(openai.BadRequestError):
        _client(srv).completions.create(model="tiny", prompt="hi", max_tokens=0)


def test_client_disconnect_mid_stream_frees_its_sequence(server):
    srv, engine = server
    _wait_idle(srv)
    cancelled = lambda: (
        engine.metrics.registry.get_sample_value(  # noqa: E731
            "attentionpack_sequences_total", {"outcome": "cancelled"}
        )
        or 0.0
    )
    before = cancelled()
    body = {"prompt": PROMPT, "max_tokens": 300, "temperature": 1.0, "seed": 1, "stream": True}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", srv.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = 0
            for line in r.iter_lines():
                lines += line.startswith("data: ")
                if lines >= 3:
                    break  # leave mid-stream: closing the response drops the connection
    health = _wait_idle(srv)
    assert health["kv_bytes_held"] == 0
    assert cancelled() == before + 1


class _FaultyCache(DynamicCache):
    """Raises in the 4th decoding step of its sequence (a fault of one request)."""

    def __init__(self, config):
        super().__init__(config=config)
        self.calls = 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == 1 and key_states.shape[-2] == 1:
            self.calls += 1
            if self.calls == 4:
                raise RuntimeError("injected fault")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def test_an_exception_in_one_request_fails_only_that_request(model):
    marker = ord("#")

    def factory(seq):
        if marker in seq.prompt:
            return _FaultyCache(model.config)
        return DynamicCache(config=model.config)

    tok = ByteTokenizer()
    with running_server(model, tok, "dynamic", cache_factory=factory, start_engine=False) as (srv, engine):
        results = {}

        def call(name, prompt):
            results[name] = httpx.post(
                srv.url + "/v1/completions", timeout=60, json={"prompt": prompt, "max_tokens": 12, "temperature": 0}
            )

        threads = [
            threading.Thread(target=call, args=("bad", "#" + PROMPT)),
            threading.Thread(target=call, args=("good", PROMPT)),
        ]
        for t in threads:
            t.start()
        _wait_queued(srv, 2)
        engine.start()  # both are queued: they are admitted one after the other and share decoding steps
        for t in threads:
            t.join()
        assert results["bad"].status_code == 500 and "injected fault" in results["bad"].json()["error"]["message"]
        assert engine.snapshot()["max_running"] == 2
        alone = httpx.post(
            srv.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0}
        ).json()["choices"][0]["text"]
        assert results["good"].status_code == 200 and results["good"].json()["choices"][0]["text"] == alone
        health = _wait_idle(srv)
        assert health["kv_bytes_held"] == 0


def test_engine_refuses_a_model_without_sdpa():
    from attentionpack.serve.engine import Engine

    model = tiny_models.build_model("llama")
    model.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="SDPA"):
        Engine(model, "dynamic", kv_memory=1 << 20)
    torch.manual_seed(0)
