"""ExecutionContext: the one run path. ``Engine.run``, ``ember run``, ``ember bench`` and every server
instance go through it.

A context owns a CUDA stream, a private memory pool (its arena: every CUDA graph it captures allocates
there, with values freed after their last use, so the pool tracks the engine's memory plan), and one
*plan* per input signature (or shape bucket, see buckets.py):

- static device buffers for the inputs, and reused pinned host buffers that numpy inputs and outputs
  are staged through, copied on the context's stream;
- the steps of the signature's specialization, cut into *segments*: runs of steps captured as one
  CUDA graph each, separated by the host steps that must run eagerly (data read on the host); a
  data-dependent shape leaves the rest to a *tail* plan, made per shape of what reaches it;
- a run copies the inputs in, replays (or runs) the segments in order, copies the outputs out and waits
  on the context's stream only.

Plans are kept in LRU order under a byte cap. Contexts of one engine share its weights; a context is
used by one thread at a time (it holds a lock): make one context per concurrent caller. On CPU a
context runs the steps directly.
"""
from __future__ import annotations

import logging
import threading
from collections import ChainMap, OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional

import numpy as np
import torch

from ..errors import InputError
from ..ops.torch_types import from_torch, tensor_to_numpy, to_numpy_value, to_torch
from . import mathmode
from .buckets import Analysis, BucketPlan, analyze_for
from .specialize import Specialization, Step

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger(__name__)
DEFAULT_GRAPH_BYTES = 4 << 30  # plans (static buffers and graph outputs) a context keeps, in bytes


@dataclass
class _Segment:
    steps: list[Step]
    host: bool  # one host step, run eagerly
    graph: Optional[torch.cuda.CUDAGraph] = None
    copy_in: dict[str, torch.Tensor] = field(default_factory=dict)  # static buffers of values made outside graphs
    outputs: dict[str, Any] = field(default_factory=dict)  # graph-owned values read after the segment


@dataclass
class _Plan:
    spec: Specialization
    inputs: dict[str, torch.Tensor]  # static device buffers (bucket shapes)
    segments: list[_Segment] = field(default_factory=list)
    tails: "OrderedDict[tuple, _Plan]" = field(default_factory=OrderedDict)
    nbytes: int = 0
    bucket: Optional[int] = None  # rows the plan runs (a padded batch), None when exact
    out_axes: dict[str, int] = field(default_factory=dict)  # padded plans: each output's batch axis
    eager: bool = False  # no CUDA graph: every step runs eagerly
    notes: list[str] = field(default_factory=list)

    @property
    def graphs(self) -> int:
        return sum(1 for s in self.segments if s.graph is not None) + sum(t.graphs for t in self.tails.values())


class _CaptureFailed(Exception):
    def __init__(self, step: Step, error: BaseException):
        super().__init__(f"{type(error).__name__}: {error}")
        self.step, self.error = step, error


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(e) for e in x)
    return 0


def _host_array(x: Any, name: str, dtype: Any) -> np.ndarray:
    """An input as a numpy array without copying where possible."""
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, torch.Tensor):
        return tensor_to_numpy(x)  # CPU tensors: a view
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise InputError(f"input '{name}': cannot make an array of {type(x).__name__} ({e})") from None


def _torch_view(a: np.ndarray) -> torch.Tensor:
    """A torch view of a numpy array (bf16/fp8 arrays of ml_dtypes through their bits)."""
    name = a.dtype.name
    if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        bits = a.view(np.uint8 if a.dtype.itemsize == 1 else np.int16)
        from ..ir.dtypes import DType

        return torch.from_numpy(bits).view(to_torch(DType(name)))
    if not a.flags.writeable:
        a = a.copy()  # torch.from_numpy warns on read-only arrays; a staging copy happens anyway
    return torch.from_numpy(a)


