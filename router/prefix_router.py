"""Prefix-aware request routing by predicted time to first token: send a prompt where its first
token is expected soonest, which is where its prefix is cached unless that replica has too much work.
A Ray Serve RequestRouter (configured with `request_router_config` on the LLM-server deployment); it
runs inside every caller (the ingress).

The prompt's prefix is `GenerateRequest.block_hashes` (router/engine_api.py): the chained hashes of
its full KV blocks, computed as the engine's prefix cache does (workers/prefix_hash.py). Hash i held
by a replica means the replica has seen the prompt's whole prefix up to the end of block i.

Rule, for a request of P prompt tokens with block hashes H, over the candidate replicas r:

    cost(r) = pending(r) + unmatched(r) + load_tokens * queue(r)

in prompt tokens of prefill, a proxy for the time to first token on r:
- unmatched(r) = P - block_size * match(r): the prompt tokens r would compute, where match(r) is the
  number of leading hashes of H it is known to hold (see Memory), counted only from
  `min_match_blocks` on;
- pending(r): prompt tokens r has queued or is prefilling for other requests, not computed yet
  (the load the replica publishes after each engine step, router/token_relay.py; 0 if unknown);
- queue(r): requests r is working on (Serve's count, as this caller's router knows it, counting
  the choices it just made); each delays a new request by `load_tokens` tokens' worth (its rows in
  every step and its share of the step's token budget) - the term that spreads load.
The replica with the lowest cost wins; ties go to the lower queue, then to the replica with the
smaller known cache (this spreads new prefixes over the replicas), then at random. So a cached prefix
of S tokens keeps its requests on its replica until that replica is S / load_tokens requests busier
than another, and an empty replica (one autoscaling just added) takes requests as soon as the others
are that much busier; once it has served a prefix, it matches as long and the two share it.
Decisions are counted as "affinity" (the winner holds >= min_match_blocks of the prompt),
"overloaded" (another replica did, and lost on cost) or "new_prefix" (none did).

Memory: what a replica is known to hold is the union of
- *routed*: the hashes this router sent it, an LRU set of at most `max_tracked_blocks_per_replica`
  hashes per replica. A prompt's hashes are touched last block first, so the head of a prefix is
  the most recently used and a prefix is evicted tail first (it stays a prefix);
- *published*: the replica's latest `ReplicaRoutingStats.cached_block_hashes`, read from
  `RunningReplica.routing_stats` (polled by Serve every `request_routing_stats_period_s`).
Correction: a new complete published snapshot (one that differs from the previous one; a snapshot
cut to the replica's size bound only adds knowledge) is the replica's
truth for everything routed to it at least `published_grace_s` before the snapshot arrived: such
routed hashes that the snapshot does not list are forgotten (the replica evicted them or never
cached them; a snapshot is read as complete). Hashes routed more recently stay, since the request
may still be queued or in prefill. Replicas that leave the deployment or die are forgotten.

Parameters (`request_router_kwargs`, passed to `initialize_state`):
- load_tokens (prompt tokens, default 16): the cost of one request in flight on a replica; lower
  keeps prefixes on their replicas longer, higher balances load sooner.
- block_size (tokens, default 16): the engine's KV block size (what one matched hash saves).
- min_match_blocks (blocks, default 1): the shortest match worth routing for.
- max_tracked_blocks_per_replica (default 8192): size of each replica's routed LRU set.
- published_grace_s (seconds, default 10): how long a routed hash is trusted against snapshots
  that do not list it; above a request's usual queue + prefill time.

Serve is handed the chosen replica first and the other open replicas second, so a request whose
replica filled up in the meantime goes to the least loaded of the rest. A choice counts against
the replica's queue length as soon as it is made (see PrefixAwareRouter). Requests whose first
positional argument is not a GenerateRequest (other methods) are routed by power of two choices:
two random candidates, Serve sends to the one with the shorter queue.
Compared with Ray's PrefixCacheAffinityRouter (ray.serve.llm): it matches engine block hashes, not
characters; it keeps its state in the caller instead of a detached actor reached by blocking
`ray.get`s; it uses the replicas' real cache contents and queued prefill; it weighs a cached prefix
against load in one cost instead of switching affinity off past a request-count threshold.
"""

import random
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from math import inf
from typing import Callable, Hashable, Iterable, Sequence

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from .engine_api import GenerateRequest
from .token_relay import published_loads


@dataclass(slots=True)
class _ReplicaPrefixes:
    routed: OrderedDict = field(default_factory=OrderedDict)  # block hash -> time last routed
    published: frozenset = frozenset()

    def holds(self, block_hash: int) -> bool:
        return block_hash in self.routed or block_hash in self.published

    def size(self) -> int:
        """A lower bound of the number of blocks the replica is known to hold."""
        return max(len(self.routed), len(self.published))


