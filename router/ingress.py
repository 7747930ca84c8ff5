"""The serving shapes: Ray Serve deployments that host the request pipeline and mount its HTTP app
(router/api.py `build_api`) and gRPC service (router/grpc_service.py).

- OpenAIIngress: in front of the LLM-server replicas; the prefix-aware router picks a replica per
  request and its chunks come back over the relay (router/token_relay.py).
- DirectIngress: the engine in the ingress's own process (one replica).
Either one serves HTTP on the port itself when `http_address` is set (`mixserve serve`), or behind
Serve's HTTP proxy (Serve configs).
"""

import asyncio
import socket
import threading
from dataclasses import dataclass, field

import uvicorn
from ray import serve

from ..workers.config import load_model_config
from ..workers.model_source import resolve_model
from ..workers.request_checks import max_model_len
from ..workers.tokenizer import Tokenizer
from .api import build_api
from .grpc_service import GrpcGenerateMixin
from .llm_server import LLMServer, LLMServerSpec, LocalLLM, RemoteLLM
from .metrics import ServingMetrics
from .request_log import RequestLog
from .request_pipeline import EngineClient, PipelineModel, RequestPipeline


@dataclass(slots=True, kw_only=True)
class IngressOptions:
    """Built by cluster/settings.py's ServeSettings.ingress_options, where the defaults live."""

    model: str  # checkpoint folder (for the tokenizer and the context length)
    served_model_name: str
    block_size: int  # the engine's KV block size
    max_model_len: int | None = None
    api_key: str | None = field(default=None, repr=False)
    admin_key: str | None = field(default=None, repr=False)  # POST /v1/re_isq needs it; 403 without one
    max_body_bytes: int
    request_log: str | None = None
    prompt_text: bool = False  # the LLM-server's router reads the prompt's text (Ray's prefix-tree router)
    http_address: tuple[str, int] | None = None  # (host, port) this replica serves HTTP on itself
    max_in_flight: int | None = None  # requests at once before 503 where no Serve queue caps them (direct HTTP)
    drain_s: float  # when Serve stops the replica: how long its own HTTP server's requests may run on


def serve_http_in_thread(app, host: str, port: int) -> tuple[uvicorn.Server, threading.Thread]:
    """Serve `app` on host:port from this process (the ingress's own HTTP server): uvicorn in a thread
    with its event loop, on a socket bound with SO_REUSEPORT so that the ingress replicas of one node
    share the port (the kernel spreads connections over them). Chunks reach this loop from the relay
    (or, in the direct shape, from the engine thread) without a Ray hop."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="mixserve-http", daemon=True)
    thread.start()
    return server, thread


class _ApiHost(GrpcGenerateMixin):
    """What every shape does with its pipeline: build the app once (Serve's ingress mounts it through
    `__serve_build_asgi_app__`; with `http_address` this process also serves it itself), gRPC, drain."""

    def _start(self, llm: EngineClient, options: IngressOptions) -> None:
        model_path = resolve_model(options.model)  # a folder, .gguf file or hub id, on this node
        config = load_model_config(model_path)
        model = PipelineModel(options.served_model_name, Tokenizer.from_dir(model_path), config.vocab_size,
                              max_model_len(options.max_model_len, config.max_position_embeddings),
                              options.block_size, options.prompt_text)
        self.pipeline = RequestPipeline(model, llm, ServingMetrics(options.served_model_name),
                                        RequestLog(options.request_log), options.api_key, options.max_in_flight,
                                        admin_key=options.admin_key)
        self.http_app = build_api(self.pipeline, options.max_body_bytes)
        self._drain_s = options.drain_s
        self._http = serve_http_in_thread(self.http_app, *options.http_address) if options.http_address else None

    def __serve_build_asgi_app__(self):
        return self.http_app

    async def __del__(self):
        """Serve stops this replica (scale-down, redeploy, shutdown). The requests of its own HTTP
        server are not Serve's, so Serve does not wait for them: stop accepting connections (the
        port's other listeners, a replacement's, take new ones) and let the requests in flight end,
        for at most drain_s; then the app's lifespan ends as Serve's wrapper does it."""
        if getattr(self, "_http", None) is not None:
            server, thread = self._http
            server.should_exit = True  # uvicorn stops listening and waits for its requests in flight
            await asyncio.to_thread(thread.join, self._drain_s)
        await super().__del__()

    def drain(self) -> int:
        """New requests get 503 from now on; returns how many this replica has in flight (cluster/drain.py)."""
        return self.pipeline.drain()


@serve.ingress()
class OpenAIIngress(_ApiHost):
    """The ingress deployment in front of the LLM-server replicas (`llm_server`: their handle; the
    prefix-aware router picks a replica per request, chunks come back over the relay)."""

    def __init__(self, llm_server, options: IngressOptions):
        self._start(RemoteLLM(llm_server), options)


@serve.ingress()
class DirectIngress(_ApiHost):
    """The direct shape: one deployment whose replica runs the engine itself (built from `server`), and
    so also answers Serve's health checks and the LLM-server calls (stats, kernel_report) for it."""

    def __init__(self, options: IngressOptions, server: LLMServerSpec):
        self.local = LLMServer(server)
        self._start(LocalLLM(self.local), options)

    async def check_health(self) -> None:
        await self.local.check_health()

    async def stats(self) -> dict:
        return await self.local.stats()

    def kernel_report(self) -> dict:
        return self.local.kernel_report()
