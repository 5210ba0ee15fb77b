"""Control flow written by others: the ONNX node tests with If/Loop/Scan optimized at every level, and a
TorchScript-exported model whose Ifs test input shapes around an LSTM (the form of Silero VAD's
op15 export, whose static-shape build failed with "input '/Constant_1/value' has no value")."""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest

import ember
from ember.frontend.onnx import import_onnx
from ember.ops.infer import infer_shapes
from ember.ops.torch_types import to_numpy_value, to_torch_value
from ember.passes import run_pipeline
from ember.passes.scope import nested_graphs
from ember.runtime.interpreter import Interpreter

from ..conformance.runner import _compare, _from_proto, collect

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

CONTROL_FLOW = ("If", "Loop", "Scan")


def _has_control_flow(g: onnx.GraphProto) -> bool:
    return any(n.op_type in CONTROL_FLOW or any(_has_control_flow(a.g) for a in n.attribute if a.HasField("g"))
               for n in g.node)


CASES = [c for c in collect() if _has_control_flow(c.model.graph)]


def test_the_suite_has_control_flow_cases():
    assert len(CASES) >= 20  # if/loop/scan and the expanded functions built on them (range, affine_grid...)


@pytest.mark.parametrize("level", [1, 3])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_node_case_optimized(case, level):
    graph = import_onnx(case.model)
    infer_shapes(graph)
    run_pipeline(graph, level, debug=True)  # verifies the graph and its scopes after every pass
    interp = Interpreter(graph, "cpu")
    for inputs, expected in case.data_sets:
        feeds = {v.name: to_torch_value(_from_proto(x)) for v, x in zip(graph.inputs, inputs)}
        outs = interp.run(feeds)
        for v, e, vi in zip(graph.outputs, expected, case.model.graph.output):
            _compare(to_numpy_value(outs[v.name]), _from_proto(e), case.rtol, case.atol, vi.name)


# -- a scripted model: Ifs on input shapes, Conv + BatchNorm + ReLU after one, an LSTM after the other --
class _ShapeSwitchedVAD(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.wide = torch.nn.Conv1d(1, 8, 4, stride=4)
        self.narrow = torch.nn.Conv1d(1, 8, 2, stride=2)
        self.bn = torch.nn.BatchNorm1d(8)
        self.lstm = torch.nn.LSTM(8, 16, batch_first=True)
        self.head = torch.nn.Linear(16, 1)
        with torch.no_grad():  # BatchNorm statistics that are not the identity
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor, state: torch.Tensor):
        x = x.unsqueeze(1)
        if x.shape[2] == 64:  # 16 kHz frames
            y = self.wide(x)
        else:
            y = self.narrow(x)
        y = torch.relu(self.bn(y)).transpose(1, 2)
        if state.shape[1] > 0:
            h, c = state[0:1], state[1:2]
        else:
            h = torch.zeros(1, x.shape[0], 16)
            c = torch.zeros(1, x.shape[0], 16)
        out, (h2, c2) = self.lstm(y, (h, c))
        return torch.sigmoid(self.head(out[:, -1])), torch.cat([h2, c2], 0)


@pytest.fixture(scope="module")
def vad_model() -> onnx.ModelProto:
    torch.manual_seed(0)
    module = torch.jit.script(_ShapeSwitchedVAD().eval())
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(2, 64), torch.randn(2, 2, 16)), buf, dynamo=False, opset_version=17,
                          input_names=["x", "state"], output_names=["p", "stateN"],
                          dynamic_axes={"x": {0: "batch", 1: "samples"}, "state": {1: "batch"}})
    m = onnx.load_from_string(buf.getvalue())
    assert [n.op_type for n in m.graph.node].count("If") == 2
    return m


def _check(m: onnx.ModelProto, eng, feeds: dict, tmp_path, device: str = "cpu", tol: float = 1e-5) -> None:
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    path = tmp_path / "vad.engine"
    eng.save(str(path))
    for e in (eng, ember.Engine.load(str(path), device=device)):
        got = e.run(feeds)
        for o, w in zip(e.outputs, want):
            np.testing.assert_allclose(np.asarray(got[o.name]), w, rtol=tol, atol=tol, err_msg=o.name)


@pytest.mark.parametrize("level", [0, 1, 2, 3])
@pytest.mark.parametrize("batch,samples", [(2, 64), (3, 32)])
def test_shape_switched_model_with_static_shapes(vad_model, tmp_path, level, batch, samples):
    rng = np.random.default_rng(batch)
    feeds = {"x": rng.standard_normal((batch, samples)).astype(np.float32),
             "state": rng.standard_normal((2, batch, 16)).astype(np.float32)}
    eng = ember.build(vad_model, device="cpu", opt_level=level, debug=True,
                      shapes={k: v.shape for k, v in feeds.items()})
    _check(vad_model, eng, feeds, tmp_path)
    ops = [n.op for n in eng.graph.nodes]
    if level >= 1:  # both conditions fold: the taken branches are inlined, no body is left
        assert "If" not in ops and not list(nested_graphs(eng.graph)) and "LSTM" in ops
    if level >= 2:  # and the inlined Conv fuses with the BatchNorm and ReLU that followed the If
        assert "BatchNormalization" not in ops and "Relu" not in ops


def test_shape_switched_model_with_dynamic_shapes(vad_model, tmp_path):
    eng = ember.build(vad_model, device="cpu", opt_level=3, debug=True)
    assert [n.op for n in eng.graph.nodes].count("If") == 2
    rng = np.random.default_rng(0)
    for batch, samples in ((2, 64), (1, 32)):
        feeds = {"x": rng.standard_normal((batch, samples)).astype(np.float32),
                 "state": rng.standard_normal((2, batch, 16)).astype(np.float32)}
        _check(vad_model, eng, feeds, tmp_path)


@pytest.mark.cuda
@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
def test_shape_switched_model_on_cuda(vad_model, tmp_path, static):
    # the inlined branch's Conv+BN+ReLU and the LSTM run on the GPU's tactics; a dynamic build keeps
    # both Ifs, whose bodies run their ops' reference implementations on the device
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((2, 64)).astype(np.float32),
             "state": rng.standard_normal((2, 2, 16)).astype(np.float32)}
    if static:
        eng = ember.build(vad_model, device="cuda", opt_level=3, shapes={k: v.shape for k, v in feeds.items()})
    else:
        profile = {"x": ((1, 32), (2, 64), (4, 64)), "state": ((2, 1, 16), (2, 2, 16), (2, 4, 16))}
        eng = ember.build(vad_model, device="cuda", opt_level=3, profiles=[profile])
    assert ("If" in [n.op for n in eng.graph.nodes]) != static
    _check(vad_model, eng, feeds, tmp_path, device="cuda", tol=1e-4)
