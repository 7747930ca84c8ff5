"""The LLM-server deployment: one engine per Serve replica.

With tensor parallelism the replica owns ONE placement group (Serve's `placement_group_bundles`):
the replica actor sits in bundle 0 and its rank actors in bundles 1..TP (see workers/ray_executor.py).
The replica streams GenerateChunk objects (router/engine_api.py) and publishes its load and
prefix-cache contents to the prefix-aware router through `record_routing_stats`.

Failure rule: a replica whose engine failed (a rank died, a step raised) can serve nothing again, so
its process leaves at once, EXIT_GRACE_S after its streams got their errors. The router's next call
to it then fails as an actor death, which takes it out of routing (Serve's router calls
on_replica_actor_died) instead of it drawing requests (prefix affinity would keep sending it the
same prefixes) until Serve's health check notices; Serve starts a replacement. Outside Serve (a
plain process, tests) the engine only reports itself unhealthy and `check_health` raises.
"""

import asyncio
import dataclasses
import logging
import os
import threading
import time

import torch
from ray import serve
from ray.serve.exceptions import RayServeException

from ..workers.async_engine import AsyncLLMEngine, fold_reports
from ..workers.engine import LLMEngine, describe_kernels
from ..workers.engine_config import EngineConfig
from ..workers.outputs import RequestOutput
from ..workers.warmup import warm_up
from .engine_api import ChoiceDelta, GenerateChunk, GenerateRequest, ReplicaLoad, ReplicaRoutingStats
from .token_relay import RelayedStream, RelayReceiver, RelaySender, encode_load, relay_receiver

EXIT_GRACE_S = 1.0  # after an engine failure: time for the error chunks to reach the ingress
LOAD_PERIOD_S = 0.05  # at most this often a replica sends its load to the ingresses
READY_WAIT_S = 1.0  # how long /health waits for the readiness probe before it answers 503
logger = logging.getLogger("ray.serve")


@dataclasses.dataclass(frozen=True, slots=True)
class LLMServerSpec:
    """What one LLM-server replica is built from (ServeSettings.llm_server_spec): both serving shapes
    (the LLMServer deployment and DirectIngress) receive it whole."""
    engine_config: EngineConfig
    num_threads: int | None  # torch threads of the replica (None: leave torch's)
    stream_interval: int
    warmup_s: float  # run the step shapes it will serve for at most this long before it takes requests
    #                  (workers/warmup.py; 0: none)


