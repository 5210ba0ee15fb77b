"""Whole models (tests/models/zoo.py) optimized at level 3 still match ONNX Runtime, and shrink."""
from __future__ import annotations

import numpy as np
import pytest

from ember.passes import count_kernels, run_pipeline
from ember.tools.loading import import_graph

from ..models.zoo import SPECS, Zoo

CASES = [(name, "torchscript", 17) for name in SPECS] + [
    (name, "dynamo", 18) for name in ("bert", "gpt2", "llama", "resnet")]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return Zoo(tmp_path_factory.mktemp("zoo"))


def _run_ort(path, feeds):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


@pytest.mark.parametrize("name, exporter, opset", CASES, ids=[f"{n}-{e}" for n, e, _ in CASES])
def test_level3_matches_onnxruntime(zoo, name, exporter, opset):
    import ember

    exported = zoo.get(name, exporter, opset)
    feeds = exported.feeds(batch=3)
    engine = ember.build(str(exported.path), device="cpu", opt_level=3, debug=True)
    got = engine.run(feeds)
    want = _run_ort(exported.path, feeds)
    for k, w in want.items():
        np.testing.assert_allclose(got[k], w, atol=2e-4, rtol=2e-3, err_msg=f"{exported.id}: output {k}")
    g = import_graph(str(exported.path))
    before = len(g.nodes)
    run_pipeline(g, 3)
    assert count_kernels(g) < before
    ops = g.op_counts()
    assert "Identity" not in ops and "Dropout" not in ops and "BatchNormalization" not in ops
    if name in ("bert", "gpt2", "llama"):
        assert ops.get("Attention") == 2, ops  # two layers, each attention one op
        assert "Softmax" not in ops
