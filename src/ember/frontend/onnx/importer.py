"""ONNX -> IR.

Loads a model (with clear errors for corrupt files and missing external data), then converts
every node through the converter registry, collecting every unsupported node before failing.
Value names are made unique across the whole model (subgraphs included), so later stages can
key values by name.
"""
from __future__ import annotations

import itertools
import os
from typing import Any, Optional

import numpy as np
import onnx
from onnx import numpy_helper

from ...errors import ModelLoadError, UnsupportedOpError
from ...ir.dtypes import ONNX_TO_DTYPE, DType
from ...ir.graph import Graph, Node, Value
from ...ir.shapes import Dim, Sym
from ...ops import REQUIRED, get, known_ops
from .registry import find_converter

MIN_OPSET, MAX_OPSET = 7, 28
DEFAULT_DOMAINS = ("", "ai.onnx")
# dim names that exporters write for "unknown", not as a name shared between axes
ANONYMOUS_DIMS = ("", "?", "-1", "None", "none", "unk", "unknown")


# -- loading --------------------------------------------------------------------------------------
def load_model(src: "str | os.PathLike | bytes | onnx.ModelProto") -> tuple[onnx.ModelProto, str]:
    """Read an ONNX model and its external data. Returns (model, base directory)."""
    if isinstance(src, onnx.ModelProto):
        return src, os.getcwd()
    if isinstance(src, (bytes, bytearray)):
        try:
            return onnx.load_from_string(bytes(src)), os.getcwd()
        except Exception as e:
            raise ModelLoadError(f"the bytes given are not a valid ONNX model ({type(e).__name__}: {e})") from None
    path = os.fspath(src)
    if not os.path.exists(path):
        raise ModelLoadError(f"model file '{path}' does not exist")
    if os.path.isdir(path):
        raise ModelLoadError(f"'{path}' is a directory; give the path of the .onnx file")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:
        raise ModelLoadError(
            f"'{path}' is not a valid ONNX model: the protobuf could not be parsed ({type(e).__name__}: {e}). "
            "Is the file complete? Re-export or re-download it.") from None
    if not model.graph.node and not model.graph.output:
        raise ModelLoadError(f"'{path}' parsed as an empty ONNX model (no nodes, no outputs): "
                             "it is probably not an ONNX file")
    base = os.path.dirname(os.path.abspath(path))
    _load_external_data(model, base, path)
    return model, base


def _all_tensors(model: onnx.ModelProto):
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(model)


def _load_external_data(model: onnx.ModelProto, base: str, path: str) -> None:
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    for t in _all_tensors(model):
        if not uses_external_data(t):
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        full = os.path.normpath(os.path.join(base, loc))
        if not os.path.isfile(full):
            raise ModelLoadError(
                f"tensor '{t.name}' of '{path}' keeps its data in external file '{loc}', which was not found "
                f"at '{full}'. Keep the data file next to the model (as exported), or re-export with "
                "the weights inside the model.")
        try:
            load_external_data_for_tensor(t, base)
        except Exception as e:
            raise ModelLoadError(f"external data of tensor '{t.name}' in '{full}' could not be read: {e}") from None
        t.data_location = onnx.TensorProto.DEFAULT
        del t.external_data[:]


def model_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in DEFAULT_DOMAINS:
            return o.version
    return 1 if model.ir_version < 3 else MAX_OPSET


# -- types ----------------------------------------------------------------------------------------
def _dims(tt: onnx.TypeProto.Tensor, name: str) -> Optional[tuple[Dim, ...]]:
    """The declared shape. A dim with a name (dim_param) is that symbol; a dim with no name, a
    placeholder name (``?``), or declared <= 0 (Paddle's exporter writes -1 for "any size"), is a
    fresh symbol of its own, named after its value and axis (``x_dim0``)."""
    if not tt.HasField("shape"):
        return None
    out: list[Dim] = []
    for axis, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value") and d.dim_value > 0:
            out.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param.strip() not in ANONYMOUS_DIMS:
            out.append(Sym.named(d.dim_param))
        else:
            out.append(Sym.named(f"{name}_dim{axis}"))
    return tuple(out)


