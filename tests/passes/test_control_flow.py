"""Passes inside If/Loop/Scan bodies: they recurse, keep outer-scope values, and inline constant Ifs.

Every model here is built with ``ember.build`` (the whole pipeline, debug mode: the graph and its
scopes are verified after every pass), run, saved, loaded and run again, and compared with ONNX
Runtime on random inputs. The structural asserts check that the pass did its work in the body.
"""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import ember
from ember.errors import GraphError
from ember.ir.graph import Graph, Value
from ember.passes.scope import check_scopes, nested_graphs

from .helpers import init, model, tensor

ort = pytest.importorskip("onnxruntime")

mk = helper.make_node
I64, BOOL = TensorProto.INT64, TensorProto.BOOL
LEVELS = [0, 1, 2, 3]


def const_node(name: str, array) -> "helper.NodeProto":
    return mk("Constant", [], [name], value=init(name + "_value", np.asarray(array)))


def body(nodes, inputs, outputs, inits=(), name="body"):
    return helper.make_graph(nodes, name, inputs, outputs, list(inits))


def loop_body(nodes, carried, outputs, inits=()):
    """A Loop body: (iteration, condition, *carried) -> (condition, *carried, *scan outputs)."""
    ins = [tensor("it", [], I64), tensor("cond_in", [], BOOL)] + carried
    return body([mk("Identity", ["cond_in"], ["cond_out"])] + nodes, ins, [tensor("cond_out", [], BOOL)] + outputs,
                inits, name="loop_body")


def check(m, feeds: dict, level: int, tmp_path, shapes=None, atol: float = 1e-5):
    """(Conditions are 1-element bool tensors, not 0-d: a 0-d bool input trips the builder's tuning
    feeds, a bug outside the passes.) Build at ``level``, compare with ONNX Runtime, save, load, compare again. Returns the engine."""
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    eng = ember.build(m, device="cpu", opt_level=level, shapes=shapes or {}, debug=True)
    path = tmp_path / f"m{level}.engine"
    eng.save(str(path))
    for e in (eng, ember.Engine.load(str(path), device="cpu")):
        got = e.run(feeds)
        for o, w in zip(e.outputs, want):
            np.testing.assert_allclose(np.asarray(got[o.name]), w, rtol=1e-5, atol=atol, err_msg=f"{o.name} O{level}")
    return eng


def graphs_ops(g: Graph) -> dict[str, list[str]]:
    return {sg.name: [n.op for n in sg.nodes] for sg in [g, *nested_graphs(g)]}


def find(g: Graph, name: str) -> Graph:
    return next(sg for sg in [g, *nested_graphs(g)] if sg.name == name)


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# -- scoping: what only a body reads stays --------------------------------------------------------
def _branch_reads_outer_constant():
    """If(flag): then x + W (W an initializer only the branch reads), else x * Constant(2) (a
    Constant node inside the branch, equal to the outer initializer 'two')."""
    then = body([mk("Add", ["x", "W"], ["t"])], [], [tensor("t", [2, 3])], name="then")
    other = body([const_node("c2", np.full(3, 2, np.float32)), mk("Mul", ["x", "c2"], ["e"])], [],
                 [tensor("e", [2, 3])], name="else")
    nodes = [mk("If", ["flag"], ["y"], then_branch=then, else_branch=other), mk("Mul", ["y", "two"], ["z"])]
    return model(nodes, [tensor("x", [2, 3]), tensor("flag", [1], BOOL)], [tensor("z", [2, 3])],
                 [init("W", rand(2, 3, seed=1)), init("two", np.full(3, 2, np.float32))])


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("flag", [True, False])
def test_initializer_read_only_inside_a_branch_survives(tmp_path, level, flag):
    # the measured failure: "input '/Constant_1/value' has no value; the graph is malformed"
    m = _branch_reads_outer_constant()
    eng = check(m, {"x": rand(2, 3), "flag": np.array([flag])}, level, tmp_path)
    assert "W" in eng.graph.initializers


