"""Prefix reuse in the server (`Engine(prefix_store=...)`): a conversation's later turns start from the cache stored
when an earlier request went through the same prefix, report the reused tokens as
`usage.prompt_tokens_details.cached_tokens`, and answer exactly what a server that prefilled the whole prompt with
the same chunk boundary answers (a stored cache reloads bit for bit)."""

from __future__ import annotations

import openai
import pytest
import tiny_models
from serve_helpers import ByteTokenizer, running_server

from attentionpack import PackConfig
from attentionpack.store import PrefixStore

CONFIG = PackConfig.preset("max").replace(window=16, chunk=16, min_span=8, budget=None)
DOCUMENT = "".join(f"Item {i}: the key of box {i} is {7 * i % 97}. " for i in range(12))  # ~430 tokens
QUESTIONS = ["What is the key of box 3?", "And the key of box 10?", "Which box holds key 14?"]


def _chat(srv, question: str):
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
    return client.chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": DOCUMENT}, {"role": "user", "content": question}],
        max_tokens=8,
        temperature=0,
    )


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_later_turns_reuse_the_stored_prefix_and_answer_the_same(name, tmp_path):
    model = tiny_models.build_model(name)
    shared = len(f"system: {DOCUMENT}\n")  # ByteTokenizer: one token per character
    block = 32
    with running_server(model, ByteTokenizer(), CONFIG, prefix_store=PrefixStore(tmp_path / "a", block=block)) as (
        srv,
        engine,
    ):
        answers = [_chat(srv, q) for q in QUESTIONS]
        stats = engine.snapshot()
    cached = [a.usage.prompt_tokens_details.cached_tokens for a in answers]
    assert cached == [0, shared // block * block, shared // block * block]
    assert (stats["prefix_misses"], stats["prefix_hits"], stats["prefix_stored"]) == (1, 2, 1)
    for i, q in enumerate(QUESTIONS[1:], 1):  # a fresh server: no stored prefix, the same chunk boundary
        with running_server(
            model, ByteTokenizer(), CONFIG, prefix_store=PrefixStore(tmp_path / f"fresh{i}", block=block)
        ) as (srv, _):
            fresh = _chat(srv, q)
        assert fresh.usage.prompt_tokens_details.cached_tokens == 0
        assert fresh.choices[0].message.content == answers[i].choices[0].message.content


def test_a_prefix_store_needs_a_compressed_cache(tmp_path):
    from attentionpack.serve.engine import Engine

    with pytest.raises(ValueError, match="PackConfig"):
        Engine(tiny_models.build_model("llama"), "dynamic", prefix_store=PrefixStore(tmp_path))