def apply_type(v: Value, tp: onnx.TypeProto) -> None:
    kind = tp.WhichOneof("value")
    if kind == "tensor_type":
        v.kind = "tensor"
        v.dtype = ONNX_TO_DTYPE.get(tp.tensor_type.elem_type)
        v.shape = _dims(tp.tensor_type, v.name)
    elif kind == "sequence_type":
        v.kind = "sequence"
        inner = tp.sequence_type.elem_type
        if inner.WhichOneof("value") == "tensor_type":
            v.dtype = ONNX_TO_DTYPE.get(inner.tensor_type.elem_type)
    elif kind == "optional_type":
        v.kind = "optional"
        inner = tp.optional_type.elem_type
        if inner.WhichOneof("value") == "tensor_type":
            v.dtype = ONNX_TO_DTYPE.get(inner.tensor_type.elem_type)
            v.shape = _dims(inner.tensor_type, v.name)


def type_to_str(tp: onnx.TypeProto) -> str:
    kind = tp.WhichOneof("value")
    if kind == "tensor_type":
        dt = ONNX_TO_DTYPE.get(tp.tensor_type.elem_type)
        return f"tensor({dt.value if dt else tp.tensor_type.elem_type})"
    if kind == "sequence_type":
        return f"seq({type_to_str(tp.sequence_type.elem_type)})"
    if kind == "optional_type":
        return f"optional({type_to_str(tp.optional_type.elem_type)})"
    return "unknown"


# -- conversion -----------------------------------------------------------------------------------
class Scope:
    """ONNX name -> Value, chained to the enclosing graph's scope."""

    def __init__(self, parent: "Scope | None" = None):
        self.parent = parent
        self.names: dict[str, Value] = {}

    def lookup(self, name: str) -> Optional[Value]:
        s: Optional[Scope] = self
        while s is not None:
            if name in s.names:
                return s.names[name]
            s = s.parent
        return None


