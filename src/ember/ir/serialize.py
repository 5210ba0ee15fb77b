"""Graph <-> JSON-ready dict plus a flat dict of arrays (constants and tensor attributes).

The JSON holds only data: names, op names, attributes of plain types, and shapes whose symbolic
dims are written as their expression trees (``{"sym": "batch"}``, ``{"mul": [2, {"sym": "h"}]}``),
never as text to parse. Arrays go to the weights file. Nothing here evaluates code.

Reading trusts nothing: every field is checked for its type, and a malformed file raises
``FormatError`` naming the graph, node and field, never a raw Python error. Nesting (dim
expressions, subgraphs, attribute lists) is bounded, so hostile input cannot exhaust the stack.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from .dtypes import DType
from .graph import Graph, Node, Value
from .shapes import Dim, Sym
from .shapes import build as build_dim

MAX_DIM_DEPTH = 100  # nesting of one dim expression; real models stay under ~20
MAX_GRAPH_DEPTH = 16  # If/Loop/Scan bodies inside each other
MAX_ATTR_DEPTH = 8  # lists (and dicts) inside each other in one attribute
DIM_OPS = ("add", "mul", "floordiv", "mod", "min", "max")
VALUE_KINDS = ("tensor", "sequence", "optional")


class FormatError(ValueError):
    """The graph JSON does not describe a valid graph."""


# -- dims -----------------------------------------------------------------------------------------
def dim_to_json(d: Dim) -> Any:
    """An int, or the expression tree: {"sym": name} or {op: [operand, ...]}."""
    if isinstance(d, int):
        return d
    if d.op == "sym":
        return {"sym": d.args[0]}
    return {d.op: [dim_to_json(a) for a in d.args]}


def dim_from_json(x: Any, where: str = "dim", depth: int = 0) -> Dim:
    """The dim ``dim_to_json`` wrote; FormatError (naming ``where``) for anything else."""
    if isinstance(x, int) and not isinstance(x, bool):
        if not -2**63 <= x < 2**63:
            raise FormatError(f"{where}: {x} is out of the int64 range")
        return x
    if isinstance(x, str):
        raise FormatError(f"{where}: dim {x!r} is text; dims are ints or expression objects "
                          "(an engine from an older ember: rebuild it)")
    if not isinstance(x, dict) or len(x) != 1:
        raise FormatError(f"{where}: a dim is an int or an object with one key "
                          f"('sym' or one of {', '.join(DIM_OPS)}), not {_describe(x)}")
    if depth >= MAX_DIM_DEPTH:
        raise FormatError(f"{where}: dim expression nested deeper than {MAX_DIM_DEPTH} levels")
    (op, arg), = x.items()
    if op == "sym":
        if not isinstance(arg, str):
            raise FormatError(f"{where}: 'sym' names a symbol with a string, not {_describe(arg)}")
        return Sym.named(arg)
    if op not in DIM_OPS:
        raise FormatError(f"{where}: unknown dim operator {op!r}; known: sym, {', '.join(DIM_OPS)}")
    if not isinstance(arg, list) or not arg or (op in ("floordiv", "mod") and len(arg) != 2):
        want = "2 operands" if op in ("floordiv", "mod") else "a non-empty list of operands"
        raise FormatError(f"{where}: '{op}' takes {want}, not {_describe(arg)}")
    args = [dim_from_json(a, where, depth + 1) for a in arg]
    try:
        return build_dim(op, args)
    except ZeroDivisionError:
        raise FormatError(f"{where}: '{op}' divides by zero") from None


def shape_to_json(shape: "tuple[Dim, ...] | None") -> "list | None":
    return None if shape is None else [dim_to_json(d) for d in shape]


def shape_from_json(x: Any, where: str) -> "tuple[Dim, ...] | None":
    if x is None:
        return None
    if not isinstance(x, list):
        raise FormatError(f"{where}: 'shape' must be a list of dims or null, not {_describe(x)}")
    return tuple(dim_from_json(d, f"{where}, axis {i}") for i, d in enumerate(x))


def _describe(x: Any) -> str:
    if isinstance(x, (dict, list)):
        return f"a {type(x).__name__} of {len(x)}"
    text = repr(x)
    return f"{type(x).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


# -- writing --------------------------------------------------------------------------------------
def _value_out(v: Value) -> dict:
    for d in v.shape or ():
        if isinstance(d, Sym) and d.depth > MAX_DIM_DEPTH:
            raise FormatError(f"value '{v.name}': dim {d} is nested deeper than {MAX_DIM_DEPTH} levels, "
                              "which engine files do not store")
    d: dict[str, Any] = {"name": v.name, "dtype": v.dtype.value if v.dtype else None, "shape": shape_to_json(v.shape)}
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
        if isinstance(v, dict):
            return {"$dict": {str(k): attr_out(node, f"{key}.{k}", x) for k, x in v.items()}}
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


# -- reading --------------------------------------------------------------------------------------
def _field(d: dict, key: str, types: "type | tuple[type, ...]", where: str, what: str,
           default: Any = ...) -> Any:
    if key not in d:
        if default is ...:
            raise FormatError(f"{where}: field '{key}' is missing")
        return default
    x = d[key]
    if not isinstance(x, types) or isinstance(x, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise FormatError(f"{where}: field '{key}' must be {what}, not {_describe(x)}")
    return x


def _list_of(d: dict, key: str, where: str, what: str, ok, default: Any = ...) -> list:
    x = _field(d, key, list, where, f"a list of {what}", default)
    for item in x:
        if not ok(item):
            raise FormatError(f"{where}: field '{key}' must be a list of {what}; it holds {_describe(item)}")
    return x


def _is_str(x: Any) -> bool:
    return isinstance(x, str)


def _reader(arrays: dict[str, np.ndarray]):
    """graph_from_json's recursive reader over one arrays dict."""

    def value_in(d: Any, where: str) -> Value:
        if not isinstance(d, dict):
            raise FormatError(f"{where}: a value is an object with 'name', 'dtype' and 'shape', not {_describe(d)}")
        name = _field(d, "name", str, where, "a string")
        where = f"{where} ('{name}')"
        dt = _field(d, "dtype", (str, type(None)), where, "a dtype name or null", None)
        kind = _field(d, "kind", str, where, f"one of {', '.join(VALUE_KINDS)}", "tensor")
        if kind not in VALUE_KINDS:
            raise FormatError(f"{where}: field 'kind' must be one of {', '.join(VALUE_KINDS)}, not {kind!r}")
        try:
            dtype = DType(dt) if dt else None
        except ValueError:
            raise FormatError(f"{where}: field 'dtype' names no ember dtype: {dt!r}") from None
        return Value(name, dtype, shape_from_json(d.get("shape"), where), kind=kind)

    def attr_in(v: Any, where: str, depth: int, graph_depth: int, scope: dict[str, Value]) -> Any:
        if depth > MAX_ATTR_DEPTH:
            raise FormatError(f"{where}: lists nested deeper than {MAX_ATTR_DEPTH} levels")
        if isinstance(v, dict):
            if len(v) != 1:
                raise FormatError(f"{where}: an encoded attribute has one key ($graph, $tensor, $float, $dtype, "
                                  f"$dict), not {sorted(map(str, v))[:5]}")
            (tag, x), = v.items()
            if tag == "$graph":
                return graph_in(x, scope, where, graph_depth + 1)
            if tag == "$tensor":
                if not isinstance(x, str) or x not in arrays:
                    raise FormatError(f"{where}: tensor {_describe(x)} is not in the weights")
                return arrays[x]
            if tag == "$float":
                try:
                    return float(x)
                except (TypeError, ValueError):
                    raise FormatError(f"{where}: '$float' holds {_describe(x)}, not a float's text") from None
            if tag == "$dtype":
                try:
                    return DType(x)
                except (TypeError, ValueError):
                    raise FormatError(f"{where}: '$dtype' holds {_describe(x)}, not an ember dtype") from None
            if tag == "$dict":
                if not isinstance(x, dict):
                    raise FormatError(f"{where}: '$dict' holds {_describe(x)}, not an object")
                return {k: attr_in(y, f"{where}.{k}", depth + 1, graph_depth, scope) for k, y in x.items()}
            raise FormatError(f"{where}: unknown attribute encoding {tag!r}")
        if isinstance(v, list):
            return [attr_in(x, f"{where}[{i}]", depth + 1, graph_depth, scope) for i, x in enumerate(v)]
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        raise FormatError(f"{where}: {_describe(v)} is not an attribute value")

    def graph_in(obj: Any, outer: dict[str, Value], where: str, depth: int) -> Graph:
        if depth > MAX_GRAPH_DEPTH:
            raise FormatError(f"{where}: subgraphs nested deeper than {MAX_GRAPH_DEPTH} levels")
        if not isinstance(obj, dict):
            raise FormatError(f"{where}: a graph is an object, not {_describe(obj)}")
        name = _field(obj, "name", str, where, "a string")
        gw = f"graph '{name}'" if depth == 0 else f"{where}: graph '{name}'"
        g = Graph(name=name, opset=_field(obj, "opset", int, gw, "an int", 0),
                  metadata=_field(obj, "metadata", dict, gw, "an object", {}))
        scope: dict[str, Value] = dict(outer)
        for i, d in enumerate(_field(obj, "inputs", list, gw, "a list of values")):
            v = value_in(d, f"{gw}, input {i}")
            g.inputs.append(v)
            scope[v.name] = v
        for i, d in enumerate(_field(obj, "constants", list, gw, "a list of values")):
            v = value_in(d, f"{gw}, constant {i}")
            key = f"const/{v.name}"
            if key not in arrays:
                raise FormatError(f"{gw}, constant {i} ('{v.name}'): its data '{key}' is not in the weights")
            v.data = arrays[key]
            g.initializers[v.name] = v
            scope[v.name] = v
        for i, nd in enumerate(_field(obj, "nodes", list, gw, "a list of nodes")):
            g.nodes.append(node_in(nd, scope, f"{gw}, node {i}", depth))
        g.outputs = []
        for out in _list_of(obj, "outputs", gw, "strings", _is_str):
            if out not in scope:
                raise FormatError(f"{gw}: output '{out}' is defined by no input, constant or node")
            g.outputs.append(scope[out])
        return g

    def node_in(nd: Any, scope: dict[str, Value], where: str, depth: int) -> Node:
        if not isinstance(nd, dict):
            raise FormatError(f"{where}: a node is an object, not {_describe(nd)}")
        name = _field(nd, "name", str, where, "a string")
        where = f"{where} ('{name}')"
        op = _field(nd, "op", str, where, "a string")
        ins: list[Optional[Value]] = []
        for x in _list_of(nd, "inputs", where, "strings (or null for a missing input)",
                          lambda x: x is None or isinstance(x, str)):
            if x is not None and x not in scope:
                raise FormatError(f"{where}: input '{x}' is defined by no input, constant or earlier node")
            ins.append(None if x is None else scope[x])
        outs = [value_in(d, f"{where}, output {i}")
                for i, d in enumerate(_field(nd, "outputs", list, where, "a list of values"))]
        attrs = {k: attr_in(v, f"{where}, attribute '{k}'", 0, depth, scope)
                 for k, v in _field(nd, "attrs", dict, where, "an object", {}).items()}
        meta = {k: attr_in(v, f"{where}, meta '{k}'", 0, depth, scope)
                for k, v in _field(nd, "meta", dict, where, "an object", {}).items()}
        node = Node(op, ins, outs, attrs, name, meta)
        for o in outs:
            o.producer = node
            scope[o.name] = o
        return node

    return graph_in


def graph_from_json(obj: Any, arrays: dict[str, np.ndarray], outer: "dict[str, Value] | None" = None) -> Graph:
    """The graph ``graph_to_json`` wrote. ``outer``: values of enclosing graphs a subgraph may read."""
    return _reader(arrays)(obj, dict(outer or {}), "graph.json", 0)
