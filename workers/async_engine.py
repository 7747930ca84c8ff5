"""Drive an LLMEngine from asyncio: one engine thread steps the engine in a loop of its own,
callers await per-request streams of RequestOutput.

The engine thread owns the engine (it is not thread-safe): requests, aborts and other calls reach
it through an inbox it drains before each step. After each step (and after aborts that leave it
idle) it publishes the engine's load as a new snapshot, `load`, which other threads read instead of
the scheduler. It never waits for the event loop: a step's reports
are handed to the loop with `call_soon_threadsafe` and the next step starts at once, so the loop's
work on step N's outputs (chunks, serialization, sockets) overlaps step N+1's compute instead of
adding to it. A reader that falls behind gets the reports it missed folded into one (deltas
concatenated), so a slow consumer costs one item per read instead of one per step. A stream that is
closed or cancelled before its request finished aborts the request, freeing its KV blocks before
the next step. If a step raises, every open stream gets the error and the engine reports itself
unhealthy from then on (the thread keeps answering calls, and never steps again), and calls
`on_failure(exc)` once, from the engine thread, after every stream has its error.

Thread rule: the engine thread is the only thread that runs the model, building included - pass
`AsyncLLMEngine` a function that builds the engine and it runs there. OpenMP (libgomp, PyTorch's on
Linux) keeps a pool of worker threads for each thread that starts parallel work; once a process
pools more threads than it has CPUs (a loading thread's pool plus the engine thread's), every worker
sleeps right after each parallel region instead of spinning, and each of the thousands of small
parallel regions of a step pays a wake-up (on a 2-core CPU, a batch-32 decode step of mini took
76-85 ms loaded in one thread and stepped in another, 57-60 ms built and stepped in one).
"""

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import AsyncIterator, Callable
from itertools import count

import torch

from .engine import LLMEngine
from .outputs import EngineLoad, RequestOutput
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


class RequestFailedError(RuntimeError):
    """One request failed on its own (its sampling, stop check or detokenization, or queueing it
    raised something other than a refusal); the engine goes on. Never worth routing again."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine],
                 on_failure: Callable[[BaseException], None] | None = None,
                 on_load: Callable[[EngineLoad], None] | None = None):
        """`engine`: an engine, or a function that builds one on the engine thread (the thread rule
        above; the constructor waits for it and raises what it raised). `on_load(load)` runs on the
        engine thread each time it publishes a new `load` (keep it short: hand the load on)."""
        self._on_failure = on_failure
        self._on_load = on_load
        self.load = EngineLoad()  # the engine's state after its last step (or abort), replaced whole
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # (fn, concurrent Future) run on the engine thread
        self._aborts: set[str] = set()
        self._aborts_lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._error: BaseException | None = None
        self._stopped = False
        self._ids = count()
        built: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._engine_loop, args=(engine, built, torch.get_num_threads()),
                                        name="mixserve-engine", daemon=True)
        self._thread.start()
        self.engine: LLMEngine = built.result()

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
        """Run fn(*args) on the engine thread, between steps (for stats or other engine reads)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put((lambda: fn(*args), future))
        self._wake.set()
        return await asyncio.wrap_future(future)

    async def generate(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's reports until it finishes. Raises ValueError for a bad request and
        RequestFailedError when the request failed on its own (the engine serves on)."""
        self._raise_if_failed()
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        finished = False
        try:
            try:
                await self.call(self.engine.add_request, request_id, prompt, params)
            except ValueError:
                raise
            except Exception as exc:  # nothing was queued: this request's failure alone
                raise RequestFailedError(f"queueing the request failed: {type(exc).__name__}: {exc}") from exc
            while not finished:
                item = await stream.get()
                while not isinstance(item, BaseException) and not item.finished and not stream.empty():
                    item = fold_reports(item, stream.get_nowait())  # the reader fell behind: one item
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"engine failed: {item!r}") from item
                if item.error is not None:
                    finished = True
                    raise RequestFailedError(item.error)
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
        self._wake.set()

    # ---- the engine thread ------------------------------------------------------------------

    def _engine_loop(self, engine: LLMEngine | Callable[[], LLMEngine], built: concurrent.futures.Future,
                     num_threads: int) -> None:
        # OpenMP keeps its thread count per thread: a new thread starts from OMP_NUM_THREADS (Ray
        # sets 1 in its actors), whatever torch.set_num_threads said in the constructing thread, and
        # oneDNN's matmuls then run on one core while torch.get_num_threads() still reports the
        # process's count. Re-applying that count here gives the engine thread its cores.
        torch.set_num_threads(num_threads)
        try:
            self.engine = engine if isinstance(engine, LLMEngine) else engine()
        except BaseException as exc:
            built.set_exception(exc)
            return
        built.set_result(self.engine)
        while not self._stopped:
            self._wake.clear()
            self._run_inbox()
            with self._aborts_lock:
                aborts, self._aborts = self._aborts, set()
            for request_id in aborts:
                self.engine.abort_request(request_id)
            if self._error is not None or not self.engine.has_unfinished_requests():
                if aborts:
                    self._publish_load()
                if self._inbox.empty():
                    self._wake.wait()
                continue
            try:
                outputs = self.engine.step()
            except BaseException as exc:  # a dead rank, a bug: fail every stream, never hang
                self._error = exc
                self._deliver_everywhere(exc)
                if self._on_failure is not None:
                    self._on_failure(exc)
                continue
            self._deliver(outputs)
            self._publish_load()

    def _publish_load(self) -> None:
        load = self.engine.load()
        if load != self.load:
            self.load = load
            if self._on_load is not None:
                self._on_load(load)

    def _run_inbox(self) -> None:
        while True:
            try:
                fn, future = self._inbox.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand each report to its stream's event loop (one callback per loop and step)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            entry = self._streams.get(out.request_id)
            if entry is not None:
                by_loop.setdefault(entry[0], []).append((entry[1], out))
        for loop, items in by_loop.items():
            self._post(loop, items)

    def _deliver_everywhere(self, exc: BaseException) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for loop, stream in list(self._streams.values()):
            by_loop.setdefault(loop, []).append((stream, exc))
        for loop, items in by_loop.items():
            self._post(loop, items)

    @staticmethod
    def _post(loop: asyncio.AbstractEventLoop, items: list) -> None:
        def put_all():
            for stream, item in items:
                stream.put_nowait(item)

        try:
            loop.call_soon_threadsafe(put_all)
        except RuntimeError:  # that loop has closed: its streams are gone
            pass

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        self.engine.shutdown()
