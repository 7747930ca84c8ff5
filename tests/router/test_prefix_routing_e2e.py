"""Prefix-aware routing across two real LLM-server replicas (Ray Serve, loopback HTTP)."""

import concurrent.futures
from collections import Counter

import httpx
import pytest

from tests.workers.engine_helpers import random_prompts
from .serve_helpers import start, stop

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_replicas(tiny_checkpoint):
    url, _ = start(tiny_checkpoint, replicas=2, replica_cpus=1.0, threads=1, prefix_routing=True,
                   routing_stats_period_s=0.5)
    yield url
    stop()


def _complete(url, prompt, max_tokens=2):
    r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                  "temperature": 0, "ignore_eos": True}, timeout=120)
    assert r.status_code == 200, r.text
    return r.headers["x-mixserve-replica"], r.json()


def test_repeated_prefixes_land_on_the_replica_that_served_them(two_replicas):
    prefixes = random_prompts([64] * 8, seed=81)  # 8 shared prefixes of 4 full blocks each
    tails = random_prompts([9] * 32, seed=82)
    first_home: dict[int, str] = {}
    repeats = same = 0
    cached = []
    for i in range(32):
        group = i % 8
        replica, body = _complete(two_replicas, prefixes[group] + tails[i][1:])
        if group in first_home:
            repeats += 1
            same += replica == first_home[group]
            cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
        else:
            first_home[group] = replica
    assert same / repeats >= 0.9, (same, repeats)
    assert len(set(first_home.values())) == 2  # new prefixes are spread over both replicas
    assert sum(c >= 64 for c in cached) / len(cached) >= 0.9  # and their blocks really were cached


def test_imbalanced_load_is_spread_to_the_other_replica(two_replicas):
    prefix = random_prompts([64], seed=83)[0]
    tails = random_prompts([5] * 8, seed=84)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda t: _complete(two_replicas, prefix + t[1:], max_tokens=120), tails))
    counts = Counter(replica for replica, _ in results)
    assert len(counts) == 2, counts
