"""The one loop that drives the engine for every connection.

`kvlab.LLM` is not thread-safe, and it needs no locking here: only `EngineLoop.run` touches it.
Between two steps, on the event loop's thread, it hands the engine the requests and aborts that
handlers queued (`submit`, `abort`); then it runs `LLM.step()` in its own worker thread (the event loop
keeps serving HTTP meanwhile) and, while that step runs, routes each RequestOutput of the step
before to the asyncio.Queue of the handler that owns the request. Requests from all connections
share the engine's continuous batch.

A handler gets its queue from `await submit(...)`, which raises the engine's ValueError for a bad
request (the engine is unchanged), or `Overloaded` when more requests wait than `max_waiting`.
What a queue receives: `Update(output, now)` per step that produced a token (the last one has
`output.finished`), or `Failure(message)` when the engine failed or the server is shutting down.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from kvlab.engine.outputs import RequestOutput
from kvlab.serve.metrics import ServerMetrics

log = logging.getLogger("kvlab.serve")


class Overloaded(Exception):
    """More requests wait than the server's queue limit."""


@dataclass
class Update:
    output: RequestOutput
    time: float   # perf_counter when the step that produced it returned


@dataclass
class Failure:
    message: str


@dataclass
class _Tracked:
    """A request the loop routes outputs for, with the times its metrics need."""
    queue: asyncio.Queue
    arrival: float
    num_prompt_tokens: int = 0
    first: float | None = None
    last: float | None = None
    num_generated: int = 0


@dataclass
class _Submission:
    args: tuple               # (prompt, SamplingParams, request_id, cache_salt)
    arrival: float
    future: asyncio.Future
    queue: asyncio.Queue


def engine_thread(num_threads: int | None = None) -> ThreadPoolExecutor:
    """The one thread that does the engine's torch work, with `num_threads` torch threads (default:
    the caller's). Build the LLM on it too (`engine_thread().submit(build).result()`): every thread
    that runs a parallel torch op keeps its own OpenMP team, and with two teams on a 2-core machine
    libgomp sees more threads than CPUs and stops spinning between parallel regions. Measured on the
    course machine (SmolLM2, FastLlama, 2 threads, one decoding request): 18 ms per step when one
    thread loads and steps the model, 25-27 ms when the main thread loaded it and a second one steps."""
    n = torch.get_num_threads() if num_threads is None else num_threads
    return ThreadPoolExecutor(1, "kvlab-engine", initializer=torch.set_num_threads, initargs=(n,))


