"""gRPC Generate service (router/generate.proto), served by the ingress through Ray Serve's gRPC
proxy: a thin adapter over the request pipeline (router/request_pipeline.py), so a gRPC request is
parsed, validated (as a /v1/completions body: same defaults and checks), routed, counted in
/metrics and logged exactly as an HTTP one. The API key, when set, comes as
`authorization: Bearer <key>` metadata; pipeline errors map onto gRPC status codes."""

import uuid

import grpc

from . import generate_pb2
from .engine_api import GenerateRequest
from .protocol import CompletionRequest
from .request_log import RequestRecord
from .request_pipeline import ApiError, RequestPipeline

_STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
           404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.INVALID_ARGUMENT,
           499: grpc.StatusCode.CANCELLED, 503: grpc.StatusCode.UNAVAILABLE}
_OPTIONAL_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed")


class GrpcGenerateMixin:
    """Methods named after the proto's RPCs; mixed into the ingress deployment class, which provides
    `self.pipeline`."""

    pipeline: RequestPipeline

    def _grpc_request(self, request: generate_pb2.GenerateRequest, grpc_context) -> GenerateRequest:
        self.pipeline.refuse_while_draining()
        metadata = dict(grpc_context.invocation_metadata() or ())
        self.pipeline.authorize(metadata.get("authorization", ""), "send authorization: Bearer <key> metadata")
        body = {name: getattr(request, name) for name in _OPTIONAL_FIELDS if request.HasField(name)}
        body.update(prompt=list(request.prompt_token_ids) if request.prompt_token_ids else request.prompt,
                    stop=list(request.stop) or None, ignore_eos=request.ignore_eos, model=request.model or None)
        parsed = self.pipeline.parse(CompletionRequest, body)
        ids = self.pipeline.prompt_ids(parsed.prompt)
        return self.pipeline.request(f"grpc-{uuid.uuid4().hex}", ids, parsed.sampling_kwargs(parsed.max_tokens))

    def _grpc_fail(self, exc: ApiError, grpc_context, record: RequestRecord) -> None:
        grpc_context.set_code(_STATUS.get(exc.status, grpc.StatusCode.UNKNOWN))
        grpc_context.set_details(exc.message)
        record.status = "error"
        self.pipeline.finish(record, record.endpoint, exc.status)

    async def Generate(self, request: generate_pb2.GenerateRequest, grpc_context) -> generate_pb2.GenerateReply:
        record = RequestRecord(endpoint="grpc:Generate")
        try:
            req = self._grpc_request(request, grpc_context)
            record.start(req.request_id, len(req.prompt_token_ids))
            text, ids, finish = "", [], ""
            async for chunk in self.pipeline.chunks(req, record):
                choice = chunk.choices[0]
                text += choice.delta_text
                ids += choice.delta_token_ids
                finish = choice.finish_reason or finish
        except ApiError as exc:
            self._grpc_fail(exc, grpc_context, record)
            return generate_pb2.GenerateReply()
        self.pipeline.finish(record, record.endpoint, 200)
        return generate_pb2.GenerateReply(request_id=req.request_id, text=text, token_ids=ids, finish_reason=finish,
                                          prompt_tokens=len(req.prompt_token_ids), completion_tokens=len(ids))

    async def GenerateStream(self, request: generate_pb2.GenerateRequest, grpc_context):
        record = RequestRecord(endpoint="grpc:GenerateStream")
        try:
            req = self._grpc_request(request, grpc_context)
            record.start(req.request_id, len(req.prompt_token_ids))
            produced = 0
            async for chunk in self.pipeline.chunks(req, record):
                choice = chunk.choices[0]
                produced += len(choice.delta_token_ids)
                yield generate_pb2.GenerateReply(
                    request_id=req.request_id, text=choice.delta_text, token_ids=choice.delta_token_ids,
                    finish_reason=choice.finish_reason or "", prompt_tokens=len(req.prompt_token_ids),
                    completion_tokens=produced,
                )
        except ApiError as exc:
            self._grpc_fail(exc, grpc_context, record)
            return
        self.pipeline.finish(record, record.endpoint, 200)
