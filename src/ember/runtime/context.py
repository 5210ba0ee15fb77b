"""ExecutionContext: the one run path. ``Engine.run``, ``ember run``, ``ember bench`` and every server
instance go through it.

A context owns a CUDA stream, a private memory pool (its arena: every CUDA graph it captures allocates
there, values freed after their last use as the memory plan assumes) and one *plan* per input
signature, or per shape bucket (buckets.py):

- static device buffers for the inputs, and reused pinned host buffers that numpy inputs and outputs
  are staged through, copied on the context's stream (staging.py);
- the steps of the signature's specialization, cut into segments captured as CUDA graphs around the
  host steps that must run eagerly, and tails planned per shape after data-dependent steps (graphs.py);
- a run copies the inputs in, replays (or runs) the segments in order, copies the outputs out and waits
  on the context's stream only.

Plans are kept in LRU order under a byte cap. Contexts of one engine share its weights; a context is
used by one thread at a time (it holds a lock). On CPU a context runs the steps directly;
``emulated_graphs()`` runs the GPU path's logic on the CPU, for tests.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections import ChainMap, OrderedDict
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional

import numpy as np
import torch

from ..errors import InputError
from ..ops.torch_types import tensor_to_numpy, to_numpy_value
from . import mathmode
from .buckets import Analysis, BucketPlan, analyze_for, batch_symbol, bucket_size
from .graphs import LAUNCH, CaptureFailed, GraphRunner, Plan, demote, plan_bytes, segments_of
from .staging import (MAX_SLOTS, Rows, StagedRun, WarmData, as_torch_dtype, copy_out, cut, dtype_name, host_values,
                      pick_slot, stage_in, torch_view)

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger(__name__)
DEFAULT_GRAPH_BYTES = 4 << 30  # device memory a context's plans may hold (static buffers, graph outputs)


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
        self.graphs_runner = GraphRunner(self.interp, self.device, self.stream, self.math, self.emulated,
                                         capture=self.cuda_graph)
        self._plans: "OrderedDict[tuple, Plan]" = OrderedDict()
        self._routes: dict[tuple, tuple] = {}  # a signature that runs padded -> (plan key, rows)
        self._verified: set[tuple] = set()  # bucket analyses whose padding was checked against an exact run
        self._lock = threading.Lock()
        self._analysis: dict[tuple, Analysis] = {}  # bucket analysis per signature of the non-batch dims
        self._pinned_out: dict[str, torch.Tensor] = {}
        self.graph_notes: list[str] = []  # why some plan is not one CUDA graph
        self.evictions = 0
        self._tensor_io = all(v.kind == "tensor" for v in (*engine.graph.inputs, *engine.graph.outputs))

    # -- device plumbing ----------------------------------------------------------------------------------
    def _on_stream(self) -> Any:
        return torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()

    def _launching(self) -> Any:
        """Work queued on this context's stream: held against captures (graphs.LAUNCH)."""
        return LAUNCH.reading() if self.cuda else contextlib.nullcontext()

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
            plan, rows = self._plan_for({k: (a.shape, a.dtype) for k, a in arrays.items()}, arrays)
            if not plan.pinned_in:
                plan.pinned_in = {k: self._pinned(tuple(b.shape), b.dtype) for k, b in plan.inputs.items()}
            with self._launching(), self._on_stream():
                stage_in(plan, plan.pinned_in, arrays, rows)
                host = copy_out(cut(self._execute(plan), rows), self._pinned_out, self._pinned)
                self._sync()
            out = {k: tensor_to_numpy(v).copy() if isinstance(v, torch.Tensor) else to_numpy_value(v)
                   for k, v in host.items()}
            self._after_run()
            return out

    # -- the device API: tensors on the engine's device in and out ----------------------------------------
    def run_device(self, feeds: Mapping[str, torch.Tensor], *, reuse_outputs: bool = False) -> dict[str, Any]:
        """Run on device tensors. With ``reuse_outputs`` the returned tensors are the context's own
        buffers, overwritten by the context's next run (no copy, as TensorRT bindings); otherwise
        clones (normal tensors, usable on the caller's stream)."""
        if not self.planned or not self._tensor_io:
            with self._lock, torch.inference_mode():
                return self.interp.run(self.engine._check_inputs(feeds))
        with self._lock:
            caller = torch.cuda.current_stream(self.device) if self.cuda else None
            shapes = {}
            for k, x in feeds.items():
                if not isinstance(x, torch.Tensor):
                    raise InputError(f"input '{k}': run_device takes torch tensors on {self.device}; got "
                                     f"{type(x).__name__} (use run() for numpy)")
                shapes[k] = (tuple(x.shape), x.dtype)
            self.engine._check_names(feeds)
            with torch.inference_mode():
                plan, rows = self._plan_for(shapes, feeds)
                with self._launching(), self._on_stream():
                    if caller is not None:
                        self.stream.wait_stream(caller)  # inputs may have been written on the caller's stream
                    for name, buf in plan.inputs.items():
                        x = feeds[name]
                        if x.device != buf.device:
                            x = x.to(buf.device, non_blocking=True)
                        dst = buf if rows is None or name not in rows.inputs else buf.narrow(rows.inputs[name], 0, rows.n)
                        if dst.data_ptr() != x.data_ptr() or dst.shape != x.shape:
                            dst.copy_(x, non_blocking=True)
                    outs = cut(self._execute(plan), rows)
            if not reuse_outputs:
                with torch.inference_mode(False), self._on_stream():
                    outs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in outs.items()}
            if caller is not None:
                caller.wait_stream(self.stream)
                for v in outs.values() if not reuse_outputs else ():
                    if isinstance(v, torch.Tensor):
                        v.record_stream(caller)  # freed on the caller's stream: not reused before its work
            self._after_run()
            return outs

    def input_buffers(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The static device buffers a run with these input shapes reads: write inputs there and pass
        them to ``run_device`` to skip the copy, as with TensorRT's bindings."""
        with self._lock, torch.inference_mode():
            plan, rows = self._plan_for({k: (tuple(x.shape), x.dtype) for k, x in feeds.items()}, feeds)
            return {k: (b.narrow(rows.inputs[k], 0, rows.n) if rows is not None and k in rows.inputs else b)
                    for k, b in plan.inputs.items()}

    # -- the server API -------------------------------------------------------------------------------------
    @property
    def can_stage(self) -> bool:
        """Whether ``stage`` works here: a planned (GPU) context of an engine with tensor inputs and
        outputs only."""
        return self.planned and self._tensor_io

    def bucket_sizes(self, max_batch: int) -> list[int]:
        """The plans batches of 1..``max_batch`` rows run in (the shape buckets; the last may exceed
        ``max_batch``), or [] when this engine runs exact shapes only."""
        symbol = batch_symbol(self.engine.graph)
        if not self.buckets or symbol is None:
            return []
        lo, hi = self._profile_range(symbol)
        return sorted({min(max(bucket_size(n), lo), hi) for n in range(1, max_batch + 1) if n <= hi})

    def capture(self, signatures: "list[Mapping[str, tuple]]", values: Optional[Mapping[str, Any]] = None) -> int:
        """Plan (and capture) these input signatures ahead of traffic: each a {name: (shape, dtype)}.
        Returns how many plans the context holds."""
        with self._lock, torch.inference_mode():
            for shapes in signatures:
                self._plan_for({k: (tuple(s), d) for k, (s, d) in shapes.items()}, WarmData(shapes, values))
            return len(self._plans)

    def stage(self, shapes: Mapping[str, tuple], values: Optional[Mapping[str, Any]] = None) -> StagedRun:
        """A run with inputs of these (shape, dtype)s, for callers that write the inputs themselves
        (the server's batcher gathers requests straight into pinned memory). ``values``: the values of
        value inputs (Interpreter.value_inputs), which key the plan. Plans the signature on first use
        (with stand-in data: real data arrives with ``submit``)."""
        with self._lock, torch.inference_mode():
            if not self.can_stage:
                raise InputError("stage() needs a GPU engine with tensor inputs and outputs; use run()")
            plan, rows = self._plan_for({k: (tuple(s), d) for k, (s, d) in shapes.items()}, WarmData(shapes, values))
            return StagedRun(self, plan, rows, pick_slot(plan, self._pinned))

    def _submit(self, run: StagedRun) -> None:
        with self._lock, torch.inference_mode():
            plan, rows, slot = run.plan, run.rows, run.slot
            with self._launching(), self._on_stream():
                for name, buf in plan.inputs.items():
                    pin, dev = slot.inputs[name], buf
                    if rows is not None and name in rows.inputs:
                        ax = rows.inputs[name]
                        pin, dev = pin.narrow(ax, 0, rows.n), dev.narrow(ax, 0, rows.n)
                    dev.copy_(pin, non_blocking=True)
                run._outs = copy_out(cut(self._execute(plan), rows), slot.outputs, self._pinned)
                if self.cuda:
                    slot.done = torch.cuda.Event()
                    slot.done.record(self.stream)
            slot.state = "submitted"
            self._after_run()

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
                if all(isinstance(v, torch.Tensor) and v.device.type == self.device.type for v in feeds.values()):
                    plan, _ = self._plan_for({k: (tuple(v.shape), v.dtype) for k, v in feeds.items()}, feeds)
                else:
                    arrays = self._host_inputs(feeds)
                    plan, _ = self._plan_for({k: (a.shape, a.dtype) for k, a in arrays.items()}, arrays)
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
            "tails_captured": len(plan.tails), "plan_bytes": plan.nbytes, "arena_bytes": self.arena_bytes(),
        }

    def arena_bytes(self) -> Optional[int]:
        """Bytes the context's memory pool holds (None where torch cannot say)."""
        return self.graphs_runner.arena_bytes()

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
                    out[v.name] = np.asarray(x, dtype=_numpy_dtype(v.dtype))
                except (TypeError, ValueError) as e:
                    raise InputError(f"input '{v.name}': cannot make an array of {type(x).__name__} ({e})") from None
        return out

    def _signature(self, shapes: dict[str, tuple], data: Mapping[str, Any]) -> tuple:
        values = self.interp.value_inputs
        return tuple((k, tuple(int(d) for d in sh), dtype_name(dt))
                     + ((tuple(host_values(data[k])),) if k in values else ())
                     for k, (sh, dt) in sorted(shapes.items()))

    def _plan_for(self, shapes: dict[str, tuple], data: Mapping[str, Any]) -> tuple[Plan, Optional[Rows]]:
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
        if bucket is None:
            plan = self._build(shapes, data)
            self._insert(sig, plan)
            return plan, None
        bplan, n, b, group = bucket
        rows = Rows(n, b, dict(bplan.inputs), dict(bplan.outputs))
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

    def _bucket(self, shapes: dict[str, tuple], data: Mapping[str, Any]) -> Optional[tuple]:
        """(bucket plan, rows, bucket, analysis key) when this signature runs padded, else None."""
        symbol = batch_symbol(self.engine.graph) if self.buckets else None
        if symbol is None:
            return None
        inputs = {v.name: v for v in self.engine.graph.inputs}
        first = next((v for v in self.engine.graph.inputs if _is_symbol(v, 0, symbol)), None)
        if first is None or not shapes[first.name][0]:
            return None
        n = int(shapes[first.name][0][0])
        other = tuple((k, tuple(int(d) for i, d in enumerate(sh) if not _is_symbol(inputs[k], i, symbol)), dtype_name(dt))
                      + ((tuple(host_values(data[k])),) if k in self.interp.value_inputs else ())
                      for k, (sh, dt) in sorted(shapes.items()))
        analysis = self._analysis.get(other)
        if analysis is None:
            meta = {k: torch.empty(tuple(sh), dtype=as_torch_dtype(dt), device="meta") for k, (sh, dt) in shapes.items()}
            for k in self.interp.value_inputs:
                meta[k] = torch.as_tensor(np.asarray(host_values(data[k]))).reshape(tuple(shapes[k][0]))
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

    def _insert(self, key: tuple, plan: Plan) -> None:
        self._plans[key] = plan
        while len(self._plans) > 1 and (len(self._plans) > self.max_graphs
                                        or sum(p.nbytes for p in self._plans.values()) > self.max_graph_bytes):
            old_key, old = self._plans.popitem(last=False)
            self.evictions += 1
            self._routes = {s: r for s, r in self._routes.items() if r[0] != old_key}
            log.info("execution context: dropped a plan (%d bytes) to stay under its cap", old.nbytes)

    def _build(self, shapes: dict[str, tuple], data: Mapping[str, Any], rows: Optional[Rows] = None) -> Plan:
        """Make and capture the plan for these (padded) shapes, running it on ``data``. Holds the
        launch lock for writing: no other context queues work while a capture is under way."""
        with LAUNCH.writing() if self.cuda else contextlib.nullcontext(), self._on_stream():
            with torch.inference_mode(False):  # normal tensors: callers may write them (input_buffers)
                inputs = {v.name: torch.zeros(tuple(shapes[v.name][0]), dtype=as_torch_dtype(shapes[v.name][1]),
                                              device=self.device) for v in self.engine.graph.inputs}
            _fill(inputs, data, rows)
            spec = self.interp.specialization(dict(inputs))
            plan = Plan(spec, inputs, bucket=rows.bucket if rows is not None else None)
            if self.cuda_graph:
                with mathmode.applied(self.math, self.device):
                    for _ in range(2):  # warm up: handles, Triton compiles, lazy tables (OpContext.cached)
                        self.interp.run_spec(spec, self._env(plan))
                self._sync()
            for _ in range(64):
                plan.segments = segments_of(plan.spec.steps)
                plan.eager = not self.cuda_graph
                try:
                    self.graphs_runner.capture(plan, self._env(plan))
                    break
                except CaptureFailed as e:  # that step runs eagerly from now on; capture again
                    self.graph_notes.append(demote(e, plan.spec, plan.notes))
                    plan = Plan(plan.spec, plan.inputs, bucket=plan.bucket, notes=plan.notes)
            else:
                plan.segments, plan.eager = segments_of(plan.spec.steps), True
                self.graphs_runner.capture(plan, self._env(plan))
            self._sync()
        if plan.spec.tail is not None:
            plan.notes.append("shapes after a data-dependent step are planned per shape of what reaches them")
        if not plan.spec.capturable and not plan.notes:
            plan.notes.extend(plan.spec.reasons[:4])
        plan.nbytes = plan_bytes(plan)
        return plan

    def _env(self, plan: Plan) -> Any:
        return ChainMap(dict(plan.inputs), plan.spec.host, self.interp.consts)

    # -- running ---------------------------------------------------------------------------------------------
    def _execute(self, plan: Plan) -> dict[str, Any]:
        """One run of a planned signature on the context's stream (inputs already in place)."""
        env = self._env(plan)
        self.graphs_runner.replay(plan, env)
        return {v.name: env[v.name] for v in self.engine.graph.outputs}

    def _after_run(self) -> None:
        """Capture the tails a run saw for the second time (outside its launch)."""
        if self.graphs_runner.pending:
            with torch.inference_mode():
                self.graphs_runner.capture_pending(self.interp.consts)

    def _bucket_matches(self, plan: Plan, data: Mapping[str, Any], rows: Rows) -> bool:
        """First padded run of a bucket analysis: its rows must match an exact eager run (else buckets
        go off for this context). The padding rows hold real rows (valid data, not zeros, which would
        hide some row mixing)."""
        with self._launching(), self._on_stream():
            _fill(plan.inputs, data, rows, pad=True)
            got = cut(self._execute(plan), rows)
            exact = {v.name: (x if isinstance(x, torch.Tensor) else torch_view(np.asarray(x))).to(self.device)
                     for v in self.engine.graph.inputs for x in [data[v.name]]}
            with mathmode.applied(self.math, self.device):
                want = self.interp.run(exact)
            self._sync()
        precision = str(self.engine.manifest.get("precision"))
        tol = 1e-2 if precision in ("fp16", "bf16", "int8", "fp8") else 5e-3 if precision == "tf32" else 1e-4
        for k, w in want.items():
            g = got.get(k)
            if not isinstance(w, torch.Tensor):
                continue
            if not isinstance(g, torch.Tensor) or tuple(g.shape) != tuple(w.shape):
                self.graph_notes.append(f"shape buckets off: output '{k}' of a padded run has shape "
                                        f"{list(getattr(g, 'shape', []))}, the exact run {list(w.shape)}")
                return False
            err = _distance(g, w)
            if not err <= (tol if w.is_floating_point() else 0.01):
                self.graph_notes.append(f"shape buckets off: output '{k}' of a padded run differs from the exact "
                                        f"run ({err:.2e}): the model mixes rows")
                return False
        return True

    # -- CPU and non-tensor engines -------------------------------------------------------------------------
    def _run_eager_host(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock, torch.inference_mode():
            with self._launching(), self._on_stream():
                outs = self.interp.run(self.engine._check_inputs(feeds))
                res = {k: to_numpy_value(v) for k, v in outs.items()}
                self._sync()
            return res


def _fill(inputs: dict[str, torch.Tensor], data: Mapping[str, Any], rows: Optional[Rows], pad: bool = False) -> None:
    """Copy ``data`` into static input buffers (the run's rows of them, when padded; with ``pad``,
    the rows beyond them get copies of the real rows)."""
    for name, buf in inputs.items():
        x = data[name]
        src = (x if isinstance(x, torch.Tensor) else torch_view(np.asarray(x))).to(buf.device)
        if rows is None or name not in rows.inputs:
            buf.copy_(src.reshape(buf.shape))
            continue
        ax = rows.inputs[name]
        buf.narrow(ax, 0, rows.n).copy_(src.reshape(buf.narrow(ax, 0, rows.n).shape))
        if pad and rows.n:
            for start in range(rows.n, rows.bucket, rows.n):
                k = min(rows.n, rows.bucket - start)
                buf.narrow(ax, start, k).copy_(src.narrow(ax, 0, k))


def _distance(g: torch.Tensor, w: torch.Tensor) -> float:
    """Relative L2 over finite elements (non-finite ones must sit in the same places), or the fraction
    of differing elements for integers and bools."""
    if not w.is_floating_point():
        return float((g != w).double().mean()) if w.numel() else 0.0
    g, w = g.double(), w.double()
    fw, fg = torch.isfinite(w), torch.isfinite(g)
    if not torch.equal(fw, fg) or not torch.equal(torch.where(fw, 0.0, w).nan_to_num(0.0, 1.0, -1.0),
                                                  torch.where(fg, 0.0, g).nan_to_num(0.0, 1.0, -1.0)):
        return float("inf")
    g, w = torch.where(fw, g, 0.0), torch.where(fw, w, 0.0)
    return float((g - w).norm() / w.norm().clamp_min(1e-30))


def _numpy_dtype(dt: Any) -> Any:
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


__all__ = ["MAX_SLOTS", "ExecutionContext", "StagedRun", "emulated_graphs"]
