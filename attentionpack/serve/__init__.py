"""`attentionpack serve`: an OpenAI-compatible server with continuous batching over compressed KV caches.

engine.py: the scheduler (one engine thread, admission by KV bytes, one batched forward per decoding step);
batch_cache.py: the multi-sequence cache of that step; app.py: FastAPI routes and schemas; metrics.py:
Prometheus metrics; bench.py: `attentionpack bench serve`. Needs the `serve` extra (fastapi, uvicorn,
prometheus-client; the bench and tests also use httpx and openai).
"""
