"""Generated fusion-group kernels match the ops' reference functions run node by node in float64.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set below before
triton is imported) on CPU tensors, on small shapes.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ember.ir.dtypes import DType  # noqa: E402
from ember.ir.graph import Graph, Node, Value  # noqa: E402
from ember.kernels import fused_groups as fg  # noqa: E402
from ember.kernels.fused_groups import FusedGroupKernel, fuse_group, group_io, lower_groups  # noqa: E402
from ember.ops import OpContext, get  # noqa: E402
from ember.ops.infer import infer_shapes  # noqa: E402
from ember.ops.torch_types import tensor_from_numpy, to_torch  # noqa: E402
from tests.sm90 import assert_aot_main_compiles  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# masked-off lanes may divide by zero or take log(0) in the interpreter's numpy; harmless
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
TOL = {DType.FLOAT32: (1e-5, 1e-5), DType.FLOAT16: (1e-2, 1e-2), DType.BFLOAT16: (1e-2, 2e-2)}


# -- building groups --------------------------------------------------------------------------------
def build(inputs: dict, nodes: list) -> tuple[Graph, list[Node]]:
    """inputs: name -> (DType, shape) for a graph input or np.ndarray for a constant;
    nodes: (op, [input names or None], attrs); node i's output is named n<i>."""
    g = Graph()
    vals: dict[str, Value] = {}
    for name, spec in inputs.items():
        vals[name] = g.add_const(name, spec) if isinstance(spec, np.ndarray) else g.add_input(name, *spec)
    made = []
    for i, (op, ins, attrs) in enumerate(nodes):
        n = g.add_node(op, [vals[x] if x is not None else None for x in ins], 1, attrs, name=f"n{i}")
        vals[f"n{i}"] = n.outputs[0]
        made.append(n)
    g.outputs = [made[-1].outputs[0]]
    infer_shapes(g)
    return g, made


def feeds_for(g: Graph, seed: int = 0, positive: bool = False) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    out = {}
    for v in g.inputs:
        shape = tuple(int(d) for d in v.shape)
        if v.dtype == DType.BOOL:
            out[v.name] = torch.from_numpy(rng.random(shape) > 0.5)
        elif v.dtype.is_int:
            out[v.name] = torch.from_numpy(rng.integers(-50, 50, shape)).to(to_torch(v.dtype))
        else:
            a = rng.standard_normal(shape) * 2
            a = np.where(np.abs(a) < 0.05, 0.3, a)  # never zero
            if positive:
                a = np.abs(a) + 0.1
            out[v.name] = torch.from_numpy(a).to(to_torch(v.dtype))
    return out


def reference(nodes: list[Node], env: dict[str, torch.Tensor]) -> torch.Tensor:
    """The ops' reference functions, node by node, floats widened to float64."""
    vals = {k: (t.double() if t.is_floating_point() else t) for k, t in env.items()}
    for n in nodes:
        args = []
        for v in n.inputs:
            if v is None:
                args.append(None)
            elif v.name in vals:
                args.append(vals[v.name])
            else:
                t = tensor_from_numpy(v.data)
                args.append(t.double() if t.is_floating_point() else t)
        attrs = dict(n.attrs)
        if n.op == "Cast":  # cast within float64 where the target is a float: compare in float64
            from ember.ops.quant import dtype_of_attr

            to = dtype_of_attr(attrs["to"])
            if to.is_float and args[0].is_floating_point():
                vals[n.outputs[0].name] = args[0].to(to_torch(to)).double()
                continue
        vals[n.outputs[0].name] = get(n.op).call(args, attrs, OpContext(num_outputs=1))
    return vals[nodes[-1].outputs[0].name]


def run_group(g: Graph, nodes: list[Node], feeds: dict[str, torch.Tensor], layout=None) -> tuple:
    inputs, output = group_io(nodes)
    k = fuse_group(nodes, inputs, output)
    assert k is not None, FusedGroupKernel.supports(nodes)[1]
    tensors = []
    for v in inputs:
        if v.is_const:
            tensors.append(tensor_from_numpy(v.data).to(DEV))
        else:
            t = feeds[v.name].to(DEV)
            tensors.append(layout(t) if layout is not None else t)
    return k, k(*tensors), reference(nodes, feeds), output


