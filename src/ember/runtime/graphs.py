"""Capturing and replaying a plan's segments as CUDA graphs (the run path's device side).

A plan (one input signature of one context) is cut into *segments*: runs of steps captured as one
CUDA graph each, separated by *host steps* that run eagerly. The first run of a plan captures its
segments in order, replaying each right after capture so that what follows sees real values.
Values made by a host step and read by a later graph are copied into static buffers the graph reads
(``copy_in``); values made by a graph stay in its own memory (``outputs``).

After a step with data-dependent output shapes, the rest of the graph is a *tail*, planned per shape
of what reaches it. A tail signature runs eagerly the first time it is seen and is captured when it
comes again (after NonMaxSuppression most counts are seen once: capturing them would cost more than
running them).

Every graph of a context allocates in one private memory pool, the context's arena. Captures are
rare and exclusive: a capture holds the process-wide launch lock for writing, and every launch on a
context's stream holds it for reading, because torch hands out 32 streams per device in rotation
and a capture would record another context's work queued on the same stream.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections import ChainMap, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from . import mathmode
from .specialize import Break, Specialization, Step

log = logging.getLogger(__name__)
MAX_TAILS = 16  # captured tail plans a plan keeps


@dataclass
class Segment:
    steps: list[Step]
    host: bool  # one host step, run eagerly
    graph: Any = None  # torch.cuda.CUDAGraph (or an emulation of one)
    copy_in: dict[str, torch.Tensor] = field(default_factory=dict)  # static copies of values made outside graphs
    outputs: dict[str, Any] = field(default_factory=dict)  # graph-owned values read after the segment


@dataclass
class Plan:
    spec: Specialization
    inputs: dict[str, torch.Tensor]  # static device buffers (bucket shapes)
    segments: list[Segment] = field(default_factory=list)
    tails: "OrderedDict[tuple, Plan]" = field(default_factory=OrderedDict)  # captured tails, by signature
    tail_seen: dict[tuple, int] = field(default_factory=dict)
    nbytes: int = 0
    bucket: Optional[int] = None  # rows the plan runs (a padded batch), None when exact
    eager: bool = False  # no CUDA graph: every step runs eagerly
    notes: list[str] = field(default_factory=list)
    pinned_in: dict[str, torch.Tensor] = field(default_factory=dict)
    slots: list = field(default_factory=list)  # staging slots of the server path (staging.StagedRun)

    @property
    def graphs(self) -> int:
        return sum(1 for s in self.segments if s.graph is not None) + sum(t.graphs for t in self.tails.values())

    def all_segments(self) -> list[Segment]:
        segs = list(self.segments)
        for t in self.tails.values():
            segs += t.all_segments()
        return segs


class CaptureFailed(Exception):
    def __init__(self, step: Step, error: BaseException):
        super().__init__(f"{type(error).__name__}: {error}")
        self.step, self.error = step, error


class EmulatedGraph:
    """A CUDA graph's contract on the CPU: replay recomputes the recorded steps from the same input
    objects into the same output objects, as a graph's kernels read and write fixed addresses."""

    def __init__(self, interp: Any):
        self.interp = interp
        self.record: list = []

    def replay(self) -> None:
        for step, bound, args, result in self.record:
            fresh = self.interp.invoke(step, bound, args)
            olds = result if isinstance(result, tuple) else (result,)
            news = fresh if isinstance(fresh, tuple) else (fresh,)
            for old, new in zip(olds, news):
                if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor) and old.data_ptr() != new.data_ptr():
                    old.copy_(new)


