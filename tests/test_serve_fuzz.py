"""1,200 malformed or hostile requests (a bounded, seeded loop) against a real server on 127.0.0.1: every one gets
a well-formed answer (an OpenAI-style error body for every error, never a 5xx), and afterwards the server still
answers a normal request exactly as before, holding no KV bytes."""

from __future__ import annotations

import json
import random
import time

import httpx
import tiny_models
from serve_helpers import ByteTokenizer, running_server

from attentionpack import PackConfig

REQUESTS = 1200
TIME_LIMIT_S = 240.0
VALID = {"prompt": "a fuzzed but valid prompt", "max_tokens": 2, "temperature": 0}
NASTY_VALUES = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2**63,
    -(2**63),
    10**30,
    1.5,
    -0.0,
    1e308,
    float("inf"),
    float("nan"),
    "",
    " ",
    "\x00",
    "\ud800",
    "A" * 5000,
    "é中𝄞",
    [],
    [None],
    [1, 2],
    {},
    {"a": {"b": []}},
    [[[[[]]]]],
    "9",
    "true",
    [-5],
    [2**40],
]
FIELDS = [
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "model",
    "user",
    "logprobs",
    "echo",
    "__proto__",
    "",
    "prompt ",
]


def _hostile(rng: random.Random) -> tuple[str, str, bytes | None, dict]:
    """(method, path, body, headers) of one hostile request."""
    path = rng.choice(["/v1/completions", "/v1/chat/completions"])
    headers = {"content-type": "application/json"}
    kind = rng.randrange(10)
    if kind == 0:  # random bytes
        return "POST", path, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))), headers
    if kind == 1:  # truncated JSON
        text = json.dumps({**VALID, "messages": [{"role": "user", "content": "hi"}]})
        return "POST", path, text[: rng.randrange(len(text))].encode(), headers
    if kind == 2:  # valid JSON that is not an object, or deep nesting
        body = rng.choice(["null", "1", '"text"', "[]", "[" * 5000 + "]" * 5000, '{"a":' * 3000 + "1" + "}" * 3000])
        return "POST", path, body.encode(), headers
    if kind == 3:  # wrong method or path
        method = rng.choice(["GET", "PUT", "DELETE", "PATCH"])
        return method, rng.choice([path, "/v1/nope", "/../etc/passwd", "/v1/models/x", "/%00"]), b"{}", headers
    if kind == 4:  # wrong or missing content type
        return (
            "POST",
            path,
            json.dumps(VALID).encode(),
            rng.choice([{}, {"content-type": "text/plain"}, {"content-type": "application/x-www-form"}]),
        )
    # a request object with one to three mutated fields (wrong types, out of range, unknown names)
    body: dict = (
        dict(VALID)
        if path == "/v1/completions"
        else {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    )
    for _ in range(rng.randrange(1, 4)):
        body[rng.choice(FIELDS)] = rng.choice(NASTY_VALUES)
    if path == "/v1/chat/completions" and rng.random() < 0.3:
        body["messages"] = [{"role": rng.choice(["user", "tool", 5, None]), "content": rng.choice(NASTY_VALUES)}]
    return "POST", path, json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass"), headers


def test_fuzz_1200_hostile_requests_then_the_server_still_answers():
    model = tiny_models.build_model("llama")
    config = PackConfig.preset("balanced").replace(window=16, chunk=16, min_span=8)
    with running_server(model, ByteTokenizer(), config, kv_memory=8 << 20, max_queue=8) as (srv, engine):
        normal = {"prompt": "The same prompt before and after the storm.", "max_tokens": 12, "temperature": 0}
        before = httpx.post(srv.url + "/v1/completions", json=normal, timeout=60).json()["choices"][0]["text"]
        rng = random.Random(16)
        statuses: dict[int, int] = {}
        deadline = time.monotonic() + TIME_LIMIT_S
        sent = 0
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            while sent < REQUESTS and time.monotonic() < deadline:
                method, path, body, headers = _hostile(rng)
                r = client.request(method, path, content=body, headers=headers)
                sent += 1
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                assert r.status_code in (200, 400, 404, 405, 413, 429), (r.status_code, body[:200], r.text[:300])
                if r.status_code >= 400:
                    assert isinstance(r.json()["error"]["message"], str), r.text[:300]
                elif path.endswith("completions") and method == "POST":
                    assert r.json()["choices"], r.text[:300]
        assert sent == REQUESTS, f"only {sent} requests in {TIME_LIMIT_S} s"
        assert statuses.get(400, 0) > REQUESTS // 2, statuses
        after = httpx.post(srv.url + "/v1/completions", json=normal, timeout=60).json()["choices"][0]["text"]
        assert after == before
        deadline = time.monotonic() + 30
        while (health := httpx.get(srv.url + "/health").json())["running"] or health["kv_bytes_held"]:
            assert time.monotonic() < deadline, health
            time.sleep(0.05)
        assert health["status"] == "ok" and health["reservation_violations"] == 0