def check(g: Graph, nodes: list[Node], seed: int = 0, positive: bool = False, layout=None) -> torch.Tensor:
    feeds = feeds_for(g, seed, positive)
    k, got, want, output = run_group(g, nodes, feeds, layout)
    assert got.dtype == to_torch(output.dtype)
    assert tuple(got.shape) == tuple(want.shape), (got.shape, want.shape)
    if got.dtype.is_floating_point:
        rtol, atol = TOL[output.dtype]
        torch.testing.assert_close(got.cpu().double(), want.double(), rtol=rtol, atol=atol)
    else:
        assert torch.equal(got.cpu(), want.to(got.dtype)), (got, want)
    return got


F32 = DType.FLOAT32
X4 = {"x": (F32, (2, 3, 4, 5))}


# -- pointwise ops, one at a time -----------------------------------------------------------------------
UNARY = [("Relu", {}), ("LeakyRelu", {"alpha": 0.1}), ("Sigmoid", {}), ("Tanh", {}), ("Exp", {}),
         ("Neg", {}), ("Abs", {}), ("Erf", {}), ("Gelu", {}), ("Gelu", {"approximate": "tanh"}),
         ("Swish", {}), ("Swish", {"alpha": 1.702}), ("HardSigmoid", {}), ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}),
         ("HardSwish", {}), ("Softplus", {}), ("Softsign", {}), ("Mish", {}), ("Elu", {"alpha": 0.7}), ("Selu", {}),
         ("Celu", {"alpha": 1.3}), ("ThresholdedRelu", {"alpha": 0.5}), ("Shrink", {"lambd": 0.4, "bias": 0.1}),
         ("Sin", {}), ("Cos", {}), ("Floor", {}), ("Ceil", {}), ("Sign", {}), ("Reciprocal", {})]
POSITIVE = [("Log", {}), ("Sqrt", {})]


@pytest.mark.parametrize("op, attrs", UNARY + POSITIVE, ids=lambda v: v if isinstance(v, str) else "")
def test_unary(op, attrs):
    # behind an Add with a per-channel bias so each op also sees broadcast operands
    inputs = {**X4, "b": (F32, (3, 1, 1))}
    if (op, attrs) in POSITIVE:
        g, nodes = build(inputs, [("Abs", ["x"], {}), ("Add", ["n0", "b"], {}), ("Abs", ["n1"], {}),
                                  (op, ["n2"], attrs)])
    else:
        g, nodes = build(inputs, [("Add", ["x", "b"], {}), (op, ["n0"], attrs)])
    check(g, nodes)