class LaunchLock:
    """Readers launch work on a context's stream; a writer captures. Re-entrant per thread for the
    same kind; a reader must not ask to write (captures happen outside launches)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer: Optional[int] = None
        self._waiting_writers = 0
        self._local = threading.local()

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        me = threading.get_ident()
        depth = getattr(self._local, "reads", 0)
        if self._writer == me or depth:
            self._local.reads = depth + 1
            try:
                yield
            finally:
                self._local.reads = depth
            return
        with self._cond:
            while self._writer is not None or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        self._local.reads = 1
        try:
            yield
        finally:
            self._local.reads = 0
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        me = threading.get_ident()
        if self._writer == me:
            yield
            return
        if getattr(self._local, "reads", 0):
            raise RuntimeError("a CUDA-graph capture was started from inside a launch on the same thread")
        with self._cond:
            self._waiting_writers += 1
            while self._writer is not None or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = me
        try:
            yield
        finally:
            with self._cond:
                self._writer = None
                self._cond.notify_all()


LAUNCH = LaunchLock()


def segments_of(steps: list[Step]) -> list[Segment]:
    segs: list[Segment] = []
    for s in steps:
        if s.host:
            segs.append(Segment([s], True))
        elif segs and not segs[-1].host:
            segs[-1].steps.append(s)
        else:
            segs.append(Segment([s], False))
    return segs


def segment_reads(steps: list[Step]) -> list[str]:
    produced: set[str] = set()
    reads: dict[str, None] = {}
    for s in steps:
        for k in s.inputs:
            if k is not None and k not in produced:
                reads.setdefault(k, None)
        produced.update(s.outputs)
    return list(reads)


def nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(nbytes(e) for e in x)
    return 0


def plan_bytes(plan: Plan) -> int:
    return (sum(nbytes(t) for t in plan.inputs.values())
            + sum(nbytes(t) for s in plan.all_segments() for t in (*s.copy_in.values(), *s.outputs.values())))


class GraphRunner:
    """Captures and replays plans for one execution context (its stream, its memory pool)."""

    def __init__(self, interp: Any, device: torch.device, stream: Any, math: Any, emulated: bool, capture: bool):
        self.interp, self.device, self.stream, self.math = interp, device, stream, math
        self.emulated, self.capture_enabled = emulated, capture
        self.cuda = device.type == "cuda"
        self._pool: Any = None  # the arena: a MemPool (measurable), or an anonymous graph pool
        self._pool_id: Any = None
        self.pending: list[tuple] = []  # tails seen twice, to capture outside the launch

    # -- the pool ---------------------------------------------------------------------------------------
    def pool_handle(self) -> Any:
        if self._pool_id is None:
            try:
                self._pool = torch.cuda.MemPool()
                self._pool_id = self._pool.id
            except Exception:
                self._pool, self._pool_id = None, torch.cuda.graph_pool_handle()
        return self._pool_id

    def arena_bytes(self) -> Optional[int]:
        """Bytes the pool holds (None where torch cannot say)."""
        if self._pool is None or not hasattr(self._pool, "snapshot"):
            return None
        try:
            return sum(int(s.get("total_size", 0)) for s in self._pool.snapshot())
        except Exception:
            return None

    def _sync(self) -> None:
        if self.cuda:
            self.stream.synchronize()

    # -- first run: capture -------------------------------------------------------------------------------
    def capture(self, plan: Plan, env: Any) -> None:
        """Capture ``plan``'s segments in order (run them, without graphs), for real. Raises
        CaptureFailed naming a step that cannot be captured (the caller demotes it and retries)."""
        stable = {id(t) for t in plan.inputs.values()}
        self._run_segments(plan, env, stable)
        if plan.spec.tail is not None:
            self.run_tail(plan, env)

    def _run_segments(self, plan: Plan, env: Any, stable: set[int]) -> None:
        for seg in plan.segments:
            if seg.host or plan.eager:
                with mathmode.applied(self.math, self.device):
                    self.interp.execute(seg.steps, env)
                continue
            for k in segment_reads(seg.steps):
                x = env.maps[0].get(k)
                if x is None or id(x) in stable:  # static inputs, values of earlier graphs
                    continue
                if isinstance(x, torch.Tensor) and x.device.type == self.device.type:
                    buf = x.clone()  # made by a host step: the graph reads a static copy
                    seg.copy_in[k] = buf
                    env.maps[0][k] = buf
                else:  # a sequence or a host tensor made by a host step: a graph would keep the first run's
                    reader = next(s for s in seg.steps if k in s.inputs)
                    raise CaptureFailed(reader, ValueError(f"reads '{k}', a {type(x).__name__} a host step makes"))
            seg.graph = self._capture_segment(seg, env)
            seg.graph.replay()  # the captured kernels have not run yet: what follows needs their results
            produced = {o for s in seg.steps for o in s.outputs}
            seg.outputs = {k: v for k, v in env.maps[0].items() if k in produced}
            stable.update(id(t) for t in seg.outputs.values())

    def _capture_segment(self, seg: Segment, env: Any) -> Any:
        at = [0]
        with mathmode.applied(self.math, self.device):
            if self.emulated:
                g = EmulatedGraph(self.interp)
                try:
                    self.interp.execute(seg.steps, env, at, record=g.record)
                except Exception as e:
                    raise CaptureFailed(seg.steps[at[0]], e) from e
                return g
            self._sync()
            g = torch.cuda.CUDAGraph()
            err: Optional[BaseException] = None
            with torch.cuda.stream(self.stream):  # captures are on the context's stream, never the default one
                pool = self._begin(g)
                try:
                    self.interp.execute(seg.steps, env, at)
                except BaseException as e:  # an op synced, copied from the host, or the like
                    err = e
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # "the CUDA graph is empty": the first step failed
                        g.capture_end()
                except Exception as e:  # invalidated: torch threw before ending the pool's routing
                    _end_allocate_to_pool(self.device, pool)
                    err = err or e
            if err is not None:
                del g
                self._sync()
                if isinstance(err, torch.OutOfMemoryError) or not isinstance(err, Exception):
                    raise err
                raise CaptureFailed(seg.steps[at[0]], err) from err
        return g

    def _begin(self, g: Any) -> Any:
        try:
            pool = self.pool_handle()
            g.capture_begin(pool=pool, capture_error_mode="thread_local")
            return pool
        except Exception as e:
            if self._pool is None:
                raise
            log.info("capture into a MemPool failed (%s): an anonymous graph pool instead", e)
            self._pool, self._pool_id = None, torch.cuda.graph_pool_handle()
            g.capture_begin(pool=self._pool_id, capture_error_mode="thread_local")
            return self._pool_id

    # -- replays --------------------------------------------------------------------------------------------
    def replay(self, plan: Plan, env: Any) -> None:
        """One run of a captured plan (inputs in place), on the context's stream."""
        for seg in plan.segments:
            if seg.graph is None:
                with mathmode.applied(self.math, self.device):
                    self.interp.execute(seg.steps, env)
                continue
            for k, buf in seg.copy_in.items():
                buf.copy_(env[k], non_blocking=True)
            seg.graph.replay()
            env.maps[0].update(seg.outputs)
        if plan.spec.tail is not None:
            self.run_tail(plan, env)

    def run_tail(self, plan: Plan, env: Any) -> None:
        """The plan's tail for what reaches it: its captured plan, or eagerly (and captured next time)."""
        tail = plan.spec.tail
        sig = tail.signature(env)
        sub = plan.tails.get(sig)
        if sub is not None:
            plan.tails.move_to_end(sig)
            env.maps.insert(1, sub.spec.host)
            self.replay(sub, env)
            return
        boundary = {k: env[k] for k in tail.reads}
        spec = self.interp.tail_specialization(tail, env)
        env.maps.insert(1, spec.host)
        with mathmode.applied(self.math, self.device):
            self.interp.run_spec(spec, env)
        seen = plan.tail_seen[sig] = plan.tail_seen.get(sig, 0) + 1
        if seen == 2 and self.capture_enabled and not plan.eager and len(plan.tails) < MAX_TAILS:
            snap = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in boundary.items()}
            self.pending.append((plan, sig, snap))
        if len(plan.tail_seen) > 4096:
            plan.tail_seen.clear()

    def capture_pending(self, consts: dict) -> int:
        """Capture the tails seen twice (call outside any launch: it takes the launch lock to write)."""
        done = 0
        while self.pending:
            plan, sig, boundary = self.pending.pop(0)
            if sig in plan.tails:
                continue
            with LAUNCH.writing() if self.cuda else contextlib.nullcontext(), \
                    torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext():
                sub = self._capture_tail(plan, boundary, consts)
            if sub is not None:
                plan.tails[sig] = sub
                plan.nbytes += sub.nbytes
                done += 1
        return done

    def _capture_tail(self, plan: Plan, boundary: dict, consts: dict) -> Optional[Plan]:
        tail = plan.spec.tail
        env = ChainMap(dict(boundary), plan.spec.host, consts)
        spec = self.interp.tail_specialization(tail, env)
        env.maps.insert(1, spec.host)
        with mathmode.applied(self.math, self.device):  # warm up (its shapes may be new to Triton)
            self.interp.execute(spec.steps, ChainMap(dict(env.maps[0]), *env.maps[1:]))
        self._sync()
        for attempt in range(64):
            sub = Plan(spec, {})
            sub.segments = segments_of(spec.steps)
            scratch = ChainMap(dict(env.maps[0]), *env.maps[1:])
            try:
                self._run_segments(sub, scratch, stable=set())  # every boundary value gets a static copy
                sub.nbytes = plan_bytes(sub)
                return sub
            except CaptureFailed as e:
                self._sync()
                demote(e, spec, sub.notes)
        return None


