"""Tiny ONNX graphs for pass tests, and a check that optimizing them keeps their outputs."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ember.frontend.onnx import import_onnx
from ember.ir.graph import Graph
from ember.ops.infer import infer_shapes
from ember.passes import run_pipeline
from ember.runtime.interpreter import Interpreter
from ember.ops.torch_types import tensor_from_numpy, tensor_to_numpy

F32 = TensorProto.FLOAT


def tensor(name: str, shape, dtype=F32):
    return helper.make_tensor_value_info(name, dtype, shape)


def init(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def model(nodes, inputs, outputs, inits=(), opset: int = 18) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "t", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def random_feeds(g: Graph, dims: "dict[str, int] | None" = None, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for v in g.inputs:
        shape = tuple(d if isinstance(d, int) else (dims or {}).get(str(d), 3) for d in v.shape)
        feeds[v.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def run_graph(g: Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = Interpreter(g).run({k: tensor_from_numpy(v) for k, v in feeds.items()})
    return {k: tensor_to_numpy(v) for k, v in out.items()}


def optimized(m: onnx.ModelProto, level: int = 3, dims=None, atol: float = 1e-4) -> Graph:
    """Import, optimize at ``level`` (verifying after every pass) and check outputs are unchanged."""
    before = import_onnx(m)
    infer_shapes(before)
    g = import_onnx(m)
    infer_shapes(g)
    run_pipeline(g, level, debug=True)
    feeds = random_feeds(before, dims)
    want, got = run_graph(before, feeds), run_graph(g, feeds)
    assert list(want) == list(got), "output names changed"
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=atol, rtol=1e-4, err_msg=k)
    return g


def ops(g: Graph) -> list[str]:
    return [n.op for n in g.nodes]


def export(module, *args, opset: int = 17, dynamic: "dict | None" = None) -> onnx.ModelProto:
    """A torch module exported with the TorchScript exporter (which keeps ops decomposed)."""
    import io
    import warnings

    import torch

    buf = io.BytesIO()
    names = [f"x{i}" for i in range(len(args))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), tuple(args), buf, dynamo=False, opset_version=opset, input_names=names,
                          output_names=["y"], dynamic_axes=dynamic)
    return onnx.load_from_string(buf.getvalue())
