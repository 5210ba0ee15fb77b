"""Writing IR nodes at the ONNX opset of the model they came from.

IR ops carry the newest ONNX semantics (the importer normalizes every opset to them). An older
opset differs from that in three ways, and each is handled by reading the ONNX schemas:

* a parameter that became an input (ReduceMean's ``axes`` at 18, Squeeze's at 13, Clip's
  ``min``/``max`` at 11, Pad's ``pads`` at 11...): a constant input goes back into the attribute
  the older schema has;
* a parameter that is new (Cast's ``saturate``, Reshape's ``allowzero``, Pad's ``axes``...): left
  out when it holds the value that means "as before";
* an op that did not exist yet, which ember's optimizer creates by recognizing a pattern (Gelu,
  Swish, HardSwish, LayerNormalization, RMSNormalization): spelled out as the standard ops it
  stands for, the same nodes the pattern was recognized from.

Anything else is an :class:`OpsetError` naming the node, the op and the opset it needs, so the
caller can write a less optimized graph or ask for a newer opset.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import onnx

from ...errors import EmberError

if TYPE_CHECKING:
    from ...ir.graph import Node
    from .exporter import _Writer

NEWEST_OPSET = onnx.defs.onnx_opset_version()


class ExportError(EmberError):
    """The IR graph holds something ONNX cannot express."""


class OpsetError(ExportError):
    """A node cannot be written at the target opset: its op is newer, or changed in a way that has
    no spelling at that opset."""


# an IR input that an older opset takes as an attribute of another name
_ATTRIBUTE_NAME = {("Pad", "constant_value"): "value", ("TopK", "K"): "k"}
# below these opsets the op's meaning differs (not only its signature), so it is not written there
_MEANING_SINCE = {"Resize": 11, "Scan": 9}
# the softmax family computed over a flattened 2-D view before opset 13
_COERCED_TO_2D = ("Softmax", "LogSoftmax", "Hardmax")


def schema(op: str, opset: int) -> Optional[Any]:
    try:
        return onnx.defs.get_schema(op, opset)
    except Exception:  # onnx raises SchemaError; an unknown op is simply not an ONNX op
        return None


def first_opset(op: str) -> Optional[int]:
    """The opset an ONNX op first appeared at (None if ONNX has no such op)."""
    s = schema(op, NEWEST_OPSET)
    if s is None:
        return None
    v = s.since_version
    while (older := schema(op, v - 1)) is not None:
        v = older.since_version
    return v


def adapt_inputs(op: str, inputs: list[str], attrs: dict[str, Any], opset: int, consts: dict[str, np.ndarray],
                 new_const: Callable[[str, np.ndarray], str], node: str,
                 rank: Optional[int]) -> tuple[list[str], dict[str, Any]]:
    """The inputs and attributes of an ``op`` node with IR semantics, as the schema at ``opset``
    takes them (``consts``: the constant values by name; ``new_const`` adds one). Raises OpsetError
    if that schema cannot say the same thing."""
    old, new = schema(op, opset), schema(op, NEWEST_OPSET)
    if old is None or new is None or old.since_version == new.since_version:
        return inputs, attrs
    if opset < _MEANING_SINCE.get(op, 0):
        raise OpsetError(f"node '{node}': {op} before opset {_MEANING_SINCE[op]} means something else; "
                         f"it cannot be written at opset {opset}")
    attrs = dict(attrs)
    if op in _COERCED_TO_2D and opset < 13:
        axis = int(attrs.get("axis", -1))
        if axis != -1 and (rank is None or axis != rank - 1):
            raise OpsetError(f"node '{node}': {op} over axis {axis} of a rank-{rank} tensor has no spelling "
                             f"before opset 13 (it then flattened the trailing dims)")
        attrs["axis"] = -1
    formal = [p.name for p in new.inputs]
    if formal and new.inputs[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
        return inputs, attrs  # Concat, Sum, Max...: their inputs never changed into attributes
    old_formal = [p.name for p in old.inputs]
    # IR inputs by the older schema's name: the same name, or the same place when the older name
    # is gone from the newer schema (BatchNormalization's mean became input_mean)
    renamed = {k: old_formal[i] for i, k in enumerate(formal)
               if k not in old_formal and i < len(old_formal) and old_formal[i] not in formal}
    given = {renamed.get(formal[i], formal[i]): name for i, name in enumerate(inputs) if i < len(formal) and name}
    for key, name in given.items():
        if key in old_formal:
            continue
        attr = _ATTRIBUTE_NAME.get((op, key), key)
        if attr in old.attributes and name in consts:
            attrs[attr] = _attribute_value(consts[name], old.attributes[attr].type)
        elif not _moot_input(op, key, consts.get(name), rank):
            raise OpsetError(f"node '{node}': {op} input '{key}' has no place at opset {opset}"
                             + ("" if name in consts else " unless it is a constant"))
    out = [given.get(k, "") for k in old_formal]
    for i, p in enumerate(old.inputs):
        if not out[i] and p.option == onnx.defs.OpSchema.FormalParameterOption.Single:
            if (op, p.name) != ("Resize", "roi"):
                raise OpsetError(f"node '{node}': {op} needs input '{p.name}' at opset {opset}")
            out[i] = new_const(node + "_roi", np.zeros(0, np.float32))  # roi matters only to crop-and-resize
    while out and not out[-1]:
        out.pop()
    return out, attrs


def _attribute_value(data: np.ndarray, kind: int) -> Any:
    T = onnx.AttributeProto
    flat = np.asarray(data).reshape(-1)
    if kind == T.INTS:
        return [int(x) for x in flat]
    if kind == T.FLOATS:
        return [float(x) for x in flat]
    if kind == T.INT:
        return int(flat[0])
    if kind == T.FLOAT:
        return float(flat[0])
    return np.asarray(data)


def _moot_input(op: str, key: str, data: Optional[np.ndarray], rank: Optional[int]) -> bool:
    """An input an older opset lacks, holding the value that means what the older op did."""
    if data is None:
        return False
    flat = np.asarray(data).reshape(-1)
    if (op, key) == ("Slice", "steps"):
        return bool(np.all(flat == 1))
    if (op, key) == ("Pad", "axes"):
        return rank is not None and sorted(int(a) % rank for a in flat) == list(range(rank))
    if (op, key) == ("Resize", "roi"):
        return flat.size == 0
    return False


# -- ops newer than the target opset, spelled out --------------------------------------------------
def spell(w: "_Writer", n: "Node") -> list[onnx.NodeProto]:
    """Write ``n``, whose op does not exist at ``w.opset``, as the standard ops it stands for."""
    fn = SPELLINGS.get(n.op)
    since = first_opset(n.op)
    if fn is None or any(o.name in w.read for o in n.outputs[1:]):
        raise OpsetError(f"node '{n.name}': {n.op} exists from ONNX opset {since} on; the model is written at "
                         f"opset {w.opset}, where it has no spelling")
    return fn(w, n)


def _typed(n: "Node", value: float) -> np.ndarray:
    from ...ir.dtypes import to_numpy

    x = n.inputs[0]
    dtype = to_numpy(x.dtype) if x is not None and x.dtype is not None else np.dtype(np.float32)
    return np.asarray(value, dtype=dtype)


def _swish(w: "_Writer", n: "Node") -> list[onnx.NodeProto]:
    x, y = n.inputs[0].name, n.outputs[0].name
    alpha = float(n.attrs.get("alpha", 1.0))
    nodes = []
    s_in = x
    if alpha != 1.0:
        s_in = w.fresh(n.name + "_ax")
        nodes.append(w.make("Mul", [x, w.const(n.name + "_alpha", _typed(n, alpha))], [s_in], {}, w.fresh(n.name)))
    s = w.fresh(n.name + "_sigmoid")
    nodes.append(w.make("Sigmoid", [s_in], [s], {}, w.fresh(n.name)))
    nodes.append(w.make("Mul", [x, s], [y], {}, n.name))
    return nodes


def _hardswish(w: "_Writer", n: "Node") -> list[onnx.NodeProto]:
    x, y, h = n.inputs[0].name, n.outputs[0].name, w.fresh(n.name + "_hardsigmoid")
    return [w.make("HardSigmoid", [x], [h], {"alpha": 1 / 6, "beta": 0.5}, w.fresh(n.name)),
            w.make("Mul", [x, h], [y], {}, n.name)]


def _chain(w: "_Writer", n: "Node", steps: list[tuple[str, list[Any], dict[str, Any]]]) -> list[onnx.NodeProto]:
    """Nodes in sequence; an input written as a float is a constant of the input's dtype, as
    "$k" the output of step k, as a str a value name. The last step writes the node's output."""
    outs: list[str] = []
    nodes = []
    for i, (op, args, attrs) in enumerate(steps):
        ins = []
        for a in args:
            if isinstance(a, float):
                ins.append(w.const(f"{n.name}_c", _typed(n, a)))
            elif isinstance(a, str) and a.startswith("$"):
                ins.append(outs[int(a[1:])])
            elif isinstance(a, np.ndarray):
                ins.append(w.const(f"{n.name}_c", a))
            else:
                ins.append(a)
        last = i == len(steps) - 1
        out = n.outputs[0].name if last else w.fresh(f"{n.name}_{op}")
        nodes.append(w.make(op, ins, [out], attrs, n.name if last else w.fresh(n.name)))
        outs.append(out)
    return nodes


