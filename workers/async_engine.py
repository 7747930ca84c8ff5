"""Drive an LLMEngine from asyncio: one background thread steps the engine, callers await
per-request streams of RequestOutput.

Every engine call runs on that single thread (the engine is not thread-safe). A reader that falls
behind gets the reports it missed folded into one (deltas concatenated), so a slow consumer costs one
item per read instead of one per step. A stream that is
closed or cancelled before its request finished aborts the request, freeing its KV blocks at
the start of the next step. If a step raises, every open stream gets the error and the engine
reports itself unhealthy from then on.
"""

import asyncio
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from itertools import count

from .engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams


def fold_reports(earlier: RequestOutput, later: RequestOutput | BaseException) -> RequestOutput | BaseException:
    """Fold an unread report into the next one: the later report's state, both reports' deltas."""
    if isinstance(later, BaseException):
        return later
    for before, after in zip(earlier.outputs, later.outputs):
        after.delta_text = before.delta_text + after.delta_text
        after.delta_token_ids = before.delta_token_ids + after.delta_token_ids
    return later


class EngineDeadError(RuntimeError):
    """The engine failed and can no longer serve; the replica should be replaced."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mixserve-engine")
        self._streams: dict[str, asyncio.Queue] = {}
        self._aborts: set[str] = set()
        self._aborts_lock = threading.Lock()
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._error: BaseException | None = None
        self._ids = count()

    @property
    def is_healthy(self) -> bool:
        return self._error is None

    def check_health(self) -> None:
        """Raise if the engine failed or its executor (e.g. a rank actor) no longer answers. Blocking:
        for a periodic health check, never for a request (a dead rank fails the next step anyway)."""
        self._raise_if_failed()
        self.engine.executor.check_health()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"engine failed: {self._error!r}") from self._error

    async def call(self, fn, *args):
        """Run fn(*args) on the engine thread (for stats or other engine reads)."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def generate(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's reports until it finishes. Raises ValueError for a bad request."""
        self._raise_if_failed()
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        finished = False
        try:
            await self.call(self.engine.add_request, request_id, prompt, params)
            self._start_loop()
            while not finished:
                item = await queue.get()
                while not isinstance(item, BaseException) and not item.finished and not queue.empty():
                    item = fold_reports(item, queue.get_nowait())  # the reader fell behind: one item
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"engine failed: {item!r}") from item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread; takes effect before the next step."""
        with self._aborts_lock:
            self._aborts.add(request_id)
        if self._wakeup is not None and self._loop_task is not None:
            self._loop_task.get_loop().call_soon_threadsafe(self._wakeup.set)

    def _step(self):
        with self._aborts_lock:
            aborts, self._aborts = self._aborts, set()
        for request_id in aborts:
            self.engine.abort_request(request_id)
        return self.engine.step()

    def _start_loop(self) -> None:
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
        self._wakeup.set()

    async def _run(self) -> None:
        while self._error is None:
            if not self.engine.has_unfinished_requests() and not self._aborts:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                outputs = await self.call(self._step)
            except BaseException as exc:  # a dead rank, a bug: fail every stream, never hang
                self._error = exc
                for queue in self._streams.values():
                    queue.put_nowait(exc)
                return
            for out in outputs:
                queue = self._streams.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)

    def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._thread.shutdown(wait=True)
        self.engine.shutdown()
