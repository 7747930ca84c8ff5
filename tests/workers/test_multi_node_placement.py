"""Two raylets on one machine, each a real Ray node: each TP=2 replica's ranks land together on
one node (STRICT_PACK) and both replicas generate."""

import pytest
import ray
from ray.cluster_utils import Cluster

from .engine_helpers import greedy, make_engine, output_ids, random_prompts

pytestmark = pytest.mark.slow


def _start_two_nodes(attempts: int = 3):
    """A head without CPUs and two 2-CPU nodes; a start that times out (a GCS that never published its
    port on a loaded machine, see cluster/ray_start.py) is torn down and tried again."""
    for attempt in range(1, attempts + 1):
        cluster = Cluster()
        try:
            cluster.add_node(num_cpus=0, include_dashboard=False)  # the head
            nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
            cluster.wait_for_nodes()
            return cluster, nodes
        except (RuntimeError, ConnectionError, TimeoutError):
            cluster.shutdown()
            if attempt == attempts:
                raise


@pytest.fixture(scope="module")
def two_node_cluster():
    cluster, nodes = _start_two_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


def test_two_tp2_replicas_each_pack_on_one_node_and_generate(two_node_cluster, tiny_checkpoint):
    _, nodes = two_node_cluster
    prompts = random_prompts([15, 70], seed=71)
    replicas = [make_engine(tiny_checkpoint, tensor_parallel_size=2) for _ in range(2)]
    try:
        placements = [r.executor.node_ids() for r in replicas]
        for ranks in placements:
            assert len(set(ranks)) == 1  # both ranks of a replica on one node
        assert {p[0] for p in placements} == {n.node_id for n in nodes}  # one replica per node
        outputs = [output_ids(r.generate(prompts, greedy(12))) for r in replicas]
        assert outputs[0] == outputs[1]
        assert all(len(t) == 12 for t in outputs[0])
    finally:
        for r in replicas:
            r.shutdown()
