"""The prefix-aware request router: its policy as plain Python, then on a real local Ray Serve
with a stand-in for the LLM server that reports which replica served each request."""

import asyncio
import random
import time
from collections import Counter

import pytest
import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from mixserve.cluster.ray_start import init_ray
from mixserve.router.engine_api import GenerateRequest, ReplicaRoutingStats
from mixserve.router.prefix_router import Candidate, PrefixAffinityPolicy
from mixserve.workers.prefix_hash import block_hashes
from mixserve.workers.sampling_params import SamplingParams

BLOCK = 4


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def policy(**kwargs) -> PrefixAffinityPolicy:
    """Blocks of 4 tokens; a request in flight costs 3.5 tokens, so a prompt's 4 cached blocks (16
    tokens) keep it on their replica while that replica is at most 4 requests busier."""
    kwargs.setdefault("load_tokens", 3.5)
    return PrefixAffinityPolicy(block_size=BLOCK, rng=random.Random(0), **kwargs)


def prompt_hashes(seed: int, n_blocks: int) -> list[int]:
    rng = random.Random(seed)
    return block_hashes([rng.randrange(32000) for _ in range(n_blocks * BLOCK)], BLOCK)


# ---- the policy ------------------------------------------------------------------------------


def test_longest_matched_prefix_wins_when_load_is_balanced():
    p = policy()
    h = prompt_hashes(1, 6)
    p.record_routed("a", h[:2])
    p.record_routed("b", h[:5])
    p.record_routed("c", prompt_hashes(2, 6))
    assert p.matched_blocks("b", h) == 5
    assert p.choose(h, [("a", 0), ("b", 3), ("c", 0)]) == "b"


def test_equal_matches_go_to_the_less_loaded_replica():
    p = policy()
    h = prompt_hashes(1, 4)
    p.record_routed("a", h)
    p.record_routed("b", h)
    assert p.choose(h, [("a", 3), ("b", 1)]) == "b"
    assert p.choose(h, [("a", 0), ("b", 1)]) == "a"


def test_match_counts_only_leading_blocks():
    p = policy()
    h = prompt_hashes(1, 4)
    p.record_routed("a", h[1:])  # holds later blocks only: not a prefix of this prompt
    assert p.matched_blocks("a", h) == 0


def test_a_cached_prefix_stays_until_its_replica_is_busier_by_prefix_over_load_tokens():
    p = policy()
    h = prompt_hashes(1, 4)
    p.record_routed("a", h)
    assert p.choose(h, [("a", 4), ("b", 0)]) == "a"  # 4 x 3.5 = 14 < the 16 tokens it saves
    assert p.choose(h, [("a", 5), ("b", 0)]) == "b"  # 17.5 > 16
    assert p.decisions["overloaded"] == 1


def test_overloaded_replica_loses_only_its_own_affinity():
    p = policy()
    ha, hb = prompt_hashes(1, 4), prompt_hashes(2, 4)
    p.record_routed("a", ha)
    p.record_routed("b", hb)
    candidates = [("a", 1), ("b", 2), ("hot", 9)]
    assert p.choose(ha, candidates) == "a"
    assert p.choose(hb, candidates) == "b"


def test_no_replica_matching_min_match_blocks_goes_to_the_least_loaded():
    p = policy(min_match_blocks=3)
    h = prompt_hashes(1, 4)
    p.record_routed("a", h[:2])
    assert p.choose(h, [("a", 1), ("b", 0)]) == "b"
    assert p.choose(prompt_hashes(9, 4), [("a", 2), ("b", 1)]) == "b"
    assert p.choose([], [("a", 2), ("b", 1)]) == "b"  # prompt shorter than a block
    assert p.decisions["new_prefix"] == 3


def test_new_prefixes_on_equal_load_spread_over_replicas():
    p = policy()
    chosen = []
    for seed in range(8):
        h = prompt_hashes(seed, 4)
        replica = p.choose(h, [("a", 0), ("b", 0)])
        p.record_routed(replica, h)
        chosen.append(replica)
    assert Counter(chosen) == {"a": 4, "b": 4}


def test_routed_memory_is_a_bounded_lru_that_evicts_prefix_tails_first():
    p = policy(max_tracked_blocks_per_replica=6)
    old, new = prompt_hashes(1, 4), prompt_hashes(2, 4)
    p.record_routed("a", old)
    p.record_routed("a", new)
    assert p.known_cache_size("a") == 6
    assert p.matched_blocks("a", new) == 4
    assert p.matched_blocks("a", old) == 2  # the two tail blocks went first
    p.record_routed("a", old[:2])  # touching a prefix keeps it
    p.record_routed("a", prompt_hashes(3, 2))
    assert p.matched_blocks("a", old) == 2
    assert p.matched_blocks("a", new) == 2


