"""The OpenAI-compatible HTTP ingress (FastAPI on Ray Serve): thin HTTP adapters over the request
pipeline (router/request_pipeline.py), which the gRPC adapter (router/grpc_service.py) shares.

Per request: auth -> body size -> JSON -> the pipeline's parse, tokenize, validate -> its chunk
stream -> a JSON response (collected) or an SSE stream -> the pipeline's finish. Every client
mistake is a 4xx with OpenAI's error JSON; the replica's queue being full is a 503 with
Retry-After; a client that goes away cancels its request in the engine.
"""

import asyncio
import json
import logging
import socket
import threading
import uuid
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve

from ..workers.config import load_model_config
from ..workers.engine import EngineBusyError
from ..workers.model_runner import WeightReloadError
from ..workers.model_source import resolve_model
from ..workers.request_checks import max_model_len
from ..workers.tokenizer import Tokenizer
from .engine_api import GenerateRequest
from .grpc_service import GrpcGenerateMixin
from .llm_server import LLMServer, LocalLLM, RemoteLLM
from .metrics import ServingMetrics
from .openai_format import ResponseBuilder
from .protocol import ChatCompletionRequest, CompletionRequest, ReIsqRequest
from .request_log import RequestLog, RequestRecord
from .request_pipeline import ApiError, PipelineModel, RequestPipeline, remote_message

logger = logging.getLogger("mixserve.ingress")


@dataclass(slots=True)
class IngressOptions:
    model: str  # checkpoint folder (for the tokenizer and the context length)
    served_model_name: str
    block_size: int = 16
    max_model_len: int | None = None
    api_key: str | None = field(default=None, repr=False)
    admin_key: str | None = field(default=None, repr=False)  # POST /v1/re_isq needs it; 403 without one
    max_body_bytes: int = 1 << 20
    request_log: str | None = None
    prompt_text: bool = False  # the LLM-server's router reads the prompt's text (Ray's prefix-tree router)
    http_address: tuple[str, int] | None = None  # direct shape: (host, port) this replica serves HTTP on itself
    max_in_flight: int | None = None  # requests at once before 503 where no Serve queue caps them (direct HTTP)


api = FastAPI(title="mixserve", docs_url=None, redoc_url=None)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    headers = {"Retry-After": "1", **exc.headers} if exc.status == 503 else exc.headers
    return JSONResponse(exc.body, status_code=exc.status, headers=headers)


