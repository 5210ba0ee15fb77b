"""IR -> ONNX, for `ember simplify`: the optimized graph written back as a standard ONNX model.

The model is written at the opset of the model it came from (``Graph.opset``), or at the opset
asked for: IR ops carry the newest ONNX semantics, and ``export_opset`` writes each node as the
schema at that opset takes it. ember's fused ops are spelled out as the standard ops they stand
for (a GEMM with its epilogue becomes Gemm or MatMul, then the activation and the residual Add),
so ONNX Runtime or any other consumer can load the result. Fusion-group marks are not written.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...ir.dtypes import DTYPE_TO_ONNX, DType
from ...ir.graph import Graph, Node, Value
from ...ops.fused import CONV_ATTRS, activation_attrs
from .export_opset import NEWEST_OPSET, ExportError, OpsetError, adapt_inputs, first_opset, spell

__all__ = ["EXPORT_OPSET", "ExportError", "OpsetError", "export_onnx", "save_onnx"]

# for a graph that does not say which opset it came from: Attention and RMSNormalization exist,
# and every ONNX Runtime since 1.22 runs it
EXPORT_OPSET = 23


class _Writer:
    def __init__(self, opset: int):
        self.opset = opset
        self.new_inits: list[onnx.TensorProto] = []
        self.used: set[str] = set()
        self.count = 0
        self.consts: dict[str, np.ndarray] = {}  # every constant by name, for inputs that become attributes
        self.read: set[str] = set()  # every value some node or graph output reads

    def fresh(self, hint: str) -> str:
        self.count += 1
        name = f"{hint}__x{self.count}"
        while name in self.used:
            self.count += 1
            name = f"{hint}__x{self.count}"
        self.used.add(name)
        return name

    # -- graphs -------------------------------------------------------------------------------
    def const(self, hint: str, data: np.ndarray) -> str:
        """A new constant (initializer) of the graph being written; returns its name."""
        name = self.fresh(hint)
        self.new_inits.append(self.tensor(name, data))
        self.consts[name] = np.asarray(data)
        return name

    def graph(self, g: Graph, is_main: bool = True) -> onnx.GraphProto:
        self.used.update(v.name for v in g.values())
        if is_main:
            for n in g.all_nodes():
                self.read.update(v.name for v in n.inputs if v is not None)
                for sub in n.subgraphs():
                    self.read.update(v.name for v in sub.outputs)
            self.read.update(v.name for v in g.outputs)
        for v in g.values():
            if v.is_const:
                self.consts[v.name] = v.data
        nodes: list[onnx.NodeProto] = []
        inits = [self.tensor(v.name, v.data) for v in g.initializers.values()]
        extra_inits: list[onnx.TensorProto] = []
        saved, self.new_inits = self.new_inits, extra_inits  # constants the spelled-out fused ops need
        for n in g.nodes:
            nodes.extend(self.node(n))
        self.new_inits = saved
        inputs = [self.value_info(v) for v in g.inputs]
        outputs = [self.value_info(v) for v in g.outputs]
        return helper.make_graph(nodes, g.name, inputs, outputs, inits + extra_inits)

    def value_info(self, v: Value) -> onnx.ValueInfoProto:
        elem = DTYPE_TO_ONNX.get(v.dtype, 0) if v.dtype is not None else 0
        shape = None if v.shape is None else [d if isinstance(d, int) else str(d) for d in v.shape]
        if v.kind == "sequence":
            return helper.make_value_info(v.name, helper.make_sequence_type_proto(
                helper.make_tensor_type_proto(elem, None)))
        if v.kind == "optional":
            return helper.make_value_info(v.name, helper.make_optional_type_proto(
                helper.make_tensor_type_proto(elem, shape)))
        return helper.make_tensor_value_info(v.name, elem, shape)

    def tensor(self, name: str, data: np.ndarray) -> onnx.TensorProto:
        data = np.asarray(data)
        if data.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
            dt = DType(data.dtype.name)
            t = helper.make_tensor(name, DTYPE_TO_ONNX[dt], data.shape,
                                   np.ascontiguousarray(data).tobytes(), raw=True)
            return t
        return numpy_helper.from_array(data, name)

    # -- nodes --------------------------------------------------------------------------------
    def node(self, n: Node) -> list[onnx.NodeProto]:
        if n.op == "ember.Gemm":
            return self._gemm(n)
        if n.op == "ember.Conv":
            return self._conv(n)
        if n.op.startswith("ember."):
            raise ExportError(f"node '{n.name}': op {n.op} has no ONNX spelling yet; simplify at a lower "
                              "--opt-level or open an issue")
        if _schema(n.op, self.opset) is None and first_opset(n.op) is not None:
            return spell(self, n)  # an op newer than the opset written
        return [self.make(n.op, [v.name if v is not None else "" for v in n.inputs],
                          [o.name for o in n.outputs], n.attrs, n.name, n)]

    def make(self, op: str, inputs: list[str], outputs: list[str], attrs: dict[str, Any],
             name: str = "", node: Optional[Node] = None) -> onnx.NodeProto:
        # Range's stash_type (opset 27) only changes float ranges
        self._moot = {("Range", "stash_type"): lambda: node is not None and node.inputs[0] is not None
                      and node.inputs[0].dtype is not None and not node.inputs[0].dtype.is_float}
        while inputs and inputs[-1] == "":
            inputs = inputs[:-1]
        x = node.inputs[0] if node is not None and node.inputs else None
        inputs, attrs = adapt_inputs(op, inputs, attrs, self.opset, self.consts, self.const, name or outputs[0],
                                     x.rank if x is not None else None)
        proto = helper.make_node(op, inputs, outputs, name=name or outputs[0])
        schema = _schema(op, self.opset)
        for k, v in attrs.items():
            if schema is not None and k not in schema.attributes:
                # newer than the export opset, and left at its default (or meaningless here): omit
                if _is_default(op, k, v) or self._moot.get((op, k), lambda: False)():
                    continue
                newest = _schema(op, NEWEST_OPSET)
                error = OpsetError if newest is not None and k in newest.attributes else ExportError
                raise error(f"node '{name}': {op} attribute '{k}'={v!r} does not exist at ONNX opset "
                            f"{self.opset}; it cannot be written to this opset")
            a = self.attribute(k, v, schema, op, name)
            if a is not None:
                proto.attribute.append(a)
        return proto

    def attribute(self, key: str, v: Any, schema, op: str, node: str) -> Optional[onnx.AttributeProto]:
        want = schema.attributes[key].type if schema is not None and key in schema.attributes else None
        T = onnx.AttributeProto
        if v is None:
            return None
        if isinstance(v, Graph):
            return helper.make_attribute(key, self.graph(v, is_main=False))
        if isinstance(v, list) and v and all(isinstance(x, Graph) for x in v):
            return helper.make_attribute(key, [self.graph(x, is_main=False) for x in v])
        if isinstance(v, DType):
            return helper.make_attribute(key, DTYPE_TO_ONNX[v])
        if isinstance(v, np.ndarray):
            return helper.make_attribute(key, self.tensor(f"{node}.{key}", v))
        if want == T.FLOAT:
            return helper.make_attribute(key, float(v))
        if want == T.INT:
            return helper.make_attribute(key, int(v))
        if want == T.FLOATS:
            return helper.make_attribute(key, [float(x) for x in v], attr_type=T.FLOATS)
        if want == T.INTS:
            return helper.make_attribute(key, [int(x) for x in v], attr_type=T.INTS)
        if want == T.STRINGS:
            return helper.make_attribute(key, [str(x) for x in v], attr_type=T.STRINGS)
        if isinstance(v, list) and not v:
            return None
        if isinstance(v, bool):
            v = int(v)
        try:
            return helper.make_attribute(key, v)
        except Exception as e:
            raise ExportError(f"node '{node}' ({op}): attribute '{key}'={v!r} cannot be written to ONNX ({e})") from None

    # -- fused ops spelled out ---------------------------------------------------------------------
    def _epilogue(self, n: Node, y: str, out_name: str) -> list[onnx.NodeProto]:
        nodes = []
        act = n.attrs.get("activation", "")
        residual = n.inputs[3] if len(n.inputs) > 3 else None
        if residual is not None and act and n.attrs.get("act_after_residual"):
            summed = self.fresh(out_name + "_sum")
            nodes.append(self.make("Add", [y, residual.name], [summed], {}, self.fresh(n.name + "_residual")))
            y, residual = summed, None
        if act:
            act_out = out_name if residual is None else self.fresh(out_name + "_act")
            attrs = activation_attrs(n.attrs.get("act_keys"), n.attrs.get("act_values"))
            if act == "Clip":
                nodes.extend(self._clip(y, act_out, attrs, n))
            elif _schema(act, self.opset) is None and first_opset(act) is not None:  # newer than the opset
                like = n.outputs[0]
                nodes.extend(spell(self, Node(act, [Value(y, like.dtype, like.shape)], [Value(act_out)], attrs,
                                              self.fresh(n.name + "_" + act))))
            else:
                nodes.append(self.make(act, [y], [act_out], attrs, self.fresh(n.name + "_" + act)))
            y = act_out
        if residual is not None:
            nodes.append(self.make("Add", [y, residual.name], [out_name], {}, self.fresh(n.name + "_residual")))
            y = out_name
        if y != out_name:
            nodes.append(self.make("Identity", [y], [out_name], {}, self.fresh(n.name + "_out")))
        return nodes

    def _clip(self, y: str, out: str, attrs: dict, n: Node) -> list[onnx.NodeProto]:
        names = []
        for k in ("min", "max"):
            if k in attrs:
                names.append(self.const(f"{n.name}_{k}", np.asarray(attrs[k], dtype=_np_dtype(n.outputs[0]))))
            else:
                names.append("")
        return [self.make("Clip", [y] + names, [out], {}, self.fresh(n.name + "_Clip"))]

    def _gemm(self, n: Node) -> list[onnx.NodeProto]:
        if self._fits_onnx_gemm(n):
            return self._onnx_gemm(n)
        a, w = n.inputs[0].name, n.inputs[1]
        bias = n.inputs[2] if len(n.inputs) > 2 else None
        nodes = []
        b_name = w.name
        if n.attrs.get("trans_b") and w.is_const:  # a transposed weight, not a Transpose node
            b_name = self.const(w.name + "_T", np.ascontiguousarray(np.swapaxes(w.data, -1, -2)))
        elif n.attrs.get("trans_b"):
            b_name = self.fresh(n.name + "_wT")
            rank = len(w.shape) if w.shape is not None else 2
            nodes.append(self.make("Transpose", [w.name], [b_name],
                                   {"perm": list(range(rank - 2)) + [rank - 1, rank - 2]}, self.fresh(n.name + "_T")))
        done = not n.attrs.get("activation") and (len(n.inputs) < 4 or n.inputs[3] is None)
        alpha = n.attrs.get("alpha", 1.0)
        y = n.outputs[0].name if done and bias is None and alpha == 1.0 else self.fresh(n.name + "_mm")
        nodes.append(self.make("MatMul", [a, b_name], [y], {}, n.name))
        if alpha != 1.0:
            s = self.const(n.name + "_alpha", np.asarray(alpha, dtype=_np_dtype(n.outputs[0])))
            y2 = n.outputs[0].name if done and bias is None else self.fresh(n.name + "_scaled")
            nodes.append(self.make("Mul", [y, s], [y2], {}, self.fresh(n.name + "_Mul")))
            y = y2
        if bias is not None:
            y2 = n.outputs[0].name if done else self.fresh(n.name + "_biased")
            nodes.append(self.make("Add", [y, bias.name], [y2], {}, self.fresh(n.name + "_bias")))
            y = y2
        return nodes + ([] if done else self._epilogue(n, y, n.outputs[0].name))

    def _fits_onnx_gemm(self, n: Node) -> bool:
        """ONNX Gemm says it in one node: 2-D operands, a float type, a bias that broadcasts to the
        output (required before opset 11)."""
        a, w = n.inputs[0], n.inputs[1]
        bias = n.inputs[2] if len(n.inputs) > 2 else None
        return (self.opset >= 7 and a.rank == 2 and w.rank == 2 and (bias is not None or self.opset >= 11)
                and (bias is None or (bias.rank is not None and bias.rank <= 2))
                and a.dtype in (DType.FLOAT32, DType.FLOAT16, DType.FLOAT64))

    def _onnx_gemm(self, n: Node) -> list[onnx.NodeProto]:
        bias = n.inputs[2] if len(n.inputs) > 2 else None
        done = not n.attrs.get("activation") and (len(n.inputs) < 4 or n.inputs[3] is None)
        y = n.outputs[0].name if done else self.fresh(n.name + "_gemm")
        attrs: dict[str, Any] = {"transB": 1} if n.attrs.get("trans_b") else {}
        if n.attrs.get("alpha", 1.0) != 1.0:
            attrs["alpha"] = float(n.attrs["alpha"])
        ins = [n.inputs[0].name, n.inputs[1].name] + ([bias.name] if bias is not None else [])
        nodes = [self.make("Gemm", ins, [y], attrs, n.name)]
        return nodes + ([] if done else self._epilogue(n, y, n.outputs[0].name))

    def _conv(self, n: Node) -> list[onnx.NodeProto]:
        attrs = {k: v for k, v in n.attrs.items() if k in CONV_ATTRS}
        done = not n.attrs.get("activation") and (len(n.inputs) < 4 or n.inputs[3] is None)
        y = n.outputs[0].name if done else self.fresh(n.name + "_conv")
        ins = [v.name if v is not None else "" for v in n.inputs[:3]]
        nodes = [self.make("Conv", ins, [y], attrs, n.name)]
        return nodes + ([] if done else self._epilogue(n, y, n.outputs[0].name))


def _np_dtype(v: Value) -> np.dtype:
    from ...ir.dtypes import to_numpy

    return to_numpy(v.dtype) if v.dtype is not None else np.dtype(np.float32)


def _is_default(op: str, key: str, value: Any) -> bool:
    from ...ops import known_ops
    from ...ops import get as get_op

    return op in known_ops() and get_op(op).attrs.get(key, object()) == value


def _schema(op: str, opset: int):
    try:
        return onnx.defs.get_schema(op, opset)
    except Exception:
        return None


def export_onnx(graph: Graph, path: "str | os.PathLike | None" = None, opset: Optional[int] = None,
                producer: str = "ember") -> onnx.ModelProto:
    """Write ``graph`` as an ONNX model (returned; saved to ``path`` when given) at ``opset``
    [default: the opset the graph was imported from]. Raises OpsetError when a node cannot be
    written at that opset."""
    from ... import __version__

    opset = max(opset or graph.opset or EXPORT_OPSET, 1)
    w = _Writer(opset)
    gp = w.graph(graph)
    _drop_unread_initializers(gp)
    model = helper.make_model(gp, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name=producer, producer_version=__version__)
    model.ir_version = min(model.ir_version, 10)  # what ONNX Runtime releases of the last two years read
    if path is not None:
        save_onnx(model, path)
    return model


def save_onnx(model: onnx.ModelProto, path: "str | os.PathLike") -> None:
    try:
        if model.ByteSize() > 1_900_000_000:  # protobuf's 2 GiB limit: weights go next to the model
            onnx.save_model(model, os.fspath(path), save_as_external_data=True,
                            location=os.path.basename(os.fspath(path)) + ".data")
        else:
            onnx.save_model(model, os.fspath(path))
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot write '{os.fspath(path)}': {e}") from None


def _drop_unread_initializers(gp: onnx.GraphProto) -> None:
    """Weights that only a spelled-out node read in their original layout (a transposed GEMM weight)."""
    read = {o.name for o in gp.output} | {i.name for i in gp.input}  # an input's default stays
    work = [gp]
    while work:
        g = work.pop()
        for nd in g.node:
            read.update(nd.input)
            work.extend(a.g for a in nd.attribute if a.type == onnx.AttributeProto.GRAPH)
            work.extend(sub for a in nd.attribute if a.type == onnx.AttributeProto.GRAPHS for sub in a.graphs)
    keep = [t for t in gp.initializer if t.name in read]
    if len(keep) != len(gp.initializer):
        del gp.initializer[:]
        gp.initializer.extend(keep)
