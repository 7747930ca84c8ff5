"""Ray Serve LLM's own PrefixCacheAffinityRouter on mixserve's LLM-server deployment (the anchor the
prefix-aware router is compared with in `bench compare`): the ingress sends the prompt's text with
each request, Ray's router keeps its prefix tree in its detached actor and sends repeated prefixes
to the replica that served them."""

import httpx
import pytest
import ray

from tests.workers.engine_helpers import random_prompts
from .serve_helpers import start, stop

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_replicas(tiny_checkpoint):
    url, _ = start(tiny_checkpoint, replicas=2, replica_cpus=1.0, threads=1, prefix_routing=True,
                   prefix_router="ray", imbalanced_threshold=2, routing_stats_period_s=0.5)
    yield url
    stop()


def test_rays_router_sends_repeated_prefixes_to_the_replica_that_served_them(two_replicas):
    prefixes = random_prompts([64] * 6, seed=91)
    tails = random_prompts([9] * 18, seed=92)
    first_home: dict[int, str] = {}
    repeats = same = 0
    for i in range(18):
        group = i % 6
        r = httpx.post(two_replicas + "/v1/completions", json={
            "prompt": prefixes[group] + tails[i][1:], "max_tokens": 2, "temperature": 0, "ignore_eos": True},
            timeout=120)
        assert r.status_code == 200, r.text
        replica = r.headers["x-mixserve-replica"]
        if group in first_home:
            repeats += 1
            same += replica == first_home[group]
        else:
            first_home[group] = replica
    assert same / repeats >= 0.9, (same, repeats)
    tree = ray.get_actor("LlmPrefixTreeActor", namespace="serve::mixserve::LLMServer")  # Ray's router ran
    assert ray.get(tree.getattr.remote("tenant_to_char_count"))
