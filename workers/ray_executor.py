"""Run each step on tensor-parallel ranks: one Ray actor per rank, all in one placement group.

Placement follows workers/placement_plan.py: inside a Ray Serve replica the ranks take their bundles
of the replica's own placement group (Serve's `placement_group_bundles`); elsewhere the executor
creates (and later removes) a group of its own.

Per step: the same StepInput goes to every rank in parallel; rank 0 samples and returns tokens.
Failure: if any rank's call fails (its actor died, its communicator broke) or the step exceeds
`step_timeout_s`, `execute` raises RankFailure at once; the engine then reports itself unhealthy.
Re-reading the weights is two-phase: every rank stages its new shard next to the serving one; only
when all have, all swap; if any rank failed to stage (WeightReloadError), all discard and keep
serving the old shards in step, and the caller gets WeightReloadError naming the ranks.
"""

import time

import ray
from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .config import ModelConfig
from .loader import WeightFormat
from .model_runner import CacheShape, WeightReloadError
from .placement_plan import PlacementPlan
from .rank_worker import RankWorker
from .step_input import StepInput, StepOutput


class RankFailure(RuntimeError):
    """A tensor-parallel rank failed; this replica can no longer run steps."""


class RayExecutor:
    def __init__(
        self,
        model_path: str,
        config: ModelConfig,
        dtype: str,
        cache: CacheShape,
        world_size: int,
        placement: PlacementPlan,
        device: str = "cpu",
        expert_parallel: bool = False,
        weights: WeightFormat = WeightFormat(),
        start_timeout_s: float = 300.0,
        step_timeout_s: float = 600.0,
    ):
        if not ray.is_initialized():
            ray.init()
        self.world_size = world_size
        self.step_timeout_s = step_timeout_s
        self._owns_group = not placement.in_serve_replica
        if self._owns_group:
            self.placement_group = placement_group(placement.own_group_bundles(world_size), placement.strategy)
        else:
            self.placement_group = get_current_placement_group()
            if self.placement_group is None:
                raise RuntimeError("the placement plan is a Serve replica's, but this process is in no placement group")
        ray.get(self.placement_group.ready(), timeout=start_timeout_s)
        remote = ray.remote(RankWorker)
        self.workers = [
            remote.options(
                num_cpus=placement.rank_cpus,
                num_gpus=placement.rank_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.placement_group, placement_group_bundle_index=placement.rank_bundle_index(rank)
                ),
            ).remote(rank, world_size, placement.threads_per_rank())
            for rank in range(world_size)
        ]
        try:
            backend = "nccl" if device == "cuda" else "gloo"
            first = self.workers[0]
            rendezvous = ray.get(
                first.nccl_unique_id.remote() if backend == "nccl" else first.rendezvous_address.remote(),
                timeout=start_timeout_s,
            )
            self._wait_all([w.init_communicator.remote(backend, rendezvous, start_timeout_s) for w in self.workers],
                           start_timeout_s)
            self.rank_weight_bytes = self._wait_all(
                [w.load.remote(model_path, config, dtype, cache, device, expert_parallel, weights)
                 for w in self.workers],
                start_timeout_s,
            )
        except BaseException:
            self.shutdown()
            raise

    def _wait_all(self, refs: list, timeout_s: float, survivable: tuple[type, ...] = ()) -> list:
        """All results, in rank order; where a rank raised a `survivable` error (one it reports and
        keeps serving after), that error in its place. RankFailure as soon as any rank fails otherwise
        or time runs out."""
        deadline = time.monotonic() + timeout_s
        pending, answers = list(refs), {}
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise RankFailure(f"a tensor-parallel rank did not answer within {timeout_s:.0f} s")
            try:
                answers[ready[0]] = ray.get(ready[0])
            except survivable as exc:
                answers[ready[0]] = getattr(exc, "cause", exc)  # the rank's own exception, not Ray's wrapper
            except Exception as exc:
                raise RankFailure(f"a tensor-parallel rank failed: {exc}") from exc
        return [answers[ref] for ref in refs]

    def execute(self, step: StepInput) -> StepOutput:
        refs = [w.execute.remote(step, rank == 0) for rank, w in enumerate(self.workers)]
        return self._wait_all(refs, self.step_timeout_s)[0]

    def logits(self, step: StepInput):
        """Full logits from rank 0 (every rank runs the forward)."""
        return self._wait_all([w.logits.remote(step) for w in self.workers], self.step_timeout_s)[0]

    def weight_bytes(self) -> int:
        return self.rank_weight_bytes[0]

    def reload_weights(self, weights: WeightFormat, timeout_s: float = 600.0) -> None:
        """Two-phase (the rule at the top): all ranks swap to their new shards, or none does."""
        staged = self._wait_all([w.stage_weights.remote(weights) for w in self.workers], timeout_s,
                                survivable=(WeightReloadError,))
        failed = {rank: error for rank, error in enumerate(staged) if isinstance(error, WeightReloadError)}
        if failed:
            self._wait_all([w.discard_staged.remote() for w in self.workers], timeout_s)
            raise WeightReloadError("; ".join(f"rank {rank}: {error}" for rank, error in failed.items())
                                    + " (every rank keeps serving its current weights)")
        self.rank_weight_bytes = self._wait_all([w.swap_staged.remote() for w in self.workers], timeout_s)

    def kernel_report(self) -> dict[str, str]:
        return self._wait_all([self.workers[0].kernel_report.remote()], 30.0)[0]

    def node_ids(self) -> list[str]:
        return ray.get([w.node_id.remote() for w in self.workers])

    def check_health(self) -> None:
        self._wait_all([w.ping.remote() for w in self.workers], 30.0)

    def shutdown(self) -> None:
        for w in getattr(self, "workers", []):
            ray.kill(w, no_restart=True)
        self.workers = []
        if self._owns_group and getattr(self, "placement_group", None) is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None
