"""One request pipeline behind every protocol (HTTP JSON, SSE, gRPC): a Serve-free object the
ingress's thin adapters call, stage by stage.

Stages: authorize -> parse (pydantic, router/protocol.py) -> tokenize / chat template -> validate
(context length, SamplingParams) -> route and stream the replica's chunks (the LLM-server handle; the
prefix-aware router picks the replica) -> finish (Prometheus counters and histograms, the request
log, usage). Every client mistake is an ApiError carrying its HTTP status and OpenAI's error body;
protocols map the status onto their own (HTTP as is, gRPC through `grpc_status`).
"""

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator
from typing import Protocol
from dataclasses import dataclass

from pydantic import BaseModel, ValidationError
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

from ..workers.async_engine import EngineDeadError, RequestFailedError
from ..workers.prefix_hash import block_hashes
from ..workers.request_checks import ContextLengthError, completion_budget, prompt_token_ids
from ..workers.sampling_params import SamplingParams
from ..workers.tokenizer import Tokenizer
from .engine_api import GenerateChunk, GenerateRequest, ReplicaLoad
from .metrics import ServingMetrics
from .protocol import describe_validation_error, error_body
from .request_log import RequestLog, RequestRecord


logger = logging.getLogger("mixserve.ingress")

AT_CAPACITY = "the server is at capacity; retry shortly"
REPLICA_ATTEMPTS = 3  # tries of a request whose replica fails before its first chunk
RETRY_BACKOFF_S = 0.2  # times the attempt number, before routing again
# The replica's actor died or cannot be reached, or its engine failed (EngineDeadError, which arrives
# as a RayTaskError from a separate replica; a request the engine refused is a ValueError and is
# caught before these).
_REPLICA_FAILURES = (RayActorError, ReplicaUnavailableError, RayTaskError, EngineDeadError)


def remote_message(exc: BaseException) -> str:
    """The message of an error raised in a replica (Ray wraps it; `cause` is the original)."""
    return str(getattr(exc, "cause", None) or exc)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code=None, param=None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type_, code, param)
        self.headers: dict[str, str] = {}  # extra response headers (e.g. the replica that failed)

    @property
    def message(self) -> str:
        return self.body["error"]["message"]


@dataclass(slots=True)
class PipelineModel:
    """What the pipeline knows of the served model."""

    served_model_name: str
    tokenizer: Tokenizer
    vocab_size: int
    max_model_len: int
    block_size: int  # the engine's KV block size: prefix hashes for the router are per block
    prompt_text: bool = False  # the router reads the prompt's text (GenerateRequest.prompt), not only hashes


class EngineClient(Protocol):
    """How the pipeline reaches the engines (router/llm_server.py: RemoteLLM, LocalLLM)."""

    def open_stream(self, req: GenerateRequest):
        """The chunk stream of one request: an object with `async for` and `cancel()`."""

    async def re_isq(self, quantization: str, group_size: int | None, calibration: str | None) -> dict: ...

    def current_loads(self) -> list[ReplicaLoad]:
        """The engines' loads as known now, for /metrics (may be empty)."""

    async def ready(self) -> bool:
        """An engine has answered, so a request sent now is served, not held until one has started."""