class ExecutionContext:
    def __init__(self, engine: "Engine", cuda_graph: bool = True, max_graphs: int = 32,
                 max_graph_bytes: Optional[int] = None, buckets: bool = True, verify_buckets: bool = True):
        self.engine = engine
        self.interp = engine._interp
        self.device = engine._interp.device
        self.cuda = self.device.type == "cuda"
        self.cuda_graph = cuda_graph and self.cuda
        self.stream: Optional[torch.cuda.Stream] = torch.cuda.Stream(self.device) if self.cuda else None
        self.math = self.interp.math
        self.max_graphs = max_graphs
        self.max_graph_bytes = DEFAULT_GRAPH_BYTES if max_graph_bytes is None else max_graph_bytes
        self.buckets = buckets and self.cuda_graph
        self.verify_buckets = verify_buckets
        self._plans: "OrderedDict[tuple, _Plan]" = OrderedDict()
        self._lock = threading.Lock()
        self._pool: Any = None  # the arena: a private memory pool every graph of this context allocates in
        self._pool_id: Any = None
        self._analysis: dict[tuple, Analysis] = {}  # bucket analysis per signature of the non-batch dims
        self._pinned_out: dict[str, torch.Tensor] = {}
        self._routes: dict[tuple, tuple] = {}  # a signature that runs padded -> (plan key, rows, batch axes)
        self.graph_notes: list[str] = []  # why some plan is not one CUDA graph
        self.evictions = 0
        self._tensor_io = all(v.kind == "tensor" for v in (*engine.graph.inputs, *engine.graph.outputs))

    # -- the host API: numpy (or CPU tensors) in, numpy out -------------------------------------------
    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run on host inputs; returns numpy arrays. On a GPU, inputs and outputs are staged through the
        plan's pinned buffers and copied on the context's stream, which is the only one waited on."""
        if not self.cuda or not self._tensor_io:
            return self._run_eager_host(feeds)
        arrays = self._host_inputs(feeds)
        with self._lock, torch.inference_mode():
            plan, n, rows = self._plan_for({k: (a.shape, a.dtype) for k, a in arrays.items()}, arrays)
            with torch.cuda.stream(self.stream):
                self._stage_in(plan, arrays, rows)
                outs = self._execute(plan)
                host = self._stage_out(plan, outs, n)
            self.stream.synchronize()
            return {k: tensor_to_numpy(v).copy() if isinstance(v, torch.Tensor) else to_numpy_value(v)
                    for k, v in host.items()}

    # -- the device API: tensors on the engine's device in and out ----------------------------------------
    def run_device(self, feeds: Mapping[str, torch.Tensor], *, reuse_outputs: bool = False) -> dict[str, Any]:
        """Run on device tensors. With ``reuse_outputs`` the returned tensors are the context's own
        buffers, overwritten by its next run (no copy, as TensorRT bindings); otherwise clones."""
        if not self.cuda or not self._tensor_io:
            with self._lock, torch.inference_mode():
                return self.interp.run(self.engine._check_inputs(feeds))
        with self._lock, torch.inference_mode():
            caller = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(caller)  # inputs may have been written on the caller's stream
            shapes = {}
            for k, x in feeds.items():
                if not isinstance(x, torch.Tensor):
                    raise InputError(f"input '{k}': run_device takes torch tensors on {self.device}; got "
                                     f"{type(x).__name__} (use run() for numpy)")
                shapes[k] = (tuple(x.shape), x.dtype)
            plan, n, rows = self._plan_for(shapes, feeds)
            with torch.cuda.stream(self.stream):
                for name, buf in plan.inputs.items():
                    x = feeds[name]
                    if x.device != buf.device:
                        x = x.to(buf.device, non_blocking=True)
                    dst = buf if rows is None or name not in rows else buf.narrow(rows[name], 0, n)
                    if dst.data_ptr() != x.data_ptr() or dst.shape != x.shape:
                        dst.copy_(x, non_blocking=True)
                outs = self._execute(plan)
                outs = self._cut(plan, outs, n)
                if not reuse_outputs:
                    outs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in outs.items()}
            caller.wait_stream(self.stream)
            return outs

    def input_buffers(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The static device buffers a run with these input shapes reads (write inputs there and call
        ``run_device`` with them to skip the copy, as with TensorRT bindings)."""
        with self._lock, torch.inference_mode():
            plan, n, rows = self._plan_for({k: (tuple(x.shape), x.dtype) for k, x in feeds.items()}, feeds)
            if rows:
                return {k: (b.narrow(rows[k], 0, n) if k in rows else b) for k, b in plan.inputs.items()}
            return dict(plan.inputs)

    # -- reports ------------------------------------------------------------------------------------------
    @property
    def graphs(self) -> int:
        return sum(p.graphs for p in self._plans.values())

    def capture_report(self, feeds: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
        """How a run with these inputs executes: CUDA graphs, captured segments, the nodes that break the
        run into segments and why, the shape bucket, memory. Plans the inputs' signature if needed
        (without ``feeds``: the plan used last)."""
        plan = None
        if feeds is not None and self.cuda and self._tensor_io:
            with self._lock, torch.inference_mode(), torch.cuda.stream(self.stream):
                if all(isinstance(v, torch.Tensor) and v.device.type == "cuda" for v in feeds.values()):
                    plan, _, _ = self._plan_for({k: (tuple(v.shape), v.dtype) for k, v in feeds.items()}, feeds)
                else:
                    arrays = self._host_inputs(feeds)
                    plan, _, _ = self._plan_for({k: (a.shape, a.dtype) for k, a in arrays.items()}, arrays)
            self.stream.synchronize()
        elif self._plans:
            plan = next(reversed(self._plans.values()))
        if plan is None:  # CPU: the plan's steps run one by one; say what would break a graph
            spec = None
            if feeds is not None:
                with torch.inference_mode():
                    spec = self.interp.specialization(self.engine._check_inputs(feeds))
            return {"device": self.device.type, "cuda_graph": False, "graphs": 0, "segments": 0, "host_steps": 0,
                    "one_graph": False, "breaks": [b.to_json() for b in spec.breaks] if spec else [],
                    "capturable": bool(spec and spec.capturable), "bucket": None, "notes": []}
        segs = self._all_segments(plan)
        breaks = [b.to_json() for b in plan.spec.breaks]
        for t in plan.tails.values():
            breaks += [b.to_json() for b in t.spec.breaks]
        return {
            "device": self.device.type, "cuda_graph": not plan.eager, "graphs": plan.graphs,
            "segments": len([s for s in segs if not s.host]), "host_steps": len([s for s in segs if s.host]),
            "one_graph": plan.graphs == 1 and len(segs) == 1 and not plan.spec.tail,
            "capturable": plan.spec.capturable,
            "breaks": breaks, "bucket": plan.bucket, "notes": list(plan.notes),
            "plan_bytes": plan.nbytes, "arena_bytes": self.arena_bytes(),
        }

    def arena_bytes(self) -> Optional[int]:
        """Bytes the context's memory pool holds (None where torch cannot say)."""
        if self._pool is None or not hasattr(self._pool, "snapshot"):
            return None
        try:
            return sum(int(s.get("total_size", 0)) for s in self._pool.snapshot())
        except Exception:
            return None

    def memory(self) -> dict[str, Any]:
        return {"plans": len(self._plans), "graphs": self.graphs, "plan_bytes": sum(p.nbytes for p in self._plans.values()),
                "cap_bytes": self.max_graph_bytes, "evictions": self.evictions, "arena_bytes": self.arena_bytes()}

    # -- plans -------------------------------------------------------------------------------------------
    def _host_inputs(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if not isinstance(feeds, Mapping):
            raise InputError(f"run() takes a dict of input name -> array; got {type(feeds).__name__}. "
                             f"Inputs: {', '.join(s.name for s in self.engine.inputs)}")
        self.engine._check_names(feeds)
        out = {}
        for v in self.engine.graph.inputs:
            x = feeds[v.name]
            if isinstance(x, torch.Tensor) and x.device.type != "cpu":
                x = x.detach().cpu()
            out[v.name] = _host_array(x, v.name, to_numpy_dtype(v.dtype))
        return out

    def _signature(self, shapes: dict[str, tuple], data: Mapping[str, Any]) -> tuple:
        values = self.interp.value_inputs
        return tuple((k, tuple(sh), str(dt)) + ((tuple(np.asarray(_as_host(data[k])).reshape(-1).tolist()),)
                                                if k in values else ()) for k, (sh, dt) in sorted(shapes.items()))

    def _plan_for(self, shapes: dict[str, tuple], data: Mapping[str, Any]) -> tuple[_Plan, int, Optional[dict]]:
        """The plan for inputs of these (shape, dtype)s; ``data`` gives the values of value inputs and
        the first run's data. Returns (plan, actual rows, {input: batch axis}) where the plan is padded."""
        sig = self._signature(shapes, data)
        plan = self._plans.get(sig)
        if plan is not None:  # planned exactly (or this is a bucket's own size)
            self._plans.move_to_end(sig)
            return plan, -1, None
        routed = self._routes.get(sig)
        if routed is not None and routed[0] in self._plans:
            key, n, rows = routed
            self._plans.move_to_end(key)
            return self._plans[key], n, rows
        self.engine._check_specs(shapes)  # full checks once per new signature
        bucket = self._bucket(shapes, data)
        if bucket is not None:
            bplan, n, b = bucket
            padded = {k: (tuple(b if (k in bplan.inputs and i == bplan.inputs[k]) else d for i, d in enumerate(sh)), dt)
                      for k, (sh, dt) in shapes.items()}
            key = self._signature(padded, data)
            plan = self._plans.get(key)
            if plan is None:
                plan = self._build(padded, data, rows=(bplan.inputs, n), bucket=b, out_axes=bplan.outputs)
                if plan is None:  # the padded run did not match the exact one: exact plans from now on
                    self.buckets = False
                    self._routes.clear()
                    return self._plan_for(shapes, data)
                self._insert(key, plan)
            else:
                self._plans.move_to_end(key)
            rows = dict(bplan.inputs)
            self._routes[sig] = (key, n, rows)
            if len(self._routes) > 4096:
                self._routes.clear()
            return plan, n, rows
        plan = self._build(shapes, data)
        self._insert(sig, plan)
        return plan, -1, None

    def _bucket(self, shapes: dict[str, tuple], data: Mapping[str, Any]) -> Optional[tuple]:
        """(bucket plan, rows, bucket) when this signature runs padded, else None."""
        if not self.buckets:
            return None
        from .buckets import batch_symbol

        symbol = batch_symbol(self.engine.graph)
        if symbol is None:
            return None
        inputs = {v.name: v for v in self.engine.graph.inputs}
        first = self.engine.graph.inputs[0]
        n = shapes[first.name][0][0]
        other = tuple((k, tuple(d for i, d in enumerate(s) if not _is_symbol(inputs[k], i, symbol)), str(dt))
                      for k, (s, dt) in sorted(shapes.items()))
        analysis = self._analysis.get(other)
        if analysis is None:
            meta = {k: torch.empty(s, dtype=_torch_dtype(dt), device="meta") for k, (s, dt) in shapes.items()}
            for k in self.interp.value_inputs:
                meta[k] = torch.as_tensor(np.asarray(_as_host(data[k])))
            analysis = analyze_for(self.interp, meta)
            if analysis.plan is not None:
                lo, hi = self._profile_range(symbol)
                analysis.plan = BucketPlan(analysis.plan.symbol, analysis.plan.inputs, analysis.plan.outputs, lo, hi)
            else:
                self.graph_notes.append(f"no shape buckets: {analysis.reason}"
                                        + (f" (node '{analysis.node}')" if analysis.node else ""))
            self._analysis[other] = analysis
        bplan = analysis.plan
        if bplan is None:
            return None
        b = bplan.bucket(n)
        if b == n:
            return None  # exact: the signature itself is a bucket
        return bplan, n, b

    def _profile_range(self, symbol: str) -> tuple[int, int]:
        """The batch range every profile of the engine allows (buckets stay inside it)."""
        lo, hi = 1, 1 << 30
        inputs = {v.name: v for v in self.engine.graph.inputs}
        for p in self.engine.profiles:
            plo, phi = 1 << 30, 1
            for name, (mn, _, mx) in p.items():
                for i, _d in enumerate(mn):
                    if name in inputs and _is_symbol(inputs[name], i, symbol):
                        plo, phi = min(plo, mn[i]), max(phi, mx[i])
            if plo <= phi:
                lo, hi = max(lo, plo), min(hi, phi) if hi != 1 << 30 else phi
        return lo, hi

    def _insert(self, key: tuple, plan: _Plan) -> None:
        self._plans[key] = plan
        while len(self._plans) > 1 and (len(self._plans) > self.max_graphs
                                        or sum(p.nbytes for p in self._plans.values()) > self.max_graph_bytes):
            old_key, old = self._plans.popitem(last=False)
            self.evictions += 1
            log.info("context: dropped the plan of %s (%d bytes) to stay under the cap", old_key, old.nbytes)

    def _build(self, shapes: dict[str, tuple], data: Mapping[str, Any], rows: Optional[tuple] = None,
               bucket: Optional[int] = None, out_axes: Optional[dict] = None) -> Optional[_Plan]:
        """Make and capture the plan for these (padded) shapes, running it once on ``data``."""
        inputs = {}
        for v in self.engine.graph.inputs:
            shape, dt = shapes[v.name]
            inputs[v.name] = torch.zeros(tuple(shape), dtype=_torch_dtype(dt), device=self.device)
        with torch.cuda.stream(self.stream):
            self._copy_first(inputs, data, rows)
            spec = self.interp.specialization(dict(inputs))
            plan = _Plan(spec, inputs, bucket=bucket, out_axes=dict(out_axes or {}))
            with mathmode.applied(self.math, self.device):
                for _ in range(2):  # warm up: handles, Triton compiles, lazy tables (OpContext.cached)
                    self.interp.run_spec(spec, self._env(plan))
            self.stream.synchronize()
            plan = self._capture(plan)
        if bucket is not None and self.verify_buckets and not self._bucket_matches(plan, data, rows):
            return None
        return plan

    def _copy_first(self, inputs: dict[str, torch.Tensor], data: Mapping[str, Any], rows: Optional[tuple]) -> None:
        for name, buf in inputs.items():
            x = data[name]
            src = x if isinstance(x, torch.Tensor) else _torch_view(np.ascontiguousarray(x))
            if rows is not None and name in rows[0]:
                buf = buf.narrow(rows[0][name], 0, rows[1])
            buf.copy_(src.to(buf.device, non_blocking=False).reshape(buf.shape))

    def _env(self, plan: _Plan) -> Any:
        return ChainMap(dict(plan.inputs), plan.spec.host, self.interp.consts)

    # -- capture -------------------------------------------------------------------------------------------
    def _segments(self, steps: list[Step]) -> list[_Segment]:
        segs: list[_Segment] = []
        for s in steps:
            if s.host:
                segs.append(_Segment([s], True))
            elif segs and not segs[-1].host:
                segs[-1].steps.append(s)
            else:
                segs.append(_Segment([s], False))
        return segs

    def _pool_handle(self) -> Any:
        if self._pool_id is None:
            try:  # a MemPool can be measured (snapshot); older torch: an anonymous graph pool
                self._pool = torch.cuda.MemPool()
                self._pool_id = self._pool.id
            except Exception:
                self._pool, self._pool_id = None, torch.cuda.graph_pool_handle()
            self._reserve_arena()
        return self._pool_id

    def _reserve_arena(self) -> None:
        """Hold the engine's planned activation memory in the pool up front: one segment that the
        graphs' allocations are carved from."""
        mem = (self.engine.manifest.get("memory") or {}).get("activations_peak_mib")
        if self._pool is None or not isinstance(mem, (int, float)) or mem <= 0:
            return
        try:
            with torch.cuda.use_mem_pool(self._pool, self.device):
                block = torch.empty(int(mem * 1.125 * (1 << 20)) + (2 << 20), dtype=torch.uint8, device=self.device)
            del block
        except Exception as e:  # an optimization only
            log.debug("arena reservation skipped: %s", e)

    def _capture(self, plan: _Plan, attempts: int = 0) -> _Plan:
        """Capture each segment of ``plan`` as a CUDA graph (eager plans when graphs are off). A step that
        cannot be captured becomes a host step (named in the notes) and capture starts over."""
        plan.segments = self._segments(plan.spec.steps)
        plan.eager = not self.cuda_graph
        env = self._env(plan)
        stable = {id(t) for t in plan.inputs.values()}
        try:
            self._run_segments(plan, env, stable, capture=self.cuda_graph)
        except _CaptureFailed as e:
            self.stream.synchronize()
            why = f"capture failed: {e}"
            e.step.host, e.step.reason = True, why
            from .specialize import Break

            plan.spec.breaks.append(Break(e.step.node.name, e.step.node.op, why, "host"))
            plan.spec.capturable = False
            note = f"node '{e.step.node.name}' ({e.step.node.op}) runs eagerly: {why}"
            plan.notes.append(note)
            self.graph_notes.append(note)
            if attempts < 64:
                return self._capture(_Plan(plan.spec, plan.inputs, bucket=plan.bucket, notes=plan.notes,
                                           out_axes=plan.out_axes), attempts + 1)
            plan.segments, plan.eager = [_Segment(plan.spec.steps, True)], True
            self._run_segments(plan, env, stable, capture=False)
        if plan.spec.tail is not None:
            plan.notes.append("the plan ends in a tail: shapes after a data-dependent step are planned per run shape")
        plan.nbytes = (sum(_nbytes(t) for t in plan.inputs.values())
                       + sum(_nbytes(t) for s in plan.segments for t in (*s.copy_in.values(), *s.outputs.values())))
        if not plan.spec.capturable and not plan.notes:
            plan.notes.extend(plan.spec.reasons[:4])
        return plan

    def _run_segments(self, plan: _Plan, env: Any, stable: set[int], capture: bool) -> None:
        """The first run of a plan: capture its segments (or run them), in order, for real."""
        for seg in plan.segments:
            if seg.host or not capture:
                with mathmode.applied(self.math, self.device):
                    self.interp.execute(seg.steps, env)
                continue
            reads = _segment_reads(seg.steps)
            for k in reads:
                x = env.get(k)
                if isinstance(x, torch.Tensor) and id(x) not in stable and k in env.maps[0]:
                    buf = x.clone()  # made by a host step: the graph reads a static copy
                    seg.copy_in[k] = buf
                    env.maps[0][k] = buf
            g = torch.cuda.CUDAGraph()
            at = [0]
            self.stream.synchronize()
            with mathmode.applied(self.math, self.device):
                try:
                    g.capture_begin(pool=self._pool_handle(), capture_error_mode="thread_local")
                    try:
                        self.interp.execute(seg.steps, env, at)
                    finally:
                        g.capture_end()
                except Exception as e:  # an op synced, copied from the host or allocated pinned memory
                    raise _CaptureFailed(seg.steps[at[0]], e) from e
            seg.graph = g
            g.replay()  # the captured kernels have not run yet: what follows needs their results
            produced = {o for s in seg.steps for o in s.outputs}
            seg.outputs = {k: v for k, v in env.maps[0].items() if k in produced}
            stable.update(id(t) for t in seg.outputs.values() if isinstance(t, torch.Tensor))
        if plan.spec.tail is not None:
            self._tail_plan(plan, plan.spec.tail, env, stable, capture)

    def _tail_plan(self, plan: _Plan, tail: Any, env: Any, stable: set[int], capture: bool) -> _Plan:
        sig = tail.signature(env)
        sub = plan.tails.get(sig)
        if sub is not None:
            plan.tails.move_to_end(sig)
            return sub
        spec = self.interp.tail_specialization(tail, env)
        sub = _Plan(spec, {}, eager=plan.eager, out_axes=plan.out_axes)
        sub.segments = self._segments(spec.steps)
        env.maps.insert(1, spec.host)  # the tail's host values, for this run and its own tails
        with mathmode.applied(self.math, self.device):  # warm up on the real data first
            scratch = ChainMap(dict(env.maps[0]), *env.maps[1:])
            self.interp.execute(spec.steps, scratch)
        snapshot = dict(env.maps[0])
        try:
            self._run_segments(sub, env, stable, capture)
        except _CaptureFailed as e:
            self.stream.synchronize()
            e.step.host, e.step.reason = True, f"capture failed: {e}"
            sub.notes.append(f"node '{e.step.node.name}' ({e.step.node.op}) runs eagerly: {e}")
            env.maps[0].clear()
            env.maps[0].update(snapshot)
            sub.segments, sub.eager = [_Segment(spec.steps, True)], True
            self._run_segments(sub, env, stable, capture=False)
        sub.nbytes = sum(_nbytes(t) for s in sub.segments for t in (*s.copy_in.values(), *s.outputs.values()))
        plan.tails[sig] = sub
        plan.nbytes += sub.nbytes
        if len(plan.tails) > 16:
            _, old = plan.tails.popitem(last=False)
            plan.nbytes -= old.nbytes
        return sub

    # -- running ---------------------------------------------------------------------------------------------
    def _execute(self, plan: _Plan) -> dict[str, Any]:
        """One run of a planned signature on the context's stream (inputs already in place)."""
        env = self._env(plan)
        self._replay(plan, env)
        return {v.name: env[v.name] for v in self.engine.graph.outputs}

    def _replay(self, plan: _Plan, env: Any) -> None:
        for seg in plan.segments:
            if seg.graph is None:
                with mathmode.applied(self.math, self.device):
                    self.interp.execute(seg.steps, env)
                continue
            for k, buf in seg.copy_in.items():
                buf.copy_(env[k], non_blocking=True)
            seg.graph.replay()
            env.maps[0].update(seg.outputs)
        tail = plan.spec.tail
        if tail is not None:
            sig = tail.signature(env)
            sub = plan.tails.get(sig)
            if sub is None:
                stable = {id(t) for s in plan.segments for t in s.outputs.values() if isinstance(t, torch.Tensor)}
                stable |= {id(t) for t in plan.inputs.values()}
                self._tail_plan(plan, tail, env, stable, capture=not plan.eager)
                return  # its first run computed the outputs into env
            plan.tails.move_to_end(sig)
            env.maps.insert(1, sub.spec.host)
            self._replay(sub, env)

    def _stage_in(self, plan: _Plan, arrays: dict[str, np.ndarray], rows: Optional[dict]) -> None:
        """numpy -> the plan's pinned staging -> its device buffers, on the context's stream."""
        staging = getattr(plan, "_pinned_in", None)
        if staging is None:
            staging = plan._pinned_in = {k: torch.empty(b.shape, dtype=b.dtype, pin_memory=True)  # type: ignore[attr-defined]
                                         for k, b in plan.inputs.items()}
        for name, buf in plan.inputs.items():
            a = arrays[name]
            pin, dev = staging[name], buf
            if rows is not None and name in rows:
                pin, dev = pin.narrow(rows[name], 0, a.shape[rows[name]]), dev.narrow(rows[name], 0, a.shape[rows[name]])
            src = _torch_view(a) if a.ndim else _torch_view(a.reshape(1)).reshape(())
            # the pinned buffer may still feed the previous run's copy: this stream waited for it (sync below)
            pin.copy_(src)
            dev.copy_(pin, non_blocking=True)

    def _cut(self, plan: _Plan, outs: dict[str, Any], n: int) -> dict[str, Any]:
        """Padded outputs cut back to the run's rows."""
        if plan.bucket is None or n < 0:
            return outs
        axes = plan.out_axes
        b = plan.bucket
        cut = {}
        for k, v in outs.items():
            ax = axes.get(k)
            if ax is None or not isinstance(v, torch.Tensor):
                cut[k] = v
            else:
                cut[k] = v.narrow(ax, 0, v.shape[ax] // b * n)
        return cut

    def _stage_out(self, plan: _Plan, outs: dict[str, Any], n: int) -> dict[str, Any]:
        """Device outputs -> reused pinned buffers, on the context's stream (the caller syncs it)."""
        outs = self._cut(plan, outs, n)
        host: dict[str, Any] = {}
        for k, v in outs.items():
            if not isinstance(v, torch.Tensor):
                host[k] = v
                continue
            need = v.numel() * v.element_size()
            pin = self._pinned_out.get(k)
            if pin is None or pin.numel() < need:
                pin = self._pinned_out[k] = torch.empty(max(need, 1), dtype=torch.uint8, pin_memory=True)
            view = pin[:need].view(v.dtype).reshape(v.shape) if need else torch.empty(v.shape, dtype=v.dtype)
            view.copy_(v, non_blocking=True)
            host[k] = view
        return host

    def _bucket_matches(self, plan: _Plan, data: Mapping[str, Any], rows: Optional[tuple]) -> bool:
        """First use of a padded plan: its rows must equal an exact run's (else buckets are off)."""
        got = self._cut(plan, self._execute(plan), rows[1] if rows else -1)
        with mathmode.applied(self.math, self.device), torch.cuda.stream(self.stream):
            exact = {}
            for v in self.engine.graph.inputs:
                x = data[v.name]
                exact[v.name] = (x if isinstance(x, torch.Tensor) else _torch_view(np.ascontiguousarray(x))).to(self.device)
            want = self.interp.run(exact)
        self.stream.synchronize()
        tol = 1e-2 if str(self.engine.manifest.get("precision")) in ("fp16", "bf16", "tf32") else 1e-4
        for k, w in want.items():
            g = got.get(k)
            if not isinstance(w, torch.Tensor):
                continue
            if not isinstance(g, torch.Tensor) or tuple(g.shape) != tuple(w.shape):
                self.graph_notes.append(f"shape buckets off: output '{k}' of a padded run has shape "
                                        f"{list(getattr(g, 'shape', []))}, expected {list(w.shape)}")
                return False
            if w.is_floating_point():
                err = float((g.double() - w.double()).norm() / w.double().norm().clamp_min(1e-30))
                bad = not err <= tol
            else:
                err = float((g != w).double().mean()) if w.numel() else 0.0
                bad = err > 0.01
            if bad:
                self.graph_notes.append(f"shape buckets off: output '{k}' of a padded run differs from the exact "
                                        f"run ({err:.2e}); this model mixes rows")
                return False
        return True

    def _all_segments(self, plan: _Plan) -> list[_Segment]:
        segs = list(plan.segments)
        for t in plan.tails.values():
            segs += self._all_segments(t)
        return segs

    # -- CPU and non-tensor engines -------------------------------------------------------------------------
    def _run_eager_host(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock, torch.inference_mode():
            if self.cuda:
                with torch.cuda.stream(self.stream):
                    outs = self.interp.run(self.engine._check_inputs(feeds))
                    res = {k: to_numpy_value(v) for k, v in outs.items()}
                self.stream.synchronize()
                return res
            outs = self.interp.run(self.engine._check_inputs(feeds))
            return {k: to_numpy_value(v) for k, v in outs.items()}


def _segment_reads(steps: list[Step]) -> list[str]:
    produced: set[str] = set()
    reads: dict[str, None] = {}
    for s in steps:
        for k in s.inputs:
            if k is not None and k not in produced:
                reads.setdefault(k, None)
        produced.update(s.outputs)
    return list(reads)


def _as_host(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy() if x.device.type != "meta" else np.zeros(tuple(x.shape))
    return x


def _torch_dtype(dt: Any) -> torch.dtype:
    if isinstance(dt, torch.dtype):
        return dt
    from ..ir.dtypes import from_numpy

    return to_torch(from_numpy(np.dtype(dt)))


def _is_symbol(v: Any, axis: int, symbol: str) -> bool:
    from ..ir.shapes import as_symbol

    return v.shape is not None and axis < len(v.shape) and as_symbol(v.shape[axis]) == symbol


def to_numpy_dtype(dt: Any) -> Any:
    from ..ir.dtypes import to_numpy

    try:
        return to_numpy(dt) if dt is not None else None
    except Exception:
        return None


__all__ = ["ExecutionContext", "from_torch"]
