"""The tuner's correctness gate: a tactic whose output differs from the reference is never chosen."""
from __future__ import annotations

import pytest
import torch

from ember.builder.tuner import _mismatch, pick


def test_matching_outputs_pass():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=g)
    assert _mismatch(w + 1e-4 * torch.randn(64, 32, generator=g), w) == ""
    assert _mismatch((w.half(), torch.arange(3)), (w.half(), torch.arange(3))) == ""


@pytest.mark.parametrize("case, words", [
    ("noise", "relative L2"), ("nan", "relative L2 nan"), ("dtype", "expected torch.float32"),
    ("shape", "expected torch.float32[64, 32]"), ("count", "2 outputs, expected 1"), ("ints", "values differ")])
def test_wrong_outputs_are_named(case, words):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 32, generator=g)
    got, want = {
        "noise": (w + 0.2 * torch.randn(64, 32, generator=g), w),
        "nan": (w * float("nan"), w),
        "dtype": (w.half(), w),
        "shape": (w.t(), w),
        "count": ((w, w), w),
        "ints": (torch.arange(4), torch.arange(4).flip(0)),
    }[case]
    assert words in _mismatch(got, want)


def test_only_the_nodes_outputs_are_compared():
    """Attention's reference returns (Y, present_key, present_value, qk); a one-output node uses Y."""
    g = torch.Generator().manual_seed(3)
    y, extra = torch.randn(8, 4, generator=g), torch.randn(2, generator=g)
    assert _mismatch(y, (y, extra, extra, None), 1) == ""
    assert "1 outputs, expected 4" in _mismatch(y, (y, extra, extra, None))


def test_tolerance_follows_the_storage_type():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4096, generator=g)
    off = w + 3e-3 * torch.randn(4096, generator=g)  # ~3e-3 relative: fp16 rounding scale, not fp32's
    assert _mismatch(off.half(), w.half()) == ""
    assert "relative L2" in _mismatch(off.double(), w.double())


def test_reference_needs_a_clear_win():
    assert pick({"reference": 0.019, "sdpa": 0.020}) == "sdpa"  # within noise: the fused kernel
    assert pick({"reference": 0.010, "sdpa": 0.020}) == "reference"
    assert pick({"reference": 0.03, "a": 0.02, "b": 0.01}) == "b"
    assert pick({"reference": 0.03}) == "reference"


# -- the timing run: shared timings, the math mode, progress ------------------------------------------
def relu_pair():
    """Two Relu layers on same-shaped inputs: one timing serves both."""
    from ember.ir.dtypes import DType
    from ember.ir.graph import Graph
    from ember.ops.infer import infer_shapes

    g = Graph()
    x = g.add_input("x", DType.FLOAT32, (4, 8))
    a = g.add_node("Relu", [x], 1, name="a")
    b = g.add_node("Neg", a.outputs, 1, name="n")
    c = g.add_node("Relu", b.outputs, 1, name="c")
    g.outputs = list(c.outputs)
    infer_shapes(g)
    return g


@pytest.fixture
def cpu_relu_tactic():
    """A tactic that runs on the CPU (the real ones need a GPU), registered for the test only."""
    from ember.kernels import TACTICS, Tactic, candidates

    candidates(relu_pair().nodes[0], torch.device("cpu"))  # the registry is filled before we add to it
    TACTICS["test.relu"] = Tactic("test.relu", ("Relu",), lambda node, dev: True,
                                  lambda args, attrs, ctx: torch.clamp_min(args[0], 0))
    yield "test.relu"
    del TACTICS["test.relu"]


def test_nodes_with_one_signature_share_one_timing(cpu_relu_tactic):
    from ember.builder.tuner import TimingCache, select_tactics

    g = relu_pair()
    seen = []
    report = select_tactics(g, torch.device("cpu"), {"x": torch.randn(4, 8)}, 1, TimingCache.open(None), seen.append)
    assert report.timed == 1 and report.cached == 1  # the second Relu reuses the first one's timing
    assert {n.name: n.meta["tactic"] for n in g.nodes if n.op == "Relu"}.keys() == {"a", "c"}
    assert sum(report.choices.values()) == 2
    tune_msgs = [m for m in seen if getattr(m, "stage", "") == "tune"]
    assert tune_msgs and tune_msgs[0].done == 1 and tune_msgs[0].total == 2 and "Relu a" in tune_msgs[0]