def test_branch_constant_equal_to_an_outer_one_reads_the_outer_one(tmp_path):
    eng = check(_branch_reads_outer_constant(), {"x": rand(2, 3), "flag": np.array([False])}, 1, tmp_path)
    other = find(eng.graph, "else")
    assert not other.initializers
    assert other.nodes[0].inputs[1] is eng.graph.initializers["two"]


@pytest.mark.parametrize("level", LEVELS)
def test_value_computed_outside_and_read_only_in_a_loop_body_survives(tmp_path, level):
    # h = Relu(x) outside; the body adds it every iteration; W is read only by the body
    b = loop_body([mk("MatMul", ["acc", "W"], ["mm"]), mk("Add", ["mm", "h"], ["acc_out"])],
                  [tensor("acc", [2, 4])], [tensor("acc_out", [2, 4])])
    nodes = [mk("Relu", ["x"], ["h"]), mk("Loop", ["M", "", "x"], ["y"], body=b)]
    m = model(nodes, [tensor("x", [2, 4])], [tensor("y", [2, 4])],
              [init("M", np.array(3, np.int64)), init("W", rand(4, 4, seed=2) * 0.5)])
    eng = check(m, {"x": rand(2, 4)}, level, tmp_path)
    assert "Relu" in [n.op for n in eng.graph.nodes] and "W" in eng.graph.initializers


# -- every pass recurses ---------------------------------------------------------------------------------
def test_loop_body_matmul_add_tanh_becomes_one_gemm(tmp_path):
    b = loop_body([const_node("bias", rand(4, seed=3)), mk("MatMul", ["acc", "W"], ["mm"]),
                   mk("Add", ["mm", "bias"], ["pre"]), mk("Tanh", ["pre"], ["acc_out"]),
                   mk("Relu", ["acc_out"], ["step"])],
                  [tensor("acc", [2, 4])], [tensor("acc_out", [2, 4]), tensor("step", [2, 4])])
    m = model([mk("Loop", ["M", "", "x"], ["y", "steps"], body=b)], [tensor("x", [2, 4])],
              [tensor("y", [2, 4]), tensor("steps", [3, 2, 4])],
              [init("M", np.array(3, np.int64)), init("W", rand(4, 4, seed=2))])
    eng = check(m, {"x": rand(2, 4)}, 2, tmp_path)
    ops = graphs_ops(eng.graph)["loop_body"]
    assert "MatMul" not in ops and "Add" not in ops and "Tanh" not in ops
    gemm = next(n for n in find(eng.graph, "loop_body").nodes if n.op == "ember.Gemm")
    assert gemm.attrs["activation"] == "Tanh" and gemm.inputs[2] is not None  # bias and Tanh fused


def test_branch_conv_batchnorm_folds_and_dead_branch_nodes_go(tmp_path):
    bn = [init(n, v) for n, v in (("g", rand(3, seed=4) + 2), ("b", rand(3, seed=5)), ("mu", rand(3, seed=6)),
                                  ("var", np.abs(rand(3, seed=7)) + 0.5))]
    then = body([mk("Conv", ["x", "Wc"], ["c"], pads=[1, 1, 1, 1]),
                 mk("BatchNormalization", ["c", "g", "b", "mu", "var"], ["t"]),
                 mk("Sin", ["x"], ["unused"])], [], [tensor("t", [1, 3, 5, 5])], bn, name="then")
    other = body([mk("Conv", ["x", "Wc"], ["e"], pads=[1, 1, 1, 1])], [], [tensor("e", [1, 3, 5, 5])], name="else")
    m = model([mk("If", ["flag"], ["y"], then_branch=then, else_branch=other)],
              [tensor("x", [1, 2, 5, 5]), tensor("flag", [1], BOOL)], [tensor("y", [1, 3, 5, 5])],
              [init("Wc", rand(3, 2, 3, 3, seed=8))])
    for flag in (True, False):
        eng = check(m, {"x": rand(1, 2, 5, 5), "flag": np.array([flag])}, 2, tmp_path, atol=1e-4)
    then_ops = graphs_ops(eng.graph)["then"]
    assert then_ops == ["Conv"]  # BatchNormalization folded into its weights, Sin removed
    assert not {"g", "b", "mu", "var"} & set(find(eng.graph, "then").initializers)  # BN's parameters went


