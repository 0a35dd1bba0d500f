"""The server on a local Ray cluster (`attentionpack.serve.cluster`): two replicas of the embedded model behind the
ingress, called with the official `openai` client. Requests sharing a long document all go to the replica that holds
its stored prefix (`PrefixAffinityRouter`) and start at least 5x sooner than the first; killing a replica during a
bounded load fails its in-flight requests with an error (none hangs), Ray Serve replaces it, and later requests
succeed."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import openai
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

pytestmark = pytest.mark.real_model

APP = "attentionpack-test"
MODEL = "smollm2-135m-instruct"
QUESTIONS = [
    "When was Shakespeare born?",
    "Where did he die?",
    "Who was his wife?",
    "Name one of his plays.",
    "What was his father's trade?",
]


def _document() -> str:
    from attentionpack.eval.data import britannica_text

    return britannica_text()[:8000]  # about 2,000 tokens


@pytest.fixture(scope="module")
def cluster():
    from attentionpack.serve.cluster import build_app

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"replicas": 2, "budget": "1/8", "threads": 1}), name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _client(url: str, timeout: float = 120) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=timeout)


def _ask(url: str, document: str, question: str, max_tokens: int = 8) -> dict:
    """Stream one chat request; (time to first token, replica, cached tokens, text)."""
    sent = time.monotonic()
    first, text, server, usage = None, "", None, None
    stream = _client(url).chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": document}, {"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        server = chunk.system_fingerprint or server
        if chunk.choices and chunk.choices[0].delta.content:
            first = first if first is not None else time.monotonic() - sent
            text += chunk.choices[0].delta.content
        usage = chunk.usage or usage
    assert usage is not None and usage.prompt_tokens_details is not None
    return {"ttft": first, "server": server, "cached": usage.prompt_tokens_details.cached_tokens, "text": text}


def test_openai_routes_through_the_ingress(cluster):
    client = _client(cluster)
    assert [m.id for m in client.models.list().data] == [MODEL]
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=4, temperature=0
    )
    assert chat.choices[0].message.content and chat.system_fingerprint.startswith("ModelServer#")
    completion = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert completion.choices[0].text and completion.usage.completion_tokens == 4
    bad = httpx.post(cluster + "/v1/chat/completions", json={"model": MODEL, "messages": [], "max_tokens": -1})
    assert bad.status_code == 400 and "error" in bad.json()
    too_long = httpx.post(cluster + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 10**7})
    assert too_long.status_code == 400 and "context" in too_long.json()["error"]["message"]


def test_requests_sharing_a_document_go_to_the_replica_holding_it(cluster):
    document = _document()
    answers = [_ask(cluster, document, q) for q in QUESTIONS]
    first, later = answers[0], answers[1:]
    print(
        "time to first token: first "
        + f"{first['ttft']:.2f} s, later "
        + ", ".join(f"{a['ttft']:.2f}" for a in later)
        + f" s; cached {[a['cached'] for a in answers]}; replicas {[a['server'] for a in answers]}"
    )
    assert first["cached"] == 0
    assert all(a["server"] == first["server"] for a in later), "a follow-up went to the other replica"
    assert all(a["cached"] >= 1024 for a in later), "the follow-ups did not start from the stored prefix"
    assert first["ttft"] >= 5 * max(a["ttft"] for a in later)


def _replica_actor(server: str):
    """The Ray actor of the replica named `server` ("ModelServer#<id>")."""
    unique = server.split("#")[-1]
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith("SERVE_REPLICA::") and actor["name"].endswith(f"ModelServer#{unique}"):
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise AssertionError(f"no actor for replica {server}")


def _running_replicas() -> int:
    app = serve.status().applications[APP]
    return app.deployments["ModelServer"].replica_states.get("RUNNING", 0)


def test_killing_a_replica_fails_its_requests_cleanly_and_the_deployment_recovers(cluster):
    document = _document()[:2500]
    outcomes: list[tuple[str, float]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        sent = time.monotonic()
        try:
            _ask(cluster, document, f"Question {i}: {QUESTIONS[i % len(QUESTIONS)]}", max_tokens=48)
            outcome = "ok"
        except (openai.APIError, httpx.HTTPError) as err:
            outcome = type(err).__name__
        with lock:
            outcomes.append((outcome, time.monotonic() - sent))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    # a long request pins down the replica to kill: it is killed as soon as that request's first token arrives
    probe = _client(cluster).completions.create(
        model=MODEL, prompt="Counting from one to three hundred: 1, 2, 3, 4, 5,", max_tokens=300, stream=True
    )
    received = []
    for chunk in probe:
        received.append(chunk.choices[0].text if chunk.choices else "")
        if chunk.system_fingerprint:
            victim = chunk.system_fingerprint
            break
    ray.kill(_replica_actor(victim), no_restart=True)
    probe_failed = False
    try:
        for chunk in probe:
            received.append(chunk.choices[0].text if chunk.choices else "")
    except openai.APIError:
        probe_failed = True
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads), "a request hung past its timeout"
    print(f"in-flight request of the killed replica failed: {probe_failed}; load: {outcomes}")
    assert probe_failed, f"the killed replica's streaming request ended without an error: {''.join(received)!r}"
    deadline = time.monotonic() + 180
    while _running_replicas() < 2:
        assert time.monotonic() < deadline, "Ray Serve did not replace the killed replica"
        time.sleep(1)
    later = [_ask(cluster, document, q) for q in QUESTIONS[:3]]
    assert all(a["text"] for a in later)
    assert victim not in {a["server"] for a in later}
