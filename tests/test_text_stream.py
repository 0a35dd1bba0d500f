"""`TextStream`: the streamed deltas of generated ids add up to one decode of all of them (the embedded model's
tokenizer, multi-byte characters split across tokens), stop strings end the text wherever they fall, and each
token decodes a bounded number of ids however long the answer."""

from __future__ import annotations

import random

import pytest

from attentionpack.serve.text_stream import TextStream

TEXT = (
    "Café déjà vu — naïve coöperation: 東京タワー 🙂🚀 and ünïcödé! "
    "def f(x):\n    return x ** 2  # ≤ ≥ ≠\n"
    "Shakespeare's plays, e.g. Hamlet (1603), Macbeth... "
)


def _stream(tokenizer, ids: list[int], stops: list[str]) -> tuple[str, bool]:
    stream, out = TextStream(tokenizer, stops), []
    for token in ids:
        delta, stopped = stream.push(token)
        out.append(delta)
        if stopped:
            return "".join(out), True
    out.append(stream.flush())
    return "".join(out), False


@pytest.mark.real_model
def test_streamed_text_equals_one_decode(real_model):
    _, tokenizer = real_model
    rng = random.Random(3)
    ids = tokenizer(TEXT * 3, add_special_tokens=False).input_ids
    vocab = len(tokenizer)
    cases = [ids, ids[1:], ids[5:-3]]
    cases += [[rng.randrange(vocab) for _ in range(200)] for _ in range(3)]  # arbitrary ids, bytes of any kind
    for case in cases:
        text, stopped = _stream(tokenizer, case, [])
        assert not stopped and text == tokenizer.decode(case, skip_special_tokens=True)


@pytest.mark.real_model
def test_stop_strings_end_the_text_where_they_first_appear(real_model):
    _, tokenizer = real_model
    ids = tokenizer(TEXT * 2, add_special_tokens=False).input_ids
    full = tokenizer.decode(ids, skip_special_tokens=True)
    for stops in (["タワー"], ["return x"], ["🚀", "Café"], ["Macbeth...", "(1603)"], ["not there"]):
        text, stopped = _stream(tokenizer, ids, stops)
        ends = [full.find(s) for s in stops if s in full]
        assert stopped == bool(ends)
        assert text == (full[: min(ends)] if ends else full), stops


class _Counting:
    """A byte tokenizer that counts the ids it decodes."""

    def __init__(self) -> None:
        self.decoded = 0

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        self.decoded += len(ids)
        return bytes(ids).decode("utf-8", errors="replace")


def test_each_token_decodes_a_bounded_number_of_ids():
    tok = _Counting()
    data = ("naïve 東京 🙂 " * 400).encode()  # 1- to 4-byte characters, one byte per token
    text, _ = _stream(tok, list(data), ["never"])
    assert text == data.decode()
    assert tok.decoded < 12 * len(data)  # a decode of every id at every token would be ~len(data)**2 / 2
