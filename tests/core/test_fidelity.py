"""fp16/bf16 fidelity at build time (builder/fidelity.py, builder/mixed_precision.py), on the CPU.

The model below drifts in fp16 for one reason a test can name: ``relu(conv(x)) + 1000 - 1000``
stores ``r + 1000`` (fp16 keeps 11 bits: steps of 0.5 at 1000), so the two shift layers must stay
fp32 and nothing else needs to. References: the fp32 engine on the same inputs; relative L2.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import ember
from ember.builder.fidelity import clone_graph, parse_budget
from ember.errors import EmberError
from ember.frontend.onnx import import_onnx


def drifty_model(shift: float = 1000.0) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((16, 8, 1, 1)) / 3).astype(np.float32)
    w2 = (rng.standard_normal((8, 16, 1, 1)) / 4).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Add", ["r", "shift"], ["s"], name="shift_up"),
             helper.make_node("Sub", ["s", "shift"], ["d"], name="shift_down"),
             helper.make_node("Conv", ["d", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "drifty", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                               numpy_helper.from_array(np.array(shift, np.float32), "shift")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def fresh_input(seed: int = 7) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((1, 8, 6, 6)).astype(np.float32)}


@pytest.mark.parametrize("text, value", [(0.01, 0.01), ("2e-3", 2e-3), ("none", None), ("OFF", None), (None, None)])
def test_budget_parsing(text, value):
    assert parse_budget(text) == value


@pytest.mark.parametrize("bad", ["tight", "-1e-2", "0", "nan", "inf"])
def test_bad_budgets_are_errors_that_say_what_to_give(bad):
    with pytest.raises(EmberError, match="fidelity budget") as e:
        parse_budget(bad)
    assert "none" in str(e.value)
    with pytest.raises(EmberError, match="fidelity budget"):  # every precision checks it: a typo is never ignored
        ember.build(drifty_model(), device="cpu", fidelity_budget=bad)


def test_clone_is_independent_and_shares_constant_arrays():
    g = import_onnx(drifty_model())
    c = clone_graph(g)
    assert [n.name for n in c.nodes] == [n.name for n in g.nodes]
    assert all(a is not b for a, b in zip(c.nodes, g.nodes))
    assert all(o.producer is n for n in c.nodes for o in n.outputs)
    assert c.initializers["w1"].data is g.initializers["w1"].data  # weights are not copied
    c.nodes[0].outputs[0].dtype = None
    c.nodes[0].meta["x"] = 1
    assert g.nodes[0].outputs[0].dtype is not None and "x" not in g.nodes[0].meta


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_drifting_layers_are_found_kept_fp32_and_listed(precision, tmp_path):
    e32 = ember.build(drifty_model(), device="cpu")
    e = ember.build(drifty_model(), device="cpu", precision=precision)
    fid = e.manifest["fidelity"]
    assert fid["budget"] == 1e-2 and fid["drift_before"]["y"] > 1e-2  # as converted: off by the shift's rounding
    assert fid["within_budget"] and fid["drift"]["y"] <= 1e-2
    accuracy = [line for line in e.manifest["fp32_layers"] if ": accuracy" in line]
    assert {line.split(" ")[0] for line in accuracy} == {"shift_up", "shift_down"}, accuracy  # and no conv
    assert all("output drift" in line for line in accuracy)
    want = e32.run(fresh_input())["y"]
    assert rel_l2(e.run(fresh_input())["y"], want) <= 1e-2  # holds on inputs the check never saw
    path = tmp_path / "m.engine"
    e.save(path)
    loaded = ember.Engine.load(path, device="cpu")
    assert loaded.manifest["fidelity"] == fid and loaded.manifest["fp32_layers"] == e.manifest["fp32_layers"]
    assert np.array_equal(loaded.run(fresh_input())["y"], e.run(fresh_input())["y"])


def test_opting_out_keeps_every_layer_low():
    e32 = ember.build(drifty_model(), device="cpu")
    e = ember.build(drifty_model(), device="cpu", precision="fp16", fidelity_budget="none")
    assert "fidelity" not in e.manifest
    assert not any(": accuracy" in line for line in e.manifest["fp32_layers"])
    assert rel_l2(e.run(fresh_input())["y"], e32.run(fresh_input())["y"]) > 1e-2  # the drift the check removes


def test_a_looser_budget_keeps_nothing():
    e = ember.build(drifty_model(shift=8.0), device="cpu", precision="fp16", fidelity_budget=0.5)
    fid = e.manifest["fidelity"]
    assert fid["search_runs"] == 0 and fid["layers_kept"] == 0 and fid["drift"] == fid["drift_before"]


def test_fp32_builds_have_no_fidelity_block():
    e = ember.build(drifty_model(), device="cpu")
    assert "fidelity" not in e.manifest and e.manifest["fp32_layers"] == []


def test_ember_build_reports_the_check_and_takes_a_budget(tmp_path, capsys):
    from ember.cli.main import main

    model = str(tmp_path / "drifty.onnx")
    onnx.save(drifty_model(), model)
    eng = str(tmp_path / "m.engine")
    assert main(["build", model, "--fp16", "--device", "cpu", "-o", eng]) == 0
    err = capsys.readouterr().err
    assert "fp16 fidelity: output drift from fp32 1.4e-01 as converted" in err and "within the budget 1e-02" in err
    assert "kept in fp32 (accuracy): 2 layer(s)" in err and "shift_up (Add): accuracy" in err
    assert main(["build", model, "--fp16", "--device", "cpu", "-o", eng, "--fidelity-budget", "none"]) == 0
    assert "fidelity" not in capsys.readouterr().err
    assert main(["build", model, "--fp16", "--device", "cpu", "-o", eng, "--fidelity-budget", "tight"]) == 1
    assert "fidelity budget 'tight' is not a number" in capsys.readouterr().err


def test_models_that_draw_random_numbers_are_not_checked():
    nodes = [helper.make_node("RandomNormalLike", ["x"], ["n"], scale=0.01),
             helper.make_node("Add", ["x", "n"], ["y"])]
    graph = helper.make_graph(nodes, "noisy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    e = ember.build(model, device="cpu", precision="fp16")
    assert "RandomNormalLike" in e.manifest["fidelity"]["skipped"]
    assert not any(": accuracy" in line for line in e.manifest["fp32_layers"])
