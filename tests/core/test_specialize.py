"""Host-side specialization: attention masks that mask nothing are dropped; shapes come from the graph."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import ember

B, H, S, D = 2, 2, 128, 8  # the mask is B*S*S = 32768 elements: a device value, not host arithmetic


def _attention_model(fill: float, boolean: bool) -> onnx.ModelProto:
    """Attention(Q, K, V, mask) with mask = ConstantOfShape([B, 1, S, S]) built from Q's shape."""
    q, k, v = (helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", H, "s", D]) for n in "qkv")
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", H, "s", D])
    idx = {n: helper.make_tensor(n, TensorProto.INT64, [1], [i]) for n, i in (("i0", 0), ("i2", 2))}
    one = helper.make_tensor("one", TensorProto.INT64, [1], [1])
    value = (helper.make_tensor("val", TensorProto.BOOL, [1], [bool(fill)]) if boolean
             else helper.make_tensor("val", TensorProto.FLOAT, [1], [fill]))
    nodes = [
        helper.make_node("Shape", ["q"], ["qs"]),
        helper.make_node("Gather", ["qs", "i0"], ["nb"], axis=0),
        helper.make_node("Gather", ["qs", "i2"], ["ns"], axis=0),
        helper.make_node("Concat", ["nb", "one", "ns", "ns"], ["mshape"], axis=0),
        helper.make_node("ConstantOfShape", ["mshape"], ["mask"], value=value),
        helper.make_node("Attention", ["q", "k", "v", "mask"], ["y"], name="attn"),
    ]
    g = helper.make_graph(nodes, "attn", [q, k, v], [y], list(idx.values()) + [one])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])


def _reference(q, k, v, mask):
    logits = np.einsum("bhsd,bhtd->bhst", q, k) / np.sqrt(D)
    if mask is not None:
        logits = np.where(mask, logits, -np.inf) if mask.dtype == bool else logits + mask
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhst,bhtd->bhsd", p, v)


@pytest.mark.parametrize("fill, boolean, dropped", [(0.0, False, True), (-0.0, False, True), (True, True, True),
                                                    (-2.5, False, False), (False, True, False)])
def test_mask_that_masks_nothing_is_dropped(tmp_path, fill, boolean, dropped):
    path = tmp_path / "attn.onnx"
    onnx.save(_attention_model(fill, boolean), str(path))
    eng = ember.build(str(path))
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((B, H, S, D)).astype(np.float32) for n in "qkv"}
    spec = eng._interp.specialization({n: torch.from_numpy(a) for n, a in feeds.items()})
    step = next(s for s in spec.steps if s.node.op == "Attention")
    assert (step.inputs[3] is None) == dropped
    assert spec.capturable, spec.reasons  # a dropped mask is no unknown input
    if boolean and not fill:
        return  # every key masked: softmax of an all -inf row, not a case to compare
    mask = np.full((B, 1, S, S), fill, dtype=bool if boolean else np.float64)
    want = _reference(*(feeds[n].astype(np.float64) for n in "qkv"), mask)
    got = eng.run(feeds)["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_first_run_of_a_loaded_engine_does_not_import_torch_dynamo(tmp_path):
    """Conv's meta kernel imports torch._dynamo (seconds) on first use: the shapes come from the graph."""
    onnx_path = "examples/digits/digits_cnn.onnx"
    engine_path = tmp_path / "digits.engine"
    ember.build(onnx_path).save(str(engine_path))
    code = ("import sys, numpy as np, ember\n"
            f"e = ember.Engine.load({str(engine_path)!r})\n"
            "x = np.load('examples/digits/samples.npz')['image']\n"
            "e.run({'image': x})\n"
            "print('torch._dynamo' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "False"