def test_constants_and_shape_arithmetic_fold_inside_a_body(tmp_path):
    # body: k = Constant + outer constant (folds); shape = [Shape(x)[0], -1] (folds when x is static)
    b = loop_body([const_node("k1", np.float32(0.5)), mk("Add", ["k1", "half"], ["k"]),
                   mk("Shape", ["x"], ["s"]), mk("Gather", ["s", "zero"], ["n"], axis=0),
                   mk("Unsqueeze", ["n", "zero_axes"], ["n1"]), mk("Concat", ["n1", "minus1"], ["shape"], axis=0),
                   mk("Reshape", ["x", "shape"], ["flat"]), mk("Mul", ["flat", "k"], ["scaled"]),
                   mk("Add", ["acc", "scaled"], ["acc_out"])],
                  [tensor("acc", ["N", 6])], [tensor("acc_out", ["N", 6])])
    inits = [init("M", np.array(2, np.int64)), init("half", np.float32(0.5)), init("zero", np.array(0, np.int64)),
             init("zero_axes", np.array([0], np.int64)), init("minus1", np.array([-1], np.int64))]
    m = model([mk("Flatten", ["x"], ["x2"]), mk("Loop", ["M", "", "x2"], ["y"], body=b)],
              [tensor("x", ["N", 2, 3])], [tensor("y", ["N", 6])], inits)
    feeds = {"x": rand(4, 2, 3)}
    dynamic = graphs_ops(check(m, feeds, 1, tmp_path).graph)["loop_body"]
    assert "Shape" in dynamic and dynamic.count("Add") == 1  # N unknown: the shape stays; k folded
    static = graphs_ops(check(m, feeds, 1, tmp_path, shapes={"x": (4, 2, 3)}).graph)["loop_body"]
    assert not {"Shape", "Gather", "Concat", "Unsqueeze"} & set(static) and static.count("Add") == 1


def test_scan_body_patterns_and_fusion_groups(tmp_path):
    # Scan body: y_t = x_t * sigmoid(x_t) (SiLU), state += y_t * 2 + 1 (a pointwise chain)
    b = body([mk("Sigmoid", ["xt"], ["sg"]), mk("Mul", ["xt", "sg"], ["yt"]), mk("Mul", ["yt", "two"], ["y2"]),
              mk("Add", ["y2", "one"], ["y3"]), mk("Add", ["s", "y3"], ["s_out"])],
             [tensor("s", [3]), tensor("xt", [3])], [tensor("s_out", [3]), tensor("yt", [3])], name="scan_body")
    m = model([mk("Neg", ["x"], ["nx"]), mk("Exp", ["nx"], ["ex"]),
               mk("Scan", ["s0", "ex"], ["s_final", "ys"], body=b, num_scan_inputs=1)],
              [tensor("s0", [3]), tensor("x", [5, 3])], [tensor("s_final", [3]), tensor("ys", [5, 3])],
              [init("two", np.float32(2)), init("one", np.float32(1))])
    eng = check(m, {"s0": rand(3), "x": rand(5, 3, seed=1)}, 2, tmp_path)
    sb = find(eng.graph, "scan_body")
    assert "Swish" in [n.op for n in sb.nodes] and "Sigmoid" not in [n.op for n in sb.nodes]
    inner = {n.meta["group"] for n in sb.nodes if "group" in n.meta}
    outer = {n.meta["group"] for n in eng.graph.nodes if "group" in n.meta}
    assert inner and outer and not inner & outer  # groups in both scopes, ids unique across the tree


