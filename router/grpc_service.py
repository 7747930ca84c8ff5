"""gRPC Generate service (router/generate.proto), served by the ingress through Ray Serve's gRPC
proxy. Same path and semantics as HTTP /v1/completions: same validation, routing and errors
(mapped to gRPC status codes); the API key, when set, comes as `authorization: Bearer <key>`
metadata."""

import uuid

import grpc

from . import generate_pb2
from .request_log import RequestRecord

_STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
           404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.INVALID_ARGUMENT,
           499: grpc.StatusCode.CANCELLED, 503: grpc.StatusCode.UNAVAILABLE}


class GrpcGenerateMixin:
    """Methods named after the proto's RPCs; mixed into the ingress deployment class."""

    def _grpc_check_auth(self, grpc_context) -> None:
        metadata = dict(grpc_context.invocation_metadata() or ())
        if not self._authorized(metadata.get("authorization", "")):
            from .ingress import ApiError

            raise ApiError(401, "invalid or missing API key (send authorization: Bearer <key> metadata)")

    def _grpc_request(self, request: generate_pb2.GenerateRequest, grpc_context):
        from .ingress import ApiError

        self._grpc_check_auth(grpc_context)
        if request.model and request.model != self.opts.served_model_name:
            raise ApiError(404, f"model {request.model!r} does not exist; this server serves "
                                f"{self.opts.served_model_name!r}")
        ids = self._prompt_ids(list(request.prompt_token_ids) if request.prompt_token_ids else request.prompt)
        sampling = dict(
            n=1, max_tokens=request.max_tokens if request.HasField("max_tokens") else 16,
            temperature=request.temperature if request.HasField("temperature") else 1.0,
            top_p=request.top_p if request.HasField("top_p") else 1.0,
            top_k=request.top_k if request.HasField("top_k") else -1,
            seed=request.seed if request.HasField("seed") else None,
            stop=list(request.stop), ignore_eos=request.ignore_eos,
        )
        if sampling["max_tokens"] < 1 or sampling["temperature"] < 0:
            raise ApiError(400, "max_tokens must be at least 1 and temperature at least 0")
        request_id = f"grpc-{uuid.uuid4().hex}"
        return self._request(request_id, ids, sampling)

    def _grpc_fail(self, exc, grpc_context, record: RequestRecord):
        grpc_context.set_code(_STATUS.get(exc.status, grpc.StatusCode.UNKNOWN))
        grpc_context.set_details(exc.body["error"]["message"])
        record.status = "error"
        self.request_log.write(record)

    async def Generate(self, request: generate_pb2.GenerateRequest, grpc_context) -> generate_pb2.GenerateReply:
        from .ingress import ApiError

        record = RequestRecord(endpoint="grpc:Generate")
        try:
            req = self._grpc_request(request, grpc_context)
            record.start(req.request_id, len(req.prompt_token_ids))
            text, ids, finish = "", [], ""
            async for chunk in self._chunks(req, record):
                choice = chunk.choices[0]
                text += choice.delta_text
                ids += choice.delta_token_ids
                finish = choice.finish_reason or finish
        except ApiError as exc:
            self._grpc_fail(exc, grpc_context, record)
            return generate_pb2.GenerateReply()
        record.finish(200)
        self.request_log.write(record)
        return generate_pb2.GenerateReply(request_id=req.request_id, text=text, token_ids=ids, finish_reason=finish,
                                          prompt_tokens=len(req.prompt_token_ids), completion_tokens=len(ids))

    async def GenerateStream(self, request: generate_pb2.GenerateRequest, grpc_context):
        from .ingress import ApiError

        record = RequestRecord(endpoint="grpc:GenerateStream")
        try:
            req = self._grpc_request(request, grpc_context)
            record.start(req.request_id, len(req.prompt_token_ids))
            produced = 0
            async for chunk in self._chunks(req, record):
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
        record.finish(200)
        self.request_log.write(record)