def test_published_cache_contents_count_as_held():
    p = policy()
    h = prompt_hashes(1, 4)
    p.update_published("b", h[:3])  # e.g. routed there by another caller
    assert p.matched_blocks("b", h) == 3
    assert p.choose(h, [("a", 0), ("b", 0)]) == "b"


def test_published_stats_forget_routed_hashes_the_replica_no_longer_holds():
    clock = FakeClock()
    p = PrefixAffinityPolicy(published_grace_s=5.0, clock=clock)
    h = prompt_hashes(1, 4)
    p.record_routed("a", h)
    clock.now += 6.0
    p.update_published("a", h[:1])  # the replica evicted blocks 1..3
    assert p.matched_blocks("a", h) == 1
    p.update_published("a", [])  # and then block 0; the router's memory of it is gone too
    assert p.matched_blocks("a", h) == 0


def test_a_snapshot_cut_to_its_size_bound_only_adds_knowledge():
    clock = FakeClock()
    p = PrefixAffinityPolicy(published_grace_s=5.0, clock=clock)
    h, other = prompt_hashes(1, 4), prompt_hashes(2, 3)
    p.record_routed("a", h)
    clock.now += 6.0
    p.update_published("a", other, complete=False)  # the replica holds more than it listed
    assert p.matched_blocks("a", h) == 4 and p.matched_blocks("a", other) == 3


def test_published_stats_do_not_forget_recently_routed_hashes():
    clock = FakeClock()
    p = PrefixAffinityPolicy(published_grace_s=5.0, clock=clock)
    h = prompt_hashes(1, 4)
    p.record_routed("a", h)
    clock.now += 2.0
    p.update_published("a", [])  # a snapshot that may predate the request's prefill
    assert p.matched_blocks("a", h) == 4
    clock.now += 4.0
    p.update_published("a", [h[0]])
    assert p.matched_blocks("a", h) == 1


def test_prompt_tokens_a_replica_still_has_to_prefill_count_against_it():
    p = policy()
    h = prompt_hashes(1, 4)
    p.record_routed("a", h)
    # "a" holds the prefix but is prefilling 40 tokens of other prompts: "b" computes 16 and is sooner
    assert p.choose(h, [Candidate("a", 1, pending_tokens=40), Candidate("b", 1)]) == "b"
    assert p.choose(h, [Candidate("a", 1, pending_tokens=10), Candidate("b", 1)]) == "a"
    assert p.choose(h, [("a", 0), ("b", 0)], prompt_tokens=30) == "a"  # a partial last block counts too


def test_a_replica_autoscaling_adds_takes_a_share_of_one_hot_prompt():
    """8 clients send the same 50-token prompt in a closed loop to a replica that holds it; a second,
    empty replica joins. It gets requests once the first is 3 requests busier (48 cached tokens / 16),
    then holds the prompt too, and the two share it."""
    p = PrefixAffinityPolicy(load_tokens=16, block_size=16, rng=random.Random(0))
    h = prompt_hashes(5, 3)  # the prompt's 3 full blocks of 16; 2 more tokens follow
    p.record_routed("old", h)
    in_flight = {"old": 8, "new": 0}  # every client waiting on the first replica when the second joins
    landed = Counter()
    order = ["old"] * 8  # requests complete in the order they started
    for _ in range(300):
        done = order.pop(0)
        in_flight[done] -= 1
        chosen = p.choose(h, list(in_flight.items()), prompt_tokens=50)
        p.record_routed(chosen, h)
        in_flight[chosen] += 1
        order.append(chosen)
        landed[chosen] += 1
    assert landed["new"] >= landed.total() / 3, landed


def test_removed_replica_is_forgotten():
    p = policy()
    h = prompt_hashes(1, 4)
    p.record_routed("a", h)
    p.update_published("a", h)
    p.remove("a")
    assert p.replicas == set()
    assert p.matched_blocks("a", h) == 0
    assert p.choose(h, [("a", 1), ("b", 0)]) == "b"


# ---- on a real Ray Serve ---------------------------------------------------------------------

LOAD_TOKENS = 3  # a hot prefix of n blocks (4n tokens) stays on its replica until it is 4n/3 requests busier