def test_patterns_stop_at_the_body_boundary(tmp_path):
    # the outer Conv is read by an outer Relu and by a BatchNormalization inside the body: folding the
    # BN into the Conv would change what the Relu sees, so the body keeps its BN
    bn = [init(n, v) for n, v in (("g", rand(3, seed=4) + 2), ("b", rand(3, seed=5)), ("mu", rand(3, seed=6)),
                                  ("var", np.abs(rand(3, seed=7)) + 0.5))]
    b = loop_body([mk("BatchNormalization", ["c", "g", "b", "mu", "var"], ["bn"]), mk("Add", ["acc", "bn"], ["acc_out"])],
                  [tensor("acc", [1, 3, 4, 4])], [tensor("acc_out", [1, 3, 4, 4])], bn)
    m = model([mk("Conv", ["x", "Wc"], ["c"], pads=[1, 1, 1, 1]), mk("Relu", ["c"], ["r"]),
               mk("Loop", ["M", "", "r"], ["y"], body=b)],
              [tensor("x", [1, 2, 4, 4])], [tensor("y", [1, 3, 4, 4]), tensor("r", [1, 3, 4, 4])],
              [init("M", np.array(2, np.int64)), init("Wc", rand(3, 2, 3, 3, seed=8))])
    eng = check(m, {"x": rand(1, 2, 4, 4)}, 3, tmp_path, atol=1e-4)
    assert "BatchNormalization" in graphs_ops(eng.graph)["loop_body"]


def test_weights_carried_through_a_loop_become_outer_constants(tmp_path):
    # tf2onnx's Keras LSTM passes its kernel through the while loop as a carried value: in the body it
    # is an input, so nothing folds. Forwarded, the body reads the constant and its MatMul is a GEMM.
    # (The kernel is the first carried value and its final value a graph output: it becomes an Identity.)
    b = loop_body([mk("MatMul", ["acc", "w_in"], ["mm"]), mk("Tanh", ["mm"], ["acc_out"]),
                   mk("Identity", ["acc_out"], ["step"])],
                  [tensor("w_in", [4, 4]), tensor("acc", [2, 4])],
                  [tensor("w_in", [4, 4]), tensor("acc_out", [2, 4]), tensor("step", [2, 4])])
    m = model([mk("Loop", ["M", "", "W", "x"], ["w_final", "y", "steps"], body=b)], [tensor("x", [2, 4])],
              [tensor("w_final", [4, 4]), tensor("y", [2, 4]), tensor("steps", [3, 2, 4])],
              [init("M", np.array(3, np.int64)), init("W", rand(4, 4, seed=2))])
    eng = check(m, {"x": rand(2, 4)}, 2, tmp_path)
    loop = next(n for n in eng.graph.nodes if n.op == "Loop")
    assert len(loop.inputs) == 3 and len(loop.outputs) == 2  # W left the loop's interface
    assert "ember.Gemm" in graphs_ops(eng.graph)["loop_body"]
    assert [v.name for v in eng.graph.outputs] == ["w_final", "y", "steps"]


def test_scan_state_passed_through_unchanged_is_forwarded(tmp_path):
    b = body([mk("Mul", ["xt", "scale"], ["yt"]), mk("Add", ["s", "yt"], ["s_out"]), mk("Identity", ["scale"], ["same"])],
             [tensor("s", [3]), tensor("scale", [3]), tensor("xt", [3])],
             [tensor("s_out", [3]), tensor("same", [3]), tensor("yt", [3])], name="scan_body")
    m = model([mk("Scan", ["s0", "k", "x"], ["s_final", "k_final", "ys"], body=b, num_scan_inputs=1)],
              [tensor("s0", [3]), tensor("k", [3]), tensor("x", [5, 3])],
              [tensor("s_final", [3]), tensor("k_final", [3]), tensor("ys", [5, 3])])
    eng = check(m, {"s0": rand(3), "k": rand(3, seed=1), "x": rand(5, 3, seed=2)}, 1, tmp_path)
    scan = next(n for n in eng.graph.nodes if n.op == "Scan")
    assert len(scan.inputs) == 2 and [v.name for v in find(eng.graph, "scan_body").inputs] == ["s", "xt"]


