"""Dynamic batcher: one per model version.

Requests wait in bounded per-priority queues. When a model instance can take a batch, the
scheduler forms one from the head of the highest-priority queue plus every later request with
the same non-batch shapes, up to max_batch_size. It dispatches at once when the batch is full,
has a preferred size, cannot grow, or the oldest request has waited max_queue_delay; otherwise it
waits for more. Outputs go back per request along the batch dimension.

An instance is a `BatchRunner`: `launch` gathers a batch and starts it, `finish` waits for it and
splits its outputs per request. A runner of depth 2 (an engine instance on the GPU path,
instance.py) has two batches in flight: its launch thread gathers batch k+1 into pinned memory
while its finish thread waits for batch k, so CPU work overlaps the GPU. A runner of depth 1
launches and finishes on one thread. Everything else here runs on the event loop.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from .config import QueuePolicy
from .errors import (BadRequestError, InferenceFailedError, ModelNotReadyError, QueueFullError,
                     RequestTimeoutError, ServeError)

log = logging.getLogger("ember.serve")

BatchObserver = Callable[[int, int, int, int], None]  # (batch items, input ns, infer ns, output ns)
# per-request outputs (in batch order), gather ns, run ns, split ns
BatchOutputs = tuple[list[dict[str, np.ndarray]], int, int, int]


class BatchRunner(Protocol):
    """One model instance, as the batcher drives it."""

    depth: int  # batches in flight at once: 1, or 2 (launch of the next overlaps finish of this one)

    def open(self) -> None:
        """Called once on the instance's launch thread before any batch (make per-thread state)."""

    def launch(self, feeds: list[dict[str, np.ndarray]], items: list[int]) -> Any:
        """Gather the requests' inputs (in order; ``items`` rows each) and start the run."""

    def finish(self, launched: Any) -> BatchOutputs:
        """Wait for a launched run; its outputs per request."""


def split_rows(label: str, outputs: dict[str, np.ndarray], items: list[int],
               view: Callable[[np.ndarray], np.ndarray] = lambda a: a) -> list[dict[str, np.ndarray]]:
    """A batch's outputs back per request: ``view`` of each request's rows (of the whole outputs when
    the batch is one request, whatever their shape)."""
    if len(items) == 1:
        return [{k: view(v) for k, v in outputs.items()}]
    total = sum(items)
    for k, v in outputs.items():
        if v.ndim == 0 or v.shape[0] != total:
            raise InferenceFailedError(
                f"model {label}: output '{k}' has shape {list(v.shape)} for a batch of {total}; "
                "a batched model must keep the batch as the first dim of every output")
    per, off = [], 0
    for n in items:
        per.append({k: view(v[off:off + n]) for k, v in outputs.items()})
        off += n
    return per


class FunctionRunner:
    """A runner around a function of the whole batch: inputs concatenated along the batch dim, one
    call, outputs split back as views. Engines on the CPU run this way (instance.py)."""

    depth = 1

    def __init__(self, fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], label: str = "model"):
        self.fn = fn
        self.label = label

    def open(self) -> None:
        pass

    def launch(self, feeds: list[dict[str, np.ndarray]], items: list[int]) -> BatchOutputs:
        t0 = time.perf_counter_ns()
        if len(feeds) == 1:
            feed = feeds[0]
        else:
            feed = {k: np.concatenate([f[k] for f in feeds], axis=0) for k in feeds[0]}
        t1 = time.perf_counter_ns()
        out = self.fn(feed)
        t2 = time.perf_counter_ns()
        per = split_rows(self.label, out, items)
        return per, t1 - t0, t2 - t1, time.perf_counter_ns() - t2

    def finish(self, launched: BatchOutputs) -> BatchOutputs:
        return launched


@dataclass
class BatchPolicy:
    max_batch_size: int  # 0: the model has no batch dim; each request runs alone
    dynamic: bool = False  # gather several requests into one run
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_ns: int = 0
    priority_levels: int = 1
    default_priority: int = 1
    queue_policies: dict[int, QueuePolicy] = field(default_factory=dict)  # level -> policy (max_queue_size > 0)