class Importer:
    def __init__(self, model: onnx.ModelProto, path: str = "<memory>"):
        self.model = model
        self.path = path
        self.opset = model_opset(model)
        self.used: set[str] = set()
        self.unsupported: list[tuple[str, str, str, int, str]] = []
        self.value_info: dict[str, onnx.TypeProto] = {}
        self._ids = itertools.count()

    def unique(self, name: str) -> str:
        base = name or "v"
        n = base
        while n in self.used:
            n = f"{base}__{next(self._ids)}"
        self.used.add(n)
        return n

    def run(self) -> Graph:
        g = self.convert_graph(self.model.graph, None, "main")
        if self.unsupported:
            raise UnsupportedOpError([(n, op, d, v) for n, op, d, v, _ in self.unsupported], self.path,
                                     reasons=[r for *_, r in self.unsupported])
        g.opset = self.opset
        g.metadata.update({
            "producer": f"{self.model.producer_name} {self.model.producer_version}".strip(),
            "ir_version": self.model.ir_version,
            "onnx_opset": self.opset,
        })
        return g

    def convert_graph(self, gp: onnx.GraphProto, parent: Optional[Scope], name: str,
                      graph_inputs_are_formal: bool = False) -> Graph:
        scope = Scope(parent)
        g = Graph(name=gp.name or name, opset=self.opset)
        for vi in list(gp.value_info) + list(gp.output):
            self.value_info.setdefault(vi.name, vi.type)
        init_names = {t.name for t in gp.initializer} | {s.values.name for s in gp.sparse_initializer}
        for t in gp.initializer:
            try:
                scope.names[t.name] = g.add_const(self.unique(t.name), _tensor_to_numpy(t))
            except _Unsupported as e:  # a string table: listed with the unsupported nodes
                self.unsupported.append((t.name, "initializer", "", self.opset, str(e)))
                scope.names[t.name] = Value(self.unique(t.name))
        for st in gp.sparse_initializer:
            dense = numpy_helper.to_array(onnx.helper.make_tensor(
                st.values.name, st.values.data_type, list(st.dims),
                _sparse_to_dense(st).ravel().tolist()))
            scope.names[st.values.name] = g.add_const(self.unique(st.values.name), dense)
        for vi in gp.input:
            if vi.name in init_names and not graph_inputs_are_formal:
                continue  # old-style models list initializers as inputs: they are constants here
            v = Value(self.unique(vi.name))
            apply_type(v, vi.type)
            g.inputs.append(v)
            scope.names[vi.name] = v
        for np_ in _topological(gp.node):
            self.convert_node(np_, g, scope)
        for vo in gp.output:
            v = scope.lookup(vo.name)
            if v is None:
                raise ModelLoadError(f"graph '{g.name}' output '{vo.name}' is produced by no node: the model is malformed")
            if v.dtype is None or v.shape is None:
                tmp = Value(v.name)
                apply_type(tmp, vo.type)
                v.dtype = v.dtype or tmp.dtype
                v.shape = v.shape if v.shape is not None else tmp.shape
                if tmp.kind != "tensor":
                    v.kind = tmp.kind
            g.outputs.append(v)
        return g

    def convert_node(self, np_: onnx.NodeProto, g: Graph, scope: Scope) -> None:
        b = NodeBuilder(self, np_, g, scope)
        domain = np_.domain
        name = np_.name or (np_.output[0] if np_.output else np_.op_type)
        if domain not in DEFAULT_DOMAINS:
            self.unsupported.append((name, np_.op_type, domain, self._domain_opset(domain), "custom domain"))
            b.define_outputs_unconverted()
            return
        fn = find_converter(np_.op_type, self.opset)
        try:
            if fn is not None:
                fn(b)
            elif np_.op_type in known_ops():
                b.emit_default()
            else:
                raise _Unsupported("op not implemented")
        except _Unsupported as e:
            self.unsupported.append((name, np_.op_type, domain, self.opset, str(e)))
            b.define_outputs_unconverted()

    def _domain_opset(self, domain: str) -> int:
        for o in self.model.opset_import:
            if o.domain == domain:
                return o.version
        return 0


class _Unsupported(Exception):
    pass


def _names_read(np_: onnx.NodeProto) -> set[str]:
    """What a node reads: its inputs, and what its subgraphs read from enclosing scopes."""
    out = {x for x in np_.input if x}
    for a in np_.attribute:
        for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for n in sub.node:
                out |= _names_read(n)
    return out