def _gelu(w: "_Writer", n: "Node") -> list[onnx.NodeProto]:
    x = n.inputs[0].name
    if n.attrs.get("approximate", "none") == "tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        return _chain(w, n, [("Pow", [x, 3.0], {}), ("Mul", ["$0", 0.044715], {}), ("Add", [x, "$1"], {}),
                             ("Mul", ["$2", float(np.sqrt(2 / np.pi))], {}), ("Tanh", ["$3"], {}),
                             ("Add", ["$4", 1.0], {}), ("Mul", [x, "$5"], {}), ("Mul", ["$6", 0.5], {})])
    return _chain(w, n, [("Div", [x, float(np.sqrt(2.0))], {}), ("Erf", ["$0"], {}), ("Add", ["$1", 1.0], {}),
                         ("Mul", [x, "$2"], {}), ("Mul", ["$3", 0.5], {})])


def _norm_axes(n: "Node") -> np.ndarray:
    axis = int(n.attrs.get("axis", -1))
    x = n.inputs[0]
    if axis < 0:
        return np.arange(axis, 0, dtype=np.int64)
    if x.shape is None:
        raise OpsetError(f"node '{n.name}': {n.op} over axis {axis} of a tensor of unknown rank has no spelling "
                         "at this opset")
    return np.arange(axis, len(x.shape), dtype=np.int64)


