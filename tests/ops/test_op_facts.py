"""What the compiler knows about an op is stated once, on its definition (ops/registry.py), and every
pass, kernel generator and the runtime read it from there: a new op with its facts is honoured
everywhere without editing another table."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # before triton is imported: kernels run in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ember.ir.dtypes import DType  # noqa: E402
from ember.ir.graph import Graph  # noqa: E402
from ember.ops import REGISTRY, get, known_ops, op  # noqa: E402
from ember.ops.infer import infer_shapes, same_as_input  # noqa: E402
from ember.ops.registry import Epilogue, epilogue_ops, shape_rule  # noqa: E402
from ember.passes.cleanup import eliminate_common_subexpressions, fold_constants  # noqa: E402
from ember.passes.precision import convert_precision  # noqa: E402
from ember.passes.rewrite import PassContext  # noqa: E402


@pytest.fixture
def new_ops():
    """Register ops for one test, and remove them afterwards."""
    names: list[str] = []

    def register(name: str, fn, **facts):
        op(name, **facts)(fn)
        shape_rule(name)(same_as_input(0))
        REGISTRY[name].shape_rule = same_as_input(0)
        names.append(name)
        return REGISTRY[name]

    known_ops()
    yield register
    for n in names:
        REGISTRY.pop(n, None)


def test_every_ops_facts_are_consistent():
    for name in known_ops():
        d = get(name)
        assert all(0 <= i < len(d.input_names) for i in d.host_inputs | d.type_inputs), name
        assert d.foldable == (not d.random and d.kind != "control"), name
        if d.quant is not None:
            assert d.quant.quantized_op in known_ops(), name
    assert {n for n in known_ops() if get(n).random} == {"RandomNormal", "RandomUniform", "RandomNormalLike",
                                                         "RandomUniformLike", "Bernoulli"}
    assert get("Reshape").host_inputs == {1} and get("Slice").host_inputs == {1, 2, 3, 4}
    assert get("CastLike").param_inputs == {1} and get("ReduceSum").param_inputs == {1}
    assert get("Exp").low_precision_inputs(1) is None  # overflow-prone: fp32 in every engine
    assert get("Where").low_precision_inputs(3) == {1, 2} and get("Add").low_precision_inputs(2) == {0, 1}


def test_facts_name_real_inputs():
    with pytest.raises(ValueError, match="host_inputs names"):
        op("test.Bad", host_inputs=("shape",))(lambda x: x)
    assert "test.Bad" not in REGISTRY


def test_a_random_op_is_never_folded_nor_merged(new_ops):
    new_ops("test.Noise", lambda x: x + torch.rand_like(x), kind="pointwise", random=True)
    g = Graph()
    c = g.add_const("c", np.ones((2, 2), np.float32))
    a = g.add_node("test.Noise", [c], 1, name="a")
    b = g.add_node("test.Noise", [c], 1, name="b")
    s = g.add_node("Add", [a.outputs[0], b.outputs[0]], 1, name="s")
    g.outputs = list(s.outputs)
    infer_shapes(g)
    ctx = PassContext()
    fold_constants(g, ctx)
    eliminate_common_subexpressions(g, ctx)
    assert [n.op for n in g.nodes] == ["test.Noise", "test.Noise", "Add"]


def test_precision_and_lowering_come_from_the_definition(new_ops):
    new_ops("test.Twice", lambda x: x * 2, kind="pointwise", triton="({0} * 2.0)", low_precision="fp32")
    g = Graph()
    x = g.add_input("x", DType.FLOAT32, (2, 3))
    t = g.add_node("test.Twice", [x], 1, name="t")
    r = g.add_node("Relu", t.outputs, 1, name="r")
    g.outputs = list(r.outputs)
    infer_shapes(g)
    kept = convert_precision(g, DType.FLOAT16)
    assert [(k.node, k.reason) for k in kept] == [("t", "op")]
    dtypes = {n.name: n.outputs[0].dtype for n in g.nodes}
    assert dtypes["t"] == DType.FLOAT32 and dtypes["r"] == DType.FLOAT16

    from ember.kernels.triton_codegen import build_program, generate_source

    g2 = Graph()
    x2 = g2.add_input("x", DType.FLOAT32, (2, 3))
    t2 = g2.add_node("test.Twice", [x2], 1, name="t")
    r2 = g2.add_node("Sigmoid", t2.outputs, 1, name="r")
    g2.outputs = list(r2.outputs)
    infer_shapes(g2)
    src = generate_source(build_program(g2.nodes, [x2], r2.outputs[0]))
    assert "* 2.0)" in src and "tl.sigmoid" in src


def test_epilogue_activations_are_the_ops_that_say_how():
    from ember.kernels.triton_templates import activation_code
    from ember.kernels.vendor import fast_activation

    acts = epilogue_ops()
    assert {"Relu", "Gelu", "Clip", "Swish", "Mish"} <= set(acts) and "Exp" not in acts
    codes = {a: activation_code(a, None, None) for a in acts}
    assert all(c is not None for c in codes.values()) and len({c[0] for c in codes.values()}) == len(acts)
    y = torch.randn(16)
    assert torch.equal(fast_activation(y.clone(), "Relu", None, None), torch.relu(y))
    assert fast_activation(y.clone(), "Swish", ["alpha"], [1.5]) is None  # no one-kernel torch form: reference
    assert activation_code("Gelu", ["approximate"], ["tanh"])[0] != activation_code("Gelu", None, None)[0]


def test_a_new_activation_fuses_into_the_epilogue(new_ops):
    from ember.passes import anchors

    new_ops("test.Cube", lambda x: x * x * x, kind="pointwise", epilogue=Epilogue(13))
    anchors.epilogue_rules.cache_clear()
    try:
        g = Graph()
        x = g.add_input("x", DType.FLOAT32, (2, 3))
        w = g.add_const("w", np.ones((3, 4), np.float32))
        m = g.add_node("ember.Gemm", [x, w], 1, name="m")
        c = g.add_node("test.Cube", m.outputs, 1, name="c")
        g.outputs = list(c.outputs)
        infer_shapes(g)
        assert anchors.fuse_epilogues(g, PassContext())
        assert [(n.op, n.attrs.get("activation")) for n in g.nodes] == [("ember.Gemm", "test.Cube")]
    finally:
        anchors.epilogue_rules.cache_clear()
