"""AsyncLLM: an LLMEngine stepped on a thread of its own, for asyncio callers (the OpenAI server).

Callers submit requests and iterate their outputs; the engine thread owns the engine (scheduler, KV
blocks) and takes commands (add, abort) from a queue between steps, so nothing but that thread touches
engine state. A caller that stops iterating (a client that disconnects) aborts its request, which frees
its KV blocks at the next step boundary.

Admission is decided on the caller's side, at once: a request beyond ``max_waiting`` queued ones is
refused with QueueFullError (HTTP 429); once the engine thread has died (a failed step) or is closing,
every request gets EngineDeadError (HTTP 503).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from .engine import LLMEngine
from .errors import EngineDeadError, QueueFullError, RequestError
from .outputs import RequestOutput
from .sampling import SamplingParams

log = logging.getLogger("ember.llm")


@dataclass
class RequestTimes:
    """What metrics record of one finished request (seconds, monotonic clock)."""

    arrival: float
    queue: float = 0.0  # arrival -> first scheduled
    first_token: Optional[float] = None  # arrival -> first token
    inter_token: list[float] = field(default_factory=list)
    end: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: Optional[str] = None


class Observer:
    """Metrics hooks; the server's Prometheus collector implements them. Called on the engine thread."""

    def request_done(self, times: RequestTimes) -> None:
        pass

    def step_done(self, running: int, waiting: int, kv_usage: float, preemptions: int, tokens: int) -> None:
        pass


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop, req_id: str, arrival: float):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.id = req_id
        self.times = RequestTimes(arrival)
        self.last: Optional[float] = None

    def put(self, item: object) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncLLM:
    def __init__(self, engine: LLMEngine, max_waiting: Optional[int] = None, observer: Optional[Observer] = None):
        self.engine = engine
        self.max_waiting = max_waiting if max_waiting is not None else engine.scheduler.max_waiting
        self.observer = observer or Observer()
        self._commands: "queue.SimpleQueue[tuple]" = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._pending = 0  # submitted, not yet running (the caller-side admission count)
        self._lock = threading.Lock()
        self._dead: Optional[str] = None
        self._closing = False
        self._ids = 0
        self._thread = threading.Thread(target=self._loop, name=f"ember-llm-{engine.name}", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._dead is None and not self._closing

    def close(self, timeout: float = 30.0) -> None:
        """Stop the engine thread; requests still running get EngineDeadError."""
        self._closing = True
        self._commands.put(("stop",))
        self._thread.join(timeout)

    # -- the caller's side (event loop) -------------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: Optional[str] = None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they come; the last has ``finished``. Leaving the iteration early
        (or being cancelled) aborts the request."""
        async for out in self.consume(self.submit(prompt_ids, params, request_id)):
            yield out

    async def consume(self, stream: "_Stream") -> AsyncIterator[RequestOutput]:
        """The outputs of a submitted request; leaving early aborts it."""
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self._commands.put(("abort", stream.id))

    def abort(self, request_id: str) -> None:
        """Abort a request (from any thread); a finished or unknown one is left alone."""
        self._commands.put(("abort", request_id))

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: Optional[str] = None) -> _Stream:
        if self._dead is not None:
            raise EngineDeadError(f"the LLM engine of '{self.engine.name}' stopped ({self._dead}); restart the server")
        if self._closing:
            raise EngineDeadError(f"the LLM engine of '{self.engine.name}' is shutting down")
        self.engine.check_request(prompt_ids, params)
        with self._lock:
            waiting = self._pending + len(self.engine.scheduler.waiting)
            if waiting >= self.max_waiting:
                raise QueueFullError(f"'{self.engine.name}' has {waiting} requests waiting, its limit; retry with "
                                     "backoff")
            self._pending += 1
            self._ids += 1
            rid = request_id or f"req-{self._ids}"
        stream = _Stream(asyncio.get_running_loop(), rid, time.monotonic())
        self._commands.put(("add", stream, list(prompt_ids), params))
        return stream

    def stats(self) -> dict[str, float]:
        s = self.engine.scheduler
        return {"running": len(s.running), "waiting": len(s.waiting) + self._pending,
                "kv_usage": self.engine.kv_usage(),
                "preemptions": s.preemptions, "steps": self.engine.steps}

    # -- the engine thread ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        eng = self.engine
        try:
            while True:
                block = not eng.has_unfinished()
                if not self._drain(block):
                    break
                if not eng.has_unfinished():
                    continue
                outs = eng.step()
                self._deliver(outs)
                s = eng.scheduler
                self.observer.step_done(len(s.running), len(s.waiting), eng.kv_usage(), s.preemptions,
                                        sum(len(o.token_ids) for o in outs))
        except Exception as e:  # a failed step: every request is told, new ones are refused
            log.exception("LLM engine '%s' stopped", eng.name)
            self._dead = f"{type(e).__name__}: {e}"
        finally:
            err = EngineDeadError(f"the LLM engine of '{eng.name}' stopped"
                                  + (f" ({self._dead})" if self._dead else " (shutting down)"))
            for st in list(self._streams.values()):
                st.put(err)
            self._streams.clear()
            while True:  # requests submitted but never added
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    break
                if cmd[0] == "add":
                    cmd[1].put(err)

    def _drain(self, block: bool) -> bool:
        """Apply queued commands; False on stop. Blocks for the first one when the engine is idle."""
        while True:
            try:
                cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
            except queue.Empty:
                return True
            block = False
            if cmd[0] == "stop":
                return False
            if cmd[0] == "add":
                _, stream, ids, params = cmd
                with self._lock:
                    self._pending -= 1
                try:
                    self.engine.add_request(ids, params, stream.id)
                except (RequestError, QueueFullError) as e:
                    stream.put(e)
                    continue
                self._streams[stream.id] = stream
            elif cmd[0] == "abort":
                stream = self._streams.pop(cmd[1], None)
                if stream is not None and self.engine.abort(cmd[1]) is not None:
                    stream.times.finish_reason = "abort"
                    stream.times.end = time.monotonic()
                    self.observer.request_done(stream.times)

    def _deliver(self, outs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for o in outs:
            st = self._streams.get(o.request_id)
            if st is None:
                continue
            t = st.times
            if t.first_token is None:
                t.first_token = now - t.arrival
                t.queue = max(0.0, (o.scheduled_at or now) - t.arrival)
            elif st.last is not None:
                t.inter_token.append(now - st.last)
            st.last = now
            if o.finished:  # recorded before the caller can see the end (and, say, swap the observer)
                self._streams.pop(o.request_id, None)
                t.end, t.finish_reason = now - t.arrival, o.finish_reason
                t.prompt_tokens, t.completion_tokens, t.cached_tokens = (o.prompt_tokens, o.completion_tokens,
                                                                         o.cached_tokens)
                self.observer.request_done(t)
            st.put(o)

