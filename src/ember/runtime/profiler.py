"""Per-layer profiler and timing helpers for `ember bench` and the benchmark scripts.

``profile_layers(engine, feeds)`` runs the engine's steps (the nodes left after host-side shape
arithmetic, see specialize.py) one at a time, eagerly, and times each one: CUDA events around
each step on a GPU, ``perf_counter`` on the CPU. On a GPU a step's time is the span from just
before its launch to the end of its device work, so a launch-bound step shows its host cost too;
the per-layer times therefore add up to the eager run time, not to a CUDA-graph replay.
"""
from __future__ import annotations

import math
import statistics
import time
from collections import ChainMap
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import torch

from ..errors import EmberError


# -- statistics -------------------------------------------------------------------------------------
def summarize_ms(samples: Sequence[float]) -> dict[str, float]:
    """min/mean/median/p90/p95/p99/max of a list of milliseconds (nearest-rank percentiles)."""
    if not samples:
        return {}
    s = sorted(samples)

    def pct(p: float) -> float:
        return s[max(0, min(len(s) - 1, math.ceil(p / 100.0 * len(s)) - 1))]

    return {"min": s[0], "mean": statistics.fmean(s), "median": statistics.median(s), "p90": pct(90),
            "p95": pct(95), "p99": pct(99), "max": s[-1], "count": len(s)}


