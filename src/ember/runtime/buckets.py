"""Shape buckets: a dynamic batch is padded up to a captured size, as TensorRT-LLM and vLLM do.

A CUDA graph replays one shape. An engine with a dynamic batch dim would need a graph per batch size
it ever sees; instead, a batch of ``n`` runs in the graph of the nearest bucket ``b >= n`` (1, 2, 4, 8,
then multiples of 8 up to 128, then of 32...), with rows ``n..b`` of the inputs left as they are and
the outputs cut back to ``n`` rows.

That is only right when no row of the output depends on another row of the input: the model must
treat the batch dim row by row (convolutions, GEMMs over rows, attention within a sample, norms and
softmax over other axes...). :func:`analyze` proves it op by op, or names the node that mixes rows.
It reads every value's concrete shape at two batch sizes (two plans of the specializer, on meta
tensors), so it needs no symbolic shape inference: the batch axis of a value is the one axis whose
size scales with the batch. Anything it does not know (control flow on batch data, data-dependent
shapes, reductions over the batch, the batch size used as a number on data) means exact shapes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from ..ir.graph import Graph, Node, Value
from ..ir.shapes import as_symbol
from ..ops import get

FREE, SHAPE, ROWS = "free", "shape", "rows"
ALL = frozenset({-1})  # every element of a shape value may depend on the batch size
SIZES = (3, 5)  # the two batch sizes the shapes are read at


@dataclass(frozen=True)
class BucketPlan:
    """How to pad one dynamic dim: the symbol, its axis in each input that has it, and its axis in
    each output that carries it (outputs not listed do not depend on the batch)."""

    symbol: str
    inputs: dict[str, int]
    outputs: dict[str, int]
    lo: int = 1
    hi: int = 1 << 30

    def bucket(self, n: int) -> int:
        """The smallest bucket holding ``n`` rows, within [lo, hi] (``n`` itself above hi)."""
        if n > self.hi:
            return n
        return min(max(bucket_size(n), self.lo), self.hi)


def bucket_size(n: int) -> int:
    """1, 2, 4, 8, then multiples of 8 to 128, of 32 to 512, of 128 beyond: padding stays under half
    of the batch while the number of graphs stays small."""
    if n <= 8:
        return 1 << max(0, math.ceil(math.log2(max(n, 1))))
    step = 8 if n <= 128 else 32 if n <= 512 else 128
    return -(-n // step) * step


@dataclass
class Analysis:
    plan: Optional[BucketPlan]
    reason: str = ""  # why there is no plan
    node: str = ""  # the node that mixes rows, if one does
    detail: dict = field(default_factory=dict)


@dataclass
class _State:
    kind: str  # FREE, SHAPE (shape arithmetic on the batch size), ROWS (batch rows at ``axis``)
    axis: int = -1
    pos: frozenset = frozenset()  # SHAPE: elements (of a 1-D shape vector) that depend on the batch size


class _Mixes(Exception):
    pass


class _Shapes:
    """Concrete shapes of every value at the two batch sizes, and the values the host computed."""

    def __init__(self, a: dict[str, tuple], b: dict[str, tuple], host_a: "dict | None" = None,
                 host_b: "dict | None" = None):
        self.a, self.b = a, b
        self.host_a, self.host_b = host_a or {}, host_b or {}

    def const(self, v: Optional[Value]) -> Optional[list[int]]:
        """A constant input's values, or a host-computed one's when it is the same at both sizes."""
        if v is None:
            return None
        if v.is_const:
            return [int(x) for x in np.asarray(v.data).reshape(-1)]
        for key in (v.name, v.name + "@host"):
            x, y = self.host_a.get(key), self.host_b.get(key)
            if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.device.type == "cpu" \
                    and x.shape == y.shape and torch.equal(x, y) and x.numel() <= 64:
                return [int(t) for t in x.reshape(-1).tolist()]
        return None

    def pair(self, v: Optional[Value]) -> Optional[tuple[tuple, tuple]]:
        if v is None or v.name not in self.a or v.name not in self.b:
            return None
        return tuple(self.a[v.name]), tuple(self.b[v.name])

    def rank(self, v: Optional[Value]) -> int:
        p = self.pair(v)
        return -1 if p is None or len(p[0]) != len(p[1]) else len(p[0])

    def batch_axis(self, v: Value) -> Optional[int]:
        """The axis whose size is the batch times a constant; None if no size changes with the
        batch; -2 if sizes change otherwise (unknown shapes, several axes, not proportional)."""
        p = self.pair(v)
        if p is None or len(p[0]) != len(p[1]):
            return -2
        diff = [i for i, (x, y) in enumerate(zip(*p)) if x != y]
        if not diff:
            return None
        if len(diff) > 1:
            return -2
        i = diff[0]
        x, y = p[0][i], p[1][i]
        if x % SIZES[0] or x * SIZES[1] != y * SIZES[0]:
            return -2
        return i

    def outer(self, v: Value, axis: int) -> tuple[int, int]:
        p = self.pair(v)
        return int(np.prod(p[0][:axis] or (1,))), int(np.prod(p[1][:axis] or (1,)))

    def vec_len(self, v: Optional[Value]) -> Optional[int]:
        p = self.pair(v)
        if p is None or len(p[0]) != 1 or p[0] != p[1]:
            return None
        return p[0][0]


_SHAPES: list["_Shapes"] = []  # the shapes of the analysis in progress (the rules read constants through it)


def _const(node: Node, pos: int) -> Optional[list[int]]:
    if pos >= len(node.inputs) or node.inputs[pos] is None:
        return None
    return _SHAPES[-1].const(node.inputs[pos]) if _SHAPES else None


def _attr_or_const(node: Node, name: str, pos: Optional[int] = None) -> Any:
    if name in node.attrs:
        return node.attrs[name]
    return _const(node, pos) if pos is not None else None


def _norm_axes(axes: Any, rank: int) -> Optional[set[int]]:
    if axes is None:
        return None
    axes = [axes] if isinstance(axes, int) else list(axes)
    return {a + rank if a < 0 else a for a in axes}


_BATCH_FIRST = {"Conv", "ConvTranspose", "ember.Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
                "LpPool", "GlobalLpPool", "InstanceNormalization", "GroupNormalization", "LRN", "DepthToSpace",
                "SpaceToDepth", "Resize", "Upsample", "MeanVarianceNormalization", "GridSample", "MaxUnpool"}
_ALONG_AXIS = {"Softmax", "LogSoftmax", "Hardmax", "LpNormalization", "CumSum", "CumProd", "TopK", "ArgMax", "ArgMin",
               "LayerNormalization", "RMSNormalization"}


def _rule(node: Node, st: list[_State], sh: _Shapes) -> list[int]:
    """The batch axis of each output of a node that has an input carrying rows.
    Raises _Mixes when the node would make one row depend on another."""
    op = node.op
    rows = [i for i, s in enumerate(st) if s.kind == ROWS]
    a = st[rows[0]].axis
    r = sh.rank(node.inputs[rows[0]])
    ranks = [sh.rank(v) for v in node.inputs]
    out_rank = [sh.rank(o) for o in node.outputs]
    if get(op).kind == "pointwise" or op in ("Identity", "Dropout"):
        R = max(out_rank[0], max(ranks))
        aligned = {st[i].axis + (R - ranks[i]) for i in rows}
        if len(aligned) != 1:
            raise _Mixes("its inputs carry the batch on different axes")
        return [aligned.pop()] * len(node.outputs)
    if op in _BATCH_FIRST:
        data = [i for i in rows if not (op == "ember.Conv" and i == 3)]  # ember.Conv's residual is output-shaped
        if data != [0] or any(st[i].axis != 0 for i in rows):
            raise _Mixes("the batch must be axis 0 of its data input")
        return [0] * len(node.outputs)
    if op in _ALONG_AXIS or op.startswith("Reduce"):
        if rows != [0]:
            raise _Mixes("only its data input may carry the batch")
        keep = 1
        if op in ("LayerNormalization", "RMSNormalization"):
            axis = node.attrs.get("axis", -1)
            axes = set(range(axis + r if axis < 0 else axis, r))
        elif op.startswith("Reduce"):
            axes = _norm_axes(_attr_or_const(node, "axes", 1), r)
            keep = node.attrs.get("keepdims", 1)
            if axes is None:
                if len(node.inputs) > 1 and node.inputs[1] is not None:
                    raise _Mixes("its axes are not known before the run")
                if node.attrs.get("noop_with_empty_axes", 0):
                    return [a]
                raise _Mixes("it reduces over every axis")
        elif op in ("CumSum", "CumProd"):
            axes = _norm_axes(_const(node, 1), r)
            if axes is None:
                raise _Mixes("its axis is not known before the run")
        else:
            default = 0 if op in ("ArgMax", "ArgMin") else -1
            axes = _norm_axes(node.attrs.get("axis", default), r)
            if op in ("ArgMax", "ArgMin"):
                keep = node.attrs.get("keepdims", 1)
        if a in axes:
            raise _Mixes("it reduces or normalizes over the batch axis")
        return [a if keep else a - sum(1 for x in axes if x < a)] * len(node.outputs)
    if op == "Transpose":
        perm = node.attrs.get("perm") or list(range(r))[::-1]
        return [list(perm).index(a)]
    if op in ("MatMul", "ember.Gemm", "MatMulInteger"):
        ra, rb, R = ranks[0], ranks[1], out_rank[0]
        out = set()
        for i in rows:
            ax = st[i].axis
            if i == 0:
                if ra < 2 or ax == ra - 1:
                    raise _Mixes("the batch is on the reduced (K) axis")
                out.add(ax + (R - ra))
            elif i == 1:
                if rb <= 2 or ax >= rb - 2:
                    raise _Mixes("the batch is on a matrix axis of the right-hand operand")
                out.add(ax + (R - rb))
            else:  # bias, residual: broadcast like pointwise
                out.add(ax + (R - ranks[i]))
        if len(out) != 1:
            raise _Mixes("its operands carry the batch on different axes")
        return [out.pop()]
    if op == "Gemm":
        if 1 in rows:
            raise _Mixes("the right-hand operand carries the batch")
        if 0 in rows and a != (1 if node.attrs.get("transA", 0) else 0):
            raise _Mixes("the batch is on the reduced (K) axis")
        if 2 in rows and st[2].axis + (2 - ranks[2]) != 0:
            raise _Mixes("the bias carries the batch on another axis")
        return [0]
    if op == "Attention":
        if any(st[i].axis != 0 for i in rows):
            raise _Mixes("the batch must be axis 0 of every operand")
        return [0] * len(node.outputs)
    if op in ("LSTM", "GRU", "RNN"):
        layout = node.attrs.get("layout", 0)
        batch = 1 if layout == 0 else 0
        want = {0: batch, 4: 0, 5: batch, 6: batch}
        if any(want.get(i) != st[i].axis for i in rows):
            raise _Mixes("an input carries the batch on another axis than the recurrence's batch")
        return [2 if layout == 0 else 0] + [batch] * (len(node.outputs) - 1)
    if op in ("Squeeze", "Unsqueeze"):
        axes = _attr_or_const(node, "axes", 1)
        if op == "Squeeze":
            if axes is None:
                if len(node.inputs) > 1 and node.inputs[1] is not None:
                    raise _Mixes("its axes are not known before the run")
                return [a - sum(1 for i in range(a) if sh.pair(node.inputs[0])[0][i] == 1)]
            axes = _norm_axes(axes, r)
            if a in axes:
                raise _Mixes("it squeezes the batch axis")
            return [a - sum(1 for x in axes if x < a)]
        if axes is None:
            raise _Mixes("its axes are not known before the run")
        pos = a
        for x in sorted(_norm_axes(axes, out_rank[0])):
            if x <= pos:
                pos += 1
        return [pos]
    return _view_rule(node, st, sh, rows, a, r, ranks, out_rank)


def _view_rule(node: Node, st: list[_State], sh: _Shapes, rows: list[int], a: int, r: int, ranks: list[int],
               out_rank: list[int]) -> list[int]:
    op = node.op
    if op == "Concat":
        axis = node.attrs["axis"]
        if (axis + r if axis < 0 else axis) == a or any(st[i].axis != a for i in rows):
            raise _Mixes("it concatenates along the batch axis, or its inputs disagree")
        if len(rows) != len([v for v in node.inputs if v is not None]):
            # an input without the batch would have to be batch-sized along it: impossible unless generated
            raise _Mixes("it concatenates batch rows with a tensor that has none")
        return [a]
    if op == "Split":
        axis = node.attrs.get("axis", 0)
        if (axis + r if axis < 0 else axis) == a or rows != [0]:
            raise _Mixes("it splits the batch axis")
        return [a] * len(node.outputs)
    if op in ("Gather", "GatherElements"):
        axis = node.attrs.get("axis", 0)
        axis = axis + r if axis < 0 else axis
        if op == "Gather" and rows == [1]:  # an embedding lookup: rows of indices pick rows of a table
            return [axis + st[1].axis]
        if 0 not in rows or axis == st[0].axis or (op == "Gather" and 1 in rows):
            raise _Mixes("it gathers across the batch")
        if op == "GatherElements":
            return [a]
        return [a if a < axis else a + ranks[1] - 1]
    if op == "Slice":
        starts, ends, axes, steps = _const(node, 1), _const(node, 2), _const(node, 3), _const(node, 4)
        if starts is None or ends is None or rows != [0] or (axes is None and len(node.inputs) > 3
                                                              and node.inputs[3] is not None):
            raise _Mixes("it may slice the batch axis")
        axes = [x + r if x < 0 else x for x in (axes if axes is not None else range(len(starts)))]
        if a in axes:
            i = axes.index(a)
            step = steps[i] if steps is not None and len(node.inputs) > 4 and node.inputs[4] is not None else 1
            if not (step == 1 and (starts[i] == 0 or starts[i] <= -(1 << 24)) and ends[i] >= 1 << 24):
                raise _Mixes("it slices the batch axis")  # a full-range slice is the identity: fine
        return [a]
    if op == "GatherND":
        bd = node.attrs.get("batch_dims", 0)
        if bd < 1 or any(st[i].axis != 0 for i in rows) or a != 0:
            raise _Mixes("it gathers across the batch")
        return [0]
    if op == "Pad":
        pads = _const(node, 1)
        axes = _const(node, 3)
        if pads is None or rows != [0]:
            raise _Mixes("it may pad the batch axis")
        axes = sorted(_norm_axes(axes, r)) if axes is not None else list(range(r))
        if a in axes:
            i = axes.index(a)
            if pads[i] or pads[i + len(axes)]:
                raise _Mixes("it pads the batch axis")
        return [a]
    if op == "Tile":
        reps = _const(node, 1)
        if reps is None or rows != [0] or reps[a] != 1:
            raise _Mixes("it may repeat the batch axis")
        return [a]
    if op == "Expand":
        if rows != [0]:
            raise _Mixes("its shape carries the batch")
        return [a + out_rank[0] - r]
    if op in ("OneHot", "RotaryEmbedding"):
        return [a]
    if op in ("Reshape", "Flatten"):
        if rows != [0]:
            raise _Mixes("its shape carries the batch")
        b = sh.batch_axis(node.outputs[0])
        if b is None or b < 0:
            raise _Mixes("it merges the batch with another dim")
        # rows stay rows when the product of the dims before the batch is the same on both sides
        if sh.outer(node.inputs[0], a) != sh.outer(node.outputs[0], b):
            raise _Mixes("it moves the batch inside another dim")
        return [b]
    raise _Mixes(f"ember does not know how {op} treats the batch")


def _shape_of(node: Node, src: _State, sh: _Shapes) -> _State:
    """Shape(x)/Size(x): which elements of the result depend on the batch size."""
    if src.kind == FREE:
        return _State(FREE)
    if node.op == "Size" or src.kind == SHAPE:
        return _State(SHAPE, pos=ALL)
    r = sh.rank(node.inputs[0])
    if r < 0:
        return _State(SHAPE, pos=ALL)
    start = node.attrs.get("start", 0)
    start = max(0, start + r if start < 0 else start)
    end = node.attrs.get("end")
    end = r if end is None else min(r, end + r if end < 0 else end)
    return _State(SHAPE, pos=frozenset({src.axis - start})) if start <= src.axis < end else _State(FREE)


def _shape_arith(node: Node, st: list[_State], sh: _Shapes) -> frozenset:
    """Elements of a shape-arithmetic result that depend on the batch size (empty: none)."""
    deps = [s.pos if s.kind == SHAPE else frozenset() for s in st]
    first = deps[0] if deps else frozenset()
    if node.op == "Gather" and first and ALL not in first and not any(deps[1:]):
        idx, n = _const(node, 1), sh.vec_len(node.inputs[0])
        if idx is not None and n is not None:
            hit = [j for j, i in enumerate(idx) if (i + n if i < 0 else i) in first]
            return frozenset({0} if hit and sh.rank(node.inputs[1]) == 0 else hit)
    if node.op in ("Cast", "Identity", "Unsqueeze", "Squeeze") and first and not any(deps[1:]):
        return first
    if node.op == "Concat" and ALL not in frozenset().union(*deps):
        out, off = set(), 0
        for v, d in zip(node.inputs, deps):
            n = sh.vec_len(v)
            if n is None:
                return ALL
            out.update(off + j for j in d)
            off += n
        return frozenset(out)
    if node.op == "Slice" and first and ALL not in first and not any(deps[1:]):
        starts, ends, n = _const(node, 1), _const(node, 2), sh.vec_len(node.inputs[0])
        if starts is not None and ends is not None and n is not None and len(starts) == 1:
            lo, hi = starts[0], ends[0]
            lo, hi = (lo + n if lo < 0 else lo), (hi + n if hi < 0 else hi)
            lo, hi = max(0, min(lo, n)), max(0, min(hi, n))
            return frozenset(j - lo for j in first if lo <= j < hi)
    return ALL if any(deps) else frozenset()


_GENERATORS = {"ConstantOfShape": {0}, "Expand": {1}, "Tile": {1}, "Reshape": {1}, "Range": {1}}


def analyze(graph: Graph, shapes_a: dict[str, tuple], shapes_b: dict[str, tuple], symbol: str,
            host_a: "dict | None" = None, host_b: "dict | None" = None) -> Analysis:
    """Whether ``graph`` treats the dim ``symbol`` row by row. ``shapes_a``/``shapes_b``: every value's
    concrete shape with that dim at SIZES[0] and SIZES[1] (other dims equal); ``host_a``/``host_b``:
    the values the host computed at each size (shape parameters such as Pad's pads)."""
    sh = _Shapes(shapes_a, shapes_b, host_a, host_b)
    _SHAPES.append(sh)
    try:
        return _analyze(graph, sh, symbol)
    finally:
        _SHAPES.pop()


def _analyze(graph: Graph, sh: _Shapes, symbol: str) -> Analysis:
    state: dict[int, _State] = {}
    inputs: dict[str, int] = {}
    for v in graph.inputs:
        ax = sh.batch_axis(v)
        if ax == -2:
            return Analysis(None, f"input '{v.name}' uses '{symbol}' in a way ember cannot pad")
        if ax is not None:
            inputs[v.name] = ax
            state[id(v)] = _State(ROWS, ax)
    if not inputs:
        return Analysis(None, f"no input has '{symbol}' as a dim")

    def get_state(v: Optional[Value]) -> _State:
        return _State(FREE) if v is None else state.get(id(v), _State(FREE))

    for node in graph.nodes:
        st = [get_state(v) for v in node.inputs]
        if any(node.subgraphs()):
            captured = [state.get(id(c), _State(FREE)) for sg in node.subgraphs() for c in sg.captured_values()]
            if any(s.kind != FREE for s in st + captured):
                return Analysis(None, "control flow touches the batch", node.name)
            continue
        opdef = get(node.op)
        if node.op in ("Shape", "Size"):
            s0 = _shape_of(node, st[0] if st else _State(FREE), sh)
            for o in node.outputs:
                state[id(o)] = s0
            continue
        if all(s.kind == FREE for s in st):
            continue
        shape_pos = {i for i, s in enumerate(st) if s.kind == SHAPE}
        has_rows = any(s.kind == ROWS for s in st)
        if not has_rows and not (node.op in _GENERATORS and shape_pos <= _GENERATORS[node.op]):
            pos = _shape_arith(node, st, sh)  # shape arithmetic on the batch size
            for o in node.outputs:
                state[id(o)] = _State(SHAPE, pos=pos) if pos else _State(FREE)
            continue
        if has_rows and shape_pos - set(opdef.host_inputs):
            return Analysis(None, "it uses the batch size as a number on batch data", node.name)
        try:
            axes: list[Optional[int]] = _rule(node, st, sh) if has_rows else [None] * len(node.outputs)
        except _Mixes as e:
            return Analysis(None, str(e), node.name)
        for o, ax in zip(node.outputs, axes):
            if o.kind != "tensor":
                return Analysis(None, "it makes a sequence of batch data", node.name)
            b = sh.batch_axis(o)
            if b == -2 or (ax is not None and b != ax):
                return Analysis(None, f"its output '{o.name}' does not keep the batch as one dim", node.name)
            if b is not None:  # generators (no rows in) start rows where their output has the batch
                state[id(o)] = _State(ROWS, b)
    outputs: dict[str, int] = {}
    for v in graph.outputs:
        s = get_state(v)
        if s.kind == SHAPE:
            return Analysis(None, f"output '{v.name}' is computed from the batch size")
        if s.kind == ROWS:
            outputs[v.name] = s.axis
    return Analysis(BucketPlan(symbol, inputs, outputs))


def batch_symbol(graph: Graph) -> Optional[str]:
    """The dim buckets pad: the first input's first dim when it is a named symbol."""
    for v in graph.inputs:
        if v.shape:
            return as_symbol(v.shape[0])
    return None


def analyze_for(interp: Any, feeds: dict[str, Any]) -> Analysis:
    """Analyze ``interp``'s graph for batch padding, with the other dims as in ``feeds``: plans the
    graph twice on meta tensors (batch SIZES[0] and SIZES[1]) and compares every value's shape."""
    from .specialize import specialize

    graph = interp.graph
    symbol = batch_symbol(graph)
    if symbol is None:
        return Analysis(None, "the first input has no named dynamic first dim")
    shapes = []
    for n in SIZES:
        metas = {}
        for v in graph.inputs:
            x = feeds.get(v.name)
            if not isinstance(x, torch.Tensor):
                return Analysis(None, f"input '{v.name}' is not a tensor")
            shape = list(x.shape)
            for i, d in enumerate(v.shape or ()):
                if as_symbol(d) == symbol:
                    shape[i] = n
            if v.name in interp.value_inputs:
                if list(shape) != list(x.shape):
                    return Analysis(None, f"input '{v.name}' is a shape value sized by the batch")
                metas[v.name] = x.detach().cpu()
            else:
                metas[v.name] = torch.empty(shape, dtype=x.dtype, device="meta")
        try:
            spec = specialize(graph, metas, interp.small_consts, torch.device("meta"), interp.value_inputs)
        except Exception as e:
            return Analysis(None, f"the graph cannot be planned at batch {n} ({type(e).__name__}: {e})")
        if spec.tail is not None:
            return Analysis(None, "the plan has data-dependent shapes")
        shapes.append(spec)
    return analyze(graph, shapes[0].shapes, shapes[1].shapes, symbol, shapes[0].host, shapes[1].host)


__all__ = ["Analysis", "BucketPlan", "analyze", "analyze_for", "batch_symbol", "bucket_size"]
