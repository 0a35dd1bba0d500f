"""Helpers of the serve tests: a byte-level tokenizer for the tiny random models (vocab 128) and a server
factory (engine + FastAPI app + uvicorn on 127.0.0.1)."""

from __future__ import annotations

import contextlib

import tiny_models


class ByteTokenizer:
    """ASCII characters as token ids (vocab 128: the tiny models' vocabulary); no chat template."""

    chat_template = None
    eos_token_id = 2

    def __len__(self) -> int:
        return tiny_models.VOCAB

    def __call__(self, text: str, add_special_tokens: bool = True):
        class Encoded:
            input_ids = [ord(c) % tiny_models.VOCAB for c in text]

        return Encoded()

    def get_vocab(self) -> dict[str, int]:  # what the prefix store's tokenizer fingerprint reads
        return {chr(i): i for i in range(tiny_models.VOCAB)}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i < 3))


@contextlib.contextmanager
def running_server(
    model,
    tokenizer,
    cache_spec="dynamic",
    kv_memory: int = 64 << 20,
    max_queue: int = 64,
    start_engine: bool = True,
    **engine_kwargs,
):
    """Yield (ServerThread, Engine) for `model` on a free loopback port; stops both on exit."""
    from attentionpack.serve.app import ServerThread, create_app
    from attentionpack.serve.engine import Engine
    from attentionpack.serve.metrics import ServerMetrics

    metrics = ServerMetrics()
    engine = Engine(
        model,
        cache_spec,
        kv_memory=kv_memory,
        max_queue=max_queue,
        metrics=metrics,
        tokenizer=tokenizer,
        **engine_kwargs,
    )
    if start_engine:
        engine.start()
    app = create_app(engine, tokenizer, "tiny", metrics, default_max_tokens=16)
    try:
        with ServerThread(app) as server:
            yield server, engine
    finally:
        engine.stop()
