"""Prometheus metrics of one server (its own registry, so several servers can live in one process, e.g. tests)."""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300, 600)
TOKENS_PER_SECOND_WINDOW = 10.0  # seconds of recent tokens the tokens/s gauge averages over


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes and friends (Linux)
        r = self.registry
        self.kv_held = Gauge(
            "attentionpack_kv_bytes_held",
            "KV cache bytes held by all running sequences (measured at the last step boundary)",
            registry=r,
        )
        self.kv_held_max = Gauge(
            "attentionpack_kv_bytes_held_max", "Most KV bytes held at any step boundary", registry=r
        )
        self.kv_dynamic = Gauge(
            "attentionpack_kv_bytes_dynamic_equivalent",
            "Bytes a transformers DynamicCache would hold for the same tokens",
            registry=r,
        )
        self.kv_reserved = Gauge(
            "attentionpack_kv_bytes_reserved", "KV bytes reserved by admitted sequences", registry=r
        )
        self.kv_limit = Gauge("attentionpack_kv_bytes_limit", "The --kv-memory limit", registry=r)
        self.violations = Gauge(
            "attentionpack_kv_reservation_violations",
            "Times a sequence held more bytes than it had reserved (0 when the bounds hold)",
            registry=r,
        )
        self.running = Gauge("attentionpack_requests_running", "Sequences being prefilled or decoded", registry=r)
        self.queued = Gauge("attentionpack_requests_queued", "Sequences waiting for KV memory", registry=r)
        self.tokens_total = Counter("attentionpack_generated_tokens", "Tokens generated", registry=r)
        self.tps = Gauge(
            "attentionpack_tokens_per_second",
            f"Generated tokens per second over the last {TOKENS_PER_SECOND_WINDOW:g} s",
            registry=r,
        )
        self.ttft = Histogram(
            "attentionpack_time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "attentionpack_inter_token_latency_seconds",
            "Time between two tokens of a sequence",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.step = Histogram(
            "attentionpack_decode_step_seconds", "One batched decoding step", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch = Gauge("attentionpack_decode_batch_size", "Sequences in the last decoding step", registry=r)
        self.outcomes = Counter(
            "attentionpack_sequences", "Sequences that left the server, by outcome", ["outcome"], registry=r
        )
        self.rejected = Counter(
            "attentionpack_requests_rejected", "Requests refused before admission, by status", ["status"], registry=r
        )
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    # ---- called by the engine ---------------------------------------------------------------------------------
    def update(self, snap: dict) -> None:
        self.kv_held.set(snap["kv_bytes_held"])
        self.kv_held_max.set(snap["kv_bytes_held_max"])
        self.kv_dynamic.set(snap["kv_bytes_dynamic_equivalent"])
        self.kv_reserved.set(snap["kv_bytes_reserved"])
        self.kv_limit.set(snap["kv_bytes_limit"])
        self.violations.set(snap["reservation_violations"])
        self.running.set(snap["running"])
        self.queued.set(snap["queued"])

    def tokens(self, n: int) -> None:
        self.tokens_total.inc(n)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, n))

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def decode_step(self, seconds: float, batch: int) -> None:
        self.step.observe(seconds)
        self.batch.set(batch)

    def outcome(self, outcome: str) -> None:
        self.outcomes.labels(outcome).inc()

    # ---- called by the HTTP side ------------------------------------------------------------------------------
    def render(self) -> bytes:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - TOKENS_PER_SECOND_WINDOW:
                self._recent.popleft()
            self.tps.set(sum(n for _, n in self._recent) / TOKENS_PER_SECOND_WINDOW)
        return generate_latest(self.registry)
