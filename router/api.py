"""The OpenAI-compatible HTTP API: `build_api(pipeline)` makes the FastAPI app, thin HTTP adapters over
the request pipeline (router/request_pipeline.py), which the gRPC adapter (router/grpc_service.py)
shares. Nothing here knows Ray Serve: a serving shape (router/ingress.py) builds the app once and
mounts it (Serve's ingress, and/or its own uvicorn server).

Per request: draining? -> auth -> body size -> JSON -> the pipeline's parse, tokenize, validate ->
its chunk stream -> a JSON response (collected) or an SSE stream -> the pipeline's finish. Every
client mistake is a 4xx with OpenAI's error JSON; a full queue or a draining server is a 503 with
Retry-After; a client that goes away cancels its request in the engine.
"""

import asyncio
import json
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..workers.engine import EngineBusyError
from ..workers.model_runner import WeightReloadError
from .engine_api import GenerateRequest
from .openai_format import ResponseBuilder
from .protocol import ChatCompletionRequest, CompletionRequest, ReIsqRequest, error_body
from .request_log import RequestRecord
from .request_pipeline import ApiError, RequestPipeline, remote_message


async def json_body(request: Request, limit: int) -> dict:
    """The body as a JSON object; its size is counted while it is read (a chunked body has no
    Content-Length), so no more than `limit` bytes are ever held."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    raw = bytearray()
    try:
        async for part in request.stream():
            raw += part
            if len(raw) > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
    except ClientDisconnect:
        raise ApiError(499, "client closed the request") from None
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, an integer of over 4300 digits
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "request body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


async def _prefetched(chunks):
    """Pull the first chunk now (so errors before the first token become HTTP statuses), then
    hand back an iterator over all of them."""
    first = await chunks.__anext__()

    async def all_chunks():
        yield first
        async for chunk in chunks:
            yield chunk

    return all_chunks()


async def _until_done_or_disconnected(request: Request, work):
    """Run a non-streaming request; cancel it if the client disconnects meanwhile."""
    task = asyncio.ensure_future(work)
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if not done and await request.is_disconnected():
            task.cancel()
            raise ApiError(499, "client closed the request")
    return task.result()


def build_api(pipeline: RequestPipeline, max_body_bytes: int) -> FastAPI:
    """The app's routes, each closing over `pipeline`."""
    api = FastAPI(title="mixserve", docs_url=None, redoc_url=None)
    p = pipeline
    name = p.model.served_model_name

    @api.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        headers = {"Retry-After": "1", **exc.headers} if exc.status == 503 else exc.headers
        return JSONResponse(exc.body, status_code=exc.status, headers=headers)

    @api.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):  # unknown path, wrong method: OpenAI's shape
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", exc.status_code),
                            status_code=exc.status_code, headers=exc.headers)

    async def respond(request: Request, endpoint: str, handler) -> Response:
        record = RequestRecord(endpoint=endpoint)
        try:
            p.refuse_while_draining()
            p.authorize(request.headers.get("authorization", ""))
            response = await handler(request, record)
        except ApiError as exc:
            record.status = "error"
            p.finish(record, endpoint, exc.status)
            raise
        if isinstance(response, StreamingResponse):
            return response  # the stream records its own end
        p.finish(record, endpoint, 200)
        return response

    def sse(request_id: str, endpoint: str, record: RequestRecord, events) -> StreamingResponse:
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
                p.finish(record, endpoint, status)

        return StreamingResponse(body(), media_type="text/event-stream", headers={
            "Cache-Control": "no-cache", "X-Request-Id": request_id, "X-Mixserve-Replica": record.replica})

    async def collect_or_stream(request: Request, record: RequestRecord, endpoint: str, req: GenerateRequest,
                                stream: bool, collect, events) -> Response:
        """Run `req` through the pipeline: `collect(chunks)` builds the JSON response, or `events(chunks)`
        yields the SSE events (the first chunk is awaited first, so errors before it stay HTTP statuses)."""
        record.start(req.request_id, len(req.prompt_token_ids))
        if not stream:
            try:
                result = await _until_done_or_disconnected(request, collect(p.chunks(req, record)))
            except ApiError as exc:  # e.g. its replica died: the error names it, as a success would
                if record.replica:
                    exc.headers["X-Mixserve-Replica"] = record.replica
                raise
            return JSONResponse(result, headers={"X-Mixserve-Replica": record.replica})
        chunks = await _prefetched(p.chunks(req, record))
        return sse(req.request_id, endpoint, record, events(chunks))

    @api.get("/health")
    async def health():
        p.refuse_while_draining()  # a load balancer's probe takes this replica out of rotation
        await p.refuse_until_ready()
        return {"status": "ok"}

    @api.get("/metrics")
    async def metrics_text():
        p.observe_current_loads()
        return Response(p.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @api.get("/v1/models")
    async def models(request: Request):
        p.authorize(request.headers.get("authorization", ""))
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "mixserve",
                                            "max_model_len": p.model.max_model_len}]}

    @api.post("/v1/re_isq")
    async def re_isq(request: Request):
        """Re-quantize the weights of the replica the router picks (each replica keeps its own format)
        from its checkpoint: 409 while it has requests in flight. {"quantization": "none"|"int8"|"int4",
        "group_size": 32|64|128|256, "calibration": "none"|"builtin"} -> the replica, its new format and
        weight bytes. Needs the admin key (401 without it; 403 when the server has none): the API key
        never grants it."""
        p.authorize(request.headers.get("authorization", ""), admin=True)
        body = p.parse(ReIsqRequest, await json_body(request, max_body_bytes))
        try:
            result = await p.llm.re_isq(body.quantization, body.group_size, body.calibration)
        except EngineBusyError as exc:
            raise ApiError(409, remote_message(exc), "conflict_error", "engine_busy") from None
        except ValueError as exc:
            raise ApiError(400, remote_message(exc)) from None
        except WeightReloadError as exc:  # the replica kept its weights (workers/model_runner.py)
            raise ApiError(500, f"re-quantizing failed, the replica still serves its previous weights: "
                                f"{remote_message(exc)}", "server_error", "reload_failed") from None
        p.metrics.weight_bytes.labels(name, result["replica"]).set(result["weight_bytes"])
        return result

    async def completions_handler(request: Request, record: RequestRecord):
        body = p.parse(CompletionRequest, await json_body(request, max_body_bytes))
        ids = p.prompt_ids(body.prompt)
        sampling = body.sampling_kwargs(body.max_tokens)
        sampling["logprobs"] = body.logprobs
        if body.echo and body.logprobs is not None:
            sampling["prompt_logprobs"] = body.logprobs
        req = p.request(f"cmpl-{uuid.uuid4().hex}", ids, sampling)
        tokenizer = p.model.tokenizer
        builder = ResponseBuilder("completion", req.request_id, name, tokenizer, body.n, chat=False)
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

        return await collect_or_stream(request, record, "/v1/completions", req, body.stream, collect, events)

    async def chat_handler(request: Request, record: RequestRecord):
        body = p.parse(ChatCompletionRequest, await json_body(request, max_body_bytes))
        ids = p.chat_ids(body.messages)
        sampling = body.sampling_kwargs(body.requested_max_tokens)
        if body.logprobs:
            sampling["logprobs"] = body.top_logprobs or 0
        req = p.request(f"chatcmpl-{uuid.uuid4().hex}", ids, sampling)
        builder = ResponseBuilder("chat", req.request_id, name, p.model.tokenizer, body.n, chat=True,
                                  strip_leading_space=True)

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

        return await collect_or_stream(request, record, "/v1/chat/completions", req, body.stream, collect, events)

    @api.post("/v1/completions")
    async def completions(request: Request):
        return await respond(request, "/v1/completions", completions_handler)

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await respond(request, "/v1/chat/completions", chat_handler)

    return api