@dataclass(frozen=True, slots=True)
class Candidate:
    replica: Hashable
    queue: int  # requests it is working on
    pending_tokens: int = 0  # prompt tokens it has yet to prefill for them


class PrefixAffinityPolicy:
    """The routing rule of this module (see the module docstring), free of Serve: replica ids are
    any hashable, loads are queue lengths and pending prompt tokens. Not thread-safe; Serve calls it
    from one event loop."""

    def __init__(
        self,
        load_tokens: float = 16.0,
        block_size: int = 16,
        min_match_blocks: int = 1,
        max_tracked_blocks_per_replica: int = 8192,
        published_grace_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ):
        if load_tokens < 0 or block_size < 1 or min_match_blocks < 1 or max_tracked_blocks_per_replica < 1:
            raise ValueError("need load_tokens >= 0, block_size >= 1, min_match_blocks >= 1, "
                             "max_tracked_blocks_per_replica >= 1")
        self.load_tokens = load_tokens
        self.block_size = block_size
        self.min_match_blocks = min_match_blocks
        self.max_tracked_blocks_per_replica = max_tracked_blocks_per_replica
        self.published_grace_s = published_grace_s
        self._clock = clock
        self._rng = rng or random.Random()
        self._replicas: dict[Hashable, _ReplicaPrefixes] = {}
        self.decisions: Counter = Counter()  # "affinity" | "new_prefix" | "overloaded"

    @property
    def replicas(self) -> set:
        return set(self._replicas)

    def matched_blocks(self, replica_id: Hashable, block_hashes: Sequence[int]) -> int:
        """How many leading blocks of the prompt the replica is known to hold."""
        memory = self._replicas.get(replica_id)
        if memory is None:
            return 0
        n = 0
        for block_hash in block_hashes:
            if not memory.holds(block_hash):
                break
            n += 1
        return n

    def known_cache_size(self, replica_id: Hashable) -> int:
        memory = self._replicas.get(replica_id)
        return 0 if memory is None else memory.size()

    def cost(self, candidate: Candidate, block_hashes: Sequence[int], prompt_tokens: int) -> float:
        """The rule's cost of sending the prompt to `candidate` (prompt tokens of prefill)."""
        match = self.matched_blocks(candidate.replica, block_hashes) if block_hashes else 0
        saved = self.block_size * match if match >= self.min_match_blocks else 0
        return (candidate.pending_tokens + max(0, prompt_tokens - saved)
                + self.load_tokens * candidate.queue)

    def choose(self, block_hashes: Sequence[int], candidates: list[Candidate | tuple],
               prompt_tokens: int | None = None) -> Hashable:
        """The replica for a prompt with these block hashes and `prompt_tokens` tokens (default: its
        full blocks); candidates are Candidates or (replica id, queue length) pairs."""
        if not candidates:
            raise ValueError("no candidate replicas")
        candidates = [c if isinstance(c, Candidate) else Candidate(*c) for c in candidates]
        tokens = prompt_tokens if prompt_tokens is not None else self.block_size * len(block_hashes)
        tokens = max(tokens, self.block_size * len(block_hashes))

        def key(c: Candidate):
            return (self.cost(c, block_hashes, tokens), c.queue, self.known_cache_size(c.replica), self._rng.random())

        best = min(candidates, key=key)
        holders = [c.replica for c in candidates
                   if block_hashes and self.matched_blocks(c.replica, block_hashes) >= self.min_match_blocks]
        self.decisions["affinity" if best.replica in holders else "overloaded" if holders else "new_prefix"] += 1
        return best.replica

    def record_routed(self, replica_id: Hashable, block_hashes: Sequence[int]) -> None:
        memory = self._replicas.setdefault(replica_id, _ReplicaPrefixes())
        routed, now = memory.routed, self._clock()
        for block_hash in reversed(block_hashes):  # the head of the prefix ends most recent
            routed[block_hash] = now
            routed.move_to_end(block_hash)
        while len(routed) > self.max_tracked_blocks_per_replica:
            routed.popitem(last=False)

    def update_published(self, replica_id: Hashable, block_hashes: Iterable[int], complete: bool = True) -> None:
        """A new snapshot of the replica's prefix cache; forgets what it contradicts (see Memory).
        A snapshot cut to its size bound (`complete=False`) only adds knowledge."""
        memory = self._replicas.setdefault(replica_id, _ReplicaPrefixes())
        memory.published = frozenset(block_hashes)
        if not complete:
            return
        trusted_until = self._clock() - self.published_grace_s
        # `routed` is ordered by time last routed, oldest first.
        stale = []
        for block_hash, routed_at in memory.routed.items():
            if routed_at > trusted_until:
                break
            if block_hash not in memory.published:
                stale.append(block_hash)
        for block_hash in stale:
            del memory.routed[block_hash]

    def remove(self, replica_id: Hashable) -> None:
        self._replicas.pop(replica_id, None)