class RequestPipeline:
    def __init__(self, model: PipelineModel, llm: EngineClient, metrics: ServingMetrics, request_log: RequestLog,
                 api_key: str | None = None, max_in_flight: int | None = None, admin_key: str | None = None):
        """`max_in_flight`: requests this pipeline streams at once, beyond which it answers 503 +
        Retry-After itself (for a shape where no Serve handle queue caps them: direct HTTP)."""
        self.model = model
        self.llm = llm
        self.metrics = metrics
        self.request_log = request_log
        self.api_key = api_key
        self.admin_key = admin_key
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.draining = False

    # ---- drain before the server stops (cluster/drain.py) --------------------------------------

    def drain(self) -> int:
        """From now on refuse new requests (HTTP, gRPC, /health) with 503 + Retry-After while the ones
        in flight run to their end; returns how many are in flight. Idempotent; no way back."""
        self.draining = True
        return self.in_flight

    def refuse_while_draining(self) -> None:
        if self.draining:
            raise ApiError(503, "the server is shutting down and takes no new requests; retry shortly",
                           "server_error", "shutting_down")

    async def refuse_until_ready(self) -> None:
        """/health answers 503 until an engine has answered: a replica loads and warms up after the
        ingress is up, and a client (or a readiness probe) that starts on the first 200 must not wait for it."""
        if not await self.llm.ready():
            raise ApiError(503, "the server is starting: no LLM-server replica has answered yet; retry shortly",
                           "server_error", "starting")

    # ---- authorize, parse, tokenize, validate ------------------------------------------------

    def authorize(self, authorization: str, how: str = "send Authorization: Bearer <key>", admin: bool = False) -> None:
        """An `Authorization` value must carry the API key (any value, when none is set), or with `admin`
        the admin key (refused with 403 when the server has none: the admin endpoints are off; the API key
        never grants them); compared in constant time."""
        key, what = (self.admin_key, "admin key") if admin else (self.api_key, "API key")
        if not key:
            if admin:
                raise ApiError(403, "this endpoint needs the admin key and the server was started without one",
                               "permission_error", "admin_key_not_configured")
            return
        given = authorization[7:] if authorization.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(401, f"invalid or missing {what} ({how})", "authentication_error",
                           f"invalid_{what.lower().replace(' ', '_')}")

    def parse(self, model_cls: type[BaseModel], body: dict):
        try:
            parsed = model_cls.model_validate(body)
        except ValidationError as exc:
            raise ApiError(400, describe_validation_error(exc)) from None
        model = getattr(parsed, "model", None)
        if model is not None and model != self.model.served_model_name:
            raise ApiError(404, f"model {model!r} does not exist; this server serves "
                                f"{self.model.served_model_name!r}", code="model_not_found", param="model")
        return parsed

    def prompt_ids(self, prompt) -> list[int]:
        try:
            return prompt_token_ids(self.model.tokenizer, prompt, self.model.vocab_size)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="prompt") from None

    def chat_ids(self, messages) -> list[int]:
        """messages: router/protocol.py ChatMessage objects -> the chat template's prompt ids."""
        try:
            return self.model.tokenizer.encode_chat([{"role": m.role, "content": m.text()} for m in messages])
        except ValueError as exc:
            raise ApiError(400, str(exc), param="messages") from None

    def request(self, request_id: str, ids: list[int], sampling: dict) -> GenerateRequest:
        """The GenerateRequest, after the context-length check and SamplingParams' own checks."""
        try:
            max_tokens = completion_budget(len(ids), sampling["max_tokens"], self.model.max_model_len)
        except ContextLengthError as exc:
            raise ApiError(400, str(exc), param="max_tokens", code="context_length_exceeded") from None
        try:
            params = SamplingParams(**{**sampling, "max_tokens": max_tokens})
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        text = self.model.tokenizer.decode(ids) if self.model.prompt_text else ""
        return GenerateRequest(request_id, ids, params, block_hashes(ids, self.model.block_size), text)

    # ---- route and stream ----------------------------------------------------------------------

    async def chunks(self, req: GenerateRequest, record: RequestRecord) -> AsyncIterator[GenerateChunk]:
        """The replica's chunks for one request; cancels it there if the caller stops early.

        Replica failure rule: if the replica dies (or its engine fails) before the request's first
        chunk, the request goes to a replica again, up to REPLICA_ATTEMPTS times, unseen by the
        client; after its first chunk it ends with ApiError 503 (an SSE error event, or a JSON error),
        never a cut connection. A request that failed on its own (RequestFailedError: the engine
        serves on) is never routed again: it ends with ApiError 500."""
        if self.max_in_flight is not None and self.in_flight >= self.max_in_flight:
            raise ApiError(503, AT_CAPACITY, "server_overloaded", 503)
        self.in_flight += 1
        try:
            async for chunk in self._routed_chunks(req, record):
                yield chunk
        finally:
            self.in_flight -= 1

    async def _routed_chunks(self, req: GenerateRequest, record: RequestRecord) -> AsyncIterator[GenerateChunk]:
        for attempt in range(1, REPLICA_ATTEMPTS + 1):
            stream = None
            finished = started = retrying = False
            try:
                stream = self.llm.open_stream(req)
                async for chunk in stream:
                    record.on_chunk(chunk)
                    finished, started = chunk.finished, True
                    yield chunk
                return
            except BackPressureError:
                raise ApiError(503, AT_CAPACITY, "server_overloaded", 503) from None
            except ValueError as exc:  # the engine refused the request (a RayTaskError that is a ValueError)
                raise ApiError(400, remote_message(exc)) from None
            except RequestFailedError as exc:  # it failed on its own; the replica serves on: never re-routed
                record.status = "request_failed"
                raise ApiError(500, f"this request failed in the engine ({remote_message(exc)}); the server goes "
                                    "on serving", "server_error", "request_failed") from None
            except _REPLICA_FAILURES as exc:
                failed = record.replica or "a replica"
                if record.replica and isinstance(exc, (RayActorError, ReplicaUnavailableError)):
                    self.metrics.forget_replica(record.replica)  # its process is gone: no ghost series
                if started or attempt == REPLICA_ATTEMPTS:
                    record.status = "replica_failed"
                    raise ApiError(503, f"the replica serving this request failed ({type(exc).__name__}) after "
                                        f"{record.completion_tokens} token(s); retry the request", "server_error",
                                   "replica_failed") from None
                logger.warning("request %s: %s failed before its first token (%s); routing it again (attempt %d)",
                               req.request_id, failed, type(exc).__name__, attempt + 1)
                retrying = True
            finally:
                if not finished and stream is not None:
                    try:
                        stream.cancel()
                    except Exception:  # a request that was never assigned re-raises its error here
                        pass
                    if not retrying:
                        record.status = record.status or "cancelled"
            await asyncio.sleep(RETRY_BACKOFF_S * attempt)  # only reached when retrying

    # ---- finish ----------------------------------------------------------------------------------

    def observe_current_loads(self) -> None:
        """The engines' gauges as they are now (not as the last chunk left them)."""
        self.metrics.observe_loads(self.llm.current_loads())

    def finish(self, record: RequestRecord, endpoint: str, status: int) -> None:
        """Count the request (every protocol, by endpoint and HTTP-equivalent status), observe its
        latencies and tokens, and write its log line."""
        record.finish(status)
        self.metrics.http_requests.labels(self.model.served_model_name, endpoint, str(status)).inc()
        record.observe(self.metrics)
        self.request_log.write(record)
