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
context runs the steps directly (``emulate_graphs`` runs the GPU path's logic on the CPU, for tests).
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections import ChainMap, OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional

import numpy as np
import torch

from ..errors import InputError
from ..ops.torch_types import tensor_to_numpy, to_numpy_value, to_torch
from . import mathmode
from .buckets import Analysis, BucketPlan, analyze_for, batch_symbol, bucket_size
from .specialize import Break, Specialization, Step

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger(__name__)
DEFAULT_GRAPH_BYTES = 4 << 30  # device memory a context's plans may hold (static buffers, graph outputs)


@dataclass
class _Segment:
    steps: list[Step]
    host: bool  # one host step, run eagerly
    graph: Any = None  # torch.cuda.CUDAGraph (or an emulation of one)
    copy_in: dict[str, torch.Tensor] = field(default_factory=dict)  # static copies of values made outside graphs
    outputs: dict[str, Any] = field(default_factory=dict)  # graph-owned values read after the segment


@dataclass
class _Plan:
    spec: Specialization
    inputs: dict[str, torch.Tensor]  # static device buffers (bucket shapes)
    segments: list[_Segment] = field(default_factory=list)
    tails: "OrderedDict[tuple, _Plan]" = field(default_factory=OrderedDict)
    nbytes: int = 0
    bucket: Optional[int] = None  # rows the plan runs (a padded batch), None when exact
    eager: bool = False  # no CUDA graph: every step runs eagerly
    notes: list[str] = field(default_factory=list)
    pinned_in: dict[str, torch.Tensor] = field(default_factory=dict)
    slots: list = field(default_factory=list)  # staging slots of the server path (StagedRun)

    @property
    def graphs(self) -> int:
        return sum(1 for s in self.segments if s.graph is not None) + sum(t.graphs for t in self.tails.values())

    def all_segments(self) -> list[_Segment]:
        segs = list(self.segments)
        for t in self.tails.values():
            segs += t.all_segments()
        return segs


@dataclass(frozen=True)
class _Rows:
    """A run padded into a bucket's plan: its rows, and where the batch sits in inputs and outputs."""

    n: int
    bucket: int
    inputs: dict
    outputs: dict


MAX_SLOTS = 4  # staging slots per plan: runs in flight or outputs still held by a caller


class _Slot:
    """Pinned host buffers for one run in flight: inputs (the plan's shapes) and outputs."""

    def __init__(self, ctx: "ExecutionContext", plan: _Plan):
        self.inputs = {k: ctx._pinned(tuple(b.shape), b.dtype) for k, b in plan.inputs.items()}
        self.outputs: dict[str, torch.Tensor] = {}
        self.done: Any = None  # event recorded after the slot's outputs are copied out
        self.state = "idle"  # "staged" (handed to a caller), "submitted" (its run queued or done)
        self.released = True  # the caller is done with the outputs


class _WarmData(Mapping):
    """Inputs for planning a signature before any data exists: made only if a plan must be built."""

    def __init__(self, shapes: Mapping[str, tuple], values: Optional[Mapping[str, Any]]):
        self.shapes, self.values, self.made = shapes, values or {}, {}

    def __getitem__(self, name: str) -> Any:
        if name in self.values:
            return np.asarray(self.values[name])
        if name not in self.made:
            shape, dt = self.shapes[name]
            self.made[name] = _warm_data(tuple(shape), _np_of(_torch_dtype(dt)))
        return self.made[name]

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


class StagedRun:
    """One run prepared for the server path: fill ``inputs`` (numpy views of pinned buffers, already
    cut to the run's rows), ``submit()`` (copies in, replays, copies out, all queued on the context's
    stream) and ``wait()`` for the outputs: numpy views of pinned buffers, valid until this slot is
    staged again (two runs later). Two slots per plan let the next batch be gathered on the CPU while
    this one runs on the GPU."""

    def __init__(self, ctx: "ExecutionContext", plan: _Plan, rows: Optional["_Rows"], slot: _Slot,
                 shapes: dict[str, tuple]):
        self.ctx, self.plan, self.rows, self.slot = ctx, plan, rows, slot
        self.inputs: dict[str, np.ndarray] = {}
        for name, pin in slot.inputs.items():
            view = pin
            if rows is not None and name in rows.inputs:
                view = pin.narrow(rows.inputs[name], 0, rows.n)
            self.inputs[name] = _numpy_view(view)
        self._outs: Optional[dict[str, Any]] = None

    def submit(self) -> None:
        self.ctx._submit(self)

    def wait(self) -> dict[str, np.ndarray]:
        return self.ctx._wait(self)

    def release(self) -> None:
        """The caller is done with the outputs: the slot may be staged again at once. (Without it, a
        slot is reused, oldest first, once MAX_SLOTS runs of its plan are staged.)"""
        self.slot.released = True


class _CaptureFailed(Exception):
    def __init__(self, step: Step, error: BaseException):
        super().__init__(f"{type(error).__name__}: {error}")
        self.step, self.error = step, error


class _EmulatedGraph:
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


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(e) for e in x)
    return 0


