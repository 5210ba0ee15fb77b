"""IR: symbolic dims, verifier, printer, JSON round trip."""
from __future__ import annotations

import numpy as np
import pytest

from ember.errors import GraphError
from ember.ir import DType, Graph, Sym, Value, broadcast_shapes, verify
from ember.ir.serialize import graph_from_json, graph_to_json


def test_symbolic_arithmetic():
    b, s = Sym.named("batch"), Sym.named("seq")
    assert str(b * s) == "batch*seq"
    assert (b * s) // s == b
    assert b * 2 + 1 - b == b + 1
    assert (b - b) == 0 and isinstance(b - b, int)
    assert (b * 4) // 2 == b * 2
    assert (b - 3) // 2 + 1 == (b + 1) // 2 - 1  # the constant of a quotient is kept in [0, 2)
    assert (b * s + 3).evaluate({"batch": 2, "seq": 5}) == 13


def test_broadcast_symbolic_and_mismatch():
    b = Sym.named("batch")
    assert broadcast_shapes((b, 1, 3), (4, 1)) == (b, 4, 3)
    with pytest.raises(ValueError, match="do not broadcast"):
        broadcast_shapes((2, 3), (4, 3))


def _tiny_graph() -> Graph:
    g = Graph("g", opset=17)
    x = g.add_input("x", DType.FLOAT32, (Sym.named("batch"), 4))
    w = g.add_const("w", np.arange(4, dtype=np.float32))
    n = g.add_node("Add", [x, w], name="add")
    n.outputs[0].dtype, n.outputs[0].shape = DType.FLOAT32, x.shape
    n.attrs["alpha"] = float("nan")
    n.meta["group"] = 3
    g.outputs.append(n.outputs[0])
    return g


def test_verifier_accepts_and_rejects():
    g = _tiny_graph()
    verify(g)
    # use before definition
    bad = _tiny_graph()
    ghost = Value("ghost", DType.FLOAT32, (4,))
    bad.add_node("Relu", [ghost], name="relu")
    with pytest.raises(GraphError, match="ghost"):
        verify(bad)
    # double assignment
    bad2 = _tiny_graph()
    out = bad2.nodes[0].outputs[0]
    n2 = bad2.add_node("Relu", [out], outputs=[out], name="again")
    out.producer = n2
    with pytest.raises(GraphError):
        verify(bad2)
    # unknown op
    with pytest.raises(GraphError, match="not in the op registry"):
        verify(_tiny_graph(), known_ops={"Mul"})


def test_printer_and_json_round_trip():
    g = _tiny_graph()
    text = str(g)
    assert "float32[batch,4] = Add(%x, %w)" in text and "# group 3" in text
    obj, arrays = graph_to_json(g)
    g2 = graph_from_json(obj, arrays)
    assert [n.op for n in g2.nodes] == ["Add"]
    assert g2.inputs[0].shape == (Sym.named("batch"), 4)
    assert np.isnan(g2.nodes[0].attrs["alpha"]) and g2.nodes[0].meta["group"] == 3
    np.testing.assert_array_equal(g2.initializers["w"].data, np.arange(4, dtype=np.float32))
    verify(g2)
