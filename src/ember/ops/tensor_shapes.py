"""Symbolic shape rules of the layout, shape and indexing ops.

Shape-like inputs (Reshape's shape, Slice's starts, Unsqueeze's axes...) must be constants for an
exact rule; when they are computed at run time the rule answers with fresh unknown dims of the
right rank where it can, so that downstream rules still know ranks.
"""
from __future__ import annotations

from typing import Optional

from ..ir.dtypes import ONNX_TO_DTYPE, DType, from_numpy
from ..ir.graph import Node, Value
from ..ir.shapes import Dim, Sym, floordiv
from .index import slice_bounds
from .infer import TypeInfo, fresh_dim, same_as_input
from .registry import shape_rule

BIG = 2**31 - 1  # exporters write INT_MAX / INT64_MAX for "to the end"


def const_ints(v: Optional[Value]) -> Optional[list[int]]:
    if v is None or not v.is_const:
        return None
    return [int(x) for x in v.data.reshape(-1).tolist()]


def product(dims) -> Dim:
    n: Dim = 1
    for d in dims:
        n = n * d
    return n


def divide_numel(total: Dim, known: list[Dim]) -> Dim:
    """total // prod(known), dividing the int part first so that batch*seq*768 // (batch*64) simplifies."""
    ints = product(d for d in known if isinstance(d, int))
    out = floordiv(total, ints) if ints != 1 else total
    for d in known:
        if isinstance(d, Sym):
            out = floordiv(out, d)
    return out


def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


def _one(dtype, shape) -> list[TypeInfo]:
    return [(dtype, tuple(shape) if shape is not None else None)]


# -- layout ---------------------------------------------------------------------------------------
@shape_rule("Reshape")
def reshape_rule(node: Node) -> list[TypeInfo]:
    x, target = node.inputs[0], const_ints(node.inputs[1])
    if target is None:
        n = node.inputs[1].shape
        rank_known = n is not None and len(n) == 1 and isinstance(n[0], int)
        return _one(x.dtype, tuple(fresh_dim() for _ in range(n[0])) if rank_known else None)
    allowzero = node.attrs.get("allowzero", 0)
    dims: list[Dim] = []
    for i, d in enumerate(target):
        if d == 0 and not allowzero:
            if x.shape is None:
                return _one(x.dtype, None)
            dims.append(x.shape[i])
        else:
            dims.append(d)
    if -1 in dims:
        if x.shape is None:
            return _one(x.dtype, None)
        k = dims.index(-1)
        dims[k] = divide_numel(product(x.shape), [d for i, d in enumerate(dims) if i != k])
    return _one(x.dtype, dims)


@shape_rule("Transpose")
def transpose_rule(node: Node) -> list[TypeInfo]:
    x = node.inputs[0]
    if x.shape is None:
        return _one(x.dtype, None)
    perm = node.attrs.get("perm") or list(range(len(x.shape) - 1, -1, -1))
    return _one(x.dtype, [x.shape[p] for p in perm])


@shape_rule("Concat")
def concat_rule(node: Node) -> list[TypeInfo]:
    ins = [v for v in node.inputs if v is not None]
    if any(v.shape is None for v in ins):
        return _one(ins[0].dtype, None)
    rank = len(ins[0].shape)
    a = _axis(node.attrs["axis"], rank)
    out = list(ins[0].shape)
    for i in range(rank):  # prefer a static dim where some input has one
        if i != a and not isinstance(out[i], int):
            out[i] = next((v.shape[i] for v in ins if isinstance(v.shape[i], int)), out[i])
    total: Dim = 0
    for v in ins:
        total = total + v.shape[a]
    out[a] = total
    return _one(ins[0].dtype, out)


@shape_rule("Squeeze")
def squeeze_rule(node: Node) -> list[TypeInfo]:
    x = node.inputs[0]
    axes_v = node.inputs[1] if len(node.inputs) > 1 else None
    if x.shape is None:
        return _one(x.dtype, None)
    if axes_v is None:
        if not all(isinstance(d, int) for d in x.shape):
            return _one(x.dtype, None)  # a symbolic dim might be 1
        return _one(x.dtype, [d for d in x.shape if d != 1])
    axes = const_ints(axes_v)
    if axes is None:
        return _one(x.dtype, None)
    drop = {_axis(a, len(x.shape)) for a in axes}
    return _one(x.dtype, [d for i, d in enumerate(x.shape) if i not in drop])


