"""Choices (drift item 4): a choice carries its parameters and a hash of its code; the timing cache is
keyed on that hash (an edited kernel is timed again); each choice has its own tolerance for the
tuner's correctness gate; a name at load that no choice answers is an error, not a silent fallback."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # before triton is imported: kernels run in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import ember  # noqa: E402
from ember.builder.tuner import TimingCache, _mismatch, select_tactics  # noqa: E402
from ember.ir.dtypes import DType  # noqa: E402
from ember.ir.graph import Graph  # noqa: E402
from ember.kernels import QUANTIZED_TOLERANCE, TACTICS, Choice, candidates, get_tactic  # noqa: E402
from ember.ops.infer import infer_shapes  # noqa: E402

pytest.importorskip("triton")


def relu_graph() -> Graph:
    g = Graph()
    x = g.add_input("x", DType.FLOAT32, (4, 8))
    r = g.add_node("Relu", [x], 1, name="r")
    g.outputs = list(r.outputs)
    infer_shapes(g)
    return g


def relu_a(args, attrs, ctx):
    return torch.clamp_min(args[0], 0)


def relu_b(args, attrs, ctx):  # the same function, other code: an edited kernel
    return torch.where(args[0] > 0, args[0], torch.zeros_like(args[0]))


def always(node, device) -> bool:
    return True


@pytest.fixture
def cpu_choice():
    candidates(relu_graph().nodes[0], torch.device("cpu"))  # fill the registry first

    def install(run, **fields):
        TACTICS["test.relu"] = Choice("test.relu", ("Relu",), lambda n, d: True, run, **fields)
        return TACTICS["test.relu"]

    yield install
    TACTICS.pop("test.relu", None)


def test_a_choice_carries_its_parameters_and_a_hash_of_its_code():
    from ember.kernels.template_choice import TileConfig

    listed = get_tactic("triton.gemm[128x128x64,w8,s4]")
    assert listed.params["tile"] == TileConfig(128, 128, 64, 8, 4) and listed.family == "triton.gemm"
    # a tile configuration in no list (an engine from another ember version) is rebuilt from its name
    other = get_tactic("triton.gemm[32x64x16,w2,s2]")
    assert other is not None and other.params["tile"] == TileConfig(32, 64, 16, 2, 2)
    assert other.code_hash != listed.code_hash  # the parameters are part of what was timed
    assert get_tactic("triton.gemm[32x64x16,w2,s2]").code_hash == other.code_hash
    assert get_tactic("triton.gemm[3x64x16,w2,s2]") is None and get_tactic("nothing.like[it]") is None
    a = Choice("t", ("Relu",), always, relu_a)
    b = Choice("t", ("Relu",), always, relu_b)
    assert a.code_hash != b.code_hash and a.code_hash == Choice("t", ("Relu",), always, relu_a).code_hash


def test_an_edited_kernel_is_timed_again(cpu_choice):
    cache = TimingCache.open(None)
    cpu_choice(relu_a)
    first = select_tactics(relu_graph(), torch.device("cpu"), {"x": torch.randn(4, 8)}, 1, cache)
    assert first.timed == 1
    (entry,) = cache.entries.values()
    assert entry["code"]["test.relu"] == TACTICS["test.relu"].code_hash and "reference" in entry["code"]
    again = select_tactics(relu_graph(), torch.device("cpu"), {"x": torch.randn(4, 8)}, 1, cache)
    assert again.timed == 0 and again.cached == 1  # same code: the timing stands
    cpu_choice(relu_b)  # the kernel changed
    edited = select_tactics(relu_graph(), torch.device("cpu"), {"x": torch.randn(4, 8)}, 1, cache)
    assert edited.timed == 1 and edited.cached == 0
    assert next(iter(cache.entries.values()))["code"]["test.relu"] == TACTICS["test.relu"].code_hash


def test_each_choice_has_its_own_tolerance():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4096, generator=g)
    off = w + 2e-2 * torch.randn(4096, generator=g)
    strict = Choice("s", ("Relu",), lambda n, d: True, relu_a)
    loose = Choice("l", ("Relu",), lambda n, d: True, relu_a, tolerance={torch.float32: 5e-2})
    assert "relative L2" in _mismatch(off, w, 1, strict) and _mismatch(off, w, 1, loose) == ""
    # quantized outputs: one step off in a few places passes a quantized choice, never the default
    q = torch.randint(-100, 100, (4096,), generator=g, dtype=torch.int8)
    q1 = q.clone()
    q1[::512] += 1
    int8 = Choice("q", ("Relu",), lambda n, d: True, relu_a, tolerance=QUANTIZED_TOLERANCE)
    assert _mismatch(q1, q, 1, int8) == "" and "values differ" in _mismatch(q1, q, 1, strict)
    assert "relative L2" in _mismatch(q // 2, q, 1, int8)


def test_an_unknown_choice_at_load_is_an_error(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    engine = ember.build(model, device="cpu")
    engine.graph.nodes[0].meta["tactic"] = "triton.gemm[nonsense]"  # what a newer ember might write
    path = os.fspath(tmp_path / "e.engine")
    engine.save(path)
    with pytest.raises(ember.runtime.engine.FallbackError, match=r"tactic triton.gemm\[nonsense\]"):
        ember.Engine.load(path, device="cpu")
    loaded = ember.Engine.load(path, device="cpu", allow_fallback=True)  # asked for: the reference runs
    xs = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    assert np.array_equal(loaded.run({"x": xs})["y"], np.maximum(xs, 0))