def serve_http_in_thread(host: str, port: int) -> threading.Thread:
    """Serve this module's FastAPI app on host:port from this process (the ingress's own HTTP server):
    uvicorn in a thread with its event loop, on a socket bound with SO_REUSEPORT so that the ingress
    replicas of one node share the port (the kernel spreads connections over them). The class routes
    find the ingress object through Serve's replica context, which is process-wide; chunks reach this
    loop from the relay (or, in the direct shape, the engine), without a Ray hop."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(api, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="mixserve-http", daemon=True)
    thread.start()
    return thread


async def _prefetched(chunks):
    """Pull the first chunk now (so errors before the first token become HTTP statuses), then
    hand back an iterator over all of them."""
    first = await chunks.__anext__()

    async def all_chunks():
        yield first
        async for chunk in chunks:
            yield chunk

    return all_chunks()


@serve.ingress(api)
class OpenAIIngress(GrpcGenerateMixin):
    """`llm_server`: the LLM-server deployment's handle (a separate deployment behind the router), or
    None with `engine` = (EngineConfig, torch threads, stream interval) for the direct shape: the
    engine runs in this replica, which then also answers Serve's health checks and the LLM-server
    calls (stats, kernel_report) for it."""

    draining = False  # set by drain(): new requests are refused (503) while those in flight run to their end

    def __init__(self, llm_server, options: IngressOptions, engine: tuple | None = None):
        self.local = LLMServer(engine[0], engine[1], stream_interval=engine[2]) if engine else None
        self.llm = LocalLLM(self.local) if self.local else RemoteLLM(llm_server)
        self.opts = options
        model_path = resolve_model(options.model)  # a folder, .gguf file or hub id, on this node
        config = load_model_config(model_path)
        self.model = PipelineModel(options.served_model_name, Tokenizer.from_dir(model_path), config.vocab_size,
                                   max_model_len(options.max_model_len, config.max_position_embeddings),
                                   options.block_size, options.prompt_text)
        self.metrics = ServingMetrics(options.served_model_name)
        self.pipeline = RequestPipeline(self.model, self.llm.open_stream, self.metrics, RequestLog(options.request_log),
                                        options.api_key, options.max_in_flight, admin_key=options.admin_key)
        if options.http_address is not None:
            serve_http_in_thread(*options.http_address)

    # ---- the engine's own calls, in the direct shape -------------------------------------------

    async def check_health(self) -> None:
        if self.local is not None:
            await self.local.check_health()

    async def stats(self) -> dict:
        return await self.local.stats()

    def kernel_report(self) -> dict:
        return self.local.kernel_report()

    # ---- drain before Serve stops (cluster/drain.py) ------------------------------------------

    def drain(self) -> int:
        """From now on answer new requests (HTTP, gRPC, /health) with 503 + Retry-After while the ones in
        flight run to their end; returns how many this replica has in flight. Idempotent; no way back."""
        self.draining = True
        return self.pipeline.in_flight

    def _refuse_while_draining(self) -> None:
        if self.draining:
            raise ApiError(503, "the server is shutting down and takes no new requests; retry shortly",
                           "server_error", "shutting_down")

    def _grpc_request(self, request, grpc_context):
        self._refuse_while_draining()
        return super()._grpc_request(request, grpc_context)

    # ---- HTTP plumbing ----------------------------------------------------------------------

    def _check_auth(self, request: Request) -> None:
        self.pipeline.authorize(request.headers.get("authorization", ""))

    async def _json_body(self, request: Request) -> dict:
        """The body as a JSON object; its size is counted while it is read (a chunked body has no
        Content-Length), so no more than the limit is ever held."""
        limit = self.opts.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, an integer of over 4300 digits
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise ApiError(400, "request body is not valid JSON: nested too deeply") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return body

    async def _respond(self, request: Request, endpoint: str, handler) -> Response:
        record = RequestRecord(endpoint=endpoint)
        try:
            self._refuse_while_draining()
            self._check_auth(request)
            response = await handler(request, record)
        except ApiError as exc:
            record.status = "error"
            self.pipeline.finish(record, endpoint, exc.status)
            raise

        if isinstance(response, StreamingResponse):
            return response  # the stream records its own end
        self.pipeline.finish(record, endpoint, 200)
        return response

    async def _until_done_or_disconnected(self, request: Request, work):
        """Run a non-streaming request; cancel it if the client disconnects meanwhile."""
        task = asyncio.ensure_future(work)
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if not done and await request.is_disconnected():
                task.cancel()
                raise ApiError(499, "client closed the request")
        return task.result()

    def _sse(self, request_id: str, endpoint: str, record: RequestRecord, events):
        async def body():
            status = 200
            try:
                async for event in events:
                    yield f"data: {json.dumps(event)}\n\n"
                yield "data: [DONE]\n\n"
            except ApiError as exc:
                status = exc.status
                yield f"data: {json.dumps(exc.body)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                self.pipeline.finish(record, endpoint, status)

        return StreamingResponse(body(), media_type="text/event-stream", headers={
            "Cache-Control": "no-cache", "X-Request-Id": request_id, "X-Mixserve-Replica": record.replica})

    async def _collect_or_stream(self, request: Request, record: RequestRecord, endpoint: str, req: GenerateRequest,
                                 stream: bool, collect, events) -> Response:
        """Run `req` through the pipeline: `collect(chunks)` builds the JSON response, or `events(chunks)`
        yields the SSE events (the first chunk is awaited first, so errors before it stay HTTP statuses)."""
        record.start(req.request_id, len(req.prompt_token_ids))
        if not stream:
            try:
                result = await self._until_done_or_disconnected(request, collect(self.pipeline.chunks(req, record)))
            except ApiError as exc:  # e.g. its replica died: the error names it, as a success would
                if record.replica:
                    exc.headers["X-Mixserve-Replica"] = record.replica
                raise
            return JSONResponse(result, headers={"X-Mixserve-Replica": record.replica})
        chunks = await _prefetched(self.pipeline.chunks(req, record))
        return self._sse(req.request_id, endpoint, record, events(chunks))

    # ---- endpoints --------------------------------------------------------------------------

    @api.get("/health")
    async def health(self):
        self._refuse_while_draining()  # a load balancer's probe takes this replica out of rotation
        return {"status": "ok"}

    @api.get("/metrics")
    async def metrics_text(self):
        if self.local is not None:  # direct shape: the engine's gauges as they are now, not as the last chunk
            self.metrics.observe_load(self.local.load())  # left them (a stream abandoned mid-way sends none after)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @api.get("/v1/models")
    async def models(self, request: Request):
        self._check_auth(request)
        return {"object": "list", "data": [{"id": self.opts.served_model_name, "object": "model",
                                            "created": 0, "owned_by": "mixserve",
                                            "max_model_len": self.model.max_model_len}]}

    @api.post("/v1/re_isq")
    async def re_isq(self, request: Request):
        """Re-quantize the weights of the replica the router picks (each replica keeps its own format)
        from its checkpoint: 409 while it has requests in flight. {"quantization": "none"|"int8"|"int4",
        "group_size": 32|64|128|256, "calibration": "none"|"builtin"} -> the replica, its new format and
        weight bytes. Needs the admin key (401 without it; 403 when the server has none): the API key
        never grants it."""
        self.pipeline.authorize(request.headers.get("authorization", ""), admin=True)
        body = self.pipeline.parse(ReIsqRequest, await self._json_body(request))
        try:
            result = await self.llm.re_isq(body.quantization, body.group_size, body.calibration)
        except EngineBusyError as exc:
            raise ApiError(409, remote_message(exc), "conflict_error", "engine_busy") from None
        except ValueError as exc:
            raise ApiError(400, remote_message(exc)) from None
        except WeightReloadError as exc:  # the replica kept its weights (workers/model_runner.py)
            raise ApiError(500, f"re-quantizing failed, the replica still serves its previous weights: "
                                f"{remote_message(exc)}", "server_error", "reload_failed") from None
        self.metrics.weight_bytes.labels(self.opts.served_model_name, result["replica"]).set(result["weight_bytes"])
        return result

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._respond(request, "/v1/completions", self._completions)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._respond(request, "/v1/chat/completions", self._chat)

    async def _completions(self, request: Request, record: RequestRecord):
        p = self.pipeline
        body = p.parse(CompletionRequest, await self._json_body(request))
        ids = p.prompt_ids(body.prompt)
        sampling = body.sampling_kwargs(body.max_tokens)
        sampling["logprobs"] = body.logprobs
        if body.echo and body.logprobs is not None:
            sampling["prompt_logprobs"] = body.logprobs
        req = p.request(f"cmpl-{uuid.uuid4().hex}", ids, sampling)
        tokenizer = self.model.tokenizer
        builder = ResponseBuilder("completion", req.request_id, self.opts.served_model_name, tokenizer, body.n,
                                  chat=False)
        echo = (body.prompt if isinstance(body.prompt, str) else tokenizer.decode(ids)) if body.echo else ""
        want_lp = body.logprobs is not None

        async def collect(chunks):
            prompt_lp = None
            async for chunk in chunks:
                prompt_lp = chunk.prompt_logprobs if chunk.prompt_logprobs is not None else prompt_lp
                builder.add(chunk)
            return builder.completion(echo, want_lp, prompt_lp)

        async def events(chunks):
            if echo:
                for state in builder.choices:
                    yield builder.completion_chunk(state, echo, None)
            async for chunk in chunks:
                for state, text, new_lp in builder.add(chunk):
                    logprobs = builder.completion_logprobs(new_lp) if want_lp else None
                    yield builder.completion_chunk(state, text, logprobs)
            if body.stream_options and body.stream_options.include_usage:
                yield builder.usage_chunk()

        return await self._collect_or_stream(request, record, "/v1/completions", req, body.stream, collect, events)

    async def _chat(self, request: Request, record: RequestRecord):
        p = self.pipeline
        body = p.parse(ChatCompletionRequest, await self._json_body(request))
        ids = p.chat_ids(body.messages)
        sampling = body.sampling_kwargs(body.requested_max_tokens)
        if body.logprobs:
            sampling["logprobs"] = body.top_logprobs or 0
        req = p.request(f"chatcmpl-{uuid.uuid4().hex}", ids, sampling)
        builder = ResponseBuilder("chat", req.request_id, self.opts.served_model_name, self.model.tokenizer, body.n,
                                  chat=True, strip_leading_space=True)

        async def collect(chunks):
            async for chunk in chunks:
                builder.add(chunk)
            return builder.chat_completion(body.logprobs)

        async def events(chunks):
            async for chunk in chunks:
                for state, text, new_lp in builder.add(chunk):
                    logprobs = builder.chat_logprobs(new_lp) if body.logprobs else None
                    yield builder.chat_chunk(state, text, logprobs, finish=state.finish_reason is not None)
            if body.stream_options and body.stream_options.include_usage:
                yield builder.usage_chunk()

        return await self._collect_or_stream(request, record, "/v1/chat/completions", req, body.stream, collect,
                                             events)