@shape_rule("Unsqueeze")
def unsqueeze_rule(node: Node) -> list[TypeInfo]:
    x, axes = node.inputs[0], const_ints(node.inputs[1])
    if x.shape is None or axes is None:
        return _one(x.dtype, None)
    rank = len(x.shape) + len(axes)
    out = list(x.shape)
    for a in sorted(_axis(a, rank) for a in axes):
        out.insert(a, 1)
    return _one(x.dtype, out)


@shape_rule("Flatten")
def flatten_rule(node: Node) -> list[TypeInfo]:
    x = node.inputs[0]
    if x.shape is None:
        return _one(x.dtype, None)
    a = _axis(node.attrs.get("axis", 1), len(x.shape))
    return _one(x.dtype, [product(x.shape[:a]), product(x.shape[a:])])


@shape_rule("Expand")
def expand_rule(node: Node) -> list[TypeInfo]:
    x, target = node.inputs[0], const_ints(node.inputs[1])
    if x.shape is None or target is None:
        return _one(x.dtype, None)
    rank = max(len(x.shape), len(target))
    a = [1] * (rank - len(x.shape)) + list(x.shape)
    b = [1] * (rank - len(target)) + target
    return _one(x.dtype, [bd if ad == 1 else ad for ad, bd in zip(a, b)])


@shape_rule("Tile")
def tile_rule(node: Node) -> list[TypeInfo]:
    x, reps = node.inputs[0], const_ints(node.inputs[1])
    if x.shape is None or reps is None:
        return _one(x.dtype, None)
    return _one(x.dtype, [d * r for d, r in zip(x.shape, reps)])


