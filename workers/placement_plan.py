"""Where one replica's processes run, as Ray placement: the one place that turns the rule below into
Serve's placement-group bundles, each rank's bundle index and the CPUs a replica needs.

Rule: without tensor parallelism a replica is one actor with `replica_cpus` CPUs. With it, a Serve
replica owns ONE placement group: bundle 0 holds the replica actor (`replica_cpus`), bundles
1..world_size one rank each (`rank_cpus`, `rank_gpus`), placed by `strategy` (STRICT_PACK: one
node). Under STRICT_SPREAD (every bundle on its own node) the replica actor shares rank 0's bundle
instead, so one rank per node needs world_size nodes, not one more. An engine started outside Serve
(`replica_cpus` None: tests, benchmarks) creates its own group of the rank bundles only, and removes
it when it shuts down. A rank runs `rank_threads` torch threads (default: its bundle's CPUs, at least
1). Ray-free: workers/ray_executor.py applies it.
"""

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PlacementPlan:
    rank_cpus: float = 1.0
    rank_gpus: float = 0.0
    strategy: str = "STRICT_PACK"  # Ray's placement-group strategy: STRICT_PACK, PACK, SPREAD, STRICT_SPREAD
    replica_cpus: float | None = None  # the Serve replica actor's bundle; None: not inside a Serve replica
    rank_threads: int | None = None

    @property
    def in_serve_replica(self) -> bool:
        return self.replica_cpus is not None

    def rank_bundle(self) -> dict[str, float]:
        """Ray resources of one rank actor."""
        return {"CPU": self.rank_cpus, **({"GPU": self.rank_gpus} if self.rank_gpus else {})}

    @property
    def replica_shares_rank0_bundle(self) -> bool:
        return self.strategy == "STRICT_SPREAD"

    def serve_bundles(self, world_size: int) -> list[dict[str, float]] | None:
        """Serve's `placement_group_bundles` for a replica with `world_size` ranks (None without
        tensor parallelism: the replica is a plain actor). Serve puts the replica actor in bundle 0."""
        if world_size == 1:
            return None
        ranks = self.own_group_bundles(world_size)
        if self.replica_shares_rank0_bundle:
            return [{**ranks[0], "CPU": ranks[0]["CPU"] + self._replica_cpus()}] + ranks[1:]
        return [{"CPU": self._replica_cpus()}] + ranks

    def own_group_bundles(self, world_size: int) -> list[dict[str, float]]:
        """The group an engine outside Serve creates: one bundle per rank."""
        return [self.rank_bundle() for _ in range(world_size)]

    def rank_bundle_index(self, rank: int) -> int:
        """The bundle of `rank` in the group the ranks run in."""
        return rank + (1 if self.in_serve_replica and not self.replica_shares_rank0_bundle else 0)

    def threads_per_rank(self) -> int:
        return self.rank_threads or max(1, int(self.rank_cpus))

    def replica_cpus_needed(self, world_size: int) -> float:
        """CPUs one Serve replica takes: its actor, plus its ranks' with tensor parallelism."""
        return self._replica_cpus() + (world_size * self.rank_cpus if world_size > 1 else 0.0)

    def _replica_cpus(self) -> float:
        if self.replica_cpus is None:
            raise ValueError("this plan is for an engine outside Serve: it has no replica bundle")
        return self.replica_cpus
