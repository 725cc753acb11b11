"""EngineThread: the server's engine, stepped on a thread of its own.

While serving, this thread is the only caller of the engine: request handlers (coroutines on
the event loop) reach it through `call` — a command run between two steps — and read results
from asyncio queues that the thread fills through `loop.call_soon_threadsafe`. So the event loop
never blocks on the engine's lock (a step holds it for the whole step), and the stepping thread is
never starved of it by handlers (Python locks are not fair).
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
from typing import Callable

from jaxserve.outputs import RequestOutput

logger = logging.getLogger("jaxserve.server")

_IDLE_WAIT_SECONDS = 1.0  # an idle thread wakes this often anyway (to see a stop request)
# A failed step ends its own requests with finish_reason "error" (the engine does that); this many
# failures in a row is no passing fault: every request is ended, and /health says unhealthy until
# a step succeeds again.
MAX_STEP_FAILURES = 3


class EngineThread:
    def __init__(self, engine, observe: Callable[[RequestOutput], None] | None = None):
        self.engine = engine
        self._observe = observe  # sees every output (of aborted requests too), on this thread
        self._inbox: collections.deque = collections.deque()  # (fn, args, loop, future or None)
        self._wake = threading.Event()
        # request_id -> (event loop, queue, tag): where the thread delivers the request's outputs.
        self._consumers: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, object]] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="jaxserve-engine", daemon=True)
        self.num_waiting = 0  # published after each step: handlers read it without a round trip
        self.failed_steps = 0  # in a row

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Abort what is still unfinished and end the thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ---- from the event loop ---------------------------------------------------------------
    async def call(self, fn: Callable, *args):
        """Run fn(*args) on the engine thread between two steps; its result or exception."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._post(fn, args, loop, future)
        return await future

    def post(self, fn: Callable, *args) -> None:
        """Run fn(*args) on the engine thread soon, without waiting (e.g. an abort from a
        cancelled coroutine, which must not await)."""
        self._post(fn, args, None, None)

    def _post(self, fn, args, loop, future) -> None:
        if self._stopping or not self._thread.is_alive():
            raise RuntimeError("the engine is shut down")
        self._inbox.append((fn, args, loop, future))
        self._wake.set()

    async def submit(self, requests: list[tuple]) -> "Outputs":
        """Add requests — (request_id, prompt, SamplingParams, LoRARequest | None, client) — all
        or none (a bad one raises here), and return their DELTA outputs as they come. Whoever
        takes them must `close()` them (aborting what is unfinished) if it stops early."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        requests = [(rid, prompt, dataclasses.replace(params, output_kind="delta"), lora, client)
                    for rid, prompt, params, lora, client in requests]
        outputs = Outputs(self, [r[0] for r in requests], queue)
        for index, request_id in enumerate(outputs.ids):  # before the add: outputs may follow at once
            self._consumers[request_id] = (loop, queue, index)
        try:
            await self.call(self.engine.add_requests, requests)
        except BaseException:  # refused, or the caller was cancelled (then the add may still happen)
            outputs.close()
            raise
        return outputs

    def release(self, request_ids: list[str], unfinished: set[str]) -> None:
        """Stop delivering these requests' outputs; abort the unfinished ones (at the next step
        boundary; a no-op once the thread is stopping, which aborts everything itself)."""
        for request_id in request_ids:
            self._consumers.pop(request_id, None)
        if unfinished and not self._stopping and self.alive:
            self.post(self._abort, list(unfinished))

    def _abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.engine.abort(request_id)

    # ---- the thread -----------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while True:
            self._wake.clear()
            self._run_commands()
            if self._stopping:
                break
            if engine.has_unfinished_requests():
                self._step()
            else:
                self._wake.wait(_IDLE_WAIT_SECONDS)
        self._shut_down()

    def _run_commands(self) -> None:
        while self._inbox:
            fn, args, loop, future = self._inbox.popleft()
            try:
                result, error = fn(*args), None
            except Exception as exc:  # the caller's to handle (a bad request, say)
                result, error = None, exc
            if future is not None:
                _settle(loop, future, result, error)
            elif error is not None:
                logger.error("engine command %s failed: %s", getattr(fn, "__name__", fn), error)

    @property
    def healthy(self) -> bool:
        return self.alive and self.failed_steps < MAX_STEP_FAILURES

    def _step(self) -> None:
        try:
            self.engine.step(route=self._route)
            self.failed_steps = 0
        except Exception as exc:
            self.failed_steps += 1
            logger.exception("engine step failed (%d in a row)", self.failed_steps)
            if self.failed_steps >= MAX_STEP_FAILURES:  # end everything rather than spin
                self.engine.abort_all()
                for loop, queue, _ in list(self._consumers.values()):
                    _put(loop, queue, RuntimeError(f"the engine failed {self.failed_steps} steps in a row, the "
                                                   f"last with {type(exc).__name__}: {exc}"))
        finally:
            self.num_waiting = self.engine.batcher.num_waiting

    def _route(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs to their consumers, one hand-over per event loop (under the step's
        lock, so in step order)."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            if self._observe is not None:
                self._observe(out)
            consumer = self._consumers.get(out.request_id)
            if consumer is not None:
                loop, queue, tag = consumer
                batches.setdefault(loop, []).append((queue, (tag, out)))
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: nobody is left to read these
                pass

    def _shut_down(self) -> None:
        """Abort every unfinished request, report them, fail every pending command."""
        engine = self.engine
        engine.abort_all()
        try:
            while engine.has_unfinished_requests():
                engine.step(route=self._route)
        except Exception:
            logger.exception("engine step failed during shutdown")
        while self._inbox:
            _, _, loop, future = self._inbox.popleft()
            if future is not None:
                _settle(loop, future, None, RuntimeError("the engine is shut down"))


def _put_all(items) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _put(loop, queue, item) -> None:
    try:
        loop.call_soon_threadsafe(queue.put_nowait, item)
    except RuntimeError:
        pass


def _settle(loop, future, result, error) -> None:
    def settle():
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)
    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the caller's loop is closed
        pass


class Outputs:
    """The outputs of submitted requests: an async iterator of (index, DELTA RequestOutput) that
    ends when every request finished."""

    def __init__(self, thread: EngineThread, ids: list[str], queue: asyncio.Queue):
        self.thread, self.ids, self.queue = thread, ids, queue
        self.unfinished = set(ids)
        self.closed = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if not self.unfinished or self.closed:
            self.close()
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        index, out = item
        if out.finished:
            self.unfinished.discard(out.request_id)
        return index, out

    def close(self) -> None:
        """Stop delivering; abort the unfinished requests (their pages are freed at the next
        step). Safe to call more than once, from a cancelled coroutine too."""
        if self.closed:
            return
        self.closed = True
        self.thread.release(self.ids, self.unfinished)