def _topological(nodes) -> list[onnx.NodeProto]:
    """The nodes in an order where each comes after the nodes it reads from (ONNX requires it, some
    exporters do not keep it; ONNX Runtime sorts). The file's order where it is already valid."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps = [sorted({producer[x] for x in _names_read(n) if x in producer} - {i}) for i, n in enumerate(nodes)]
    if all(d < i for i, ds in enumerate(deps) for d in ds):
        return list(nodes)
    order: list[int] = []
    state = [0] * len(nodes)  # 0 new, 1 on the stack, 2 placed
    for root in range(len(nodes)):
        if state[root]:
            continue
        state[root] = 1
        stack = [(root, iter(deps[root]))]
        while stack:
            i, it = stack[-1]
            nxt = next((d for d in it if state[d] == 0), None)
            if nxt is not None:
                state[nxt] = 1
                stack.append((nxt, iter(deps[nxt])))
                continue
            stack.pop()
            state[i] = 2
            order.append(i)
    return [nodes[i] for i in order]  # a cycle keeps some reader first: its missing input is reported


class NodeBuilder:
    """What a converter sees: the ONNX node, and ways to emit IR nodes and constants."""

    def __init__(self, imp: Importer, np_: onnx.NodeProto, g: Graph, scope: Scope):
        self.imp, self.proto, self.graph, self.scope = imp, np_, g, scope
        self.opset = imp.opset
        self.name = np_.name or (np_.output[0] if np_.output else np_.op_type)
        self._attrs: Optional[dict[str, Any]] = None

    # inputs & attributes
    @property
    def num_inputs(self) -> int:
        return len(self.proto.input)

    def input(self, i: int) -> Optional[Value]:
        if i >= len(self.proto.input) or not self.proto.input[i]:
            return None
        v = self.scope.lookup(self.proto.input[i])
        if v is None:
            raise ModelLoadError(f"node '{self.name}' ({self.proto.op_type}) reads '{self.proto.input[i]}', "
                                 "which no node, input or initializer defines: the model is malformed")
        return v

    def inputs(self) -> list[Optional[Value]]:
        return [self.input(i) for i in range(len(self.proto.input))]

    def attrs(self) -> dict[str, Any]:
        if self._attrs is None:
            self._attrs = {a.name: self._attr_value(a) for a in self.proto.attribute}
        return self._attrs

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs().get(name, default)

    def _attr_value(self, a: onnx.AttributeProto) -> Any:
        T = onnx.AttributeProto
        if a.ref_attr_name:
            raise _Unsupported(f"attribute '{a.name}' refers to a function attribute")
        if a.type == T.FLOAT:
            return float(a.f)
        if a.type == T.INT:
            return int(a.i)
        if a.type == T.STRING:
            return a.s.decode("utf-8", errors="replace")
        if a.type == T.FLOATS:
            return [float(x) for x in a.floats]
        if a.type == T.INTS:
            return [int(x) for x in a.ints]
        if a.type == T.STRINGS:
            return [s.decode("utf-8", errors="replace") for s in a.strings]
        if a.type == T.TENSOR:
            return _tensor_to_numpy(a.t)
        if a.type == T.SPARSE_TENSOR:
            return _sparse_to_dense(a.sparse_tensor)
        if a.type == T.GRAPH:
            return self.imp.convert_graph(a.g, self.scope, f"{self.name}.{a.name}", graph_inputs_are_formal=True)
        if a.type == T.GRAPHS:
            return [self.imp.convert_graph(x, self.scope, f"{self.name}.{a.name}{i}", True)
                    for i, x in enumerate(a.graphs)]
        if a.type == T.TYPE_PROTO:
            return type_to_str(a.tp)
        if a.type == T.TENSORS:
            return [_tensor_to_numpy(t) for t in a.tensors]
        raise _Unsupported(f"attribute '{a.name}' has a type ember does not read ({a.type})")

    # emitting
    def const(self, data: "np.ndarray | list | int | float", dtype: "str | None" = None, hint: str = "c") -> Value:
        arr = np.asarray(data, dtype=dtype) if dtype else np.asarray(data)
        return self.graph.add_const(self.imp.unique(f"{self.name}/{hint}"), arr)

    def const_i64(self, data: Any, hint: str = "c") -> Value:
        return self.const(np.asarray(data, dtype=np.int64), hint=hint)

    def tmp(self, hint: str = "t") -> Value:
        return Value(self.imp.unique(f"{self.name}/{hint}"))

    def emit(self, op: str, inputs: list[Optional[Value]], attrs: "dict[str, Any] | None" = None,
             outputs: "list[Value] | int | None" = None) -> Node:
        """Emit an IR node. outputs=None: the ONNX node's own outputs (its final node)."""
        if op not in known_ops():
            raise _Unsupported(f"IR op '{op}' is not implemented")
        if outputs is None:
            outs = self.node_outputs()
        elif isinstance(outputs, int):
            outs = [self.tmp() for _ in range(outputs)]
        else:
            outs = outputs
        opdef = get(op)
        attrs = dict(attrs or {})
        problems = opdef.check_attrs(attrs)
        if problems:
            raise _Unsupported("; ".join(problems))
        while inputs and inputs[-1] is None:
            inputs = inputs[:-1]
        if len(inputs) < opdef.min_inputs or (opdef.max_inputs() is not None and len(inputs) > opdef.max_inputs()):
            raise _Unsupported(f"{len(inputs)} inputs given; the IR op takes "
                               f"{opdef.min_inputs}..{opdef.max_inputs() or 'any'}")
        node = Node(op, list(inputs), outs, attrs, name=self.name if outputs is None else f"{self.name}/{op}")
        for o in outs:
            o.producer = node
        self.graph.nodes.append(node)
        return node

    def emit_default(self) -> Node:
        return self.emit(self.proto.op_type, self.inputs(), self.attrs())

    def node_outputs(self) -> list[Value]:
        outs = []
        for i, name in enumerate(self.proto.output):
            v = Value(self.imp.unique(name or f"{self.name}/unused{i}"))
            tp = self.imp.value_info.get(name) if name else None
            if tp is not None:
                apply_type(v, tp)
            if name:
                self.scope.names[name] = v
            outs.append(v)
        return outs

    def alias_output(self, i: int, v: Value) -> None:
        """Make ONNX output i an alias of an existing value (no node emitted)."""
        self.scope.names[self.proto.output[i]] = v

    def define_outputs_unconverted(self) -> None:
        for name in self.proto.output:
            if name:
                self.scope.names[name] = Value(self.imp.unique(name))

    def unsupported(self, why: str) -> None:
        raise _Unsupported(why)


