"""`ember inspect`: inputs, outputs and layers of a model or engine, before and after optimization."""
from __future__ import annotations

from typing import Any

from ..ir.graph import Graph, Value
from ..ops import get, known_ops
from ..passes import count_kernels
from .loading import load_graphs


def _value(v: Value) -> dict[str, Any]:
    return {"name": v.name, "dtype": v.dtype.value if v.dtype else None,
            "shape": None if v.shape is None else [d if isinstance(d, int) else str(d) for d in v.shape]}


def epilogue_of(n) -> list[str]:
    """What a fused anchor does after its product: ['bias', 'Gelu', 'residual']."""
    if not n.op.startswith("ember."):
        return []
    parts = []
    if len(n.inputs) > 2 and n.inputs[2] is not None:
        parts.append("bias")
    if len(n.inputs) > 3 and n.inputs[3] is not None:
        parts.append("residual")
    if n.attrs.get("activation"):
        parts.insert(len(parts) if n.attrs.get("act_after_residual") else len(parts) - (parts[-1:] == ["residual"]),
                     n.attrs["activation"])
    return parts


def _buckets(n) -> "dict[str, Any] | None":
    """The node's choice per shape bucket ({"symbol", "buckets": [{"upto", "tactic"}]}), if it has one."""
    from ..runtime.tactic_buckets import BucketChoices

    rec = BucketChoices.of(n)
    return None if rec is None else rec.to_meta()


def layer_rows(g: Graph) -> list[dict[str, Any]]:
    rows = []
    for n in g.nodes:
        rows.append({
            "name": n.name, "op": n.op,
            "kind": get(n.op).kind if n.op in known_ops() else "unknown",
            "inputs": [_value(v) if v is not None else None for v in n.inputs if v is None or not v.is_const],
            "weights": [_value(v) for v in n.inputs if v is not None and v.is_const],
            "outputs": [_value(o) for o in n.outputs],
            "group": n.meta.get("group"),
            "epilogue": epilogue_of(n),
            "tactic": n.meta.get("tactic"),
            "tactic_buckets": _buckets(n),
        })
    return rows


def inspect_model(model: Any, opt_level: int = 2) -> dict[str, Any]:
    """A JSON-ready description: IO, per-layer rows, and node counts before/after optimization."""
    loaded = load_graphs(model, opt_level)
    g = loaded.optimized
    groups = sorted({n.meta["group"] for n in g.nodes if "group" in n.meta})
    info: dict[str, Any] = {
        "source": loaded.source, "kind": loaded.kind,
        "opt_level": loaded.manifest.get("opt_level", opt_level) if loaded.kind == "engine" else opt_level,
        "inputs": [_value(v) for v in g.inputs],
        "outputs": [_value(v) for v in g.outputs],
        "nodes_in": loaded.nodes_in,
        "nodes_out": count_kernels(g),
        "ir_nodes_out": len(g.nodes),
        "fusion_groups": len(groups),
        "anchors": sum(1 for n in g.nodes if n.op in known_ops() and get(n.op).kind == "anchor"),
        "op_counts_in": loaded.imported.op_counts() if loaded.imported is not None else None,
        "op_counts_out": g.op_counts(),
        "passes": loaded.passes,
        "layers": layer_rows(g),
    }
    if loaded.kind == "engine":
        info["manifest"] = {k: loaded.manifest.get(k) for k in ("ember_version", "device", "precision", "backend")}
    from .plan_report import graph_plan, representative_shapes

    shapes, where = representative_shapes(g, loaded.manifest if loaded.kind == "engine" else None)
    info["cuda_graph"] = graph_plan(g, shapes) | {"shapes_from": where}
    return info