def _stashed(n: "Node") -> bool:
    from ...ir.dtypes import DType

    x = n.inputs[0]
    return (int(n.attrs.get("stash_type", 1)) == 1 and x.dtype is not None
            and x.dtype not in (DType.FLOAT32, DType.FLOAT64))


def _layernorm(w: "_Writer", n: "Node") -> list[onnx.NodeProto]:
    if _stashed(n):
        raise OpsetError(f"node '{n.name}': LayerNormalization of {n.inputs[0].dtype} computed in float32 has no "
                         f"spelling before opset 17")
    axes, eps = _norm_axes(n), float(n.attrs.get("epsilon", 1e-5))
    x, scale = n.inputs[0].name, n.inputs[1].name
    bias = n.inputs[2].name if len(n.inputs) > 2 and n.inputs[2] is not None else None
    steps: list[tuple[str, list[Any], dict[str, Any]]] = [
        ("ReduceMean", [x, axes], {}), ("Sub", [x, "$0"], {}), ("Mul", ["$1", "$1"], {}),
        ("ReduceMean", ["$2", axes], {}), ("Add", ["$3", eps], {}), ("Sqrt", ["$4"], {}), ("Div", ["$1", "$5"], {}),
        ("Mul", ["$6", scale], {})]
    if bias is not None:
        steps.append(("Add", ["$7", bias], {}))
    return _chain(w, n, steps)


def _rmsnorm(w: "_Writer", n: "Node") -> list[onnx.NodeProto]:
    if _stashed(n):
        raise OpsetError(f"node '{n.name}': RMSNormalization of {n.inputs[0].dtype} computed in float32 has no "
                         f"spelling before opset 23")
    axes, eps = _norm_axes(n), float(n.attrs.get("epsilon", 1e-5))
    x, scale = n.inputs[0].name, n.inputs[1].name
    return _chain(w, n, [("Mul", [x, x], {}), ("ReduceMean", ["$0", axes], {}), ("Add", ["$1", eps], {}),
                         ("Sqrt", ["$2"], {}), ("Div", [x, "$3"], {}), ("Mul", ["$4", scale], {})])


SPELLINGS: dict[str, Callable[["_Writer", "Node"], list[onnx.NodeProto]]] = {
    "Swish": _swish, "HardSwish": _hardswish, "Gelu": _gelu, "LayerNormalization": _layernorm,
    "RMSNormalization": _rmsnorm,
}
