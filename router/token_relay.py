"""Tokens from an LLM-server replica to the ingress that asked for them, without a Ray object per chunk.

The router still picks the replica: the ingress calls the replica's `generate_relayed` through the
LLM-server handle (prefix-aware routing, Serve's queue limits, ongoing-request counts for
autoscaling and failure handling all stay Serve's), and that call lasts as long as the request. The
chunks themselves travel over a TCP connection the replica keeps open to each ingress replica
(`RelayReceiver`, one listening socket per ingress process), many requests multiplexed on it.

Rule:
1. The ingress opens a receiver on its node's address and a random port, with a random secret;
   GenerateRequest.reply_to = (host, port, secret). Before asking the replica it registers the
   request id, so no chunk can arrive for an unknown request.
2. The replica (`RelaySender`) connects once per receiver address, sends the secret first (a
   connection that does not is closed unread), then frames: 4-byte big-endian length + JSON. JSON,
   not pickle: a frame is data, and the receiver never runs what it reads. A frame holds a chunk or
   the replica's load, which it publishes after its engine steps to every receiver it is connected
   to (`RelayReceiver.loads`: /metrics and routing read it there).
3. The replica's call returns after the request's last chunk was written to the connection; TCP keeps
   that connection's frames in order, so the ingress reads the last chunk (finished=True) before or
   soon after the call returns. A call that raises (the replica died, the request was refused or
   failed) ends the stream with that error once the chunks already received are read.
4. A reader that goes away cancels the call (the replica aborts the request); frames that still
   arrive for an unregistered request are dropped.
"""

import asyncio
import dataclasses
import json
import logging
import secrets
import struct
import threading
from collections.abc import AsyncIterator

from .engine_api import ChoiceDelta, GenerateChunk, GenerateRequest, ReplicaLoad, TokenLogprob

logger = logging.getLogger("mixserve.relay")

_LENGTH = struct.Struct(">I")
MAX_FRAME_BYTES = 64 << 20
LAST_CHUNK_WAIT_S = 30.0  # after the call returned, how long the finished chunk may take to arrive


# ---- frames ------------------------------------------------------------------------------------

def _logprob(e: TokenLogprob) -> list:
    return [e.token_id, e.logprob, e.top]


def _token_logprob(v: list) -> TokenLogprob:
    return TokenLogprob(v[0], v[1], [tuple(t) for t in v[2]])


def _frame(payload: dict) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return _LENGTH.pack(len(body)) + body


def encode_chunk(chunk: GenerateChunk) -> bytes:
    """One frame (length prefix included) holding a GenerateChunk."""
    payload = {
        "id": chunk.request_id, "fin": chunk.finished, "np": chunk.num_prompt_tokens, "nc": chunk.num_cached_tokens,
        "r": chunk.replica, "t": chunk.engine_times,
        "ch": [[c.index, c.delta_text, c.delta_token_ids,
                None if c.logprobs is None else [_logprob(e) for e in c.logprobs], c.finish_reason, c.stop_reason]
               for c in chunk.choices],
    }
    if chunk.prompt_logprobs is not None:
        payload["pl"] = [None if e is None else _logprob(e) for e in chunk.prompt_logprobs]
    return _frame(payload)


def encode_load(load: ReplicaLoad) -> bytes:
    """One frame holding a replica's load (published after its engine steps)."""
    return _frame({"load": dataclasses.astuple(load)})


def decode(body: bytes) -> GenerateChunk | ReplicaLoad:
    p = json.loads(body)
    if "load" in p:
        return ReplicaLoad(*p["load"])
    choices = [ChoiceDelta(index=c[0], delta_text=c[1], delta_token_ids=c[2],
                           logprobs=None if c[3] is None else [_token_logprob(e) for e in c[3]],
                           finish_reason=c[4], stop_reason=c[5]) for c in p["ch"]]
    prompt_lp = p.get("pl")
    return GenerateChunk(
        request_id=p["id"], choices=choices, finished=p["fin"], num_prompt_tokens=p["np"], num_cached_tokens=p["nc"],
        replica=p["r"], engine_times=tuple(p["t"]),
        prompt_logprobs=None if prompt_lp is None else [None if e is None else _token_logprob(e) for e in prompt_lp],
    )


# ---- the ingress's side --------------------------------------------------------------------------

_receiver: "RelayReceiver | None" = None  # this process's (the ingress's), created on first use


def relay_receiver(host: str) -> "RelayReceiver":
    """This process's receiver, listening on `host` (created on first use)."""
    global _receiver
    if _receiver is None:
        _receiver = RelayReceiver(host)
    return _receiver


def published_loads() -> dict[str, ReplicaLoad]:
    """The loads the replicas published to this process, by replica id (empty without a receiver):
    what the prefix-aware router, which runs in this process, weighs."""
    return {} if _receiver is None else dict(_receiver.loads)


