"""The rewrite engine itself: a rewrite's result is rewritten again, small constants are one value,
and a pattern never walks out of the graph it edits."""
from __future__ import annotations

import ml_dtypes
import numpy as np
from onnx import TensorProto, helper

from ember.frontend.onnx import import_onnx
from ember.ir.dtypes import from_numpy
from ember.ir.graph import Value
from ember.ops.infer import infer_shapes
from ember.passes import PassContext, run_pipeline
from ember.passes.noops import remove_noops
from ember.passes.rewrite import Editor, P, Rule, apply_rules, const_key
from ember.passes.scope import check_scopes

from .helpers import init, model, ops, tensor

mk = helper.make_node


def _imported(m):
    g = import_onnx(m)
    infer_shapes(g)
    return g


def test_result_of_a_rewrite_is_rewritten_again_in_the_same_sweep():
    g = _imported(model([mk("Sin", ["x"], ["y"])], [tensor("x", [4])], [tensor("y", [4])]))
    rules = [Rule("sin_to_cos", P("Sin", P.any("x"), name="y"), lambda ed, m: ed.out("Cos", [m["x"]], like=m["y"])),
             Rule("cos_to_tanh", P("Cos", P.any("x"), name="y"), lambda ed, m: ed.out("Tanh", [m["x"]], like=m["y"]))]
    log: list[str] = []
    assert apply_rules(g, rules, log)
    assert ops(g) == ["Tanh"] and g.outputs[0].name == "y"
    assert log == ["sin_to_cos: y", "cos_to_tanh: y"]


def test_rules_that_undo_each_other_stop():
    g = _imported(model([mk("Sin", ["x"], ["y"])], [tensor("x", [4])], [tensor("y", [4])]))
    rules = [Rule("a", P("Sin", P.any("x"), name="y"), lambda ed, m: ed.out("Cos", [m["x"]], like=m["y"])),
             Rule("b", P("Cos", P.any("x"), name="y"), lambda ed, m: ed.out("Sin", [m["x"]], like=m["y"]))]
    log: list[str] = []
    apply_rules(g, rules, log)
    assert 1 < len(log) <= 8 and len(g.nodes) == 1


def test_equal_constants_are_one_value_in_every_pass():
    # Squeeze(Unsqueeze(x, a1), a2) needs a1 and a2 to be the same value; the exporter wrote two
    nodes = [mk("Unsqueeze", ["x", "a1"], ["u"]), mk("Squeeze", ["u", "a2"], ["s"]), mk("Relu", ["s"], ["y"])]
    inits = [init("a1", np.array([0], np.int64)), init("a2", np.array([0], np.int64))]
    g = _imported(model(nodes, [tensor("x", [3])], [tensor("y", [3])], inits))
    assert remove_noops(g, PassContext())  # no CSE pass needed first
    assert ops(g) == ["Relu"] and not g.initializers


def test_editor_const_returns_an_equal_constant_already_in_scope():
    g = _imported(model([mk("Add", ["x", "c"], ["y"])], [tensor("x", [3])], [tensor("y", [3])],
                        [init("c", np.arange(3, dtype=np.float32))]))
    ed = Editor(g)
    assert ed.const(np.arange(3, dtype=np.float32)) is g.initializers["c"]
    assert ed.const(np.arange(3, dtype=np.float64)) is not g.initializers["c"]  # another dtype: another value
    big = np.zeros(4096, np.float32)
    assert ed.const(big) is not ed.const(big.copy())  # weights are never shared behind the user's back


def test_constant_identity_includes_the_element_type():
    bits = np.zeros(3, np.uint8)
    e4m3, e5m2 = bits.view(ml_dtypes.float8_e4m3fn), bits.view(ml_dtypes.float8_e5m2)
    e4m3, e5m2 = (Value(str(a.dtype), from_numpy(a.dtype), data=a) for a in (e4m3, e5m2))
    assert const_key(e4m3) != const_key(e5m2)


def test_pattern_does_not_walk_into_the_enclosing_graph():
    # x*sigmoid(x) split across a boundary: Sigmoid outside, Mul inside the branch. Recognizing SiLU in
    # the branch would be sound, but a pattern must not claim (or remove) a node of another graph.
    then = helper.make_graph([mk("Mul", ["x", "s"], ["t"])], "then", [], [tensor("t", [4])])
    other = helper.make_graph([mk("Neg", ["s"], ["e"])], "else", [], [tensor("e", [4])])
    nodes = [mk("Sigmoid", ["x"], ["s"]), mk("If", ["flag"], ["y"], then_branch=then, else_branch=other)]
    m = model(nodes, [tensor("x", [4]), tensor("flag", [1], TensorProto.BOOL)], [tensor("y", [4])])
    g = _imported(m)
    run_pipeline(g, 3, debug=True)
    check_scopes(g)
    branch = g.nodes[-1].attrs["then_branch"]
    assert ops(g) == ["Sigmoid", "If"] and [n.op for n in branch.nodes] == ["Mul"]