def test_unary_extreme_values():
    """Large and tiny magnitudes: tanh/softplus/expm1 stay accurate where naive forms cancel."""
    g, nodes = build({"x": (F32, (64,))}, [("Tanh", ["x"], {})])
    x = torch.cat([torch.logspace(-6, 1.5, 32), -torch.logspace(-6, 1.5, 32)]).float()
    for op, attrs in [("Tanh", {}), ("Softplus", {}), ("Elu", {}), ("Gelu", {"approximate": "tanh"}), ("Mish", {})]:
        nodes[0].op, nodes[0].attrs = op, attrs
        k = fuse_group(nodes, *group_io(nodes))
        want = reference(nodes, {"x": x})
        torch.testing.assert_close(k(x.to(DEV)).cpu().double(), want, rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Max", "Min"])
def test_binary_broadcast_rank_mismatch(op):
    g, nodes = build({"x": (F32, (2, 3, 4, 5)), "y": (F32, (4, 5))}, [(op, ["x", "y"], {})])
    check(g, nodes)
    g, nodes = build({"x": (F32, (4, 1)), "y": (F32, (3, 1, 5))}, [(op, ["x", "y"], {})])  # no full-size input
    check(g, nodes)


def test_scalars_inlined_and_loaded():
    inputs = {**X4, "c": np.array(1.5, np.float32), "one": np.array([2.0], np.float32), "s": (F32, ())}
    g, nodes = build(inputs, [("Mul", ["x", "c"], {}), ("Sub", ["n0", "one"], {}), ("Add", ["n1", "s"], {})])
    k, *_ = run_group(g, nodes, feeds_for(g))
    assert "1.5" in k.source and "2.0" in k.source  # constants are literals
    assert len(k.program.loaded) == 2  # x and the run-time scalar s
    check(g, nodes)


def _pointwise_cases() -> dict:
    i64, b1, f16, bf16 = DType.INT64, DType.BOOL, DType.FLOAT16, DType.BFLOAT16
    lim = {**X4, "lo": np.array(-0.5, np.float32), "hi": np.array(0.7, np.float32), "y": (F32, (5,))}
    cases = {f"pow-{e}": ({**X4, "e": np.array(e, np.float32)}, [("Abs", ["x"], {}), ("Pow", ["n0", "e"], {})])
             for e in (2.0, 0.5, 3.0, -1.0, 1.7)}
    cases.update({
        "pow-int-exponent-negative-base": ({**X4, "e": np.array(3, np.int64)}, [("Pow", ["x", "e"], {})]),
        "pow-runtime-exponent": ({**X4, "e": (F32, (5,))}, [("Abs", ["x"], {}), ("Pow", ["n0", "e"], {})]),
        "clip-greater-where": (lim, [("Clip", ["x", "lo", "hi"], {}), ("Greater", ["x", "y"], {}),
                                     ("Where", ["n1", "n0", "y"], {})]),
        "clip-max-only": (lim, [("Clip", ["x", None, "hi"], {})]),
        "clip-runtime-bounds": ({**X4, "lo": (F32, ()), "hi": (F32, ())}, [("Clip", ["x", "lo", "hi"], {})]),
        "cast-bool-mul": ({**X4, "m": (b1, (4, 5))}, [("Cast", ["m"], {"to": 1}), ("Mul", ["x", "n0"], {})]),
        "less-not": (X4, [("Less", ["x", "x"], {}), ("Not", ["n0"], {})]),
        "isnan-isinf-or": (X4, [("IsNaN", ["x"], {}), ("IsInf", ["x"], {}), ("Or", ["n0", "n1"], {})]),
        "variadic-sum-mean-max": ({**X4, "y": (F32, (5,)), "z": (F32, (4, 1))},
                                  [("Sum", ["x", "y", "z"], {}), ("Mean", ["n0", "y", "z"], {}),
                                   ("Max", ["n1", "x", "z"], {})]),
        "prelu-swiglu": ({**X4, "s": (F32, (3, 1, 1)), "y": (F32, (2, 3, 4, 5))},
                         [("PRelu", ["x", "s"], {}), ("SwiGLU", ["n0", "y"], {"alpha": 1.5})]),
        "int-mul-add": ({"a": (i64, (3, 1, 1, 1)), "b": (i64, (3, 1, 1, 4))},
                        [("Mul", ["a", "a"], {}), ("Add", ["n0", "b"], {})]),
        "int-equal-where": ({"a": (i64, (4,)), "c": np.array([-1], np.int64), "v": np.array([7], np.int64)},
                            [("Equal", ["a", "c"], {}), ("Where", ["n0", "v", "a"], {})]),
        "int-relu-neg-abs-cast": ({"a": (DType.INT32, (3, 4))}, [("Relu", ["a"], {}), ("Neg", ["n0"], {}),
                                                                  ("Abs", ["n1"], {}), ("Cast", ["n2"], {"to": 1})]),
        "bool-and-or": ({"p": (b1, (1, 1, 5, 1)), "q": (b1, (2, 1, 5, 6))},
                        [("And", ["p", "q"], {}), ("Or", ["n0", "p"], {})]),
        "half-gelu": ({"x": (f16, (2, 3, 4, 5)), "b": (f16, (5,))},
                      [("Add", ["x", "b"], {}), ("Gelu", ["n0"], {}), ("Mul", ["n1", "x"], {})]),
        "bf16-silu-mul": ({"x": (bf16, (2, 3, 8)), "y": (bf16, (2, 3, 8))},
                          [("Swish", ["x"], {}), ("Mul", ["n0", "y"], {})]),
        "cast-to-half-and-back": ({"x": (f16, (2, 3, 8))},
                                  [("Cast", ["x"], {"to": 1}), ("Exp", ["n0"], {}), ("Cast", ["n1"], {"to": 16})]),
    })
    return cases


POINTWISE_CASES = _pointwise_cases()


@pytest.mark.parametrize("case", list(POINTWISE_CASES))
def test_pointwise_group(case):
    inputs, spec = POINTWISE_CASES[case]
    g, nodes = build(inputs, spec)
    check(g, nodes)


def test_cast_rounds_through_the_narrower_type():
    g, nodes = build(X4, [("Cast", ["x"], {"to": 10}), ("Cast", ["n0"], {"to": 1}), ("Sub", ["x", "n1"], {})])
    got = check(g, nodes)  # x - fp32(fp16(x)) is not zero: the round trip is kept
    assert got.abs().max() > 0


# -- layouts and dtypes -----------------------------------------------------------------------------
def test_channels_last_in_channels_last_out():
    g, nodes = build({"x": (F32, (2, 8, 5, 3)), "b": (F32, (8, 1, 1))},
                     [("Add", ["x", "b"], {}), ("Relu", ["n0"], {})])
    got = check(g, nodes, layout=lambda t: t.to(memory_format=torch.channels_last) if t.dim() == 4 else t)
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_mixed_layouts_and_strided_views():
    g, nodes = build({"x": (F32, (2, 8, 5, 3)), "y": (F32, (2, 8, 5, 3))}, [("Add", ["x", "y"], {})])
    feeds = feeds_for(g)
    k = fuse_group(nodes, *group_io(nodes))
    x, y = feeds["x"].to(DEV), feeds["y"].to(DEV)
    got = k(x.to(memory_format=torch.channels_last), y)  # one channels_last, one contiguous
    torch.testing.assert_close(got, x + y)
    xt = torch.randn(2, 8, 3, 5, device=DEV).transpose(2, 3)  # non-dense strides
    torch.testing.assert_close(k(xt, y), xt + y)
    big = torch.randn(2, 8, 10, 3, device=DEV)[:, :, ::2]  # a strided slice
    torch.testing.assert_close(k(big, y), big + y)
    assert len(k._plans) == 3  # one plan per signature...
    k(x, y)
    k(x, y)
    assert len(k._plans) == 4  # ...computed once


def test_preallocated_output():
    g, nodes = build({"x": (F32, (2, 8, 5, 3)), "b": (F32, (8, 1, 1))}, [("Add", ["x", "b"], {})])
    k = fuse_group(nodes, *group_io(nodes))
    x = torch.randn(2, 8, 5, 3, device=DEV).to(memory_format=torch.channels_last)
    b = torch.randn(8, 1, 1, device=DEV)
    shape, stride, dtype = k.output_layout(x, b)
    buf = torch.empty_strided(shape, stride, dtype=dtype, device=DEV)
    assert k(x, b, out=buf) is buf
    torch.testing.assert_close(buf, x + b)
    with pytest.raises(ValueError, match="strides"):
        k(x, b, out=torch.empty(shape, device=DEV))  # contiguous, but the result is channels_last


@pytest.mark.parametrize("dt", [DType.FLOAT16, DType.BFLOAT16])
def test_half_precision_rows(dt):
    g, nodes = build({"x": (dt, (3, 37)), "r": (dt, (3, 37)), "s": (dt, (37,)), "b": (dt, (37,))},
                     [("Add", ["x", "r"], {}), ("LayerNormalization", ["n0", "s", "b"], {"axis": -1})])
    check(g, nodes)


# -- row reductions --------------------------------------------------------------------------------------
ROWS = {"x": (F32, (2, 3, 37))}  # a row length that is not a power of 2


def _row_cases():
    s37 = {"s": (F32, (37,)), "b": (F32, (37,))}
    return {
        "softmax": (ROWS, [("Softmax", ["x"], {"axis": -1})]),
        "scale_softmax_mul": ({**ROWS, "c": np.array(0.125, np.float32), "m": (F32, (37,))},
                              [("Mul", ["x", "c"], {}), ("Softmax", ["n0"], {"axis": 2}), ("Mul", ["n1", "m"], {})]),
        "logsoftmax": (ROWS, [("LogSoftmax", ["x"], {"axis": -1})]),
        "residual_layernorm": ({**ROWS, "r": (F32, (2, 3, 37)), **s37},
                               [("Add", ["x", "r"], {}), ("LayerNormalization", ["n0", "s", "b"], {"epsilon": 1e-6})]),
        "layernorm_no_bias": ({**ROWS, "s": (F32, (37,))}, [("LayerNormalization", ["x", "s"], {})]),
        "rmsnorm": ({**ROWS, "s": (F32, (37,))}, [("RMSNormalization", ["x", "s"], {"epsilon": 1e-6})]),
        "masked_softmax": ({**ROWS, "mask": (F32, (2, 1, 37))},
                           [("Add", ["x", "mask"], {}), ("Softmax", ["n0"], {})]),
    }


def _reduce_cases():
    ax = np.array([-1], np.int64)
    cases = {}
    for op in ("ReduceMax", "ReduceMin", "ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL1", "ReduceL2",
               "ReduceLogSumExp"):
        for keep in (0, 1):
            cases[f"{op}-keep{keep}"] = ({**ROWS, "ax": ax}, [(op, ["x", "ax"], {"keepdims": keep})])
    # a row-level epilogue: mean over the row, then scaled by a per-row input
    cases["mean_then_mul"] = ({**ROWS, "ax": ax, "w": (F32, (2, 3, 1))},
                              [("ReduceMean", ["x", "ax"], {}), ("Mul", ["n0", "w"], {})])
    # LayerNorm written out: two chained reductions and the rows reused after them
    eps = np.array(1e-5, np.float32)
    cases["decomposed_layernorm"] = ({**ROWS, "ax": ax, "two": np.array(2.0, np.float32), "eps": eps,
                                      "s": (F32, (37,))},
                                     [("ReduceMean", ["x", "ax"], {}), ("Sub", ["x", "n0"], {}),
                                      ("Pow", ["n1", "two"], {}), ("ReduceMean", ["n2", "ax"], {}),
                                      ("Add", ["n3", "eps"], {}), ("Sqrt", ["n4"], {}), ("Div", ["n1", "n5"], {}),
                                      ("Mul", ["n6", "s"], {})])
    return cases


ALL_ROWS = {**_row_cases(), **_reduce_cases()}


@pytest.mark.parametrize("case", list(ALL_ROWS))
def test_row_reduction(case):
    inputs, spec = ALL_ROWS[case]
    g, nodes = build(inputs, spec)
    check(g, nodes)


@pytest.mark.parametrize("case", ["softmax", "residual_layernorm", "ReduceMean-keep1", "mean_then_mul",
                                  "decomposed_layernorm", "logsoftmax", "rmsnorm"])
def test_row_reduction_looped(case, monkeypatch):
    """Rows longer than MAX_BLOCK take the chunked kernel; shrink the limits so 37 takes 3 chunks."""
    monkeypatch.setattr(fg, "MAX_BLOCK", 16)
    monkeypatch.setattr(fg, "LOOP_BLOCK", 16)
    inputs, spec = ALL_ROWS[case]
    g, nodes = build(inputs, spec)
    check(g, nodes)
    k, *_ = run_group(g, nodes, feeds_for(g))
    assert [p.fn.__name__ for p in k._plans.values()] == [k.program.name + "_looped"]


def test_row_reduction_strided_input():
    g, nodes = build({"x": (F32, (4, 37)), "r": (F32, (4, 37))}, [("Add", ["x", "r"], {}), ("Softmax", ["n0"], {})])
    k = fuse_group(nodes, *group_io(nodes))
    x = torch.randn(37, 4, device=DEV).t()  # column-major rows
    r = torch.randn(4, 37, device=DEV)
    torch.testing.assert_close(k(x, r), torch.softmax(x + r, -1))


# -- the API around the kernels ------------------------------------------------------------------------
def test_unsupported_groups_say_why():
    g, nodes = build({"x": (F32, (3, 4)), "y": (F32, (3, 4))}, [("Mod", ["x", "y"], {"fmod": 1}), ("Relu", ["n0"], {})])
    ok, why = FusedGroupKernel.supports(nodes)
    assert not ok and "Mod" in why
    assert fuse_group(nodes, *group_io(nodes)) is None
    g, nodes = build({"x": (F32, (3, 4))}, [("Softmax", ["x"], {"axis": 0}), ("Relu", ["n0"], {})])
    ok, why = FusedGroupKernel.supports(nodes)
    assert not ok and "axis" in why


def test_source_is_stable():
    def make():
        g, nodes = build({**X4, "b": (F32, (3, 1, 1))}, [("Add", ["x", "b"], {}), ("Sigmoid", ["n0"], {})])
        return fuse_group(nodes, *group_io(nodes)).source
    assert make() == make()


def test_lower_groups_on_an_optimized_graph():
    from ember.passes import group_fusions
    from ember.passes.rewrite import PassContext
    from ember.runtime.interpreter import Interpreter

    g, nodes = build({"x": (F32, (2, 5, 24)), "r": (F32, (2, 5, 24)), "s": np.ones(24, np.float32) * 1.1,
                      "b": np.full(24, 0.2, np.float32), "w": (F32, (24,))},
                     [("Add", ["x", "r"], {}), ("LayerNormalization", ["n0", "s", "b"], {}),
                      ("Softmax", ["n1"], {}), ("Mul", ["n2", "w"], {}), ("Sigmoid", ["n3"], {})])
    assert group_fusions(g, PassContext())
    skipped: dict[str, str] = {}
    kernels = lower_groups(g, skipped)
    assert len(kernels) == 1 and not skipped
    (gid, k), = kernels.items()
    feeds = feeds_for(g)
    want = Interpreter(g).run(feeds)[g.outputs[0].name]
    tensors = [tensor_from_numpy(v.data) if v.is_const else feeds[v.name] for v in k.inputs]
    torch.testing.assert_close(k(*[t.to(DEV) for t in tensors]).cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_zoo_model_groups(name, tmp_path):
    """Every group of a real exported model lowers, and matches the reference interpreter's values."""
    pytest.importorskip("transformers")
    from pathlib import Path

    from ember.passes import run_pipeline
    from ember.runtime.interpreter import Interpreter
    from ember.tools.loading import import_graph

    from ..models.zoo import Zoo

    exported = Zoo(Path(tmp_path)).get(name, "torchscript", 17)
    g = import_graph(str(exported.path))
    run_pipeline(g, 3)
    skipped: dict[str, str] = {}
    kernels = lower_groups(g, skipped)
    assert kernels and not skipped, skipped
    outs = list(g.outputs)
    wanted = [v for k in kernels.values() for v in [*k.inputs, k.output] if not v.is_const]
    g.outputs = outs + [v for v in dict.fromkeys(wanted) if v not in outs]  # keep every group's values
    feeds = {k: tensor_from_numpy(v) for k, v in exported.feeds(batch=2).items()}
    env = Interpreter(g).run(feeds)
    g.outputs = outs
    for gid, k in kernels.items():
        args = [tensor_from_numpy(v.data) if v.is_const else env[v.name] for v in k.inputs]
        got, want = k(*[a.to(DEV) for a in args]).cpu(), env[k.output.name]
        if got.is_floating_point():
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=gid)
        else:
            assert torch.equal(got, want), gid


# -- the real compiler: every case compiled for sm_90 (Hopper) without a GPU ----------------------------
def _aot_cases() -> dict:
    unary = {f"unary-{op}-{i}": ({**X4, "b": (F32, (3, 1, 1))}, [("Add", ["x", "b"], {}), (op, ["n0"], a)])
             for i, (op, a) in enumerate(UNARY + POSITIVE)}
    return {**unary, **POINTWISE_CASES, **ALL_ROWS}


def _aot_main() -> None:
    """Run in a process with TRITON_INTERPRET=0: compile each case's variants to PTX for sm_90."""
    from ember.kernels.fused_groups import compile_for_target

    failed = []
    cases = _aot_cases()
    for name, (inputs, spec) in cases.items():
        g, nodes = build(inputs, spec)
        try:
            compile_for_target(fuse_group(nodes, *group_io(nodes)), arch=90)
        except Exception as e:  # report every failing case, not just the first
            failed.append(f"{name}: {type(e).__name__}: {str(e)[-1500:]}")
    print("AOT-FAILED" if failed else "AOT-OK", len(cases))
    print("\n".join(failed))


@pytest.mark.slow
def test_every_case_compiles_for_sm90():
    assert_aot_main_compiles("tests.kernels.test_fused_groups")
