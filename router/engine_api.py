"""The contract between the callers (HTTP/gRPC ingress, the prefix-aware router) and the
LLM-server replicas. Plain dataclasses of lists and numbers: cheap to pickle across Ray.

- The ingress tokenizes, validates and builds a GenerateRequest, including `block_hashes`: the
  chained hashes of the prompt's full blocks (workers/prefix_hash.py, the engine's own block size),
  which is how the router and the engine agree on what a prefix is.
- The replica streams GenerateChunk objects: one per engine step that moved the request, the last
  with `finished=True`, each naming the replica and the engine's stage times so far. The replica's
  load (ReplicaLoad) travels apart, published after each engine step (router/token_relay.py).
- `record_routing_stats()` of a replica returns a ReplicaRoutingStats as a dict.
"""

from dataclasses import asdict, dataclass, field

from ..workers.sampling_params import SamplingParams
from ..workers.step_input import TokenLogprobs as TokenLogprob  # the engine's own record, shared as is


@dataclass(slots=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams  # checked once, at the boundary (RequestPipeline.request)
    block_hashes: list[int] = field(default_factory=list)
    prompt: str = ""  # the prompt's text, for routers that read it (Ray's PrefixCacheAffinityRouter); else ""
    reply_to: tuple[str, int, str] | None = None  # the ingress's relay receiver (router/token_relay.py)


@dataclass(slots=True)
class ChoiceDelta:
    index: int
    delta_text: str
    delta_token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None  # for delta_token_ids, when requested
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: str | int | None = None


@dataclass(slots=True)
class ReplicaLoad:
    """A replica's engine load (workers/outputs.py EngineLoad, field for field) and what else its
    gauges show."""

    replica: str
    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of KV blocks referenced by sequences
    prefix_queries: int  # prompt tokens looked up in the prefix cache (cumulative)
    prefix_hits: int  # of which were cached (cumulative)
    preemptions: int  # cumulative
    weight_bytes: int = 0  # of one rank's weights, quantized codes and scales included
    pending_prefill_tokens: int = 0  # prompt tokens admitted or waiting that are not computed yet
    step_s: float = 0.0  # recent wall time of an engine step

    @property
    def idle(self) -> bool:
        """No request running or waiting and no KV block in use (nothing left behind)."""
        return self.num_running == 0 and self.num_waiting == 0 and self.kv_usage == 0


@dataclass(slots=True)
class GenerateChunk:
    request_id: str
    choices: list[ChoiceDelta]
    finished: bool
    num_prompt_tokens: int
    num_cached_tokens: int
    replica: str
    # (queue, prefill, decode) seconds in the engine so far (workers/outputs.py RequestTimes), None until known
    engine_times: tuple[float | None, float | None, float | None] = (None, None, None)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the first chunk, when requested


@dataclass(slots=True)
class ReplicaRoutingStats:
    replica: str
    num_running: int
    num_waiting: int
    kv_usage: float
    block_size: int
    cached_block_hashes: list[int]  # hashes of full blocks in this replica's prefix cache (bounded)
    complete: bool = True  # False when the list was cut to its bound (then it only adds knowledge)

    def to_dict(self) -> dict:
        return asdict(self)