class RelayReceiver:
    """One per ingress process (`relay_receiver`): a listening socket on its own thread and event loop;
    chunks go to the queue of their request, on the loop that registered it."""

    def __init__(self, host: str):
        self.secret = secrets.token_hex(16)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.loads: dict[str, ReplicaLoad] = {}  # each connected replica's latest published load
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(host, started), name="mixserve-relay", daemon=True)
        self._thread.start()
        started.wait()
        self.address: tuple[str, int, str] = (host, self._port, self.secret)

    def _run(self, host: str, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, host, 0))
        self._port = server.sockets[0].getsockname()[1]
        started.set()
        self._loop.run_forever()

    def register(self, request_id: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), queue)
        return queue

    def unregister(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        replicas = set()  # that published their load on this connection
        try:
            if (await reader.readexactly(len(self.secret))).decode(errors="replace") != self.secret:
                return
            while True:
                (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
                if length > MAX_FRAME_BYTES:
                    return
                item = decode(await reader.readexactly(length))
                if isinstance(item, ReplicaLoad):
                    self.loads[item.replica] = item
                    replicas.add(item.replica)
                    continue
                entry = self._streams.get(item.request_id)
                if entry is not None:
                    entry[0].call_soon_threadsafe(entry[1].put_nowait, item)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, KeyError, IndexError, TypeError):
            pass  # the replica went away or sent garbage: its calls fail on their own
        finally:
            writer.close()
            for replica in replicas:  # its process is gone (or will reconnect and publish again)
                self.loads.pop(replica, None)


class RelayedStream:
    """A request's chunks, as the pipeline reads them (`async for`, `cancel()`): the relayed frames of
    a `generate_relayed` call through `handle` (rule 3 above for how the two end)."""

    def __init__(self, handle, receiver: RelayReceiver, request: GenerateRequest):
        self._receiver = receiver
        self._request_id = request.request_id
        self._queue = receiver.register(request.request_id)
        request.reply_to = receiver.address
        self._response = handle.generate_relayed.remote(request)
        self._call = asyncio.ensure_future(self._await_call())
        self._call.add_done_callback(_retrieve)  # a call cancelled or failed after the reader left: no warning
        self._finished = False

    async def _await_call(self):
        return await self._response

    def __aiter__(self) -> AsyncIterator[GenerateChunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[GenerateChunk]:
        try:
            while not self._finished:
                chunk = await self._next()
                self._finished = chunk.finished
                yield chunk
        finally:
            self._receiver.unregister(self._request_id)

    async def _next(self) -> GenerateChunk:
        if not self._queue.empty():
            return self._queue.get_nowait()
        getter = asyncio.ensure_future(self._queue.get())
        try:
            done, _ = await asyncio.wait({getter, self._call}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                return getter.result()
            self._call.result()  # raises the call's error: replica gone, request refused or failed
            # the call returned: its last chunks are on the wire (rule 3)
            return await asyncio.wait_for(asyncio.shield(getter), LAST_CHUNK_WAIT_S)
        finally:
            if not getter.done():
                getter.cancel()

    def cancel(self) -> None:
        if not self._finished:
            self._response.cancel()
            self._call.cancel()
        self._receiver.unregister(self._request_id)


def _retrieve(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()


# ---- the replica's side --------------------------------------------------------------------------

class RelaySender:
    """One per LLM-server replica: a connection per receiver address, opened on first use on the
    replica's event loop and opened again after it broke."""

    def __init__(self):
        self._connections: dict[tuple[str, int], asyncio.StreamWriter] = {}
        self._opening: dict[tuple[str, int], asyncio.Lock] = {}

    async def send(self, reply_to: tuple[str, int, str], chunk: GenerateChunk) -> None:
        """Write one chunk; raises ConnectionError when the ingress cannot be reached."""
        writer = await self._writer(reply_to)
        try:
            writer.write(encode_chunk(chunk))
            if writer.transport.get_write_buffer_size() > (1 << 20):
                await writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            self._connections.pop(reply_to[:2], None)
            raise ConnectionError(f"the ingress at {reply_to[0]}:{reply_to[1]} went away: {exc}") from exc

    def broadcast(self, frame: bytes) -> None:
        """Write a frame (a load) to every receiver this replica is connected to; a broken connection
        is dropped (the next chunk for it opens a new one)."""
        for key, writer in list(self._connections.items()):
            if writer.is_closing():
                self._connections.pop(key, None)
            else:
                writer.write(frame)

    async def _writer(self, reply_to: tuple[str, int, str]) -> asyncio.StreamWriter:
        key = (reply_to[0], reply_to[1])
        writer = self._connections.get(key)
        if writer is not None and not writer.is_closing():
            return writer
        async with self._opening.setdefault(key, asyncio.Lock()):
            writer = self._connections.get(key)
            if writer is None or writer.is_closing():
                _, writer = await asyncio.open_connection(*key)
                writer.write(reply_to[2].encode())
                self._connections[key] = writer
            return writer