class LLMServer:
    def __init__(self, spec: LLMServerSpec, max_published_hashes: int = 8192):
        if spec.num_threads:
            torch.set_num_threads(spec.num_threads)
        engine_config, warmup_s = spec.engine_config, spec.warmup_s
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
            in_serve = True
        except RayServeException:  # constructed outside Serve (in-process use, tests)
            self.replica_id, in_serve = "local", False
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop relayed requests run on (first one)
        self._load_sent_at = 0.0
        self._load_pending = False
        def build() -> LLMEngine:  # on the engine thread (workers/async_engine.py's thread rule)
            engine = LLMEngine(engine_config)
            if warmup_s > 0:  # logged here: Serve's logger reaches the replica's log, a module's INFO does not
                logger.info("%s", warm_up(engine, warmup_s).line())
            return engine

        self.engine = AsyncLLMEngine(build, on_failure=self._leave if in_serve else None, on_load=self._on_load)
        engine = self.engine.engine
        logger.info("engine kernels: %s | weights %s: %.2f GiB per rank | torch threads %d",
                    describe_kernels(engine.kernel_report()), engine.weight_format.quantization,
                    engine.weight_bytes() / 2**30, torch.get_num_threads())
        self.max_published_hashes = max_published_hashes
        self.stream_interval = spec.stream_interval
        self.relay = RelaySender()

    def _leave(self, exc: BaseException) -> None:
        logger.error("replica %s: the engine failed (%r); this replica exits in %.1f s and Serve replaces it",
                     self.replica_id, exc, EXIT_GRACE_S)
        threading.Timer(EXIT_GRACE_S, os._exit, args=(1,)).start()

    def load(self) -> ReplicaLoad:
        """The engine's load as the engine thread last published it (never its live scheduler)."""
        load = self.engine.load
        return ReplicaLoad(
            replica=self.replica_id, num_running=load.num_running, num_waiting=load.num_waiting,
            kv_usage=load.kv_usage, prefix_queries=load.prefix_queries, prefix_hits=load.prefix_hits,
            preemptions=load.preemptions, weight_bytes=self.engine.engine.weight_bytes(),
            pending_prefill_tokens=load.pending_prefill_tokens, step_s=load.step_s,
        )

    # ---- publishing the load to the ingresses (router/token_relay.py) ---------------------------

    def _on_load(self, load) -> None:
        """On the engine thread, after a step: have the relay loop send the new load (at once when
        the engine fell idle)."""
        loop = self._loop
        if loop is None:
            return
        idle = load.num_running == 0 and load.num_waiting == 0
        if idle or not self._load_pending:
            self._load_pending = not idle
            try:
                loop.call_soon_threadsafe(self._publish_load, idle)
            except RuntimeError:  # the loop has closed
                pass

    def _publish_load(self, now: bool = False) -> None:
        """Send the current load to every connected ingress: at most every LOAD_PERIOD_S while the
        engine is busy (the last load of a burst is always sent), and `now` when it fell idle. That
        load is posted before the last chunks of the step that ended the work resume their stream,
        so it reaches the ingress before the response ends (a scrape right after sees it)."""
        wait = self._load_sent_at + LOAD_PERIOD_S - time.monotonic()
        if wait > 0 and not now:
            self._loop.call_later(wait, self._publish_load)
            return
        if not now:
            self._load_pending = False
        self._load_sent_at = time.monotonic()
        self.relay.broadcast(encode_load(self.load()))

    def _chunk(self, out: RequestOutput, first: bool) -> GenerateChunk:
        choices = []
        for c in out.outputs:
            new = len(c.delta_token_ids)
            choices.append(ChoiceDelta(
                index=c.index, delta_text=c.delta_text, delta_token_ids=list(c.delta_token_ids),
                logprobs=c.logprobs[len(c.logprobs) - new:] if c.logprobs is not None else None,
                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
            ))
        return GenerateChunk(
            request_id=out.request_id, choices=choices, finished=out.finished,
            num_prompt_tokens=len(out.prompt_token_ids), num_cached_tokens=out.num_cached_tokens,
            replica=self.replica_id, engine_times=out.times.durations() if out.times else (None, None, None),
            prompt_logprobs=out.prompt_logprobs if first else None,
        )

    async def generate(self, request: GenerateRequest):
        """Stream GenerateChunks for one request. Raises ValueError for a request the engine refuses.

        Chunking rule: the first report goes out at once (time to first token), then reports are
        folded until a choice holds `stream_interval` new tokens or the request finishes. Each chunk
        is a Ray object crossing to the ingress, so on a small CPU fewer chunks leave more of it to
        the model."""
        first, held = True, None
        async for out in self.engine.generate(request.prompt_token_ids, request.sampling, request.request_id):
            held = out if held is None else fold_reports(held, out)
            new = max((len(c.delta_token_ids) for c in held.outputs), default=0)
            if first or held.finished or new >= self.stream_interval:
                yield self._chunk(held, first)
                first, held = False, None

    async def generate_relayed(self, request: GenerateRequest) -> None:
        """`generate`, with the chunks written to the ingress's relay receiver (request.reply_to)
        instead of streamed back through Ray (router/token_relay.py); returns when the last chunk is
        written. Raises what `generate` raises; an ingress that cannot be reached aborts the request."""
        self._loop = self._loop or asyncio.get_running_loop()
        async for chunk in self.generate(request):
            await self.relay.send(request.reply_to, chunk)

    def record_routing_stats(self) -> dict:
        engine = self.engine.engine
        cached = engine.kv.pool.by_hash
        hashes = list(cached)[-self.max_published_hashes:]
        load = self.load()
        return ReplicaRoutingStats(
            replica=self.replica_id, num_running=load.num_running, num_waiting=load.num_waiting,
            kv_usage=load.kv_usage, block_size=engine.config.block_size, cached_block_hashes=hashes,
            complete=len(hashes) == len(cached),
        ).to_dict()

    async def re_isq(self, quantization: str, group_size: int | None = None, calibration: str | None = None) -> dict:
        """Re-quantize this replica's weights from its checkpoint between steps (workers/engine.py
        `requantize`); raises EngineBusyError while requests are in flight, ValueError for a bad format."""
        weights = await self.engine.call(self.engine.engine.requantize, quantization, group_size, calibration)
        self.relay.broadcast(encode_load(self.load()))  # the new weight bytes, to every ingress
        return {"replica": self.replica_id, "quantization": weights.quantization, "group_size": weights.group_size,
                "calibration": weights.calibration, "weight_bytes": self.engine.engine.weight_bytes()}

    def kernel_report(self) -> dict:
        """The CPU, dtype and linear kernels this replica's engine runs with (workers/engine.py)."""
        return self.engine.engine.kernel_report()

    async def stats(self) -> dict:
        return {"load": self.load(), "engine": self.engine.engine.stats}

    async def check_health(self) -> None:
        await asyncio.to_thread(self.engine.check_health)  # pings the rank actors: off the event loop

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