# -- If with a constant condition --------------------------------------------------------------------
def _if_on_width():
    """If(Shape(x)[1] == 4): then (x + a) * Constant(2), Relu(x) (a value computed outside);
    else x - a, -x. The condition is constant once x's width is static."""
    then = body([const_node("two_t", np.float32(2)), mk("Add", ["x", "a"], ["xa"]), mk("Mul", ["xa", "two_t"], ["t0"]),
                 mk("Identity", ["r"], ["t1"])], [], [tensor("t0", ["N", "W"]), tensor("t1", ["N", "W"])], name="then")
    other = body([mk("Sub", ["x", "a"], ["e0"]), mk("Neg", ["x"], ["e1"])], [],
                 [tensor("e0", ["N", "W"]), tensor("e1", ["N", "W"])], name="else")
    nodes = [mk("Relu", ["x"], ["r"]), mk("Shape", ["x"], ["s"]), mk("Gather", ["s", "one"], ["w"], axis=0),
             mk("Equal", ["w", "four"], ["is4"]), mk("If", ["is4"], ["y0", "y1"], then_branch=then, else_branch=other)]
    return model(nodes, [tensor("x", ["N", "W"])], [tensor("y0", ["N", "W"]), tensor("y1", ["N", "W"])],
                 [init("a", np.float32(0.25)), init("one", np.array(1, np.int64)), init("four", np.array(4, np.int64))])


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("width", [4, 5])
def test_if_on_a_static_shape_is_inlined(tmp_path, level, width):
    m, feeds = _if_on_width(), {"x": rand(2, width)}
    eng = check(m, feeds, level, tmp_path, shapes={"x": (2, width)})
    ops = [n.op for n in eng.graph.nodes]
    assert ("If" in ops) == (level == 0)
    if level:
        assert not list(nested_graphs(eng.graph)) and [v.name for v in eng.graph.outputs] == ["y0", "y1"]


def test_if_on_a_dynamic_shape_stays_and_both_branches_are_optimized(tmp_path):
    m = _if_on_width()
    for width in (4, 5):
        eng = check(m, {"x": rand(3, width)}, 3, tmp_path)
    assert "If" in [n.op for n in eng.graph.nodes]
    names = [v.name for g in [eng.graph, *nested_graphs(eng.graph)] for v in g.values()]
    assert len(names) == len(set(names))  # value names stay unique across scopes


def test_if_returning_constants_and_outer_values_is_inlined(tmp_path):
    # the chosen branch returns a Constant and an outer input as the graph's outputs: Identities keep the names
    then = body([const_node("k", np.arange(3, dtype=np.float32)), mk("Identity", ["x"], ["xi"])], [],
                [tensor("k", [3]), tensor("xi", [3])], name="then")
    other = body([mk("Neg", ["x"], ["n0"]), mk("Abs", ["x"], ["n1"])], [], [tensor("n0", [3]), tensor("n1", [3])],
                 name="else")
    m = model([mk("If", ["yes"], ["y0", "y1"], then_branch=then, else_branch=other)], [tensor("x", [3])],
              [tensor("y0", [3]), tensor("y1", [3])], [init("yes", np.array(True))])
    eng = check(m, {"x": rand(3)}, 1, tmp_path)
    assert [n.op for n in eng.graph.nodes] == ["Identity", "Identity"]
    assert [v.name for v in eng.graph.outputs] == ["y0", "y1"]