def _tensor_to_numpy(t: onnx.TensorProto) -> np.ndarray:
    if t.data_type == onnx.TensorProto.STRING:
        raise _Unsupported(f"tensor '{t.name}' holds strings, which ember does not run")
    if t.data_type not in ONNX_TO_DTYPE:
        name = onnx.TensorProto.DataType.Name(t.data_type)
        raise _Unsupported(f"tensor '{t.name}' has element type {name}, which ember does not run")
    try:
        a = numpy_helper.to_array(t)
    except Exception as e:  # data shorter or longer than the dims say, a raw buffer of the wrong size
        raise ModelLoadError(
            f"tensor '{t.name or '(unnamed)'}' declares shape {list(t.dims)} ({_elements(t.dims)} elements), "
            f"but its data cannot be read as that ({type(e).__name__}: {e}); the model file is damaged or "
            "was written by a faulty exporter: re-export it") from None
    dt = ONNX_TO_DTYPE[t.data_type]
    if dt in (DType.BFLOAT16, DType.FLOAT8E4M3, DType.FLOAT8E5M2):
        from ...ir.dtypes import to_numpy

        a = a.astype(to_numpy(dt)) if a.dtype != to_numpy(dt) else a
    return a


def _elements(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _sparse_to_dense(st: onnx.SparseTensorProto) -> np.ndarray:
    values = numpy_helper.to_array(st.values)
    dense = np.zeros(tuple(st.dims), dtype=values.dtype)
    idx = numpy_helper.to_array(st.indices)
    if idx.ndim == 1:
        dense.reshape(-1)[idx] = values
    else:
        dense[tuple(idx.T)] = values
    return dense


def import_onnx(src: "str | os.PathLike | bytes | onnx.ModelProto") -> Graph:
    """Load and convert an ONNX model into an IR graph (shapes inferred where ONNX can)."""
    model, _ = load_model(src)
    path = os.fspath(src) if isinstance(src, (str, os.PathLike)) else "<model>"
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:
        inferred = model
    imp = Importer(inferred, path)
    if not (1 <= imp.opset <= MAX_OPSET):
        raise ModelLoadError(f"'{path}' uses ONNX opset {imp.opset}; ember reads opsets {MIN_OPSET}..{MAX_OPSET}")
    return imp.run()