class RemoteLLM:
    """The LLM-server deployment seen from a separate ingress: the router picks the replica, whose
    chunks come over the relay (router/token_relay.py), not as Ray objects."""

    def __init__(self, handle):
        self.handle = handle
        self._receiver: RelayReceiver | None = None
        self._answered = False  # a replica has answered a call (it warmed up before Serve sent it one)
        self._probe: asyncio.Future | None = None

    async def ready(self) -> bool:
        """True once a replica has answered one cheap call. One probe at a time: it waits in Serve's
        queue until a replica runs (a replica takes calls only after its warm-up); each caller waits
        for it at most READY_WAIT_S."""
        if not self._answered:
            if self._probe is None or self._probe.done():
                self._probe = asyncio.ensure_future(self._answer_once())
            await asyncio.wait({self._probe}, timeout=READY_WAIT_S)
        return self._answered

    async def _answer_once(self) -> None:
        try:
            await self.handle.kernel_report.remote()
            self._answered = True
        except Exception:  # its replica failed or was replaced: the next probe asks again
            pass

    def open_stream(self, req: GenerateRequest):
        if self._receiver is None:
            import ray

            self._receiver = relay_receiver(ray.util.get_node_ip_address())
        return RelayedStream(self.handle, self._receiver, req)

    async def re_isq(self, quantization: str, group_size: int | None, calibration: str | None = None) -> dict:
        result = await self.handle.re_isq.remote(quantization, group_size, calibration)
        load = self._receiver.loads.get(result["replica"]) if self._receiver else None
        if load is not None:  # its next published load says the same; /metrics need not wait for it
            self._receiver.loads[result["replica"]] = dataclasses.replace(load, weight_bytes=result["weight_bytes"])
        return result

    def current_loads(self) -> list[ReplicaLoad]:
        """The loads the replicas published to this process's relay receiver."""
        return [] if self._receiver is None else list(self._receiver.loads.values())


class _LocalStream:
    """An in-process LLMServer.generate stream with the interface of a Serve streaming response."""

    def __init__(self, chunks):
        self._chunks = chunks

    def __aiter__(self):
        return self._chunks.__aiter__()

    def cancel(self) -> None:
        asyncio.ensure_future(self._chunks.aclose())  # its finally aborts the request in the engine


class LocalLLM:
    """An LLMServer in the ingress's own process (the direct shape: the LLM server is its own HTTP
    ingress, so a chunk crosses no Ray hop before the HTTP proxy)."""

    def __init__(self, server: LLMServer):
        self.server = server

    def open_stream(self, req: GenerateRequest):
        return _LocalStream(self.server.generate(req))

    async def re_isq(self, quantization: str, group_size: int | None, calibration: str | None = None) -> dict:
        return await self.server.re_isq(quantization, group_size, calibration)

    def current_loads(self) -> list[ReplicaLoad]:
        return [self.server.load()]

    async def ready(self) -> bool:
        return True  # built, and warmed up, before this process serves
