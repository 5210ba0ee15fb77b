"""Whether a model runs as one CUDA graph, and if not, which nodes break it and why.

Plans the graph for representative input shapes on meta tensors (no weights are touched, no kernel
runs), exactly as a run of that signature would be planned (runtime/specialize.py), and reports the
plan's breaks: host steps (data read on the host: an If on a data condition, a shape parameter
computed from data) and data-dependent shapes (NonZero, NonMaxSuppression...), after which the rest of
the graph is planned per run.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..ir.graph import Graph
from ..ops.torch_types import tensor_from_numpy, to_torch
from ..runtime.specialize import HOST_LIMIT, specialize, value_inputs


def representative_shapes(graph: Graph, manifest: Optional[dict] = None) -> tuple[dict[str, tuple], str]:
    """Input shapes to plan with, and where they come from: the first profile's opt shapes, the
    static shapes the engine was built for, the shapes it was tuned at, else 1 for unnamed dims."""
    manifest = manifest or {}
    profiles = manifest.get("profiles") or []
    if profiles:
        return {k: tuple(v[1]) for k, v in profiles[0].items()} | _fixed(graph), "the first profile's opt shapes"
    for key, what in (("static_shapes", "the static shapes it was built for"), ("tuned_shapes", "the shapes it was tuned at")):
        if manifest.get(key):
            return {k: tuple(v) for k, v in manifest[key].items()} | _fixed(graph, manifest[key]), what
    out = {}
    for v in graph.inputs:
        out[v.name] = tuple(d if isinstance(d, int) else 1 for d in (v.shape or ()))
    dynamic = any(not isinstance(d, int) for v in graph.inputs for d in (v.shape or ()))
    return out, ("dynamic dims at 1 (give shapes to plan at others)" if dynamic else "the model's static shapes")


def _fixed(graph: Graph, given: Optional[dict] = None) -> dict[str, tuple]:
    """Inputs not named in ``given``: their static shapes (dynamic dims 1)."""
    given = given or {}
    return {v.name: tuple(d if isinstance(d, int) else 1 for d in (v.shape or ())) for v in graph.inputs
            if v.name not in given}


def graph_plan(graph: Graph, shapes: dict[str, tuple], values: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Plan ``graph`` for ``shapes`` (``values``: values of value inputs, zeros where not given)."""
    vins = value_inputs(graph)
    feeds: dict[str, Any] = {}
    for v in graph.inputs:
        shape = tuple(shapes.get(v.name) or ())
        dtype = to_torch(v.dtype) if v.dtype is not None else torch.float32
        if v.name in vins:
            x = (values or {}).get(v.name)
            feeds[v.name] = torch.as_tensor(x).to(dtype).reshape(shape) if x is not None else torch.zeros(shape, dtype=dtype)
        else:
            feeds[v.name] = torch.empty(shape, dtype=dtype, device="meta")
    small = {k: tensor_from_numpy(c.data) for k, c in _consts(graph).items() if c.data is not None and c.data.size <= HOST_LIMIT}
    try:
        spec = specialize(graph, feeds, small, torch.device("meta"), vins)
    except Exception as e:
        return {"shapes": {k: list(s) for k, s in shapes.items()}, "planned": False,
                "error": f"{type(e).__name__}: {e}", "one_graph": None, "breaks": [], "value_inputs": sorted(vins)}
    host_steps = sum(1 for s in spec.steps if s.host)
    segments = _segments(spec.steps)
    return {
        "shapes": {k: list(s) for k, s in shapes.items()}, "planned": True,
        "one_graph": spec.capturable, "segments": segments, "host_steps": host_steps,
        "tail": spec.tail is not None, "breaks": [b.to_json() for b in spec.breaks],
        "unrolled_control_flow": spec.unrolled, "folded_on_host": spec.folded, "steps": len(spec.steps),
        "value_inputs": sorted(vins),
    }


def _segments(steps: list) -> int:
    n, inside = 0, False
    for s in steps:
        if s.host:
            inside = False
        elif not inside:
            n, inside = n + 1, True
    return n


def _consts(graph: Graph) -> dict:
    out = dict(graph.initializers)
    for n in graph.nodes:
        for sg in n.subgraphs():
            out.update(_consts(sg))
    return out


def describe(plan: dict[str, Any]) -> str:
    """One line for a terminal."""
    if not plan.get("planned"):
        return f"could not be planned at these shapes ({plan.get('error')})"
    if plan["one_graph"]:
        extra = f"; {plan['unrolled_control_flow']} control-flow node(s) decided on the host" if plan["unrolled_control_flow"] else ""
        return f"runs as one CUDA graph ({plan['steps']} steps{extra})"
    parts = [f"{b['node']} ({b['op']}): {b['reason']}" for b in plan["breaks"][:4]]
    more = " …" if len(plan["breaks"]) > 4 else ""
    return (f"runs as {plan['segments']} captured segment(s) around {plan['host_steps']} host step(s)"
            + (", then planned per run shape after a data-dependent step" if plan["tail"] else "")
            + "; broken by: " + "; ".join(parts) + more)


__all__ = ["describe", "graph_plan", "representative_shapes"]