def _generate_request(pending_request: PendingRequest | None) -> GenerateRequest | None:
    if pending_request is None or not pending_request.args:
        return None
    first = pending_request.args[0]
    return first if isinstance(first, GenerateRequest) else None


class PrefixAwareRouter(RequestRouter):
    """Serve's side of PrefixAffinityPolicy: queue lengths from Serve's cache (probing replicas it
    has no fresh entry for), published cache contents from `routing_stats`, replica churn.

    No FIFOMixin on purpose: with it Serve hands a chosen replica to the oldest pending request,
    not to the request it was chosen for.

    Serve counts a request against a replica's queue length only once the request is sent, and one
    routing task may route a whole burst before any of it is sent: every choice of the burst would
    see the same queue lengths and a hot prefix would pile onto one replica. So a choice is counted
    when it is made, and the send that follows is not counted again (`on_send_request`)."""

    def initialize_state(self, **policy_kwargs):
        """`request_router_kwargs`: PrefixAffinityPolicy's parameters (module docstring), its defaults."""
        self.policy = PrefixAffinityPolicy(**policy_kwargs)
        self._last_stats: dict[ReplicaID, dict] = {}
        self._counted_at_choice: Counter = Counter()  # replica id -> choices not yet sent

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        request = _generate_request(pending_request)
        if request is None or not candidate_replicas:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        queue_lens = await self._queue_lens(candidate_replicas)
        open_replicas = [r for r in candidate_replicas if queue_lens.get(r.replica_id, inf) < r.max_ongoing_requests]
        if not open_replicas:  # all full or silent: let Serve probe and back off
            return [candidate_replicas]
        published = published_loads()
        loads = [Candidate(r.replica_id, queue_lens[r.replica_id],
                           getattr(published.get(r.replica_id.unique_id), "pending_prefill_tokens", 0))
                 for r in open_replicas]
        chosen_id = self.policy.choose(request.block_hashes, loads, len(request.prompt_token_ids))
        # Recorded now, not only once accepted, so that concurrent requests of a new prefix follow it.
        self.policy.record_routed(chosen_id, request.block_hashes)
        self._count_choice(chosen_id, queue_lens[chosen_id])
        chosen = [r for r in open_replicas if r.replica_id == chosen_id]
        others = [r for r in open_replicas if r.replica_id != chosen_id]
        return [chosen, others] if others else [chosen]

    async def _queue_lens(self, replicas: list[RunningReplica]) -> dict[ReplicaID, int]:
        lens, unknown = {}, []
        for r in replicas:
            queue_len = self.replica_queue_len_cache.get(r.replica_id)
            if queue_len is None:
                unknown.append(r)
            else:
                lens[r.replica_id] = queue_len
        if unknown:
            for r, queue_len in await self._probe_queue_lens(unknown, 0):
                if queue_len is not None:
                    lens[r.replica_id] = queue_len
        return lens

    def _count_choice(self, replica_id: ReplicaID, queue_len: int) -> None:
        if self._use_replica_queue_len_cache:
            self.replica_queue_len_cache.update(replica_id, queue_len + 1)
            self._counted_at_choice[replica_id] += 1

    def on_send_request(self, replica_id: ReplicaID) -> None:
        # A choice that ends elsewhere (the chosen replica was full) stays counted on the chosen
        # replica until its next send. Miscounts are brief: with Serve's rejection protocol every
        # accepted request brings back the replica's true count (`on_new_queue_len_info`).
        if self._counted_at_choice[replica_id] > 0:
            self._counted_at_choice[replica_id] -= 1
        else:
            super().on_send_request(replica_id)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        # The replica that accepted the request (another than chosen when the chosen one was full).
        request = _generate_request(pending_request)
        if request is not None:
            self.policy.record_routed(replica_id, request.block_hashes)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        for gone in self.policy.replicas - self._replica_id_set:
            self._forget(gone)
        for r in replicas:
            stats = r.routing_stats
            if stats and stats != self._last_stats.get(r.replica_id):
                self._last_stats[r.replica_id] = stats
                self.policy.update_published(r.replica_id, stats.get("cached_block_hashes", ()),
                                             stats.get("complete", True))

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget(replica_id)

    def _forget(self, replica_id: ReplicaID) -> None:
        self.policy.remove(replica_id)
        self._last_stats.pop(replica_id, None)
        self._counted_at_choice.pop(replica_id, None)
