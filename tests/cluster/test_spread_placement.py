"""A TP=2 Serve replica with `placement_strategy: STRICT_SPREAD` on two 2-CPU Ray nodes (real raylets on
one machine): its ranks land on different nodes, with the replica actor in rank 0's bundle
(workers/placement_plan.py), and its greedy output equals one engine's. Before that rule the replica
asked for three bundles on three distinct nodes and never started."""

import os
import threading
import time

import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from mixserve.cluster.app import build_app
from mixserve.cluster.ray_start import ray_working_directory
from mixserve.cluster.serve_config import APP_NAME, LLM_DEPLOYMENT
from mixserve.cluster.settings import ServeSettings
from mixserve.router.engine_api import GenerateRequest
from tests.workers.engine_helpers import greedy, make_engine, output_ids, random_prompts

pytestmark = pytest.mark.slow


def test_a_strict_spread_tp2_replica_puts_one_rank_on_each_node_and_matches_tp1(tiny_checkpoint):
    settings = ServeSettings(model=str(tiny_checkpoint), dtype="float32", max_model_len=512, kv_cache_bytes=16 << 20,
                             tensor_parallel_size=2, placement_strategy="STRICT_SPREAD", replica_cpus=0.5,
                             rank_cpus=1.0, ingress_cpus=0.1, warmup_s=0, routing_stats_period_s=0.5)
    prompt = random_prompts([40], seed=5)[0]
    expected = output_ids(make_engine(tiny_checkpoint).generate([prompt], greedy(16)))[0]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the head runs no replica
    cwd = os.getcwd()
    try:
        nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
        cluster.wait_for_nodes()
        os.chdir(ray_working_directory())  # Ray's rule here (cluster/ray_start.py): no checkout on the path
        ray.init(address=cluster.address, log_to_driver=False)
        os.chdir(cwd)
        serve.start(proxy_location="Disabled")
        deploy = threading.Thread(target=serve.run, args=(build_app(settings),),
                                  kwargs={"name": APP_NAME, "route_prefix": None}, daemon=True)
        deploy.start()
        deploy.join(timeout=120)
        assert not deploy.is_alive(), "the STRICT_SPREAD replica was never placed"

        ranks = list_actors(filters=[("class_name", "=", "RankWorker"), ("state", "=", "ALIVE")])
        assert len(ranks) == 2
        assert {r.node_id for r in ranks} == {n.node_id for n in nodes}  # one rank on each node

        llm = serve.get_deployment_handle(LLM_DEPLOYMENT, APP_NAME).options(stream=True)
        deadline = time.monotonic() + 120
        tokens = []
        for chunk in llm.generate.remote(GenerateRequest("spread", prompt, greedy(16))):
            tokens.extend(chunk.choices[0].delta_token_ids)
            assert time.monotonic() < deadline
        assert tokens == expected
    finally:
        os.chdir(cwd)
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
