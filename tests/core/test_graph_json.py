"""graph.json: symbolic dims stored as trees, and every malformed file a FormatError naming the spot."""
from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.ir import DType, Graph, Sym
from ember.ir.serialize import FormatError, graph_from_json, graph_to_json

SEQ, NA = Sym.named("seq-len"), Sym.named("N/A")


def _graph() -> Graph:
    """x[N/A, seq-len] -> Add(w) -> If(then: Relu of the outer value) -> out[N/A, 2*(seq-len//2)]."""
    g = Graph("g", opset=17)
    x = g.add_input("x", DType.FLOAT32, (NA, SEQ))
    w = g.add_const("w", np.arange(3, dtype=np.float32))
    add = g.add_node("Add", [x, w], name="add")
    add.outputs[0].dtype, add.outputs[0].shape = DType.FLOAT32, (NA, 2 * (SEQ // 2))
    add.attrs.update(alpha=float("inf"), axes=[[1, 2], [3]], to=DType.FLOAT16, table={"k": np.ones(2, np.int64)})
    body = Graph("then")
    r = body.add_node("Relu", [add.outputs[0]], name="relu")
    r.outputs[0].dtype, r.outputs[0].shape = DType.FLOAT32, add.outputs[0].shape
    body.outputs.append(r.outputs[0])
    cond = g.add_const("c", np.array(True))
    iff = g.add_node("If", [cond], name="if")
    iff.attrs["then_branch"] = body
    iff.outputs[0].dtype, iff.outputs[0].shape = DType.FLOAT32, (NA, 3 * (SEQ // 2) + 1)
    iff.meta["tactic"] = "reference"
    g.outputs.append(iff.outputs[0])
    return g


def _saved() -> tuple[dict, dict]:
    obj, arrays = graph_to_json(_graph())
    return json.loads(json.dumps(obj)), arrays  # through JSON text, as the engine file stores it


def test_round_trip_keeps_dims_names_and_attributes():
    obj, arrays = _saved()
    assert obj["inputs"][0]["shape"] == [{"sym": "N/A"}, {"sym": "seq-len"}]
    g = graph_from_json(obj, arrays)
    assert g.inputs[0].shape == (NA, SEQ)
    add, iff = g.nodes
    assert add.outputs[0].shape == (NA, 2 * (SEQ // 2)) and iff.outputs[0].shape == (NA, 3 * (SEQ // 2) + 1)
    assert add.outputs[0].shape[1].evaluate({"seq-len": 7}) == 6
    assert add.attrs["alpha"] == float("inf") and add.attrs["axes"] == [[1, 2], [3]]
    assert add.attrs["to"] == DType.FLOAT16 and list(add.attrs["table"]) == ["k"]
    body = iff.attrs["then_branch"]
    assert body.nodes[0].inputs[0] is add.outputs[0]  # the outer value, captured by reference
    assert graph_to_json(g)[0] == graph_to_json(_graph())[0]


def _set(obj: dict, path: list, value: Any) -> dict:
    obj = copy.deepcopy(obj)
    target = obj
    for k in path[:-1]:
        target = target[k]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return obj


_DELETE = object()
ADD = ["nodes", 0]


@pytest.mark.parametrize("path, value, msg", [
    ([*ADD, "inputs"], "x", r"node 0 \('add'\): field 'inputs' must be a list of strings"),
    ([*ADD, "inputs"], [1], r"node 0 \('add'\): field 'inputs' must be a list of strings .* holds int 1"),
    ([*ADD, "inputs"], ["ghost"], r"node 0 \('add'\): input 'ghost' is defined by no"),
    ([*ADD, "outputs"], _DELETE, r"node 0 \('add'\): field 'outputs' is missing"),
    ([*ADD, "op"], 7, r"node 0 \('add'\): field 'op' must be a string"),
    ([*ADD, "name"], None, r"node 0: field 'name' must be a string"),
    ([*ADD, "outputs", 0, "dtype"], "float128", r"output 0 \('add.*'\): field 'dtype' names no ember dtype"),
    ([*ADD, "outputs", 0, "shape"], {"a": 1}, r"'shape' must be a list of dims"),
    ([*ADD, "outputs", 0, "shape", 1], "2*(seq-len//2)", r"axis 1: dim .* is text"),
    ([*ADD, "outputs", 0, "kind"], "blob", r"field 'kind' must be one of"),
    ([*ADD, "attrs"], [], r"field 'attrs' must be an object"),
    ([*ADD, "attrs", "alpha"], {"$float": [1]}, r"attribute 'alpha': '\$float' holds"),
    ([*ADD, "attrs", "alpha"], {"$tensor": "nope"}, r"attribute 'alpha': tensor .* is not in the weights"),
    ([*ADD, "attrs", "alpha"], {"$eval": "1"}, r"unknown attribute encoding '\$eval'"),
    ([*ADD, "attrs", "to"], {"$dtype": "x"}, r"not an ember dtype"),
    (["nodes", 1, "attrs", "then_branch", "$graph", "nodes", 0, "inputs"], None,
     r"node 1 \('if'\), attribute 'then_branch': graph 'then', node 0 \('relu'\): field 'inputs' must be a list"),
    (["nodes"], {}, r"graph 'g': field 'nodes' must be a list of nodes"),
    (["nodes", 0], [], r"node 0: a node is an object"),
    (["inputs", 0, "name"], 3, r"input 0: field 'name' must be a string"),
    (["constants", 0, "name"], "missing", r"constant 0 \('missing'\): its data 'const/missing' is not in the weights"),
    (["outputs"], ["nowhere"], r"output 'nowhere' is defined by no"),
    (["outputs"], "y", r"field 'outputs' must be a list of strings"),
    (["opset"], "17", r"field 'opset' must be an int"),
    (["opset"], True, r"field 'opset' must be an int"),
    (["name"], _DELETE, r"field 'name' is missing"),
])
def test_malformed_fields_name_the_node_and_field(path, value, msg):
    obj, arrays = _saved()
    with pytest.raises(FormatError, match=msg):
        graph_from_json(_set(obj, path, value), arrays)


def test_not_an_object():
    for bad in ([], "graph", None, 3):
        with pytest.raises(FormatError, match="a graph is an object"):
            graph_from_json(bad, {})


def _nest(levels: int, wrap) -> Any:
    x: Any = 1
    for _ in range(levels):
        x = wrap(x)
    return x


@pytest.mark.parametrize("where, wrap, msg", [
    (["inputs", 0, "shape", 0], lambda x: {"max": [x, {"sym": "a"}]}, "dim expression nested deeper"),
    ([*ADD, "attrs", "axes"], lambda x: [x], "lists nested deeper"),
    ([*ADD, "attrs", "axes"], lambda x: {"$dict": {"k": x}}, "lists nested deeper"),
    ([*ADD, "attrs", "body"], lambda x: {"$graph": {"name": "b", "inputs": [], "constants": [], "outputs": [],
                                                    "nodes": [{"name": "n", "op": "If", "inputs": [],
                                                               "outputs": [], "attrs": {"g": x}}]}},
     "subgraphs nested deeper"),
])
def test_hostile_nesting_is_stopped(where, wrap, msg):
    """Parsable nesting far beyond the stack (20k levels): a FormatError, never a RecursionError."""
    obj, arrays = _saved()
    with pytest.raises(FormatError, match=msg):
        graph_from_json(_set(obj, where, _nest(20_000, wrap)), arrays)


_json = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-3, 2**64), st.floats(), st.text(max_size=5)),
                     lambda kids: st.one_of(st.lists(kids, max_size=3),
                                            st.dictionaries(st.sampled_from(["sym", "add", "name", "$graph", "$dict",
                                                                             "shape", "x"]), kids, max_size=2)),
                     max_leaves=8)


def _paths(x: Any, here: list) -> list[list]:
    out = [here]
    if isinstance(x, dict):
        for k, v in x.items():
            out += _paths(v, here + [k])
    elif isinstance(x, list):
        for i, v in enumerate(x):
            out += _paths(v, here + [i])
    return out


_ALL_PATHS = _paths(_saved()[0], [])[1:]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_ALL_PATHS), st.one_of(_json, st.just(_DELETE)))
def test_any_mutation_loads_or_is_a_format_error(path, value):
    obj, arrays = _saved()
    try:
        graph_from_json(_set(obj, path, value), arrays)
    except FormatError:
        pass
