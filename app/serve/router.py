"""Ray Serve request router for the generation replicas: LoRA-set affinity with hot-set copies.

Ranks, tried in order (a rank whose replicas are all at RAY_MAX_ONGOING is skipped at once):

1. replicas that hold the routing key (Ray's multiplexed model ids, reported by each replica);
2. the replica of the request's slot (the `slot` argument the ingress's `AffinityPlanner` chose:
   traffic-balanced placement, and for the copies `key#k` of a hot set, other replicas than the
   first copy's). Ray's default router sends a key nobody holds to "the replicas with the fewest
   models", which at steady state is any replica, and keeps a hot key on one replica
   (ray-project/ray#48741, #65691);
3. every other replica, least loaded first (spill-over under load).

Requests without LoRAs (no key) go to the two least loaded of two random replicas, as Ray's default.
"""

from __future__ import annotations

import random

from ray.serve.request_router import FIFOMixin, MultiplexMixin, PendingRequest, RequestRouter, RunningReplica

from app.serve.routing import slot_replica


class LoraAffinityRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        model_id = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not model_id:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        holders = [r for r in candidate_replicas if model_id in r.multiplexed_model_ids]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        slot = pending_request.kwargs.get("slot") if pending_request is not None else None
        home = by_id.get(slot_replica(slot, by_id)) if slot is not None else None
        ranks = [holders, [home] if home is not None and home not in holders else []]
        rest = [r for r in candidate_replicas if r not in holders and r is not home]
        ranks.append(sorted(rest, key=lambda r: self._replica_queue_len_cache.get(r.replica_id) or 0))
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
        return [rank for rank in ranks if rank]