def test_progress_messages_are_strings_with_counts():
    from ember.builder.progress import Progress

    p = Progress("compile", 3, 10)
    assert isinstance(p, str) and p == "compiling kernels 3/10" and (p.stage, p.done, p.total) == ("compile", 3, 10)
    assert str(Progress("tune", 1, 2, "Conv c1")) == "tuning 1/2 Conv c1"


@pytest.mark.parametrize("allow", [False, True])
def test_tuning_runs_with_the_engines_tf32_setting_and_restores_it(allow):
    from ember.builder.tuner import tf32_mode

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not allow
        with tf32_mode(allow):
            assert torch.backends.cuda.matmul.allow_tf32 is allow and torch.backends.cudnn.allow_tf32 is allow
        assert torch.backends.cuda.matmul.allow_tf32 is (not allow)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_planning_sends_each_template_compile_once_and_runs_vendor_tactics(monkeypatch):
    """The planning run (CUDA only in a build) on the CPU with stand-ins: a vendor tactic with
    prepared weights runs each node; every template launch is sent to the pool, once per kernel."""
    from concurrent.futures import Future

    import numpy as np

    from ember.builder import compile_plan
    from ember.builder.tuner import TimingCache, TuneReport
    from ember.ir.dtypes import DType
    from ember.ir.graph import Graph
    from ember.kernels import TACTICS, Tactic, candidates, compile_pool, triton_templates
    from ember.ops.infer import infer_shapes
    from ember.runtime.interpreter import Interpreter

    g = Graph()
    x = g.add_input("x", DType.FLOAT32, (4, 8))
    w = g.add_const("w", np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32))
    g1 = g.add_node("ember.Gemm", [x, w], 1, name="g1")
    g2 = g.add_node("ember.Gemm", [g1.outputs[0], w], 1, name="g2")
    g.outputs = list(g2.outputs)
    infer_shapes(g)
    candidates(g1, torch.device("cpu"))  # fill the registry before adding to it
    ran = []

    def vendor(args, attrs, ctx):
        ran.append(args[1].stride())  # the prepared (transposed-copy) weight
        return args[0] @ args[1]

    names = ["test.vendor", "test.tpl[a]", "test.tpl[b]"]
    TACTICS["test.vendor"] = Tactic("test.vendor", ("ember.Gemm",), lambda n, d: True, vendor,
                                    prepare=lambda n, c: {1: ("w@test", c["w"].t().contiguous().t())})
    for t in names[1:]:
        TACTICS[t] = Tactic(t, ("ember.Gemm",), lambda n, d: True, lambda a, at, c: a[0] @ a[1])

    class Spec:
        def __init__(self, name, shape):
            self.k = (name, shape)

    sent = []

    class Pool:
        def __init__(self):
            self.futures = {}

        def submit(self, spec):
            if spec.k not in self.futures:
                sent.append(spec.k)
                f = self.futures[spec.k] = Future()
                f.set_result(0.5)
            return self.futures[spec.k]

    class Planned:
        def __init__(self, name, args):
            self.name, self.shape = name, tuple(args[0].shape)

        def spec(self):
            return Spec(self.name, self.shape)

    monkeypatch.setattr(compile_plan, "TEMPLATES", {n: ("gemm", None) for n in names[1:]})
    monkeypatch.setattr(triton_templates, "launch_of", lambda name, args, attrs: Planned(name, args))
    monkeypatch.setattr(compile_pool, "shared_pool", lambda device: Pool())
    try:
        interp = Interpreter(g, "cpu")
        report = TuneReport()
        futures = compile_plan.plan_compiles(torch.device("cpu"), interp, {"x": torch.randn(4, 8)},
                                             {"g1": g1, "g2": g2}, TimingCache.open(None), 3, 132, report)
    finally:
        for t in names:
            del TACTICS[t]
    assert sorted(sent) == [("test.tpl[a]", (4, 8)), ("test.tpl[b]", (4, 8))]  # one compile per kernel
    assert report.compiled == 2 and [len(futures["g1"]), len(futures["g2"])] == [2, 2]
    assert ran == [(1, 8), (1, 8)]  # both nodes ran the vendor tactic on its prepared weight
    assert "tactic" not in g1.meta and not interp.bound  # the timing run starts from a clean slate
