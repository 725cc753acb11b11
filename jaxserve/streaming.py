"""Streaming a request's outputs as they come: `stream` (a generator that steps the engine
itself) and `AsyncStreams` (for servers: many coroutines stream at once while one background
task steps the engine in a worker thread and routes each request's outputs to its consumer).

Both yield DELTA outputs (new text and tokens). Outputs of requests a consumer does not own are
handed back to the engine (`put_back`) for their own consumers.
"""
from __future__ import annotations

import asyncio
import dataclasses
from typing import AsyncIterator, Iterator

from jaxserve.outputs import RequestOutput
from jaxserve.sampling import SamplingParams


def stream(engine, request_id: str, prompt, sampling_params: SamplingParams | None = None,
           lora_request=None, client: str | None = None) -> Iterator[RequestOutput]:
    params = dataclasses.replace(sampling_params or SamplingParams(), output_kind="delta")
    engine.add_request(request_id, prompt, params, lora_request, client)
    request_id = str(request_id)
    finished = False
    try:
        while not finished:
            outputs = engine.step()
            engine.put_back([out for out in outputs if out.request_id != request_id])
            for out in outputs:
                if out.request_id == request_id:
                    finished = out.finished
                    yield out
    finally:
        if not finished:  # the consumer stopped early: free the request's pages
            engine.abort(request_id)


class AsyncStreams:
    """The engine's async consumers: one queue per streamed request, each with the event loop it
    belongs to, so a step run for any loop's stepper reaches it (a notebook may close a loop while
    its stepper's step is still running in a worker thread)."""

    def __init__(self, engine):
        self.engine = engine
        self._consumers: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids: set[str] = set()  # requests added by astream, until their last output
        self._stepper: asyncio.Task | None = None

    async def astream(self, request_id: str, prompt, sampling_params: SamplingParams | None = None,
                      lora_request=None, client: str | None = None) -> AsyncIterator[RequestOutput]:
        params = dataclasses.replace(sampling_params or SamplingParams(), output_kind="delta")
        queue: asyncio.Queue = asyncio.Queue()
        request_id = str(request_id)
        self.engine.add_request(request_id, prompt, params, lora_request, client)  # raises on a duplicate id
        # no await in between: no output can be missed
        self._consumers[request_id] = (asyncio.get_running_loop(), queue)
        self._ids.add(request_id)
        self._ensure_stepper()
        try:
            while True:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                yield out
                if out.finished:
                    return
        finally:
            if self._consumers.pop(request_id, None) is not None:
                self.engine.abort(request_id)  # the consumer went away early

    def _ensure_stepper(self) -> None:
        loop = asyncio.get_running_loop()
        # A stepper of another event loop (stopped or closed with the task pending) never runs
        # again: this loop gets its own.
        if self._stepper is None or self._stepper.done() or self._stepper.get_loop() is not loop:
            self._stepper = loop.create_task(self._step_forever())

    async def _step_forever(self) -> None:
        while self._consumers and self.engine.has_unfinished_requests():
            await asyncio.to_thread(self._step_and_route)

    def _step_and_route(self) -> None:
        """One step in a worker thread; its outputs are routed from there, under the step's lock
        (so in step order)."""
        try:
            self.engine.step(route=self._route)
        except BaseException as err:  # every waiting consumer hears of it
            for request_id in list(self._consumers):
                self._deliver(request_id, err)
            raise

    def _route(self, outputs: list[RequestOutput]) -> None:
        # Outputs of requests no astream ever consumed (LLM.generate or stream in another
        # thread, add_request) go back to their consumers; an astream whose consumer left
        # early is aborted and its last output dropped here.
        self.engine.put_back([out for out in outputs if out.request_id not in self._ids])
        for out in outputs:
            self._deliver(out.request_id, out)
            if out.finished:
                self._consumers.pop(out.request_id, None)
                self._ids.discard(out.request_id)

    def _deliver(self, request_id: str, item) -> None:
        consumer = self._consumers.get(request_id)
        if consumer is None:
            return
        loop, queue = consumer
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # its loop is closed: nobody is left to read it, nor to abort it
            self._consumers.pop(request_id, None)
            self.engine.abort(request_id)