class EngineLoop:
    def __init__(self, llm, metrics: ServerMetrics, max_waiting: int = 256, executor: ThreadPoolExecutor | None = None):
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {max_waiting}")
        self.llm, self.metrics, self.max_waiting = llm, metrics, max_waiting
        self._submissions: list[_Submission] = []
        self._aborts: list[str] = []
        self._tracked: dict[str, _Tracked] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False
        self.error: str | None = None   # set if the loop died; /health reports it
        # one thread steps the engine (the one that built it, when the caller passes it: engine_thread)
        self._executor = executor if executor is not None else engine_thread()
        metrics.snapshot = llm.get_metrics()

    # ---- handlers' side ----------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done() and not self._stopping

    def num_waiting(self) -> int:
        return int(self.metrics.snapshot.get("num_requests_waiting", 0)) + len(self._submissions)

    async def submit(self, prompt, params, request_id: str, cache_salt: str | None = None,
                     arrival: float | None = None, queue: asyncio.Queue | None = None) -> asyncio.Queue:
        """Hand one request to the engine at its next step boundary; returns the queue its outputs go
        to (`queue`, or a new one: a handler with several prompts passes one queue for all)."""
        if not self.alive:
            raise Overloaded("the server is shutting down" if self._stopping else "the engine is not running")
        if self.num_waiting() >= self.max_waiting:
            raise Overloaded(f"{self.num_waiting()} requests are waiting (the limit is {self.max_waiting}); "
                             "retry later")
        sub = _Submission((prompt, params, request_id, cache_salt), arrival or time.perf_counter(),
                          asyncio.get_running_loop().create_future(), queue if queue is not None else asyncio.Queue())
        self._submissions.append(sub)
        self.metrics.pending = len(self._submissions)
        self._wake.set()
        await sub.future   # raises the engine's ValueError for a bad request
        return sub.queue

    def abort(self, request_id: str) -> None:
        """Stop a request at the next step boundary (a client left); its blocks are freed then."""
        if request_id in self._tracked or any(s.args[2] == request_id for s in self._submissions):
            self._aborts.append(request_id)
            if self._wake is not None:
                self._wake.set()

    # ---- the loop ----------------------------------------------------------------------------
    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self.run(), name="kvlab-engine-loop")

    async def stop(self) -> None:
        """Let the running step end, then abort every request left; their handlers get a Failure."""
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        self._fail_all("the server is shutting down")
        self._executor.shutdown(wait=True)

    def _fail_all(self, message: str) -> None:
        for sub in self._submissions:
            if not sub.future.done():
                sub.future.set_exception(Overloaded(message))
        self._submissions.clear()
        self.metrics.pending = 0
        for rid in list(self._tracked):
            try:
                self.llm.abort_request(rid)
            except Exception:   # an engine whose step failed may fail here too; the handler still hears
                log.exception("abort of %s failed", rid)
            self._finish(rid, "abort", time.perf_counter()).queue.put_nowait(Failure(message))
        self.metrics.snapshot = self.llm.get_metrics()

    def _apply_commands(self) -> None:
        subs, self._submissions = self._submissions, []
        self.metrics.pending = 0
        for sub in subs:
            if sub.future.done():   # its handler was cancelled (the client left) before the engine saw it
                continue
            prompt, params, rid, salt = sub.args
            try:
                self.llm.add_request(prompt, params, request_id=rid, cache_salt=salt)
            except ValueError as e:
                sub.future.set_exception(e)
                continue
            self._tracked[rid] = _Tracked(sub.queue, sub.arrival)
            sub.future.set_result(None)
        aborts, self._aborts = self._aborts, []
        if aborts:
            now = time.perf_counter()
            for rid in aborts:
                if rid in self._tracked:
                    self.llm.abort_request(rid)
                    self._finish(rid, "abort", now)
        self.metrics.snapshot = self.llm.get_metrics()

    def _finish(self, rid: str, reason: str, now: float) -> _Tracked:
        t = self._tracked.pop(rid)
        self.metrics.observe_finished(reason, t.arrival, t.first, t.last, t.num_prompt_tokens,
                                      t.num_generated, now)
        return t

    def _route(self, outputs: list[RequestOutput], now: float) -> None:
        for out in outputs:
            t = self._tracked.get(out.request_id)
            if t is None:   # aborted while the step ran
                continue
            self.metrics.observe_token(t.arrival, t.first, t.last, now)
            t.num_prompt_tokens = len(out.prompt_token_ids)
            t.num_generated = len(out.outputs[0].token_ids)
            t.first = now if t.first is None else t.first
            t.last = now
            t.queue.put_nowait(Update(out, now))
            if out.finished:
                self._finish(out.request_id, out.outputs[0].finish_reason or "stop", now)

    async def run(self) -> None:
        """Step the engine until stopped. The outputs of a step are routed to their handlers while the
        next step runs (as vLLM's engine core process overlaps the API server's output processing):
        between two steps the engine waits only for the commands handlers queued, not for their
        streaming work."""
        loop = asyncio.get_running_loop()
        routed = None   # (outputs, time) of the last step, not yet handed to their handlers
        while True:
            self._apply_commands()
            if self._stopping:
                if routed is not None:
                    self._route(*routed)
                return
            if not self.llm.has_unfinished_requests():
                if routed is not None:
                    self._route(*routed)
                    routed = None
                    await asyncio.sleep(0)
                    continue
                self._wake.clear()
                if not (self._submissions or self._aborts or self._stopping):
                    await self._wake.wait()
                continue
            step = loop.run_in_executor(self._executor, self.llm.step)
            if routed is not None:
                self._route(*routed)
                routed = None
                await asyncio.sleep(0)   # let handlers write their chunks while the step runs
            try:
                outputs = await step
            except Exception as e:   # the engine's state is unknown: fail everyone, keep serving
                log.exception("engine step failed")
                self.error = f"engine step failed: {type(e).__name__}: {e}"
                self._fail_all(self.error)
                continue
            routed = (outputs, time.perf_counter())