@serve.deployment(
    num_replicas=2,
    max_ongoing_requests=32,
    ray_actor_options={"num_cpus": 0.1},
    request_router_config=RequestRouterConfig(
        request_router_class="mixserve.router.prefix_router:PrefixAwareRouter",
        request_router_kwargs={"load_tokens": LOAD_TOKENS, "block_size": BLOCK, "min_match_blocks": 1},
        request_routing_stats_period_s=0.2,
    ),
)
class StandInServer:
    """Answers with its replica id, remembers the block hashes it served and publishes them.
    A request takes `max_tokens` hundredths of a second."""

    def __init__(self):
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.hashes: dict[int, None] = {}

    async def generate(self, request: GenerateRequest) -> str:
        await asyncio.sleep(request.sampling.max_tokens / 100)
        self.hashes.update(dict.fromkeys(request.block_hashes))
        return self.replica

    def record_routing_stats(self) -> dict:
        return ReplicaRoutingStats(self.replica, 0, 0, 0.0, BLOCK, list(self.hashes)).to_dict()


@pytest.fixture(scope="module")
def handle():
    init_ray(num_cpus=4, log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")  # handles only: no HTTP port to collide with
        yield serve.run(StandInServer.bind(), name="prefix_router_test", route_prefix=None)
    finally:
        serve.shutdown()
        ray.shutdown()


def _request(rng: random.Random, prefix: list[int], tail_seed: int, max_tokens: int = 5) -> GenerateRequest:
    tail_tokens = [rng.randrange(32000) for _ in range(BLOCK)]
    tail = block_hashes(tail_tokens, BLOCK, parent=prefix[-1], start_block=len(prefix))
    return GenerateRequest(f"r{tail_seed}", [], SamplingParams(max_tokens=max_tokens), prefix + tail)


@pytest.fixture(scope="module")
def shared_prefixes():
    rng = random.Random(7)
    return [prompt_hashes(100 + i, rng.randint(4, 8)) for i in range(8)]


@pytest.fixture(scope="module")
def owners(handle, shared_prefixes):
    """Open-loop traffic over 8 shared prefixes: a request every 20 ms, interleaved, each taking
    50 ms (2 to 3 in flight). Returns, per prefix, the replica that served its first request and
    the replicas that served any, and the fraction of later requests that went to the first one."""
    rng = random.Random(0)
    order = [i for i in range(len(shared_prefixes)) for _ in range(6)]
    rng.shuffle(order)
    responses = []
    for k, i in enumerate(order):
        responses.append(handle.generate.remote(_request(rng, shared_prefixes[i], k)))
        time.sleep(0.02)
    first: dict[int, str] = {}
    served: dict[int, set[str]] = {}
    repeats = same = 0
    for i, response in zip(order, responses):
        replica = response.result(timeout_s=30)
        served.setdefault(i, set()).add(replica)
        if i in first:
            repeats += 1
            same += replica == first[i]
        else:
            first[i] = replica
    return first, served, same / repeats


def test_requests_with_a_seen_prefix_go_to_the_replica_that_served_it(owners):
    first, _, affinity = owners
    print(f"affinity {affinity:.1%}, prefixes per replica {Counter(first.values())}")
    assert affinity >= 0.9
    assert len(set(first.values())) == 2  # the prefixes were spread over both replicas


def test_a_new_caller_routes_by_the_published_cache_contents(owners, shared_prefixes):
    """A fresh handle has an empty routed memory: only the replicas' routing stats can guide it."""
    _, served, _ = owners
    held_by_one = {i: replicas.pop() for i, replicas in served.items() if len(replicas) == 1}
    assert len(held_by_one) >= 6
    fresh = serve.get_deployment_handle("StandInServer", app_name="prefix_router_test")
    rng = random.Random(1)
    # its router starts with the first call and learns the replicas' stats over the next periods
    fresh.generate.remote(_request(rng, prompt_hashes(999, 4), 999)).result(timeout_s=30)
    time.sleep(1.0)  # a few stats periods
    for i, holder in held_by_one.items():
        assert fresh.generate.remote(_request(rng, shared_prefixes[i], 1000 + i)).result(timeout_s=30) == holder


def test_a_hot_prefix_spreads_when_its_replica_is_overloaded(handle, owners, shared_prefixes):
    """16 slow requests of one prefix (n blocks, then one of its own) at once: the owner takes them
    until it is 4n / LOAD_TOKENS requests ahead (what the prefix saves over what a request costs); once the other
    replica has served the prefix it matches as long, and the two share."""
    first, _, _ = owners
    rng = random.Random(2)
    owner = first[0]
    responses = [handle.generate.remote(_request(rng, shared_prefixes[0], 2000 + k, max_tokens=150)) for k in range(16)]
    landed = Counter(r.result(timeout_s=30) for r in responses)
    other = landed.total() - landed[owner]
    print(f"16 slow requests of one prefix: owner {landed[owner]}, other {other}")
    ahead = BLOCK * len(shared_prefixes[0]) // LOAD_TOKENS
    assert landed[owner] >= ahead  # affinity until the owner is that many requests ahead
    assert other >= 3  # then the other replica takes its share (without the load term: none)