# -- execution contexts -----------------------------------------------------------------------------
class EngineRunContext:
    """Stand-in for ``ExecutionContext`` on an engine that has none: every call is ``engine.run``.

    Same surface: ``run`` (numpy in/out), ``run_device`` (device tensors in/out), ``stream``.
    """

    cuda_graph = False

    def __init__(self, engine: Any):
        self.engine = engine
        self.stream = torch.cuda.current_stream() if engine.device == "cuda" else None

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        return self.engine.run({k: v.cpu().numpy() if isinstance(v, torch.Tensor) else v
                                for k, v in feeds.items()})

    def run_device(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        return self.engine.run(dict(feeds))


def execution_context(engine: Any, cuda_graph: bool = True) -> Any:
    """The engine's ExecutionContext (one CUDA graph per input signature on a GPU when asked),
    or an ``EngineRunContext`` where the runtime has none yet."""
    create = getattr(engine, "create_execution_context", None)
    if create is None:
        return EngineRunContext(engine)
    return create(cuda_graph=cuda_graph and engine.device == "cuda")


def device_runner(ctx: Any) -> Any:
    """``feeds -> outputs`` on device tensors without extra copies: ``run_device(reuse_outputs=True)``
    where the context has it (outputs are its own buffers, overwritten by the next run)."""
    import inspect

    try:
        if "reuse_outputs" in inspect.signature(ctx.run_device).parameters:
            return lambda feeds: ctx.run_device(feeds, reuse_outputs=True)
    except (TypeError, ValueError):
        pass
    return ctx.run_device


def device_feeds(engine: Any, feeds: Mapping[str, Any]) -> dict[str, Any]:
    """numpy feeds -> tensors on the engine's device, checked against its inputs like ``run``."""
    check = getattr(engine, "_check_inputs", None)
    if check is not None:
        return check(feeds)
    dev = torch.device(engine.device)
    return {k: torch.as_tensor(v).to(dev) for k, v in feeds.items()}


def sync(device: "str | torch.device") -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# -- per-layer profile ------------------------------------------------------------------------------
@dataclass
class LayerTime:
    index: int
    name: str
    op: str
    tactic: str
    ms: float  # median over the profiled runs
    percent: float = 0.0


@dataclass
class LayerProfile:
    device: str
    runs: int
    layers: list[LayerTime]
    layers_total_ms: float  # sum of per-layer medians
    run_ms: float  # median wall (CPU) / event (GPU) time of a whole profiled run, timing included
    folded_nodes: int = 0  # nodes evaluated on the host once per input signature (not timed)
    by_op: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [asdict(layer) for layer in self.layers]
        return d


def _interpreter(engine: Any) -> Any:
    interp = getattr(engine, "_interp", None)
    if interp is None or not hasattr(interp, "specialization") or not hasattr(interp, "execute"):
        raise EmberError(f"this engine ({type(engine).__name__}) has no step-by-step interpreter to profile")
    return interp


def _op_label(step: Any) -> str:
    return f"fused group ({step.fused} ops → {step.node.op})" if getattr(step, "kernel", None) is not None \
        else step.node.op


def _step_tactic(interp: Any, step: Any) -> str:
    if getattr(step, "kernel", None) is not None:
        return "triton.fused_group"
    b = getattr(step, "bound", None)  # the plan's shape-bucket choice (tactic_buckets.py)
    if b is not None:
        return getattr(b, "name", "reference")
    return _tactic(interp, step.node)


def _tactic(interp: Any, node: Any) -> str:
    tactic = str(node.meta.get("tactic", "reference"))
    if tactic != "reference" and hasattr(interp, "bound") and node.name not in interp.bound:
        tactic += " (not here: reference)"  # chosen at build time, cannot run on this device
    return tactic


def _mark(is_cuda: bool) -> Any:
    if is_cuda:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e
    return time.perf_counter()


def _elapsed_ms(a: Any, b: Any, is_cuda: bool) -> float:
    return a.elapsed_time(b) if is_cuda else (b - a) * 1e3


def _timed_run(interp: Any, spec: Any, tensors: dict[str, Any], is_cuda: bool) -> list[Any]:
    """One run with a mark before each top-level step and one at the end: len(steps) + 1 marks.

    Through the interpreter's ``on_step`` hook where it has one (so the run is exactly ``run``),
    else by executing the steps one at a time."""
    steps = spec.steps
    marks: list[Any] = [None] * (len(steps) + 1)
    if hasattr(interp, "on_step"):
        index = {id(s): i for i, s in enumerate(steps)}  # subgraph steps call the hook too: skip them

        def hook(step: Any, args: Any) -> None:
            i = index.get(id(step))
            if i is not None:
                marks[i] = _mark(is_cuda)

        prev, interp.on_step = interp.on_step, hook
        try:
            interp.run(tensors)
        finally:
            interp.on_step = prev
        marks[-1] = _mark(is_cuda)
    else:
        env: Any = ChainMap(dict(tensors), spec.host, interp.consts)
        for i, step in enumerate(steps):
            marks[i] = _mark(is_cuda)
            interp.execute([step], env)
        marks[-1] = _mark(is_cuda)
    if any(m is None for m in marks):
        raise EmberError("profile_layers: the run did not go through the steps of its specialization")
    return marks


def profile_layers(engine: Any, feeds: Mapping[str, Any], runs: int = 10, warmup: int = 2) -> LayerProfile:
    """Time every step of one run of ``engine`` on ``feeds`` (numpy or device tensors).

    Runs ``warmup`` unmeasured runs then ``runs`` measured ones; each layer's time is its median.
    """
    if runs < 1:
        raise EmberError("profile_layers: runs must be at least 1")
    interp = _interpreter(engine)
    tensors = device_feeds(engine, feeds)
    is_cuda = interp.device.type == "cuda"
    with torch.inference_mode():
        spec = interp.specialization(tensors)
        steps = spec.steps
        per_step: list[list[float]] = [[] for _ in steps]
        run_times: list[float] = []
        for r in range(warmup + runs):
            if is_cuda:
                torch.cuda.synchronize()
            marks = _timed_run(interp, spec, tensors, is_cuda)
            if is_cuda:
                torch.cuda.synchronize()
            if r < warmup:
                continue
            for i in range(len(steps)):
                per_step[i].append(_elapsed_ms(marks[i], marks[i + 1], is_cuda))
            run_times.append(_elapsed_ms(marks[0], marks[-1], is_cuda))
    layers = [LayerTime(i, s.node.name or f"#{i}", _op_label(s), _step_tactic(interp, s),
                        statistics.median(per_step[i]) if per_step[i] else 0.0)
              for i, s in enumerate(steps)]
    total = sum(layer.ms for layer in layers)
    by_op: dict[str, dict[str, float]] = {}
    for layer in layers:
        layer.percent = 100.0 * layer.ms / total if total > 0 else 0.0
        d = by_op.setdefault(layer.op, {"count": 0, "ms": 0.0, "percent": 0.0})
        d["count"] += 1
        d["ms"] += layer.ms
        d["percent"] += layer.percent
    by_op = dict(sorted(by_op.items(), key=lambda kv: -kv[1]["ms"]))
    return LayerProfile(interp.device.type, runs, layers, total, statistics.median(run_times),
                        getattr(spec, "folded", 0), by_op)


__all__ = ["EngineRunContext", "LayerProfile", "LayerTime", "device_feeds", "device_runner", "execution_context", "profile_layers",
           "summarize_ms", "sync"]