def _torch_view(a: np.ndarray) -> torch.Tensor:
    """A torch view of a numpy array (bf16/fp8 arrays of ml_dtypes through their bits)."""
    if a.ndim == 0:
        return _torch_view(a.reshape(1)).reshape(())
    name = a.dtype.name
    if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        from ..ir.dtypes import DType

        bits = np.ascontiguousarray(a).view(np.uint8 if a.dtype.itemsize == 1 else np.int16)
        return torch.from_numpy(bits).view(to_torch(DType(name)))
    if not a.flags.writeable or any(s < 0 for s in a.strides):
        a = np.ascontiguousarray(a).copy()  # torch views only writable arrays with positive strides
    return torch.from_numpy(a)


class ExecutionContext:
    emulate_graphs = False  # class-wide test switch: run the GPU path's plans on the CPU

    def __init__(self, engine: "Engine", cuda_graph: bool = True, max_graphs: int = 32,
                 max_graph_bytes: Optional[int] = None, buckets: bool = True, verify_buckets: bool = True):
        self.engine = engine
        self.interp = engine._interp
        self.device = engine._interp.device
        self.cuda = self.device.type == "cuda"
        self.emulated = not self.cuda and self.emulate_graphs
        self.planned = self.cuda or self.emulated  # runs through plans (static buffers, graphs)
        self.cuda_graph = cuda_graph and self.planned
        self.stream: Optional[torch.cuda.Stream] = torch.cuda.Stream(self.device) if self.cuda else None
        self.math = self.interp.math
        self.max_graphs = max_graphs
        self.max_graph_bytes = DEFAULT_GRAPH_BYTES if max_graph_bytes is None else max_graph_bytes
        self.buckets = buckets and self.cuda_graph
        self.verify_buckets = verify_buckets
        self._plans: "OrderedDict[tuple, _Plan]" = OrderedDict()
        self._routes: dict[tuple, tuple] = {}  # a signature that runs padded -> (plan key, rows, batch axes)
        self._verified: set[tuple] = set()  # bucket analyses whose padding was checked against an exact run
        self._lock = threading.Lock()
        self._pool: Any = None  # the arena: a private memory pool every graph of this context allocates in
        self._pool_id: Any = None
        self._analysis: dict[tuple, Analysis] = {}  # bucket analysis per signature of the non-batch dims
        self._pinned_out: dict[str, torch.Tensor] = {}
        self.graph_notes: list[str] = []  # why some plan is not one CUDA graph
        self.evictions = 0
        self._tensor_io = all(v.kind == "tensor" for v in (*engine.graph.inputs, *engine.graph.outputs))

    # -- device plumbing ----------------------------------------------------------------------------------
    def _on_stream(self) -> Any:
        return torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()

    def _sync(self) -> None:
        if self.cuda:
            self.stream.synchronize()

    def _pinned(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=self.cuda)

    # -- the host API: numpy (or CPU tensors) in, numpy out -------------------------------------------
    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run on host inputs; returns numpy arrays. On a GPU, inputs and outputs are staged through the
        plan's pinned buffers and copied on the context's stream, which is the only one waited on."""
        if not self.planned or not self._tensor_io:
            return self._run_eager_host(feeds)
        arrays = self._host_inputs(feeds)
        with self._lock, torch.inference_mode():
            with self._on_stream():
                plan, rows = self._plan_for({k: (a.shape, a.dtype) for k, a in arrays.items()}, arrays)
                self._stage_in(plan, arrays, rows)
                host = self._stage_out(_cut(self._execute(plan), rows))
            self._sync()
            return {k: tensor_to_numpy(v).copy() if isinstance(v, torch.Tensor) else to_numpy_value(v)
                    for k, v in host.items()}

    # -- the device API: tensors on the engine's device in and out ----------------------------------------
    def run_device(self, feeds: Mapping[str, torch.Tensor], *, reuse_outputs: bool = False) -> dict[str, Any]:
        """Run on device tensors. With ``reuse_outputs`` the returned tensors are the context's own
        buffers, overwritten by its next run (no copy, as TensorRT bindings); otherwise clones."""
        if not self.planned or not self._tensor_io:
            with self._lock, torch.inference_mode():
                return self.interp.run(self.engine._check_inputs(feeds))
        with self._lock, torch.inference_mode():
            caller = torch.cuda.current_stream(self.device) if self.cuda else None
            if caller is not None:
                self.stream.wait_stream(caller)  # inputs may have been written on the caller's stream
            shapes = {}
            for k, x in feeds.items():
                if not isinstance(x, torch.Tensor):
                    raise InputError(f"input '{k}': run_device takes torch tensors on {self.device}; got "
                                     f"{type(x).__name__} (use run() for numpy)")
                shapes[k] = (tuple(x.shape), x.dtype)
            self.engine._check_names(feeds)
            with self._on_stream():
                plan, rows = self._plan_for(shapes, feeds)
                for name, buf in plan.inputs.items():
                    x = feeds[name]
                    if x.device != buf.device:
                        x = x.to(buf.device, non_blocking=True)
                    dst = buf if rows is None or name not in rows.inputs else buf.narrow(rows.inputs[name], 0, rows.n)
                    if dst.data_ptr() != x.data_ptr() or dst.shape != x.shape:
                        dst.copy_(x, non_blocking=True)
                outs = _cut(self._execute(plan), rows)
                if not reuse_outputs:
                    outs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in outs.items()}
            if caller is not None:
                caller.wait_stream(self.stream)
            return outs

    def input_buffers(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The static device buffers a run with these input shapes reads: write inputs there and pass
        them to ``run_device`` to skip the copy, as with TensorRT's bindings."""
        with self._lock, torch.inference_mode(), self._on_stream():
            plan, rows = self._plan_for({k: (tuple(x.shape), x.dtype) for k, x in feeds.items()}, feeds)
            self._sync()
            return {k: (b.narrow(rows.inputs[k], 0, rows.n) if rows is not None and k in rows.inputs else b)
                    for k, b in plan.inputs.items()}

    @property
    def can_stage(self) -> bool:
        """Whether ``stage`` works here: a planned (GPU) context of an engine with tensor inputs and
        outputs only."""
        return self.planned and self._tensor_io

    def bucket_sizes(self, max_batch: int) -> list[int]:
        """The plans batches of 1..``max_batch`` rows run in (the shape buckets; the last may exceed
        ``max_batch``), or [] when this engine runs exact shapes only."""
        if not self.buckets or batch_symbol(self.engine.graph) is None:
            return []
        lo, hi = self._profile_range(batch_symbol(self.engine.graph))
        return sorted({min(max(bucket_size(n), lo), hi) for n in range(1, max_batch + 1) if n <= hi})

    def capture(self, signatures: "list[Mapping[str, tuple]]", values: Optional[Mapping[str, Any]] = None) -> int:
        """Plan (and capture) these input signatures ahead of traffic: each a {name: (shape, dtype)}.
        Returns how many plans the context holds."""
        with self._lock, torch.inference_mode():
            for shapes in signatures:
                with self._on_stream():
                    self._plan_for({k: (tuple(s), d) for k, (s, d) in shapes.items()}, _WarmData(shapes, values))
                self._sync()
            return len(self._plans)

    def stage(self, shapes: Mapping[str, tuple], values: Optional[Mapping[str, Any]] = None) -> StagedRun:
        """A run with inputs of these (shape, dtype)s, for callers that write the inputs themselves
        (the server's batcher gathers requests straight into pinned memory). ``values``: the values of
        value inputs (Interpreter.value_inputs), which key the plan. Plans the signature on first use
        (with stand-in data: real data arrives with ``submit``)."""
        with self._lock, torch.inference_mode():
            if not self.can_stage:
                raise InputError("stage() needs a GPU engine with tensor inputs and outputs; use run()")
            with self._on_stream():
                plan, rows = self._plan_for({k: (tuple(s), d) for k, (s, d) in shapes.items()},
                                            _WarmData(shapes, values))
            free = [sl for sl in plan.slots if sl.state == "idle" or (sl.state == "submitted" and sl.released)]
            if free:
                slot = free[0]
            elif len(plan.slots) < MAX_SLOTS:
                slot = _Slot(self, plan)
                plan.slots.append(slot)
            else:  # the oldest submitted one: its caller had MAX_SLOTS - 1 runs to read it
                slot = next((sl for sl in plan.slots if sl.state == "submitted"), None)
                if slot is None:
                    raise InputError(f"{MAX_SLOTS} runs of one shape are staged and none submitted: submit them")
            plan.slots.remove(slot)
            plan.slots.append(slot)
            if slot.done is not None:
                slot.done.synchronize()  # its last run's copies out of this memory are done
            slot.state, slot.released = "staged", False
            return StagedRun(self, plan, rows, slot, dict(shapes))

    def _submit(self, run: StagedRun) -> None:
        with self._lock, torch.inference_mode():
            plan, rows, slot = run.plan, run.rows, run.slot
            with self._on_stream():
                for name, buf in plan.inputs.items():
                    pin, dev = slot.inputs[name], buf
                    if rows is not None and name in rows.inputs:
                        ax = rows.inputs[name]
                        pin, dev = pin.narrow(ax, 0, rows.n), dev.narrow(ax, 0, rows.n)
                    dev.copy_(pin, non_blocking=True)
                host = self._copy_out(_cut(self._execute(plan), rows), slot.outputs)
                if self.cuda:
                    slot.done = torch.cuda.Event()
                    slot.done.record(self.stream)
            slot.state = "submitted"
            run._outs = host

    def _wait(self, run: StagedRun) -> dict[str, np.ndarray]:
        if run._outs is None:
            raise InputError("wait() before submit()")
        if run.slot.done is not None:
            run.slot.done.synchronize()
        return {k: tensor_to_numpy(v) if isinstance(v, torch.Tensor) else to_numpy_value(v)
                for k, v in run._outs.items()}

    # -- reports ------------------------------------------------------------------------------------------
    @property
    def graphs(self) -> int:
        return sum(p.graphs for p in self._plans.values())

    def capture_report(self, feeds: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
        """How a run with these inputs executes: CUDA graphs, captured segments, the nodes that break
        the run into segments and why, the shape bucket, memory. Plans the inputs' signature if
        needed (without ``feeds``: the plan used last)."""
        plan = None
        if feeds is not None and self.planned and self._tensor_io:
            with self._lock, torch.inference_mode():
                with self._on_stream():
                    if all(isinstance(v, torch.Tensor) and v.device == self.device for v in feeds.values()):
                        plan, _ = self._plan_for({k: (tuple(v.shape), v.dtype) for k, v in feeds.items()}, feeds)
                    else:
                        arrays = self._host_inputs(feeds)
                        plan, _ = self._plan_for({k: (a.shape, a.dtype) for k, a in arrays.items()}, arrays)
                self._sync()
        elif self._plans:
            plan = next(reversed(self._plans.values()))
        if plan is None:  # eager (CPU): what would keep a GPU run from being one graph
            spec = None
            if feeds is not None:
                with torch.inference_mode():
                    spec = self.interp.specialization(self.engine._check_inputs(feeds))
            return {"device": self.device.type, "cuda_graph": False, "graphs": 0, "segments": 0, "host_steps": 0,
                    "one_graph": False, "capturable": bool(spec and spec.capturable),
                    "breaks": [b.to_json() for b in spec.breaks] if spec else [], "bucket": None, "notes": []}
        segs = plan.all_segments()
        breaks = [b.to_json() for b in plan.spec.breaks]
        for t in plan.tails.values():
            breaks += [b.to_json() for b in t.spec.breaks]
        return {
            "device": self.device.type, "cuda_graph": not plan.eager, "graphs": plan.graphs,
            "segments": len([s for s in segs if not s.host]), "host_steps": len([s for s in segs if s.host]),
            "one_graph": plan.graphs == 1 and len(segs) == 1 and plan.spec.tail is None,
            "capturable": plan.spec.capturable, "breaks": breaks, "bucket": plan.bucket, "notes": list(plan.notes),
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
        return {"plans": len(self._plans), "graphs": self.graphs,
                "plan_bytes": sum(p.nbytes for p in self._plans.values()), "cap_bytes": self.max_graph_bytes,
                "evictions": self.evictions, "arena_bytes": self.arena_bytes()}

    # -- plans -------------------------------------------------------------------------------------------
    def _host_inputs(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if not isinstance(feeds, Mapping):
            raise InputError(f"run() takes a dict of input name -> array; got {type(feeds).__name__}. "
                             f"Inputs: {', '.join(s.name for s in self.engine.inputs)}")
        self.engine._check_names(feeds)
        out = {}
        for v in self.engine.graph.inputs:
            x = feeds[v.name]
            if isinstance(x, torch.Tensor):
                out[v.name] = tensor_to_numpy(x)
            elif isinstance(x, np.ndarray):
                out[v.name] = x
            else:
                try:
                    out[v.name] = np.asarray(x, dtype=_np_dtype_of(v.dtype))
                except (TypeError, ValueError) as e:
                    raise InputError(f"input '{v.name}': cannot make an array of {type(x).__name__} ({e})") from None
        return out

    def _signature(self, shapes: dict[str, tuple], data: Mapping[str, Any]) -> tuple:
        values = self.interp.value_inputs
        return tuple((k, tuple(int(d) for d in sh), _dtype_name(dt))
                     + ((tuple(_host_values(data[k])),) if k in values else ())
                     for k, (sh, dt) in sorted(shapes.items()))

    def _plan_for(self, shapes: dict[str, tuple], data: Mapping[str, Any]) -> tuple[_Plan, Optional[_Rows]]:
        """The plan for inputs of these (shape, dtype)s; ``data`` gives the values of value inputs and
        the first run's data. Returns (plan, rows) where rows says how the run is padded, if it is."""
        sig = self._signature(shapes, data)
        plan = self._plans.get(sig)
        if plan is not None:  # planned exactly (or this is a bucket's own size)
            self._plans.move_to_end(sig)
            return plan, None
        routed = self._routes.get(sig)
        if routed is not None and routed[0] in self._plans:
            self._plans.move_to_end(routed[0])
            return self._plans[routed[0]], routed[1]
        self.engine._check_specs(shapes)  # full checks once per new signature
        bucket = self._bucket(shapes, data)
        if bucket is not None:
            bplan, n, b, group = bucket
            rows = _Rows(n, b, dict(bplan.inputs), dict(bplan.outputs))
            padded = {k: (tuple(b if (k in bplan.inputs and i == bplan.inputs[k]) else d for i, d in enumerate(sh)), dt)
                      for k, (sh, dt) in shapes.items()}
            key = self._signature(padded, data)
            plan = self._plans.get(key)
            if plan is None:
                plan = self._build(padded, data, rows)
                self._insert(key, plan)
            else:
                self._plans.move_to_end(key)
            if self.verify_buckets and group not in self._verified:
                if not self._bucket_matches(plan, data, rows):  # padding changed the rows: exact plans only
                    self.buckets = False
                    self._routes.clear()
                    return self._plan_for(shapes, data)
                self._verified.add(group)
            if len(self._routes) > 4096:
                self._routes.clear()
            self._routes[sig] = (key, rows)
            return plan, rows
        plan = self._build(shapes, data)
        self._insert(sig, plan)
        return plan, None

    def _bucket(self, shapes: dict[str, tuple], data: Mapping[str, Any]) -> Optional[tuple]:
        """(bucket plan, rows, bucket) when this signature runs padded, else None."""
        if not self.buckets:
            return None
        symbol = batch_symbol(self.engine.graph)
        if symbol is None:
            return None
        inputs = {v.name: v for v in self.engine.graph.inputs}
        n = int(shapes[self.engine.graph.inputs[0].name][0][0])
        other = tuple((k, tuple(int(d) for i, d in enumerate(sh) if not _is_symbol(inputs[k], i, symbol)), str(dt))
                      + ((tuple(_host_values(data[k])),) if k in self.interp.value_inputs else ())
                      for k, (sh, dt) in sorted(shapes.items()))
        analysis = self._analysis.get(other)
        if analysis is None:
            meta = {k: torch.empty(tuple(sh), dtype=_torch_dtype(dt), device="meta") for k, (sh, dt) in shapes.items()}
            for k in self.interp.value_inputs:
                meta[k] = torch.as_tensor(np.asarray(_host_values(data[k]))).reshape(tuple(shapes[k][0]))
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
        return None if b == n else (bplan, n, b, other)

    def _profile_range(self, symbol: str) -> tuple[int, int]:
        """The batch range that every profile of the engine allows (buckets stay inside it)."""
        lo, hi = 1, 1 << 30
        inputs = {v.name: v for v in self.engine.graph.inputs}
        for p in self.engine.profiles:
            for name, (mn, _, mx) in p.items():
                for i in range(len(mn)):
                    if name in inputs and _is_symbol(inputs[name], i, symbol):
                        lo, hi = max(lo, mn[i]), min(hi, mx[i])
        return lo, hi

    def _insert(self, key: tuple, plan: _Plan) -> None:
        self._plans[key] = plan
        while len(self._plans) > 1 and (len(self._plans) > self.max_graphs
                                        or sum(p.nbytes for p in self._plans.values()) > self.max_graph_bytes):
            old_key, old = self._plans.popitem(last=False)
            self.evictions += 1
            self._routes = {s: r for s, r in self._routes.items() if r[0] != old_key}
            log.info("execution context: dropped a plan (%d bytes) to stay under its cap", old.nbytes)

    def _build(self, shapes: dict[str, tuple], data: Mapping[str, Any], rows: Optional[_Rows] = None) -> _Plan:
        """Make and capture the plan for these (padded) shapes, running it on ``data``."""
        with torch.inference_mode(False):  # normal tensors: callers may write them (input_buffers)
            inputs = {v.name: torch.zeros(tuple(shapes[v.name][0]), dtype=_torch_dtype(shapes[v.name][1]),
                                          device=self.device) for v in self.engine.graph.inputs}
        self._fill(inputs, data, rows)
        spec = self.interp.specialization(dict(inputs))
        plan = _Plan(spec, inputs, bucket=rows.bucket if rows is not None else None)
        if self.cuda_graph:
            with mathmode.applied(self.math, self.device):
                for _ in range(2):  # warm up: handles, Triton compiles, lazy tables (OpContext.cached)
                    self.interp.run_spec(spec, self._env(plan))
            self._sync()
        return self._capture(plan)

    @staticmethod
    def _fill(inputs: dict[str, torch.Tensor], data: Mapping[str, Any], rows: Optional[_Rows]) -> None:
        """Copy ``data`` into static input buffers (the run's rows of them, when padded)."""
        for name, buf in inputs.items():
            x = data[name]
            src = x if isinstance(x, torch.Tensor) else _torch_view(np.asarray(x))
            if rows is not None and name in rows.inputs:
                buf = buf.narrow(rows.inputs[name], 0, rows.n)
            buf.copy_(src.to(buf.device).reshape(buf.shape))

    def _env(self, plan: _Plan) -> Any:
        return ChainMap(dict(plan.inputs), plan.spec.host, self.interp.consts)

    # -- capture -------------------------------------------------------------------------------------------
    @staticmethod
    def _segments(steps: list[Step]) -> list[_Segment]:
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
            try:  # a MemPool can be measured (snapshot); else an anonymous graph pool
                self._pool = torch.cuda.MemPool()
                self._pool_id = self._pool.id
            except Exception:
                self._pool, self._pool_id = None, torch.cuda.graph_pool_handle()
            self._reserve_arena()
        return self._pool_id

    def _reserve_arena(self) -> None:
        """Put the engine's planned activation memory into the pool up front: one segment that the
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
        """Capture each segment of ``plan`` as a CUDA graph (or run them, without graphs). A step that
        cannot be captured becomes a host step (named in the notes) and capture starts over."""
        plan.segments = self._segments(plan.spec.steps)
        plan.eager = not self.cuda_graph
        env = self._env(plan)
        stable = {id(t) for t in plan.inputs.values()}
        try:
            self._run_segments(plan, env, stable, capture=self.cuda_graph)
        except _CaptureFailed as e:
            self._sync()
            why = f"capture failed: {e}"
            e.step.host, e.step.reason = True, why
            plan.spec.breaks.append(Break(e.step.node.name, e.step.node.op, why, "host"))
            plan.spec.capturable = False
            note = f"node '{e.step.node.name}' ({e.step.node.op}) runs eagerly: {why}"
            plan.notes.append(note)
            self.graph_notes.append(note)
            fresh = _Plan(plan.spec, plan.inputs, bucket=plan.bucket, notes=plan.notes)
            if attempts < 64:
                return self._capture(fresh, attempts + 1)
            fresh.segments, fresh.eager = [_Segment(plan.spec.steps, True)], True
            self._run_segments(fresh, self._env(fresh), stable, capture=False)
            plan = fresh
        if plan.spec.tail is not None:
            plan.notes.append("shapes after a data-dependent step are planned per shape of what reaches them")
        if not plan.spec.capturable and not plan.notes:
            plan.notes.extend(plan.spec.reasons[:4])
        plan.nbytes = (sum(_nbytes(t) for t in plan.inputs.values())
                       + sum(_nbytes(t) for s in plan.all_segments() for t in (*s.copy_in.values(), *s.outputs.values())))
        return plan

    def _run_segments(self, plan: _Plan, env: Any, stable: set[int], capture: bool) -> None:
        """The first run of a plan: capture its segments (or run them), in order, for real."""
        for seg in plan.segments:
            if seg.host or not capture:
                with mathmode.applied(self.math, self.device):
                    self.interp.execute(seg.steps, env)
                continue
            for k in _segment_reads(seg.steps):
                x = env.maps[0].get(k)
                if isinstance(x, torch.Tensor) and id(x) not in stable:
                    buf = x.clone()  # made by a host step: the graph reads a static copy
                    seg.copy_in[k] = buf
                    env.maps[0][k] = buf
            seg.graph = self._capture_segment(seg, env)
            seg.graph.replay()  # the captured kernels have not run yet: what follows needs their results
            produced = {o for s in seg.steps for o in s.outputs}
            seg.outputs = {k: v for k, v in env.maps[0].items() if k in produced}
            stable.update(id(t) for t in seg.outputs.values() if isinstance(t, torch.Tensor))
        if plan.spec.tail is not None:
            self._tail_plan(plan, plan.spec.tail, env, stable, capture)

    def _capture_segment(self, seg: _Segment, env: Any) -> Any:
        at = [0]
        with mathmode.applied(self.math, self.device):
            if self.emulated:
                g = _EmulatedGraph(self.interp)
                try:
                    self.interp.execute(seg.steps, env, at, record=g.record)
                except Exception as e:
                    raise _CaptureFailed(seg.steps[at[0]], e) from e
                return g
            g = torch.cuda.CUDAGraph()
            self._sync()
            try:
                g.capture_begin(pool=self._pool_handle(), capture_error_mode="thread_local")
                try:
                    self.interp.execute(seg.steps, env, at)
                finally:
                    g.capture_end()
            except Exception as e:  # an op synced, copied from the host, or the like
                raise _CaptureFailed(seg.steps[at[0]], e) from e
        return g

    def _tail_plan(self, plan: _Plan, tail: Any, env: Any, stable: set[int], capture: bool) -> _Plan:
        """Plan, capture and run the tail for the tensors reaching it (once per their signature)."""
        spec = self.interp.tail_specialization(tail, env)
        sub = _Plan(spec, {}, eager=plan.eager)
        sub.segments = self._segments(spec.steps)
        env.maps.insert(1, spec.host)  # the tail's host values, for this run and its own tails
        if capture:
            with mathmode.applied(self.math, self.device):  # warm up on the real data first
                self.interp.execute(spec.steps, ChainMap(dict(env.maps[0]), *env.maps[1:]))
        snapshot = dict(env.maps[0])
        try:
            self._run_segments(sub, env, stable, capture)
        except _CaptureFailed as e:
            self._sync()
            e.step.host, e.step.reason = True, f"capture failed: {e}"
            sub.notes.append(f"node '{e.step.node.name}' ({e.step.node.op}) runs eagerly: {e}")
            env.maps[0].clear()
            env.maps[0].update(snapshot)
            sub.segments, sub.eager = [_Segment(spec.steps, True)], True
            self._run_segments(sub, env, stable, capture=False)
        sub.nbytes = sum(_nbytes(t) for s in sub.all_segments() for t in (*s.copy_in.values(), *s.outputs.values()))
        plan.tails[tail.signature(ChainMap(snapshot, *env.maps[1:]))] = sub
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
                stable = {id(t) for s in plan.all_segments() for t in s.outputs.values() if isinstance(t, torch.Tensor)}
                stable |= {id(t) for t in plan.inputs.values()}
                self._tail_plan(plan, tail, env, stable, capture=not plan.eager)
                return  # its first run computed the outputs into env
            plan.tails.move_to_end(sig)
            env.maps.insert(1, sub.spec.host)
            self._replay(sub, env)

    def _stage_in(self, plan: _Plan, arrays: dict[str, np.ndarray], rows: Optional[_Rows]) -> None:
        """numpy -> the plan's pinned staging -> its device buffers, on the context's stream."""
        if not plan.pinned_in:
            plan.pinned_in = {k: self._pinned(tuple(b.shape), b.dtype) for k, b in plan.inputs.items()}
        for name, buf in plan.inputs.items():
            a = arrays[name]
            pin, dev = plan.pinned_in[name], buf
            if rows is not None and name in rows.inputs:
                ax = rows.inputs[name]
                pin, dev = pin.narrow(ax, 0, a.shape[ax]), dev.narrow(ax, 0, a.shape[ax])
            # the previous run's copy from this buffer is done: every run ends with a sync of the stream
            pin.copy_(_torch_view(a).reshape(pin.shape))
            dev.copy_(pin, non_blocking=True)

    def _stage_out(self, outs: dict[str, Any]) -> dict[str, Any]:
        return self._copy_out(outs, self._pinned_out)

    def _copy_out(self, outs: dict[str, Any], store: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Device outputs -> reused pinned buffers (``store``, grown as needed), queued on the context's
        stream: the caller synchronizes before reading them."""
        host: dict[str, Any] = {}
        for k, v in outs.items():
            if not isinstance(v, torch.Tensor):
                host[k] = v
                continue
            need = v.numel() * v.element_size()
            pin = store.get(k)
            if pin is None or pin.numel() < need:
                pin = store[k] = self._pinned((max(need, 1),), torch.uint8)
            view = pin[:need].view(v.dtype).view(v.shape)
            view.copy_(v, non_blocking=True)
            host[k] = view
        return host

    def _bucket_matches(self, plan: _Plan, data: Mapping[str, Any], rows: _Rows) -> bool:
        """First padded run of a bucket analysis: its rows must match an exact eager run (else buckets
        go off for this context)."""
        self._fill(plan.inputs, data, rows)
        got = _cut(self._execute(plan), rows)
        exact = {}
        for v in self.engine.graph.inputs:
            x = data[v.name]
            exact[v.name] = (x if isinstance(x, torch.Tensor) else _torch_view(np.asarray(x))).to(self.device)
        with mathmode.applied(self.math, self.device):
            want = self.interp.run(exact)
        self._sync()
        precision = str(self.engine.manifest.get("precision"))
        tol = 1e-2 if precision in ("fp16", "bf16") else 5e-3 if precision == "tf32" else 1e-4
        for k, w in want.items():
            g = got.get(k)
            if not isinstance(w, torch.Tensor):
                continue
            if not isinstance(g, torch.Tensor) or tuple(g.shape) != tuple(w.shape):
                self.graph_notes.append(f"shape buckets off: output '{k}' of a padded run has shape "
                                        f"{list(getattr(g, 'shape', []))}, the exact run {list(w.shape)}")
                return False
            if w.is_floating_point():
                err = float((g.double() - w.double()).norm() / w.double().norm().clamp_min(1e-30))
                bad = not err <= tol
            else:
                err = float((g != w).double().mean()) if w.numel() else 0.0
                bad = err > 0.01
            if bad:
                self.graph_notes.append(f"shape buckets off: output '{k}' of a padded run differs from the exact "
                                        f"run ({err:.2e}): the model mixes rows")
                return False
        return True

    # -- CPU and non-tensor engines -------------------------------------------------------------------------
    def _run_eager_host(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock, torch.inference_mode():
            with self._on_stream():
                outs = self.interp.run(self.engine._check_inputs(feeds))
                res = {k: to_numpy_value(v) for k, v in outs.items()}
            self._sync()
            return res


def _cut(outs: dict[str, Any], rows: Optional[_Rows]) -> dict[str, Any]:
    """A padded run's outputs cut back to its rows."""
    if rows is None:
        return outs
    cut = {}
    for k, v in outs.items():
        ax = rows.outputs.get(k)
        cut[k] = v if ax is None or not isinstance(v, torch.Tensor) else v.narrow(ax, 0, v.shape[ax] // rows.bucket * rows.n)
    return cut


def _segment_reads(steps: list[Step]) -> list[str]:
    produced: set[str] = set()
    reads: dict[str, None] = {}
    for s in steps:
        for k in s.inputs:
            if k is not None and k not in produced:
                reads.setdefault(k, None)
        produced.update(s.outputs)
    return list(reads)


def _host_values(x: Any) -> list:
    """The values of a (small) value input, from the host when they are there."""
    if isinstance(x, torch.Tensor):
        return x.detach().reshape(-1).tolist() if x.device.type != "meta" else []
    return np.asarray(x).reshape(-1).tolist()


def _numpy_view(t: torch.Tensor) -> np.ndarray:
    """A numpy array sharing ``t``'s memory (writes go to ``t``), bf16/fp8 through their bits."""
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        bits = t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.uint8).numpy()
        return bits.view(_np_of(t.dtype))
    return t.numpy()


def _dtype_name(dt: Any) -> str:
    """One name per dtype, whether numpy, torch or ember's (plans must not split on the spelling)."""
    from ..ir.dtypes import DType, from_numpy
    from ..ops.torch_types import from_torch

    try:
        if isinstance(dt, DType):
            return dt.value
        if isinstance(dt, torch.dtype):
            return from_torch(dt).value
        return from_numpy(np.dtype(dt)).value
    except Exception:
        return str(dt)


def _np_of(dt: torch.dtype) -> Any:
    from ..ops.torch_types import from_torch

    return _np_dtype_of(from_torch(dt))


def _warm_data(shape: tuple, dtype: Any) -> np.ndarray:
    """Inputs to plan and warm a signature with before real data arrives: small random floats, zero
    integers (valid indices), all-true masks."""
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return np.random.default_rng(0).standard_normal(shape).astype(dt)
    if dt.kind == "b":
        return np.ones(shape, dtype=dt)
    return np.zeros(shape, dtype=dt)


def _torch_dtype(dt: Any) -> torch.dtype:
    if isinstance(dt, torch.dtype):
        return dt
    from ..ir.dtypes import from_numpy

    return to_torch(from_numpy(np.dtype(dt)))


def _np_dtype_of(dt: Any) -> Any:
    from ..ir.dtypes import to_numpy

    try:
        return to_numpy(dt) if dt is not None else None
    except Exception:
        return None


def _is_symbol(v: Any, axis: int, symbol: str) -> bool:
    from ..ir.shapes import as_symbol

    return v.shape is not None and axis < len(v.shape) and as_symbol(v.shape[axis]) == symbol


@contextlib.contextmanager
def emulated_graphs() -> Iterator[None]:
    """Run the GPU path's plans on the CPU (tests of the run path on machines without a GPU)."""
    prev, ExecutionContext.emulate_graphs = ExecutionContext.emulate_graphs, True
    try:
        yield
    finally:
        ExecutionContext.emulate_graphs = prev


__all__ = ["ExecutionContext", "StagedRun", "emulated_graphs"]
