"""The OpenAI-compatible HTTP ingress (FastAPI on Ray Serve).

Request path: auth -> body size -> JSON -> pydantic validation -> tokenize / chat template ->
context-length and sampling checks -> GenerateRequest (with prefix block hashes for the router)
-> LLM-server handle (the prefix-aware router picks the replica) -> response or SSE stream.
Every client mistake is a 4xx with OpenAI's error JSON; the replica's queue being full is a 503
with Retry-After; a client that goes away cancels its request in the engine.
"""

import asyncio
import hmac
import json
import logging
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError

from ..workers.config import load_model_config
from ..workers.engine import EngineBusyError
from ..workers.model_source import resolve_model
from ..workers.prefix_hash import block_hashes
from ..workers.request_checks import ContextLengthError, completion_budget, max_model_len, prompt_token_ids
from ..workers.sampling_params import SamplingParams
from ..workers.tokenizer import Tokenizer
from .engine_api import GenerateChunk, GenerateRequest
from .grpc_service import GrpcGenerateMixin
from .metrics import ServingMetrics
from .openai_format import ResponseBuilder
from .protocol import ChatCompletionRequest, CompletionRequest, ReIsqRequest, describe_validation_error, error_body
from .request_log import RequestLog, RequestRecord

logger = logging.getLogger("mixserve.ingress")


@dataclass(slots=True)
class IngressOptions:
    model: str  # checkpoint folder (for the tokenizer and the context length)
    served_model_name: str
    block_size: int = 16
    max_model_len: int | None = None
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    request_log: str | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code=None, param=None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type_, code, param)


