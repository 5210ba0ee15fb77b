"""Cleanup passes on tiny graphs: folding, no-ops, CSE, dead code; symbolic dims survive."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from ember.ir.shapes import Sym
from ember.passes import PassContext
from ember.passes.cleanup import eliminate_common_subexpressions, fold_constants, remove_dead_code
from ember.passes.rewrite import P, Match

from .helpers import init, model, ops, optimized, tensor

mk = helper.make_node


def test_constant_folding_and_shape_subgraph():
    # y = Reshape(x, concat(Shape(x)[0], 12)) where dim 0 is symbolic: only the static part folds
    nodes = [mk("Shape", ["x"], ["s"]), mk("Gather", ["s", "i1"], ["d1"], axis=0),
             mk("Gather", ["s", "i2"], ["d2"], axis=0), mk("Mul", ["d1", "d2"], ["hw"]),
             mk("Gather", ["s", "i0"], ["d0"], axis=0),
             mk("Concat", ["d0", "hw"], ["shape"], axis=0), mk("Reshape", ["x", "shape"], ["r"]),
             mk("Add", ["c1", "c2"], ["c"]), mk("Add", ["r", "c"], ["y"])]
    inits = [init("i0", np.array([0])), init("i1", np.array([1])), init("i2", np.array([2])),
             init("c1", np.ones(12, np.float32)), init("c2", np.ones(12, np.float32))]
    g = optimized(model(nodes, [tensor("x", ["N", 3, 4])], [tensor("y", ["N", 12])], inits), level=1)
    assert "Mul" not in ops(g) and ops(g).count("Add") == 1  # 3*4 and c1+c2 folded
    assert g.outputs[0].shape == (Sym.named("N"), 12)


def test_static_shapes_fold_completely():
    nodes = [mk("Shape", ["x"], ["s"]), mk("Reshape", ["x", "s"], ["r"]), mk("Relu", ["r"], ["y"])]
    g = optimized(model(nodes, [tensor("x", [2, 3])], [tensor("y", [2, 3])]), level=1)
    assert ops(g) == ["Relu"]


def test_noops_removed():
    nodes = [mk("Identity", ["x"], ["a"]), mk("Dropout", ["a"], ["b"]), mk("Cast", ["b"], ["c"], to=TensorProto.FLOAT),
             mk("Transpose", ["c"], ["d"], perm=[0, 1]), mk("Mul", ["d", "one"], ["e"]), mk("Add", ["e", "zero"], ["f"]),
             mk("Pad", ["f", "pads"], ["g"]), mk("Expand", ["g", "shp"], ["h"]), mk("Reshape", ["h", "shp"], ["k"]),
             mk("Relu", ["k"], ["y"])]
    inits = [init("one", np.float32(1)), init("zero", np.zeros(3, np.float32)), init("pads", np.zeros(4, np.int64)),
             init("shp", np.array([2, 3], np.int64))]
    g = optimized(model(nodes, [tensor("x", [2, 3])], [tensor("y", [2, 3])], inits), level=1)
    assert ops(g) == ["Relu"]
    assert not g.initializers  # unused initializers removed


def test_broadcasting_mul_by_one_is_kept():
    nodes = [mk("Mul", ["x", "one"], ["y"])]
    g = optimized(model(nodes, [tensor("x", [3])], [tensor("y", [2, 3])], [init("one", np.ones((2, 3), np.float32))]),
                  level=1)
    assert ops(g) == ["Mul"]


def test_transposes_merge_and_cancel():
    nodes = [mk("Transpose", ["x"], ["a"], perm=[1, 0, 2]), mk("Transpose", ["a"], ["b"], perm=[1, 0, 2]),
             mk("Relu", ["b"], ["c"]), mk("Transpose", ["c"], ["d"], perm=[0, 2, 1]),
             mk("Transpose", ["d"], ["y"], perm=[2, 0, 1])]
    g = optimized(model(nodes, [tensor("x", [2, 3, 4])], [tensor("y", [3, 2, 4])]), level=1)
    assert ops(g) == ["Relu", "Transpose"]


def test_identity_on_graph_input_to_output_is_kept():
    g = optimized(model([mk("Identity", ["x"], ["y"])], [tensor("x", [2])], [tensor("y", [2])]), level=3)
    assert ops(g) == ["Identity"] and g.outputs[0].name == "y"


def test_cse_merges_duplicates():
    nodes = [mk("Relu", ["x"], ["a"]), mk("Relu", ["x"], ["b"]), mk("Add", ["a", "b"], ["y"])]
    g = optimized(model(nodes, [tensor("x", [4])], [tensor("y", [4])]), level=1)
    assert ops(g) == ["Relu", "Add"]
    add = g.nodes[1]
    assert add.inputs[0] is add.inputs[1]


def test_dead_code_removed():
    nodes = [mk("Relu", ["x"], ["y"]), mk("Sigmoid", ["x"], ["unused"])]
    g = optimized(model(nodes, [tensor("x", [4])], [tensor("y", [4])]), level=1)
    assert ops(g) == ["Relu"]


def test_folding_does_not_blow_up_weights():
    from ember.frontend.onnx import import_onnx
    from ember.ops.infer import infer_shapes

    nodes = [mk("Expand", ["c", "shape"], ["big"]), mk("Add", ["x", "big"], ["y"])]
    inits = [init("c", np.float32(1.5)), init("shape", np.array([512, 1024], np.int64))]
    g = import_onnx(model(nodes, [tensor("x", [512, 1024])], [tensor("y", [512, 1024])], inits))
    infer_shapes(g)
    fold_constants(g, PassContext())
    assert "Expand" in ops(g)  # 2 MiB from 4 bytes: left for run time


def test_pattern_matcher_binds_same_value_twice():
    from ember.frontend.onnx import import_onnx

    nodes = [mk("Sigmoid", ["x"], ["s"]), mk("Mul", ["s", "x"], ["y"])]
    g = import_onnx(model(nodes, [tensor("x", [4])], [tensor("y", [4])]))
    pat = P("Mul", P.any("x"), P("Sigmoid", P.any("x")))
    matches = list(pat.match(g.outputs[0], Match()))
    assert len(matches) == 1 and matches[0]["x"] is g.inputs[0]  # found with the inputs swapped
    assert not list(P("Mul", P.any("x"), P("Sigmoid", P.any("x"))).match(g.nodes[0].outputs[0], Match()))


def test_pass_functions_report_change():
    from ember.frontend.onnx import import_onnx
    from ember.ops.infer import infer_shapes

    g = import_onnx(model([mk("Relu", ["x"], ["y"]), mk("Relu", ["x"], ["z"])], [tensor("x", [4])],
                          [tensor("y", [4])]))
    infer_shapes(g)
    assert remove_dead_code(g, PassContext()) is True
    assert remove_dead_code(g, PassContext()) is False
    assert eliminate_common_subexpressions(g, PassContext()) is False
