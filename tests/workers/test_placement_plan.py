"""workers/placement_plan.py: the bundles a TP replica asks Serve for, where each rank goes, the CPUs
it needs, inside a Serve replica and outside one."""

import pytest

from mixserve.workers.placement_plan import PlacementPlan


def test_a_serve_replica_with_two_ranks_owns_one_group_replica_first():
    plan = PlacementPlan(rank_cpus=4, rank_gpus=1, strategy="PACK", replica_cpus=1)
    assert plan.serve_bundles(2) == [{"CPU": 1}, {"CPU": 4, "GPU": 1}, {"CPU": 4, "GPU": 1}]
    assert [plan.rank_bundle_index(r) for r in range(2)] == [1, 2]
    assert plan.replica_cpus_needed(2) == 9
    assert plan.threads_per_rank() == 4


def test_without_tensor_parallelism_a_replica_is_a_plain_actor():
    plan = PlacementPlan(replica_cpus=2)
    assert plan.serve_bundles(1) is None
    assert plan.replica_cpus_needed(1) == 2


def test_an_engine_outside_serve_makes_a_group_of_rank_bundles_only():
    plan = PlacementPlan(rank_cpus=0.5, rank_threads=3)
    assert not plan.in_serve_replica
    assert plan.own_group_bundles(3) == [{"CPU": 0.5}] * 3
    assert [plan.rank_bundle_index(r) for r in range(3)] == [0, 1, 2]
    assert plan.threads_per_rank() == 3  # explicit threads win over the bundle's CPUs
    assert PlacementPlan(rank_cpus=0.5).threads_per_rank() == 1  # at least one
    with pytest.raises(ValueError, match="outside Serve"):
        plan.serve_bundles(2)


def test_strict_spread_puts_the_replica_in_rank_0s_bundle_so_tp_nodes_suffice():
    plan = PlacementPlan(rank_cpus=2, rank_gpus=1, strategy="STRICT_SPREAD", replica_cpus=1)
    assert plan.serve_bundles(2) == [{"CPU": 3, "GPU": 1}, {"CPU": 2, "GPU": 1}]
    assert [plan.rank_bundle_index(r) for r in range(2)] == [0, 1]
    assert plan.replica_cpus_needed(2) == 5