api = FastAPI(title="mixserve", docs_url=None, redoc_url=None)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    return JSONResponse(exc.body, status_code=exc.status, headers=headers)


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
    def __init__(self, llm_server, options: IngressOptions):
        self.llm = llm_server
        self.opts = options
        model_path = resolve_model(options.model)  # a folder, .gguf file or hub id, on this node
        self.tokenizer = Tokenizer.from_dir(model_path)
        config = load_model_config(model_path)
        self.vocab_size = config.vocab_size
        self.max_model_len = max_model_len(options.max_model_len, config.max_position_embeddings)
        self.metrics = ServingMetrics(options.served_model_name)
        self.request_log = RequestLog(options.request_log)

    # ---- plumbing ---------------------------------------------------------------------------

    def _authorized(self, authorization: str) -> bool:
        """Whether an `Authorization` value carries the API key (always, when none is set);
        compared in constant time."""
        if not self.opts.api_key:
            return True
        given = authorization[7:] if authorization.lower().startswith("bearer ") else ""
        return hmac.compare_digest(given.encode(), self.opts.api_key.encode())

    def _check_auth(self, request: Request) -> None:
        if not self._authorized(request.headers.get("authorization", "")):
            raise ApiError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                           "authentication_error", "invalid_api_key")

    async def _json_body(self, request: Request) -> dict:
        limit = self.opts.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
        raw = await request.body()
        if len(raw) > limit:
            raise ApiError(413, f"request body of {len(raw)} bytes exceeds the limit of {limit} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return body

    def _parse(self, model_cls, body: dict):
        try:
            parsed = model_cls.model_validate(body)
        except ValidationError as exc:
            raise ApiError(400, describe_validation_error(exc)) from None
        model = getattr(parsed, "model", None)
        if model is not None and model != self.opts.served_model_name:
            raise ApiError(404, f"model {model!r} does not exist; this server serves "
                                f"{self.opts.served_model_name!r}", code="model_not_found", param="model")
        return parsed

    def _prompt_ids(self, prompt) -> list[int]:
        try:
            return prompt_token_ids(self.tokenizer, prompt, self.vocab_size)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="prompt") from None

    def _request(self, request_id: str, ids: list[int], sampling: dict) -> GenerateRequest:
        try:
            max_tokens = completion_budget(len(ids), sampling["max_tokens"], self.max_model_len)
        except ContextLengthError as exc:
            raise ApiError(400, str(exc), param="max_tokens", code="context_length_exceeded") from None
        sampling = {**sampling, "max_tokens": max_tokens}
        try:
            SamplingParams(**sampling)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        return GenerateRequest(request_id, ids, sampling, block_hashes(ids, self.opts.block_size))

    async def _chunks(self, req: GenerateRequest, record: RequestRecord):
        """The replica's chunks for one request; cancels it if the caller stops early."""
        stream = None
        finished = False
        try:
            stream = self.llm.options(stream=True).generate.remote(req)
            async for chunk in stream:
                chunk: GenerateChunk
                record.on_chunk(chunk)
                self.metrics.observe_load(chunk.load)
                finished = chunk.finished
                yield chunk
        except BackPressureError:
            raise ApiError(503, "the server is at capacity; retry shortly", "server_overloaded", 503) from None

        except ValueError as exc:
            raise ApiError(400, str(getattr(exc, "cause", None) or exc)) from None
        finally:
            if not finished and stream is not None:
                try:
                    stream.cancel()
                except Exception:  # a request that was never assigned re-raises its error here
                    pass
                record.status = record.status or "cancelled"

    async def _finish(self, record: RequestRecord, endpoint: str, status: int) -> None:
        record.finish(status)
        self.metrics.http_requests.labels(self.opts.served_model_name, endpoint, str(status)).inc()
        record.observe(self.metrics)
        self.request_log.write(record)

    async def _respond(self, request: Request, endpoint: str, handler) -> Response:
        record = RequestRecord(endpoint=endpoint)
        try:
            self._check_auth(request)
            response = await handler(request, record)
        except ApiError as exc:
            record.status = "error"
            await self._finish(record, endpoint, exc.status)
            raise

        if isinstance(response, StreamingResponse):
            return response  # the stream records its own end
        await self._finish(record, endpoint, 200)
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
                await self._finish(record, endpoint, status)

        return StreamingResponse(body(), media_type="text/event-stream", headers={
            "Cache-Control": "no-cache", "X-Request-Id": request_id, "X-Mixserve-Replica": record.replica})

    # ---- endpoints --------------------------------------------------------------------------

    @api.get("/health")
    async def health(self):
        return {"status": "ok"}

    @api.get("/metrics")
    async def metrics(self):
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @api.get("/v1/models")
    async def models(self, request: Request):
        self._check_auth(request)
        return {"object": "list", "data": [{"id": self.opts.served_model_name, "object": "model",
                                            "created": 0, "owned_by": "mixserve",
                                            "max_model_len": self.max_model_len}]}

    @api.post("/v1/re_isq")
    async def re_isq(self, request: Request):
        """Re-quantize the weights of the replica the router picks (each replica keeps its own format)
        from its checkpoint: 409 while it has requests in flight. {"quantization": "none"|"int8"|"int4",
        "group_size": 32|64|128|256} -> the replica, its new format and weight bytes."""
        self._check_auth(request)
        body = self._parse(ReIsqRequest, await self._json_body(request))
        try:
            result = await self.llm.re_isq.remote(body.quantization, body.group_size)
        except EngineBusyError as exc:
            raise ApiError(409, str(getattr(exc, "cause", None) or exc), "conflict_error", "engine_busy") from None
        except ValueError as exc:
            raise ApiError(400, str(getattr(exc, "cause", None) or exc)) from None
        self.metrics.weight_bytes.labels(self.opts.served_model_name, result["replica"]).set(result["weight_bytes"])
        return result

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._respond(request, "/v1/completions", self._completions)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._respond(request, "/v1/chat/completions", self._chat)

    async def _completions(self, request: Request, record: RequestRecord):
        body = self._parse(CompletionRequest, await self._json_body(request))
        ids = self._prompt_ids(body.prompt)
        sampling = body.sampling_kwargs(body.max_tokens)
        sampling["logprobs"] = body.logprobs
        if body.echo and body.logprobs is not None:
            sampling["prompt_logprobs"] = body.logprobs
        request_id = f"cmpl-{uuid.uuid4().hex}"
        req = self._request(request_id, ids, sampling)
        record.start(request_id, len(ids))
        builder = ResponseBuilder("completion", request_id, self.opts.served_model_name, self.tokenizer, body.n,
                                  chat=False)
        echo = (body.prompt if isinstance(body.prompt, str) else self.tokenizer.decode(ids)) if body.echo else ""
        want_lp = body.logprobs is not None

        if not body.stream:
            async def collect():
                prompt_lp = None
                async for chunk in self._chunks(req, record):
                    prompt_lp = chunk.prompt_logprobs if chunk.prompt_logprobs is not None else prompt_lp
                    builder.add(chunk)
                return builder.completion(echo, want_lp, prompt_lp)

            result = await self._until_done_or_disconnected(request, collect())
            return JSONResponse(result, headers={"X-Mixserve-Replica": record.replica})

        chunks = await _prefetched(self._chunks(req, record))

        async def events():
            if echo:
                for state in builder.choices:
                    yield builder.completion_chunk(state, echo, None)
            async for chunk in chunks:
                for state, text, new_lp in builder.add(chunk):
                    logprobs = builder.completion_logprobs(new_lp) if want_lp else None
                    yield builder.completion_chunk(state, text, logprobs)
            if body.stream_options and body.stream_options.include_usage:
                yield builder.usage_chunk()

        return self._sse(request_id, "/v1/completions", record, events())

    async def _chat(self, request: Request, record: RequestRecord):
        body = self._parse(ChatCompletionRequest, await self._json_body(request))
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            ids = self.tokenizer.encode_chat(messages)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        sampling = body.sampling_kwargs(body.requested_max_tokens)
        if body.logprobs:
            sampling["logprobs"] = body.top_logprobs or 0
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        req = self._request(request_id, ids, sampling)
        record.start(request_id, len(ids))
        builder = ResponseBuilder("chat", request_id, self.opts.served_model_name, self.tokenizer, body.n,
                                  chat=True, strip_leading_space=True)

        if not body.stream:
            async def collect():
                async for chunk in self._chunks(req, record):
                    builder.add(chunk)
                return builder.chat_completion(body.logprobs)

            result = await self._until_done_or_disconnected(request, collect())
            return JSONResponse(result, headers={"X-Mixserve-Replica": record.replica})

        chunks = await _prefetched(self._chunks(req, record))

        async def events():
            async for chunk in chunks:
                for state, text, new_lp in builder.add(chunk):
                    logprobs = builder.chat_logprobs(new_lp) if body.logprobs else None
                    yield builder.chat_chunk(state, text, logprobs, finish=state.finish_reason is not None)
            if body.stream_options and body.stream_options.include_usage:
                yield builder.usage_chunk()

        return self._sse(request_id, "/v1/chat/completions", record, events())