def demote(e: CaptureFailed, spec: Specialization, notes: list[str]) -> str:
    """Make the step that could not be captured a host step of its (shared) plan, and say why."""
    why = f"capture failed: {e}"
    if not e.step.host:
        e.step.host, e.step.reason = True, why
        spec.breaks.append(Break(e.step.node.name, e.step.node.op, why, "host"))
        spec.capturable = False
    note = f"node '{e.step.node.name}' ({e.step.node.op}) runs eagerly: {why}"
    notes.append(note)
    return note


def _end_allocate_to_pool(device: torch.device, pool: Any) -> None:
    """Undo what an invalidated capture left behind: torch's capture_end threw before telling the
    caching allocator the capture was over (CUDAGraph.cpp), which would leave every later allocation
    consulting a dead capture and make empty_cache() fail its internal assert."""
    dev = device.index if device.index is not None else torch.cuda.current_device()
    for name in ("_cuda_endAllocateToPool", "_cuda_releasePool"):
        fn = getattr(torch._C, name, None)
        if fn is not None:
            with contextlib.suppress(Exception):  # already ended: nothing to undo
                fn(dev, pool)


__all__ = ["CaptureFailed", "EmulatedGraph", "GraphRunner", "LAUNCH", "Plan", "Segment", "demote", "plan_bytes",
           "segments_of"]