@dataclass
class Timings:
    queue_ns: int
    input_ns: int
    infer_ns: int
    output_ns: int
    batch_size: int


@dataclass
class BatchResult:
    outputs: dict[str, np.ndarray]
    timings: Timings


@dataclass(eq=False)
class _Pending:
    inputs: dict[str, np.ndarray]
    items: int
    signature: tuple
    future: asyncio.Future
    enqueued_ns: int
    level: int
    timer: asyncio.TimerHandle | None = None
    queue: deque | None = None


class DynamicBatcher:
    def __init__(self, label: str, runners: Sequence[BatchRunner], policy: BatchPolicy,
                 on_batch: BatchObserver | None = None):
        self.label = label
        self.policy = policy
        self.runners = list(runners)
        self._on_batch = on_batch
        self._levels: list[deque[_Pending]] = [deque() for _ in range(policy.priority_levels)]
        self._level_count = [0] * (policy.priority_levels + 1)
        self._delayed: deque[_Pending] = deque()  # timed-out requests of DELAY policies run last
        self._launchers = [ThreadPoolExecutor(1, thread_name_prefix=f"ember-{label}-{i}")
                           for i in range(len(self.runners))]
        self._finishers: list[ThreadPoolExecutor | None] = [None] * len(self.runners)
        self._idle: asyncio.Queue[int] = asyncio.Queue()  # a token per batch an instance may take now
        self._wakeup = asyncio.Event()
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._queued = 0
        self._executing = 0
        self._closing = False
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None

    # ---- public -------------------------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def executing(self) -> int:
        return self._executing

    @property
    def instance_count(self) -> int:
        return len(self.runners)

    async def open(self) -> None:
        """Open every instance on its own launch thread (an engine instance makes its execution
        context there). Call before start()."""
        await self.on_each_instance(lambda r: r.open())

    async def on_each_instance(self, fn: Callable[[BatchRunner], Any], one_at_a_time: bool = False) -> list[Any]:
        """``fn(runner)`` on each instance's launch thread, outside the queue; the results in order."""
        loop = asyncio.get_running_loop()
        if one_at_a_time:
            return [await loop.run_in_executor(ex, fn, r) for r, ex in zip(self.runners, self._launchers)]
        return list(await asyncio.gather(*(loop.run_in_executor(ex, fn, r)
                                           for r, ex in zip(self.runners, self._launchers))))

    def start(self) -> None:
        if self._loop_task is not None:
            return
        for i, r in enumerate(self.runners):
            if r.depth > 1 and self._finishers[i] is None:
                self._finishers[i] = ThreadPoolExecutor(1, thread_name_prefix=f"ember-{self.label}-{i}-wait")
        for round_ in range(max((r.depth for r in self.runners), default=0)):  # every instance once, then again
            for i, r in enumerate(self.runners):
                if r.depth > round_:
                    self._idle.put_nowait(i)
        self._loop_task = asyncio.get_running_loop().create_task(self._schedule(), name=f"batcher-{self.label}")

    def submit(self, inputs: dict[str, np.ndarray], items: int, priority: int = 0,
               timeout_us: int | None = None) -> asyncio.Future:
        """Queue one request. Raises QueueFullError at the queue limit; never blocks."""
        if self._closing:
            raise ModelNotReadyError(f"model {self.label} is unloading and takes no new requests; retry to reach "
                                     "its replacement")
        level = self._level(priority)
        policy = self.policy.queue_policies[level]
        if self._level_count[level] >= policy.max_queue_size:
            raise QueueFullError(f"model {self.label}: the queue is full ({policy.max_queue_size} requests waiting"
                                 f"{f' at priority {level}' if self.policy.priority_levels > 1 else ''}); "
                                 "retry with backoff, or raise max_queue_size / instance_count")
        loop = asyncio.get_running_loop()
        signature = tuple((k, v.dtype.str, v.shape[1:]) for k, v in sorted(inputs.items()))
        p = _Pending(inputs, items, signature, loop.create_future(), time.monotonic_ns(), level)
        if timeout_us is None or not policy.allow_timeout_override:
            timeout_us = policy.default_timeout_us
        if timeout_us:
            p.timer = loop.call_later(timeout_us / 1e6, self._expire, p, policy.timeout_action, timeout_us)
        p.queue = self._levels[level - 1]
        p.queue.append(p)
        self._level_count[level] += 1
        self._queued += 1
        self._quiet.clear()
        self._wakeup.set()
        return p.future

    async def run_direct(self, instance: int, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one request on one instance outside the queue (warm-up)."""
        first = next(iter(inputs.values()), None)
        items = int(first.shape[0]) if first is not None and first.ndim else 1
        per, *_ = await self._run(instance, [inputs], [items])
        return per[0]

    async def drain(self) -> None:
        """Stop taking requests, finish every queued and running one."""
        self._closing = True
        self._wakeup.set()
        await self._quiet.wait()

    async def close(self) -> None:
        await self.drain()
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        for ex in [*self._launchers, *self._finishers]:
            if ex is not None:
                ex.shutdown(wait=False)

    # ---- scheduling ----------------------------------------------------------------------------------

    def _level(self, priority: int) -> int:
        levels = self.policy.priority_levels
        if priority == 0:
            return self.policy.default_priority
        if not 1 <= priority <= levels:
            raise BadRequestError(f"model {self.label}: priority {priority} is out of range; it takes 1 (highest) "
                                  f"to {levels}, or 0 for the default")
        return priority

    def _expire(self, p: _Pending, action: str, timeout_us: int) -> None:
        p.timer = None
        if p.queue is None or p.future.done():
            return
        if action == "DELAY":
            if p.queue is not self._delayed:
                p.queue.remove(p)
                p.queue = self._delayed
                self._delayed.append(p)
            return
        p.queue.remove(p)
        self._forget(p)
        p.future.set_exception(RequestTimeoutError(
            f"model {self.label}: request timed out after waiting {timeout_us / 1000:g} ms in the queue; "
            "raise the timeout or add instances"))

    def _forget(self, p: _Pending) -> None:
        p.queue = None
        if p.timer is not None:
            p.timer.cancel()
            p.timer = None
        self._level_count[p.level] -= 1
        self._queued -= 1
        self._maybe_quiet()

    def _maybe_quiet(self) -> None:
        if self._queued == 0 and self._executing == 0:
            self._quiet.set()

    def _queues(self) -> list[deque[_Pending]]:
        return [*self._levels, self._delayed]

    def _head(self) -> _Pending | None:
        for q in self._queues():
            while q and q[0].future.done():  # the client went away
                self._forget(q.popleft())
            if q:
                return q[0]
        return None

    def _collect(self, head: _Pending) -> tuple[list[_Pending], int, bool]:
        """Head plus later compatible requests that fit; and whether a compatible one did not fit."""
        limit = max(self.policy.max_batch_size, 1)
        chosen, total = [], 0
        for q in self._queues():
            for p in q:
                if p.future.done() or p.signature != head.signature:
                    continue
                if total + p.items > limit:
                    return chosen, total, True
                chosen.append(p)
                total += p.items
        return chosen, total, False

    def _take(self, chosen: list[_Pending]) -> None:
        self._executing += len(chosen)  # first, so _forget never reports the batcher quiet
        ids = {id(p) for p in chosen}
        for q in self._queues():
            if any(id(p) in ids for p in q):
                keep = [p for p in q if id(p) not in ids]
                q.clear()
                q.extend(keep)
        for p in chosen:
            self._forget(p)

    async def _gather(self) -> list[_Pending]:
        pol = self.policy
        while True:
            head = self._head()
            if head is None:
                return []
            if not pol.dynamic:
                self._take([head])
                return [head]
            chosen, total, full = self._collect(head)
            waited = time.monotonic_ns() - head.enqueued_ns
            if (full or total >= pol.max_batch_size or total in pol.preferred_batch_sizes or self._closing
                    or waited >= pol.max_queue_delay_ns):
                self._take(chosen)
                return chosen
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), (pol.max_queue_delay_ns - waited) / 1e9)
            except asyncio.TimeoutError:
                pass

    async def _schedule(self) -> None:
        while True:
            try:
                await self._schedule_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not strand queued requests: log, keep scheduling
                log.exception("batcher %s: scheduling failed", self.label)
                await asyncio.sleep(0.01)

    async def _schedule_once(self) -> None:
        if self._queued == 0:
            self._wakeup.clear()
            await self._wakeup.wait()
            return
        instance = await self._idle.get()
        dispatched = False
        try:
            batch = await self._gather()
            if batch:
                task = asyncio.get_running_loop().create_task(self._execute(instance, batch))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                dispatched = True
        finally:
            if not dispatched:
                self._idle.put_nowait(instance)

    # ---- execution --------------------------------------------------------------------------------------

    async def _run(self, instance: int, feeds: list[dict[str, np.ndarray]], items: list[int]) -> BatchOutputs:
        loop = asyncio.get_running_loop()
        runner = self.runners[instance]
        finisher = self._finishers[instance]
        if finisher is None:  # depth 1: launch and finish in one go on the instance's thread
            return await loop.run_in_executor(self._launchers[instance], _launch_and_finish, runner, feeds, items)
        # depth 2: the launch thread hands the batch to the finish thread itself, so finishes queue in
        # launch order and the event loop wakes once per batch, when its outputs are ready
        done: asyncio.Future = loop.create_future()

        def settle(result: Any = None, error: BaseException | None = None) -> None:
            try:
                loop.call_soon_threadsafe(_settle, done, result, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

        def finish(launched: Any) -> None:
            try:
                settle(runner.finish(launched))
            except BaseException as e:
                settle(error=e)

        def launch() -> None:
            try:
                launched = runner.launch(feeds, items)
                finisher.submit(finish, launched)
            except BaseException as e:
                settle(error=e)

        self._launchers[instance].submit(launch)
        return await done

    async def _execute(self, instance: int, batch: list[_Pending]) -> None:
        start = time.monotonic_ns()
        try:
            try:
                results = await self._run(instance, [p.inputs for p in batch], [p.items for p in batch])
                self._deliver(batch, results, start)
            except Exception as e:
                if len(batch) == 1:
                    self._fail(batch[0], e)
                    return
                # one request may have poisoned the batch; run each alone so the others still succeed
                for p in batch:
                    try:
                        self._deliver([p], await self._run(instance, [p.inputs], [p.items]), start)
                    except Exception as e1:
                        self._fail(p, e1)
        finally:
            self._executing -= len(batch)
            self._idle.put_nowait(instance)
            self._maybe_quiet()
            self._wakeup.set()

    def _deliver(self, batch: list[_Pending], results: BatchOutputs, start: int) -> None:
        outputs, input_ns, infer_ns, output_ns = results
        items = sum(p.items for p in batch)
        if self._on_batch is not None:
            self._on_batch(items, input_ns, infer_ns, output_ns)
        for p, out in zip(batch, outputs):
            if not p.future.done():
                p.future.set_result(BatchResult(out, Timings(start - p.enqueued_ns, input_ns, infer_ns, output_ns,
                                                             items)))

    def _fail(self, p: _Pending, e: BaseException) -> None:
        if p.future.done():
            return
        if not isinstance(e, ServeError):
            e = InferenceFailedError(f"model {self.label}: {type(e).__name__}: {e}")
        p.future.set_exception(e)


def _settle(fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


def _launch_and_finish(runner: BatchRunner, feeds: list[dict[str, np.ndarray]], items: list[int]) -> BatchOutputs:
    return runner.finish(runner.launch(feeds, items))
