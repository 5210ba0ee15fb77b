"""Build a reduced-precision (fp16/bf16) graph that is as fast as the GPU allows and faithful to fp32.

    graph32 --convert_precision(keep)--> low graph --tune--> which layers are faster in fp32?
                                              |                 (precision.choose_fp32_for_speed)
                                              +--fidelity check--> which layers drift?
                                                                   (fidelity.SegmentSearch)

Every choice is a set of layers kept in fp32 (``keep``, with the reason and what was measured), and
every graph is converted afresh from the optimized fp32 graph with it; the casts it inserts are
fused into neighbouring pointwise kernels by regrouping. Tuning again after a choice times only
what changed (the timing cache holds the rest, the fp32 twins included).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..ir.dtypes import DType
from ..ir.graph import Graph
from ..ir.verify import verify
from ..ops import get, known_ops
from ..ops.torch_types import to_torch
from ..passes.rewrite import PassContext, remove_unused_initializers
from . import fidelity as fid
from .precision import KeptLayer, choose_fp32_for_speed, convert_precision, lowerable
from .progress import report as send_progress
from .tuner import TimingCache, TuneReport, select_tactics

log = logging.getLogger(__name__)
SEARCH_ROUNDS = 3  # search, rebuild, measure the engine: this many times, then every layer fp32
VERIFY_RUNS = 4  # runs a search may take past its budget, to check segments kept without splitting


@dataclass
class LowPrecisionBuild:
    graph: Graph
    kept: list[KeptLayer]
    tune: Optional[TuneReport]
    fidelity: Optional[dict[str, Any]]  # the manifest's "fidelity" block; None when not checked


def build_low_precision(graph32: Graph, low: DType, device: torch.device, feeds: dict[str, torch.Tensor], *,
                        opt_level: int, builder_level: int, cache: Optional[TimingCache], budget: Optional[float],
                        progress: Optional[Callable[[str], None]] = None, debug: bool = False) -> LowPrecisionBuild:
    """The low-precision graph of ``graph32`` (optimized, fp32), tuned on ``device`` if it is a GPU
    (``cache`` given), with the layers kept in fp32 that make it faster or keep it within ``budget``."""
    keep: dict[str, tuple[str, str]] = {}
    state: dict[str, Any] = {}

    def lower(measure_precision: bool = False) -> None:
        g = fid.clone_graph(graph32)
        state["kept"] = convert_precision(g, low, keep)
        remove_unused_initializers(g)  # the fp32 originals of converted weights: not stored twice
        regroup(g, opt_level)  # the casts join the fusion groups next to them
        if debug:
            verify(g, known_ops())
        if cache is not None:
            t = select_tactics(g, device, feeds, builder_level, cache, progress,
                               low=to_torch(low) if measure_precision else None)
            state["tune"] = _merged(state.get("tune"), t)
        state["graph"] = g

    lower(measure_precision=cache is not None)
    if cache is not None:
        tune = state["tune"]
        faster = choose_fp32_for_speed(state["graph"], tune.node_ms, tune.cast_ms)
        if faster:
            keep.update({n: ("speed", detail) for n, detail in faster.items()})
            log.info("%d layer(s) kept in fp32: faster than their %s kernels, casts included", len(faster), low.value)
            lower()
    checked = None
    if budget is not None:
        random_ops = sorted({n.op for n in graph32.all_nodes() if n.op in known_ops() and get(n.op).random})
        if random_ops:  # two runs draw different numbers: no distance between them means anything
            checked = {"budget": budget, "skipped": f"the model draws random numbers ({', '.join(random_ops)})"}
        else:
            try:
                checked = _check_fidelity(graph32, low, device, feeds, budget, keep, lower, state, progress)
            except Exception as e:  # the engine is still built; the manifest and ember build say why unchecked
                log.warning("fp16/bf16 fidelity check failed: %s: %s", type(e).__name__, e)
                checked = {"budget": budget, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
    return LowPrecisionBuild(state["graph"], state["kept"], state.get("tune"), checked)


def _check_fidelity(graph32: Graph, low: DType, device: torch.device, feeds: dict, budget: float,
                    keep: dict[str, tuple[str, str]], lower: Callable[[], None], state: dict,
                    progress: Optional[Callable[[str], None]]) -> dict[str, Any]:
    """Measure the built graph against fp32; while it is over ``budget``, search for layers to keep
    in fp32 (rounds of fidelity.SegmentSearch on reference kernels), rebuild and measure again."""
    t0 = time.perf_counter()
    send_progress(progress, "fidelity", 0, 1, "fp32 reference")
    ref = fid.Reference(graph32, device, feeds)
    d = fid.measure_engine(state["graph"], device, feeds, ref)
    before = fid.drift(d)
    search = None
    if fid.size(d) > budget:
        search = fid.SegmentSearch(graph32, low, device, feeds, ref, [n for n in lowerable(graph32) if n not in keep],
                                   seconds=fid.CPU_SECONDS if device.type == "cpu" else math.inf)
        accuracy: dict[str, float] = {}
        whole = search.measure(search.layers)  # the search's own starting point, on reference kernels
        target = fid.TARGET * budget
        for _ in range(SEARCH_ROUNDS):
            # rounds until the reference runs agree; out of splitting runs, a round still keeps the
            # densest segments, and a few runs more check what that gives
            while fid.size(whole) > target and search.runs < search.max_runs + VERIFY_RUNS:
                found = search.round(accuracy, whole, target)
                if not found:
                    break
                accuracy.update(found)
                send_progress(progress, "fidelity", search.runs, search.max_runs, f"{len(accuracy)} layer(s) kept fp32")
                whole = search.measure([n for n in search.layers if n not in accuracy])
            if fid.size(whole) > target:  # still over: what is left goes fp32 too
                accuracy.update({n: fid.size(whole) for n in search.layers if n not in accuracy})
            keep.update({n: ("accuracy", fid.describe(c, budget)) for n, c in accuracy.items()})
            lower()
            d = fid.measure_engine(state["graph"], device, feeds, ref)
            if fid.size(d) <= budget or len(accuracy) == len(search.layers):
                break
            target *= 0.5  # the engine's kernels round differently from the reference's: aim lower
    after = fid.drift(d)
    return {"budget": budget, "drift_before": _rounded(before), "drift": _rounded(after),
            "within_budget": fid.size(d) <= budget, "search_runs": search.runs if search else 0,
            "seconds": round(time.perf_counter() - t0, 3),
            "layers_kept": sum(1 for r, _ in keep.values() if r == "accuracy")}


def regroup(graph: Graph, opt_level: int) -> None:
    """Run the optimization level's final passes (fusion grouping) again on a converted graph."""
    from ..passes.pipeline import passes_for_level

    ctx = PassContext(opt_level=opt_level)
    for p in passes_for_level(opt_level)[1]:
        p(graph, ctx)


def _merged(first: Optional[TuneReport], later: TuneReport) -> TuneReport:
    """The later tuning's choices, with the work of both counted."""
    if first is None:
        return later
    later.timed += first.timed
    later.pruned += first.pruned
    later.compiled += first.compiled
    later.compile_seconds += first.compile_seconds
    later.failures = first.failures + [f for f in later.failures if f not in first.failures]
    later.timings = {**first.timings, **later.timings}
    later.node_ms = later.node_ms or first.node_ms
    later.cast_ms = later.cast_ms or first.cast_ms
    return later


def _rounded(d: dict[str, float]) -> dict[str, Any]:
    return {k: (float(f"{v:.3e}") if math.isfinite(v) else "inf") for k, v in d.items()}
