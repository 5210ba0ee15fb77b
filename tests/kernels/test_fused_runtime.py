"""Fusion groups run as one generated kernel inside the runtime and give the node-by-node result.

On CPU the generated kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before triton
is imported), with fuse_groups="always"; on a GPU the same path runs compiled.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

import ember  # noqa: E402
from ember.runtime.interpreter import Interpreter  # noqa: E402


def _block_model() -> onnx.ModelProto:
    """x -> MatMul -> +bias -> residual add -> LayerNorm -> Gelu(tanh) * 0.5: groups around an anchor."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 32])
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [32, 32], rng.standard_normal((32, 32)).astype(np.float32) * 0.2),
             helper.make_tensor("b", TensorProto.FLOAT, [32], rng.standard_normal(32).astype(np.float32)),
             helper.make_tensor("g", TensorProto.FLOAT, [32], rng.standard_normal(32).astype(np.float32)),
             helper.make_tensor("beta", TensorProto.FLOAT, [32], rng.standard_normal(32).astype(np.float32)),
             helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]),
             helper.make_node("Add", ["mm", "b"], ["biased"]),
             helper.make_node("Sigmoid", ["biased"], ["s"]),
             helper.make_node("Mul", ["biased", "s"], ["silu"]),
             helper.make_node("Add", ["silu", "x"], ["res"]),
             helper.make_node("LayerNormalization", ["res", "g", "beta"], ["ln"], axis=-1, epsilon=1e-5),
             helper.make_node("Mul", ["ln", "half"], ["scaled"]),
             helper.make_node("Tanh", ["scaled"], ["y"])]
    g = helper.make_graph(nodes, "block", [x], [y], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_fused_steps_match_node_by_node(tmp_path):
    p = tmp_path / "block.onnx"
    onnx.save(_block_model(), str(p))
    eng = ember.build(str(p), device="cpu", opt_level=2)
    groups = {n.meta["group"] for n in eng.graph.nodes if "group" in n.meta}
    assert groups, "the optimizer marked no fusion group in this block"
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((3, 8, 32)).astype(np.float32)).to(dev)
    plain = Interpreter(eng.graph, dev, fuse_groups=False).run({"x": x})["y"]
    fused_interp = Interpreter(eng.graph, dev, fuse_groups="always")
    assert fused_interp.group_kernels, f"no group was generated: {fused_interp.groups_skipped}"
    fused = fused_interp.run({"x": x})["y"]
    spec = next(iter(fused_interp.specializations.values()))
    assert any(s.kernel is not None and s.fused > 1 for s in spec.steps)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
