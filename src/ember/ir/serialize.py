"""Graph <-> JSON-ready dict plus a flat dict of arrays (constants and tensor attributes).

The JSON holds only data: names, op names, attributes of plain types, shapes as strings for
symbolic dims. Arrays go to the weights file. Nothing here evaluates code.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .dtypes import DType
from .graph import Graph, Node, Value
from .shapes import parse_dim


def _shape_out(shape):
    return None if shape is None else [d if isinstance(d, int) else str(d) for d in shape]


def _value_out(v: Value) -> dict:
    d: dict[str, Any] = {"name": v.name, "dtype": v.dtype.value if v.dtype else None, "shape": _shape_out(v.shape)}
    if v.kind != "tensor":
        d["kind"] = v.kind
    return d


def graph_to_json(g: Graph, arrays: "dict[str, np.ndarray] | None" = None) -> tuple[dict, dict[str, np.ndarray]]:
    arrays = {} if arrays is None else arrays

    def attr_out(node: Node, key: str, v: Any) -> Any:
        if isinstance(v, Graph):
            return {"$graph": graph_to_json(v, arrays)[0]}
        if isinstance(v, np.ndarray):
            k = f"attr/{node.name}/{key}/{len(arrays)}"
            arrays[k] = v
            return {"$tensor": k}
        if isinstance(v, (list, tuple)):
            return [attr_out(node, f"{key}.{i}", x) for i, x in enumerate(v)]
        if isinstance(v, float) and not math.isfinite(v):
            return {"$float": repr(v)}
        if isinstance(v, (np.integer,)):
            return int(v)
        if isinstance(v, (np.floating,)):
            return attr_out(node, key, float(v))
        if isinstance(v, DType):
            return {"$dtype": v.value}
        return v

    consts = []
    for name, v in g.initializers.items():
        arrays[f"const/{name}"] = v.data
        consts.append(_value_out(v))
    nodes = []
    for n in g.nodes:
        nd: dict[str, Any] = {
            "name": n.name, "op": n.op,
            "inputs": [v.name if v is not None else None for v in n.inputs],
            "outputs": [_value_out(o) for o in n.outputs],
        }
        if n.attrs:
            nd["attrs"] = {k: attr_out(n, k, v) for k, v in n.attrs.items()}
        if n.meta:
            nd["meta"] = {k: attr_out(n, f"meta.{k}", v) for k, v in n.meta.items()}
        nodes.append(nd)
    obj = {
        "name": g.name, "opset": g.opset,
        "inputs": [_value_out(v) for v in g.inputs],
        "constants": consts,
        "nodes": nodes,
        "outputs": [v.name for v in g.outputs],
    }
    if g.metadata:
        obj["metadata"] = g.metadata
    return obj, arrays


class FormatError(ValueError):
    """The graph JSON does not describe a valid graph."""


def graph_from_json(obj: dict, arrays: dict[str, np.ndarray], outer: "dict[str, Value] | None" = None) -> Graph:
    scope: dict[str, Value] = dict(outer or {})

    def value_in(d: dict) -> Value:
        shape = d.get("shape")
        return Value(d["name"], DType(d["dtype"]) if d.get("dtype") else None,
                     None if shape is None else tuple(parse_dim(x) for x in shape), kind=d.get("kind", "tensor"))

    def attr_in(v: Any) -> Any:
        if isinstance(v, dict):
            if "$graph" in v:
                return graph_from_json(v["$graph"], arrays, scope)
            if "$tensor" in v:
                return arrays[v["$tensor"]]
            if "$float" in v:
                return float(v["$float"])
            if "$dtype" in v:
                return DType(v["$dtype"])
            raise FormatError(f"unknown attribute encoding {sorted(v)}")
        if isinstance(v, list):
            return [attr_in(x) for x in v]
        return v

    try:
        g = Graph(name=obj["name"], opset=obj.get("opset", 0), metadata=obj.get("metadata", {}))
        for d in obj["inputs"]:
            v = value_in(d)
            g.inputs.append(v)
            scope[v.name] = v
        for d in obj["constants"]:
            v = value_in(d)
            v.data = arrays[f"const/{v.name}"]
            g.initializers[v.name] = v
            scope[v.name] = v
        for nd in obj["nodes"]:
            ins = [scope[n] if n is not None else None for n in nd["inputs"]]
            outs = [value_in(d) for d in nd["outputs"]]
            attrs = {k: attr_in(v) for k, v in nd.get("attrs", {}).items()}
            node = Node(nd["op"], ins, outs, attrs, nd["name"], {k: attr_in(v) for k, v in nd.get("meta", {}).items()})
            for o in outs:
                o.producer = node
                scope[o.name] = o
            g.nodes.append(node)
        g.outputs = [scope[n] for n in obj["outputs"]]
    except KeyError as e:
        raise FormatError(f"graph '{obj.get('name', '?')}' refers to {e}, which it never defines") from None
    except (TypeError, ValueError) as e:
        raise FormatError(f"graph '{obj.get('name', '?')}' is malformed: {e}") from None
    return g
