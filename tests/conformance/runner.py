"""Run one ONNX backend node test case through ember's reference runtime."""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto

from ember.frontend.onnx import import_onnx
from ember.ops.torch_types import to_numpy_value, to_torch_value
from ember.runtime.engine import Engine
from tests.roundtrip import track

_OK = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT8,
       TensorProto.INT16, TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8, TensorProto.UINT16,
       TensorProto.UINT32, TensorProto.UINT64, TensorProto.BOOL}


def eligible(case) -> bool:
    """Default domain, every graph input/output a float, int or bool tensor (the issue's 1,6xx cases)."""
    m = case.model
    if any(n.domain not in ("", "ai.onnx") for n in m.graph.node):
        return False
    for vi in list(m.graph.input) + list(m.graph.output):
        if vi.type.WhichOneof("value") != "tensor_type" or vi.type.tensor_type.elem_type not in _OK:
            return False
    return True


def collect():
    import warnings

    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    return [c for c in cases if eligible(c)]


def run_case(case) -> None:
    model: onnx.ModelProto = case.model
    torch.manual_seed(0)  # unseeded random ops draw the same numbers whatever ran before (no chance XPASS)
    graph = import_onnx(model)
    interp = track(Engine(graph, device="cpu"))._interp  # each run also round-trips through an engine file
    init = {t.name for t in model.graph.initializer}
    in_names = [vi.name for vi in model.graph.input if vi.name not in init]
    for inputs, expected in case.data_sets:
        inputs, expected = [_from_proto(x) for x in inputs], [_from_proto(x) for x in expected]
        feeds = {g.name: to_torch_value(x) for g, x in zip(graph.inputs, inputs)}
        assert len(graph.inputs) == len(in_names)
        outs = interp.run(feeds)
        got = [to_numpy_value(outs[v.name]) for v in graph.outputs]
        assert len(got) == len(expected)
        for g, e, vi in zip(got, expected, model.graph.output):
            _compare(g, e, case.rtol, case.atol, vi.name)


def _from_proto(x):
    """Some cases (bf16, fp16 with NaN/inf) store their data as TensorProtos instead of arrays."""
    if isinstance(x, onnx.TensorProto):
        from onnx import numpy_helper

        return numpy_helper.to_array(x)
    return x


def _compare(got, exp, rtol, atol, name):
    if isinstance(exp, list):
        assert isinstance(got, list) and len(got) == len(exp), f"{name}: sequence length differs"
        for g, e in zip(got, exp):
            _compare(g, e, rtol, atol, name)
        return
    if exp is None:
        assert got is None, f"{name}: expected an empty optional"
        return
    exp = np.asarray(exp)
    got = np.asarray(got)
    assert got.dtype == exp.dtype, f"{name}: dtype {got.dtype} != expected {exp.dtype}"
    assert got.shape == exp.shape, f"{name}: shape {got.shape} != expected {exp.shape}"
    if exp.dtype.kind in "fc" or exp.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        np.testing.assert_allclose(got.astype(np.float64), exp.astype(np.float64), rtol=rtol, atol=atol,
                                   err_msg=name)
    else:
        np.testing.assert_array_equal(got, exp, err_msg=name)
