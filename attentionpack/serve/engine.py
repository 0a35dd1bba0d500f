"""The serving engine: one thread owns the model and runs continuous batching with admission by KV bytes.

Loop (one engine thread; HTTP handlers only submit `Sequence`s and read their event queues):
1. drop sequences whose client went away or that were stopped (their caches and reservations are freed at once);
2. admit the oldest waiting sequence if its reservation fits under `kv_memory` next to everything reserved, and
   prefill it alone (batch 1, its own cache), `prefill_chunk` tokens per loop turn (each chunk is compacted by a
   PackedCache before the next); after its last chunk it samples its first token and joins the decoding batch;
3. run ONE decoding step over every active sequence (`SequenceBatchCache`: one forward, per-row attention), padded
   to the row count the model's matrix products run fastest at (`RowPadding`, measured once per model).
A prefill chunk and a decoding step alternate, so running sequences keep advancing while a long prompt is admitted
(a 4,096-token prompt no longer stalls the batch for a whole prefill).

Admission by bytes really held (`KVAccounting`): before its prefill a sequence reserves an upper bound of what its
prompt's cache can hold; after the prefill it reserves the bytes measured plus the bound on what the remaining tokens
can add in the encodings the prefill chose, and joins the decoding batch only once that fits (until then it holds its
prompt's bytes and no other sequence is admitted). Held bytes are measured after every prefill chunk and decoding step
and checked against each reservation (a miss is counted in `reservation_violations`), so reserved >= held and
sum(reserved) <= kv_memory at every step boundary. Bytes are those of the caches' storages (`nbytes()` for PackedCache,
a tensor walk for DynamicCache); temporary work tensors inside one forward call are not KV held.

Events put on a sequence's asyncio queue (thread-safe via its loop), each with the sequence's choice index:
("token", index, id), ("end", index, finish_reason) with finish_reason "stop" (an end-of-sequence token) or
"length", and ("error", index, http_status, message).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from transformers import Cache, DynamicCache

from ..attention.packed import NAME as PACKED_ATTENTION
from ..attention.packed import enable as enable_packed_attention
from ..cache import cache_nbytes
from ..config import PackConfig
from .accounting import KVAccounting, Limits, NeverFits
from .batch_cache import SequenceBatchCache, layer_windows
from .row_padding import RowPadding
from .sequence import QueueFull, SamplingParams, Sequence

if TYPE_CHECKING:
    from ..store import PrefixStore
    from .metrics import ServerMetrics

__all__ = ["Engine", "NeverFits", "QueueFull", "SamplingParams", "Sequence"]

log = logging.getLogger("attentionpack.serve")


class Engine:
    """Continuous-batching engine over one model.

    Args:
        model: a causal LM using SDPA (switched to the "attentionpack" attention implementation here).
        cache_spec: "dynamic" for transformers' DynamicCache, or a PackConfig for PackedCache.
        kv_memory: the most KV bytes held by all sequences together (reservations never exceed it).
        max_queue: waiting sequences beyond this are refused (`QueueFull`).
        max_context: the model's context length (prompt + max_tokens must fit); default from the model config.
        cache_factory: builds a sequence's cache (default from `cache_spec`); tests inject faulty caches.
        prefill_chunk: prompt tokens prefilled per loop turn (a decoding step of the running batch follows each);
            0 prefills a whole prompt in one turn.
        prefix_store: with a PackConfig, a sequence starts from the longest stored cache of its prompt's prefix and
            stores its cache after `Sequence.store_at` prompt tokens (the app sets it at a block boundary below the
            part of the conversation that later turns repeat); `tokenizer` goes into the entries' fingerprints.
        name: reported with every sequence it serves (`Sequence.server`; a Ray replica names itself).
        pad_rows: pad decoding steps with rows of no sequence where that is faster (`serve.row_padding`).
    """

    def __init__(
        self,
        model: Any,
        cache_spec: str | PackConfig = "dynamic",
        kv_memory: int = 2 << 30,
        max_queue: int = 64,
        max_context: int | None = None,
        cache_factory: Callable[[Sequence], Cache] | None = None,
        metrics: ServerMetrics | None = None,
        prefill_chunk: int = 1024,
        prefix_store: PrefixStore | None = None,
        tokenizer: Any = None,
        name: str | None = None,
        pad_rows: bool = True,
    ) -> None:
        enable_packed_attention(model)
        if getattr(model.config, "_attn_implementation", None) != PACKED_ATTENTION:
            raise ValueError(
                "continuous batching needs a model that uses SDPA attention (it runs the "
                f"'attentionpack' implementation); this one uses {model.config._attn_implementation!r}"
            )
        if kv_memory <= 0:
            raise ValueError(f"kv_memory={kv_memory} must be a positive number of bytes")
        if prefill_chunk < 0:
            raise ValueError(f"prefill_chunk={prefill_chunk} must be a number of tokens >= 1, or 0 for whole prompts")
        self.prefill_chunk = prefill_chunk
        self.model = model
        self.cache_spec = cache_spec
        self.kv_memory = int(kv_memory)
        self.max_queue = max_queue
        cfg = model.config.get_text_config(decoder=True)
        self.max_context = max_context or getattr(cfg, "max_position_embeddings", None) or 1 << 30
        self.accounting = KVAccounting(model, cache_spec)
        self.limits = Limits(self.max_context, self.kv_memory, self.accounting)
        if prefix_store is not None and not isinstance(cache_spec, PackConfig):
            raise ValueError("a prefix store holds compressed caches: give a PackConfig (a preset or a budget)")
        self.prefix_store, self.tokenizer = prefix_store, tokenizer
        self.prefix_hits = self.prefix_misses = self.prefix_stored = 0
        self.name = name
        self.windows = layer_windows(model)
        self.row_padding = RowPadding(model) if pad_rows else None
        if self.row_padding is not None:
            self.row_padding.measure()  # once per model, before any request waits for it
        self.cache_factory = cache_factory
        if isinstance(cache_spec, PackConfig) and cache_spec.budget is not None and cache_spec.layer_weights:
            from ..scoring.sensitivity import load_or_probe_sensitivity  # ~15 s once per model: not in a request

            load_or_probe_sensitivity(model)
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.metrics = metrics
        self.waiting: deque[Sequence] = deque()
        self.active: list[Sequence] = []
        self.prefilling: Sequence | None = None
        self.reserved = 0
        self.held = 0
        self.held_max = 0
        self.dynamic_equivalent = 0
        self.reservation_violations = 0
        self.max_active = 0
        self.exact_fallbacks = 0  # sequences served with DynamicCache because their prompt was too short for a budget
        self.decode_steps = 0
        self.decode_seconds = 0.0
        self.decode_tokens = 0
        self.padded_steps: dict[str, int] = {}  # "n->rows": decoding steps of n sequences run as `rows` rows (padded)
        self.service_ema = 5.0  # seconds per finished sequence, for Retry-After
        self._lock = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    # ---- public, called from any thread --------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._run, name="attentionpack-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise NeverFits when a request of this size could never be served."""
        self.limits.check(prompt_tokens, max_tokens)

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences (all or none); raises QueueFull when the waiting queue has no room for them."""
        with self._lock:
            if self._stop:
                raise QueueFull(1)
            if len(self.waiting) + len(seqs) > self.max_queue:
                raise QueueFull(self.retry_after())
            for s in seqs:
                s.server = self.name
                if s.params.seed is not None:
                    s.generator = torch.Generator().manual_seed(s.params.seed)
                self.waiting.append(s)
            self._lock.notify_all()

    @property
    def prefix_block(self) -> int:
        """Token granularity of stored prefixes (0: no prefix store)."""
        return self.prefix_store.block if self.prefix_store is not None else 0

    def wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def retry_after(self) -> int:
        """Seconds after which a refused client may find room: the time one sequence takes, over the running ones."""
        return max(1, math.ceil(self.service_ema / max(1, len(self.active))))

    def snapshot(self) -> dict:
        with self._lock:
            return self.snapshot_unlocked()

    # ---- the engine thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._lock:
                if self._stop:
                    break
                self._drop_cancelled()
                seq = self.prefilling if self.prefilling is not None else self._admit()
                if seq is None and not self.active:
                    self._lock.wait(timeout=0.5)
                    continue
            try:
                if seq is not None:
                    self._prefill(seq)
                if self.active:
                    self._decode_step()
            except Exception as err:  # noqa: BLE001 - an engine bug must not leave clients waiting forever
                log.exception("engine step failed")
                with self._lock:
                    for s in list(self.active) + ([self.prefilling] if self.prefilling is not None else []):
                        self._release(s, outcome="failed", error=f"engine failure: {type(err).__name__}: {err}")
                    self.prefilling = None
        with self._lock:
            prefilling = [self.prefilling] if self.prefilling is not None else []  # mid-prefill or waiting to join
            for s in list(self.waiting) + self.active + prefilling:
                s.emit("error", 503, "the server is shutting down")
            self.waiting.clear()
            self.active.clear()
            self.prefilling = None
            self.reserved = self.held = 0

    def _drop_cancelled(self) -> None:
        """Called under the lock: cancelled sequences leave the queue, the prefill and the batch, freeing their
        caches."""
        if any(s.cancelled for s in self.waiting):
            self.waiting = deque(s for s in self.waiting if not s.cancelled)
        if self.prefilling is not None and self.prefilling.cancelled:
            self._release(self.prefilling, outcome="cancelled")
            self.prefilling = None
        for s in [s for s in self.active if s.cancelled]:
            self._release(s, outcome="cancelled")

    def _admit(self) -> Sequence | None:
        """Under the lock: pop the oldest waiting sequence if its reservation fits (FIFO, no overtaking)."""
        if not self.waiting:
            return None
        seq = self.waiting[0]
        need = self.accounting.before_prefill(len(seq.prompt), seq.exact_fallback)
        if self.reserved + need > self.kv_memory:
            return None
        self.waiting.popleft()
        seq.reserved = need
        self.reserved += need
        self.prefilling = seq
        return seq

    def _new_cache(self, seq: Sequence) -> Cache:
        if self.cache_factory is not None and not seq.exact_fallback:
            return self.cache_factory(seq)
        if self.cache_spec == "dynamic" or seq.exact_fallback:
            return DynamicCache(config=self.model.config)
        from ..cache import PackedCache

        return PackedCache(self.model, self.cache_spec)

    def _prefill(self, seq: Sequence) -> None:
        from ..budget import BudgetError

        if seq.first is not None:  # prefilled, waiting for room to decode
            self._join(seq)
            return
        try:
            if seq.cache is None:
                seq.cache, seq.prefilled = self._new_cache(seq), 0
                if self.prefix_store is not None and not seq.exact_fallback and self.cache_factory is None:
                    seq.cache, seq.prefilled = self._stored_prefix(seq)
            begin, total = seq.prefilled, len(seq.prompt)
            end = total if self.prefill_chunk == 0 else min(total, begin + self.prefill_chunk)
            if begin < seq.store_at < end:  # a chunk ends where the prefix is stored
                end = seq.store_at
            ids = torch.tensor([seq.prompt[begin:end]], dtype=torch.long)
            logits = self.model(input_ids=ids, past_key_values=seq.cache, use_cache=True, logits_to_keep=1).logits
            seq.prefilled = end
            if end == seq.store_at and seq.cached_tokens < end:
                self._store_prefix(seq)
            if end < total:  # more chunks on the next loop turns; the running batch decodes in between
                with self._lock:
                    self._measure(seq)
                return
            seq.length = total
            token = seq.sample(logits[0, -1])
        except BudgetError as err:  # too short a prompt for the budget: serve it exact (reserved as such)
            log.info("sequence %d: %s; served with DynamicCache", seq.id, err)
            with self._lock:
                self.prefilling = None
                self.reserved -= seq.reserved
                seq.reserved, seq.cache, seq.exact_fallback, seq.prefilled = 0, None, True, 0
                self.exact_fallbacks += 1
                self.waiting.appendleft(seq)
            return
        except Exception as err:  # noqa: BLE001 - fails this request only
            log.exception("prefill of sequence %d failed", seq.id)
            with self._lock:
                self.prefilling = None
                self._release(seq, outcome="failed", error=f"prefill failed: {type(err).__name__}: {err}")
            return
        with self._lock:
            self._measure(seq)
            seq.first = token
            seq.need = self.accounting.after_prefill(seq.cache, seq.held, seq.params.max_tokens - 1)
        self._join(seq)

    def _join(self, seq: Sequence) -> None:
        """A prefilled sequence joins the decoding batch once `need`, the bound on its bytes to its last token
        (`KVAccounting.after_prefill`, from the encodings its prefill chose), fits next to every other reservation;
        until then it stays the prefilling sequence (holding its prompt's bytes; no other is admitted) while the
        batch decodes and finished sequences free their bytes."""
        assert seq.cache is not None and seq.first is not None
        with self._lock:
            need = seq.need
            if self.reserved - seq.reserved + need > self.kv_memory:
                if self.active:
                    return
                # nothing else holds bytes: cannot happen while need <= worst_case <= kv_memory (Limits.check)
                self.prefilling = None
                self._release(seq, outcome="failed", error=f"needs {need} bytes of KV cache, over --kv-memory")
                return
            self.reserved += need - seq.reserved
            seq.reserved = need
            self.prefilling = None
            self.active.append(seq)
            self._account()
        token, seq.first = seq.first, None
        self._deliver(seq, token)

    def _stored_prefix(self, seq: Sequence) -> tuple[Cache, int]:
        """(cache, prompt tokens it holds): the longest stored prefix of the prompt, or a fresh cache and 0."""
        assert self.prefix_store is not None and isinstance(self.cache_spec, PackConfig)
        cache, covered = self.prefix_store.cache_for(seq.prompt, self.model, self.cache_spec, self.tokenizer)
        seq.cached_tokens = covered
        if covered:
            self.prefix_hits += 1
        else:
            self.prefix_misses += 1
        return cache, covered

    def _store_prefix(self, seq: Sequence) -> None:
        """Save the cache, which now holds exactly the first `store_at` prompt tokens (a failure loses only the
        entry: it is logged and the request goes on)."""
        assert self.prefix_store is not None and seq.cache is not None
        try:
            if self.prefix_store.put(seq.prompt[: seq.store_at], seq.cache, self.tokenizer) is not None:  # type: ignore[arg-type]
                self.prefix_stored += 1
        except Exception:  # noqa: BLE001 - a full disk or a race must not fail the request
            log.exception("sequence %d: storing its first %d tokens failed", seq.id, seq.store_at)

    def _decode_step(self) -> None:
        batch = [s for s in self.active if not s.cancelled and s.cache is not None]
        if not batch:
            return
        rows = self.row_padding.rows(len(batch)) if self.row_padding is not None else len(batch)
        pad = [batch[-1]] * (rows - len(batch))  # rows of no sequence: the last one's token again, logits ignored
        ids = torch.tensor([[s.last_token] for s in batch + pad], dtype=torch.long)
        pos = torch.tensor([[s.length] for s in batch + pad], dtype=torch.long)
        caches: list[Cache] = []
        for s in batch:
            assert s.cache is not None, "filtered above; caches are released only on this (the engine) thread"
            caches.append(s.cache)
        wrapper = SequenceBatchCache(caches, self.windows, len(pad))
        start = time.perf_counter()
        try:
            logits = self.model(input_ids=ids, position_ids=pos, past_key_values=wrapper, use_cache=True).logits
        except Exception as err:  # noqa: BLE001 - a fault outside any one cache: the step's sequences fail
            log.exception("decoding step failed")
            with self._lock:
                for s in batch:
                    self._release(s, outcome="failed", error=f"decoding failed: {type(err).__name__}: {err}")
            return
        elapsed = time.perf_counter() - start
        greedy = logits[: len(batch), -1].argmax(dim=-1).tolist()  # one argmax for the rows sampled greedily
        tokens = []
        for i, s in enumerate(batch):
            s.length += 1
            token = None
            if i not in wrapper.failed:
                try:
                    token = greedy[i] if s.params.temperature == 0 else s.sample(logits[i, -1])
                except Exception as err:  # noqa: BLE001 - e.g. non-finite logits: this sequence fails alone
                    wrapper.failed[i] = err
            tokens.append(token)
        with self._lock:
            self.decode_steps += 1
            self.decode_seconds += elapsed
            self.decode_tokens += len(batch) - len(wrapper.failed)
            if pad:
                key = f"{len(batch)}->{rows}"
                self.padded_steps[key] = self.padded_steps.get(key, 0) + 1
            for i, s in enumerate(batch):
                if i in wrapper.failed:
                    failure = wrapper.failed[i]
                    log.error("sequence %d failed in a decoding step: %r", s.id, failure)
                    self._release(s, outcome="failed", error=f"decoding failed: {type(failure).__name__}: {failure}")
                    continue
                self._measure(s, account=False)
            self._account()
        if self.metrics is not None:
            self.metrics.decode_step(elapsed, len(batch))
        for s, token in zip(batch, tokens, strict=False):
            if token is not None and s.cache is not None:
                self._deliver(s, token)

    def _deliver(self, seq: Sequence, token: int) -> None:
        """Hand a sampled token to the client and finish the sequence on end-of-sequence or max_tokens."""
        now = time.monotonic()
        seq.generated += 1
        seq.last_token = token
        if seq.first_token_at is None:
            seq.first_token_at = now
            if self.metrics is not None:
                self.metrics.first_token(now - seq.arrival)
        elif self.metrics is not None:
            assert seq.last_token_at is not None, "set with first_token_at, on the sequence's first token"
            self.metrics.inter_token(now - seq.last_token_at)
        seq.last_token_at = now
        if self.metrics is not None:
            self.metrics.tokens(1)
        seq.emit("token", token)
        reason = "stop" if token in self.eos else "length" if seq.generated >= seq.params.max_tokens else None
        if reason is None and seq.length + 1 > self.max_context:
            reason = "length"
        if reason is not None:
            with self._lock:
                self._release(seq, outcome="finished")  # freed before the client hears the end
            seq.emit("end", reason)

    def _release(self, seq: Sequence, outcome: str, error: str | None = None) -> None:
        """Under the lock: remove a sequence from the batch and free its cache and reservation."""
        if seq in self.active:
            self.active.remove(seq)
        self.reserved -= seq.reserved
        seq.reserved = 0
        seq.held = seq.dynamic = 0
        seq.cache = None
        if error is not None:
            seq.emit("error", 500, error)
        if outcome == "finished":
            self.service_ema = 0.8 * self.service_ema + 0.2 * (time.monotonic() - seq.arrival)
        if self.metrics is not None:
            self.metrics.outcome(outcome)
        self._account()

    def _measure(self, seq: Sequence, account: bool = True) -> None:
        """Under the lock: a sequence's bytes held now (and what DynamicCache would hold), checked against its
        reservation; `account`: update the totals (a decoding step does once after measuring its sequences)."""
        assert seq.cache is not None
        seq.held = cache_nbytes(seq.cache)
        seq.dynamic = self.accounting.dynamic_equivalent(seq.cache)
        self._check_reservation(seq, seq.held)
        if account:
            self._account()

    def _check_reservation(self, seq: Sequence, held: int) -> None:
        if held > seq.reserved:
            self.reservation_violations += 1
            log.error("sequence %d holds %d bytes over its reservation of %d", seq.id, held, seq.reserved)
            self.reserved += held - seq.reserved
            seq.reserved = held

    def _account(self) -> None:
        """Under the lock: totals after a change (held bytes are those measured at the last step boundary)."""
        holding = self.active + ([self.prefilling] if self.prefilling is not None else [])
        self.held = sum(s.held for s in holding)
        self.held_max = max(self.held_max, self.held)
        self.max_active = max(self.max_active, len(self.active))
        self.dynamic_equivalent = sum(s.dynamic for s in holding)
        if self.metrics is not None:
            self.metrics.update(self.snapshot_unlocked())

    def snapshot_unlocked(self) -> dict:
        """The engine's counters (call under the lock; `snapshot` takes it)."""
        return {
            "running": len(self.active) + (self.prefilling is not None),
            "queued": len(self.waiting),
            "kv_bytes_held": self.held,
            "kv_bytes_held_max": self.held_max,
            "kv_bytes_reserved": self.reserved,
            "kv_bytes_limit": self.kv_memory,
            "kv_bytes_dynamic_equivalent": self.dynamic_equivalent,
            "max_running": self.max_active,
            "reservation_violations": self.reservation_violations,
            "exact_fallbacks": self.exact_fallbacks,
            "decode_steps": self.decode_steps,
            "decode_seconds": self.decode_seconds,
            "decode_tokens": self.decode_tokens,
            "padded_steps": dict(self.padded_steps),
            "prefix_hits": self.prefix_hits,
            "prefix_misses": self.prefix_misses,
            "prefix_stored": self.prefix_stored,
        }