@shape_rule("Split")
def split_rule(node: Node) -> list[TypeInfo]:
    x = node.inputs[0]
    n = len(node.outputs)
    if x.shape is None:
        return [(x.dtype, None)] * n
    a = _axis(node.attrs.get("axis", 0), len(x.shape))
    dim = x.shape[a]
    split_v = node.inputs[1] if len(node.inputs) > 1 else None
    sizes: Optional[list[Dim]] = const_ints(split_v) if split_v is not None else None
    if sizes is None and split_v is None:
        parts = node.attrs.get("num_outputs") or n
        if isinstance(dim, int):
            chunk = -(-dim // parts)
            sizes = [min(chunk, max(dim - i * chunk, 0)) for i in range(parts)]
        elif node.attrs.get("num_outputs"):  # uneven allowed: the last part is the smaller one
            chunk = floordiv(dim + (parts - 1), parts)
            sizes = [chunk] * (parts - 1) + [dim - (parts - 1) * chunk]
        else:  # an even split (older opsets require it)
            sizes = [floordiv(dim, parts)] * parts
    if sizes is None:
        sizes = [fresh_dim() for _ in range(n)]
    outs = []
    for s in sizes[:n]:
        shape = list(x.shape)
        shape[a] = s
        outs.append((x.dtype, tuple(shape)))
    return outs


@shape_rule("Pad")
def pad_rule(node: Node) -> list[TypeInfo]:
    x, pads = node.inputs[0], const_ints(node.inputs[1])
    axes_v = node.inputs[3] if len(node.inputs) > 3 else None
    if x.shape is None or pads is None:
        return _one(x.dtype, None if x.shape is None else [fresh_dim() for _ in x.shape])
    rank = len(x.shape)
    axes = const_ints(axes_v) if axes_v is not None else list(range(rank))
    if axes is None:
        return _one(x.dtype, [fresh_dim() for _ in x.shape])
    out = list(x.shape)
    for i, a in enumerate(axes):
        a = _axis(a, rank)
        out[a] = out[a] + pads[i] + pads[i + len(axes)]
    return _one(x.dtype, out)


@shape_rule("DepthToSpace", "SpaceToDepth")
def depth_space_rule(node: Node) -> list[TypeInfo]:
    x = node.inputs[0]
    if x.shape is None:
        return _one(x.dtype, None)
    b, c, h, w = x.shape
    bs = node.attrs["blocksize"]
    if node.op == "DepthToSpace":
        return _one(x.dtype, [b, floordiv(c, bs * bs), h * bs, w * bs])
    return _one(x.dtype, [b, c * bs * bs, floordiv(h, bs), floordiv(w, bs)])


@shape_rule("CenterCropPad")
def center_crop_pad_rule(node: Node) -> list[TypeInfo]:
    x, target = node.inputs[0], const_ints(node.inputs[1])
    if x.shape is None or target is None:
        return _one(x.dtype, None)
    rank = len(x.shape)
    axes = node.attrs.get("axes") or list(range(rank))
    out = list(x.shape)
    for a, t in zip(axes, target):
        out[_axis(a, rank)] = t
    return _one(x.dtype, out)


# -- shape ops ------------------------------------------------------------------------------------
@shape_rule("Shape")
def shape_rule_(node: Node) -> list[TypeInfo]:
    x = node.inputs[0]
    if x.shape is None:
        return _one(DType.INT64, [fresh_dim()])
    r = len(x.shape)
    start, end = node.attrs.get("start", 0), node.attrs.get("end")
    lo = start + r if start < 0 else start
    hi = r if end is None else (end + r if end < 0 else end)
    lo, hi = min(max(lo, 0), r), min(max(hi, 0), r)
    return _one(DType.INT64, [max(hi - lo, 0)])


@shape_rule("Size")
def size_rule(node: Node) -> list[TypeInfo]:
    return _one(DType.INT64, ())


@shape_rule("ConstantOfShape")
def constant_of_shape_rule(node: Node) -> list[TypeInfo]:
    value = node.attrs.get("value")
    dtype = from_numpy(value.dtype) if value is not None else DType.FLOAT32
    dims = const_ints(node.inputs[0])
    if dims is not None:
        return _one(dtype, dims)
    s = node.inputs[0].shape
    if s is not None and len(s) == 1 and isinstance(s[0], int):
        return _one(dtype, [fresh_dim() for _ in range(s[0])])
    return _one(dtype, None)


@shape_rule("Range")
def range_rule(node: Node) -> list[TypeInfo]:
    start = node.inputs[0]
    vals = [v.data.reshape(()).item() if v.is_const else None for v in node.inputs[:3]]
    if None in vals:
        return _one(start.dtype, [fresh_dim()])
    import math

    s, l, d = vals
    return _one(start.dtype, [max(int(math.ceil((l - s) / d)), 0)])


@shape_rule("EyeLike")
def eye_like_rule(node: Node) -> list[TypeInfo]:
    x = node.inputs[0]
    dt = node.attrs.get("dtype")
    return _one(ONNX_TO_DTYPE.get(dt) if dt is not None else x.dtype, x.shape)


# -- indexing -------------------------------------------------------------------------------------
def _slice_len(dim: Dim, s: int, e: int, k: int) -> Dim:
    if isinstance(dim, int):
        s, e, k = slice_bounds(dim, s, e, k)
        return max(0, -(-(e - s) // k)) if k > 0 else max(0, -(-(s - e) // -k))
    if k > 0:
        lo: Dim = s if s >= 0 else dim + s
        hi: Dim = dim if e >= BIG else (e if e >= 0 else dim + e)
        n = hi - lo
        return n if k == 1 else floordiv(n + (k - 1), k)
    if (s >= BIG or s == -1) and e <= -BIG:  # the whole axis, reversed
        return dim if k == -1 else floordiv(dim + (-k - 1), -k)
    return fresh_dim()


@shape_rule("Slice")
def slice_rule(node: Node) -> list[TypeInfo]:
    x = node.inputs[0]
    if x.shape is None:
        return _one(x.dtype, None)
    get = lambda i: const_ints(node.inputs[i]) if len(node.inputs) > i and node.inputs[i] is not None else None  # noqa: E731
    starts, ends = const_ints(node.inputs[1]), const_ints(node.inputs[2])
    rank = len(x.shape)
    has_axes = len(node.inputs) > 3 and node.inputs[3] is not None
    has_steps = len(node.inputs) > 4 and node.inputs[4] is not None
    axes = get(3) if has_axes else (list(range(len(starts))) if starts is not None else None)
    steps = get(4) if has_steps else ([1] * len(starts) if starts is not None else None)
    if starts is None or ends is None or axes is None or steps is None:
        if axes is None:
            return _one(x.dtype, [fresh_dim() for _ in range(rank)])
        out = list(x.shape)
        for a in axes:
            out[_axis(a, rank)] = fresh_dim()
        return _one(x.dtype, out)
    out = list(x.shape)
    for s, e, a, k in zip(starts, ends, axes, steps):
        a = _axis(a, rank)
        out[a] = _slice_len(out[a], s, e, k)
    return _one(x.dtype, out)


@shape_rule("Gather")
def gather_rule(node: Node) -> list[TypeInfo]:
    x, idx = node.inputs
    if x.shape is None or idx.shape is None:
        return _one(x.dtype, None)
    a = _axis(node.attrs.get("axis", 0), len(x.shape))
    return _one(x.dtype, list(x.shape[:a]) + list(idx.shape) + list(x.shape[a + 1:]))


@shape_rule("GatherElements")
def gather_elements_rule(node: Node) -> list[TypeInfo]:
    return _one(node.inputs[0].dtype, node.inputs[1].shape)


@shape_rule("GatherND")
def gather_nd_rule(node: Node) -> list[TypeInfo]:
    x, idx = node.inputs
    if x.shape is None or idx.shape is None or not isinstance(idx.shape[-1], int):
        return _one(x.dtype, None)
    b, k = node.attrs.get("batch_dims", 0), idx.shape[-1]
    return _one(x.dtype, list(idx.shape[:-1]) + list(x.shape[b + k:]))


for _name in ("ScatterElements", "Scatter", "ScatterND", "TensorScatter", "Trilu", "ReverseSequence",
              "Identity"):
    shape_rule(_name)(same_as_input(0))


@shape_rule("Dropout")
def dropout_rule(node: Node) -> list[TypeInfo]:
    x = node.inputs[0]
    mask = node.outputs[1].dtype if len(node.outputs) > 1 and node.outputs[1].dtype else DType.BOOL
    return [(x.dtype, x.shape), (mask, x.shape)][: len(node.outputs)]


@shape_rule("TopK")
def topk_rule(node: Node) -> list[TypeInfo]:
    x, k = node.inputs[0], const_ints(node.inputs[1])
    if x.shape is None:
        return [(x.dtype, None), (DType.INT64, None)]
    out = list(x.shape)
    out[_axis(node.attrs.get("axis", -1), len(out))] = k[0] if k is not None else fresh_dim()
    return [(x.dtype, tuple(out)), (DType.INT64, tuple(out))]


@shape_rule("NonZero")
def nonzero_rule(node: Node) -> list[TypeInfo]:
    x = node.inputs[0]
    return _one(DType.INT64, [len(x.shape), fresh_dim()] if x.shape is not None else None)


@shape_rule("Compress")
def compress_rule(node: Node) -> list[TypeInfo]:
    x = node.inputs[0]
    axis = node.attrs.get("axis")
    if axis is None:
        return _one(x.dtype, [fresh_dim()])
    if x.shape is None:
        return _one(x.dtype, None)
    out = list(x.shape)
    out[_axis(axis, len(out))] = fresh_dim()
    return _one(x.dtype, out)


@shape_rule("OneHot")
def one_hot_rule(node: Node) -> list[TypeInfo]:
    idx, depth, values = node.inputs
    if idx.shape is None:
        return _one(values.dtype, None)
    d = depth.data.reshape(()).item() if depth.is_const else None
    out = list(idx.shape)
    out.insert(_axis(node.attrs.get("axis", -1), len(out) + 1), int(d) if d is not None else fresh_dim())
    return _one(values.dtype, out)