def test_if_inside_a_loop_body_on_an_outer_constant_is_inlined(tmp_path):
    then = body([mk("Mul", ["acc", "W"], ["t"])], [], [tensor("t", [2, 3])], name="then")
    other = body([mk("Add", ["acc", "W"], ["e"])], [], [tensor("e", [2, 3])], name="else")
    b = loop_body([mk("If", ["use_mul"], ["acc_out"], then_branch=then, else_branch=other)],
                  [tensor("acc", [2, 3])], [tensor("acc_out", [2, 3])])
    m = model([mk("Loop", ["M", "", "x"], ["y"], body=b)], [tensor("x", [2, 3])], [tensor("y", [2, 3])],
              [init("M", np.array(3, np.int64)), init("W", rand(2, 3, seed=1)), init("use_mul", np.array(True))])
    eng = check(m, {"x": rand(2, 3)}, 1, tmp_path)
    ops = graphs_ops(eng.graph)["loop_body"]
    assert "If" not in ops and "Mul" in ops and "Add" not in ops


# -- the scope check ---------------------------------------------------------------------------------
def test_check_scopes_names_a_constant_no_scope_holds():
    g = Graph()
    x = g.add_input("x", None, (3,))
    inner = Graph(name="branch")
    lost = Value("lost", data=np.ones(3, np.float32))  # a constant in no graph's initializers
    inner.add_node("Add", [x, lost], 1, name="add")
    inner.outputs = [inner.nodes[0].outputs[0]]
    g.add_node("If", [g.add_const("c", np.array(True))], 1, {"then_branch": inner, "else_branch": inner})
    g.outputs = [g.nodes[0].outputs[0]]
    with pytest.raises(GraphError, match="'lost'.*no enclosing graph holds"):
        check_scopes(g)
    g.add_const("lost", lost.data)  # another Value of the same name is not the same constant
    with pytest.raises(GraphError, match="'lost'"):
        check_scopes(g)
    g.initializers["lost"] = lost
    check_scopes(g)


def test_fp16_keeps_bodies_fp32_when_they_read_converted_outer_values(tmp_path):
    """A Loop body reads an outer value that fp16 conversion made float16; the body (typed for fp32,
    its weights fp32) reads it through a cast back (chars2vec's LSTM-in-a-Loop failed on the H200:
    float16 x float32 in the body's MatMul)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper as h

    import ember

    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 4)).astype(np.float32)
    body = h.make_graph(
        [h.make_node("MatMul", ["r", "w"], ["rw"]), h.make_node("Add", ["c_in", "rw"], ["c_out"]),
         h.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [h.make_tensor_value_info("i", T.INT64, []), h.make_tensor_value_info("cond_in", T.BOOL, []),
                 h.make_tensor_value_info("c_in", T.FLOAT, [2, 4])],
        [h.make_tensor_value_info("cond_out", T.BOOL, []), h.make_tensor_value_info("c_out", T.FLOAT, [2, 4])],
        [h.make_tensor("w", T.FLOAT, [3, 4], w.ravel())])
    nodes = [h.make_node("Relu", ["x"], ["r"]),
             h.make_node("Loop", ["m", "t", "c0"], ["c"], body=body)]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [2, 3]),
                                  h.make_tensor_value_info("c0", T.FLOAT, [2, 4])],
                     [h.make_tensor_value_info("c", T.FLOAT, [2, 4])],
                     [h.make_tensor("m", T.INT64, [], [3]), h.make_tensor("t", T.BOOL, [], [True])])
    path = str(tmp_path / "loop.onnx")
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8), path)
    feeds = {"x": rng.standard_normal((2, 3)).astype(np.float32), "c0": rng.standard_normal((2, 4)).astype(np.float32)}
    want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    eng = ember.build(path, device="cpu", precision="fp16", fidelity_budget="off")
    got = eng.run(feeds)["c"]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2
