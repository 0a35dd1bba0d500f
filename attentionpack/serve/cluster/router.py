"""`PrefixAffinityRouter`: a Ray Serve request router that sends a request to the replica holding its prompt's
longest stored prefix, and every other request to the least-loaded replica.

A replica stores a request's cache at `store_at` prompt tokens (a block boundary; see `serve.engine`), so the router
only has to remember which replica got the request whose `store_at` prefix had a given digest. The ingress sends
each request's prefix keys with it (`payload["prefix_keys"]`: [tokens, sha256 of the first `tokens` ids] at every
block boundary of the prompt, the digests the prefix store matches entries by, `store.prefix_digests`); the longest
key the router has seen routed wins. The map is per router (one per ingress replica), bounded, and forgets replicas
that died or left. Affinity yields to load: when the holder has `max_imbalance` more requests in flight than the
least-loaded replica (queue lengths as last probed), or is at its `max_ongoing_requests`, the request goes to the
least-loaded replica (the prefix is recomputed there, and stored there too).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

MAX_KEYS = 100_000  # prefix digests remembered (least recently routed forgotten first)
MAX_IMBALANCE = 4  # requests in flight beyond the least-loaded replica's at which a holder loses its affinity


def _payload(pending: PendingRequest | None) -> dict[str, Any] | None:
    """The generate call's payload (a dict with prefix keys), or None for any other call."""
    if pending is None or not pending.args or not isinstance(pending.args[0], dict):
        return None
    return pending.args[0] if "prefix_keys" in pending.args[0] else None


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    """Route by the longest prompt prefix a replica holds; otherwise to the least-loaded replica."""

    def initialize_state(self, max_keys: int = MAX_KEYS, max_imbalance: int = MAX_IMBALANCE, **kwargs: Any) -> None:
        self.max_keys, self.max_imbalance = max_keys, max_imbalance
        self.holders: OrderedDict[str, ReplicaID] = OrderedDict()  # prefix digest -> replica that stored it
        self.affinity_hits = 0  # requests sent to a replica because it holds their prefix

    def holder(self, payload: dict[str, Any], candidates: dict[ReplicaID, RunningReplica]) -> RunningReplica | None:
        """The candidate holding the longest of the request's prefixes, if any."""
        for _, digest in sorted(payload["prefix_keys"], reverse=True):
            rid = self.holders.get(digest)
            if rid is not None and rid in candidates:
                self.holders.move_to_end(digest)
                return candidates[rid]
        return None

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        payload = _payload(pending_request)
        by_id = {r.replica_id: r for r in candidate_replicas}
        best = self.holder(payload, by_id) if payload is not None else None
        if best is None or self._load(best) - min(map(self._load, candidate_replicas)) > self.max_imbalance:
            return [candidate_replicas]  # Ray Serve probes them and takes the least loaded
        self.affinity_hits += 1
        return [[best], [r for r in candidate_replicas if r.replica_id != best.replica_id]]

    def _load(self, replica: RunningReplica) -> int:
        """Requests in flight on the replica as last probed (0 when unknown)."""
        return self._replica_queue_len_cache.get(replica.replica_id) or 0

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        """The replica now serving the request stores its prefix of `store_at` tokens: remember it there."""
        payload = _payload(pending_request)
        if payload is None or not payload.get("store_at"):
            return
        for tokens, digest in payload["prefix_keys"]:
            if tokens == payload["store_at"]:
                self.holders[digest] = replica_id
                self.holders.move_to_end(digest)
        while len(self.holders) > self.max_keys:
            self.holders.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget(lambda rid: rid == replica_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        alive = {r.replica_id for r in replicas}
        self._forget(lambda rid: rid not in alive)

    def _forget(self, gone: Any) -> None:
        for digest in [d for d, rid in self.holders.items() if gone(rid)]:
            del self.holders[digest]
