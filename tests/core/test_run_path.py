"""The one run path (runtime/context.py), on the CPU: plans per signature and shape bucket, segments
split at host steps, tails after data-dependent shapes, LRU caps, math modes.

The GPU path's logic runs here with ``emulated_graphs()``: a "captured" segment replays by recomputing
its recorded steps from the same input objects into the same output objects, the contract of a CUDA
graph (fixed addresses). The real CUDA graphs are tested in tests/cuda/test_run_path_cuda.py.
"""
from __future__ import annotations

import threading

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import ember
from ember.runtime import mathmode
from ember.runtime.buckets import BucketPlan, bucket_size
from ember.runtime.context import emulated_graphs

F = TensorProto.FLOAT


def _save(tmp_path, nodes, inputs, outputs, inits=(), name="m.onnx", opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8  # what ONNX Runtime 1.30 reads (onnx 1.23 writes 14 by default)
    onnx.checker.check_model(m)
    p = tmp_path / name
    onnx.save(m, str(p))
    return str(p)


def _ort(path, feeds):
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _mlp(tmp_path, row_mixing=False):
    """y = relu(x @ W + b) (rows independent) or softmax over the batch axis (rows mixed)."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", F, [8, 6], rng.standard_normal((8, 6)).astype(np.float32).ravel())
    b = helper.make_tensor("b", F, [6], rng.standard_normal(6).astype(np.float32))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["hb"])]
    nodes.append(helper.make_node("Softmax", ["hb"], ["y"], axis=0) if row_mixing
                 else helper.make_node("Relu", ["hb"], ["y"], name="relu"))
    return _save(tmp_path, nodes, [helper.make_tensor_value_info("x", F, ["n", 8])],
                 [helper.make_tensor_value_info("y", F, ["n", 6])], [w, b],
                 name="mix.onnx" if row_mixing else "mlp.onnx")


@pytest.fixture
def rng():
    return np.random.default_rng(1)


def test_bucket_sizes():
    assert [bucket_size(n) for n in (1, 2, 3, 5, 8, 9, 17, 120, 129, 500, 513)] == \
        [1, 2, 4, 8, 8, 16, 24, 120, 160, 512, 640]
    p = BucketPlan("n", {"x": 0}, {"y": 0}, lo=2, hi=12)
    assert [p.bucket(n) for n in (1, 3, 9, 12, 13)] == [2, 4, 12, 12, 13]  # inside the profile, never past it


def test_padded_batches_match_exact_runs_and_share_graphs(tmp_path, rng):
    path = _mlp(tmp_path)
    with emulated_graphs():
        eng = ember.build(path, device="cpu")
        ctx = eng.create_execution_context()
        for n in (3, 4, 1, 3, 6, 16, 9):
            x = rng.standard_normal((n, 8)).astype(np.float32)
            got = ctx.run({"x": x})["y"]
            np.testing.assert_allclose(got, _ort(path, {"x": x})["y"], rtol=1e-5, atol=1e-6)
        report = ctx.capture_report()
        assert report["one_graph"], report
        # 3 and 4 share bucket 4; 6 -> 8; 9 -> 16 shares 16's plan; 1 exact
        assert len(ctx._plans) == 4, list(ctx._plans)
        assert not ctx.graph_notes


def test_rows_that_mix_run_exact_shapes_and_say_where(tmp_path, rng):
    path = _mlp(tmp_path, row_mixing=True)
    with emulated_graphs():
        eng = ember.build(path, device="cpu")
        ctx = eng.create_execution_context()
        for n in (3, 5):
            x = rng.standard_normal((n, 8)).astype(np.float32)
            np.testing.assert_allclose(ctx.run({"x": x})["y"], _ort(path, {"x": x})["y"], rtol=1e-5, atol=1e-6)
        assert len(ctx._plans) == 2
        assert any("reduces or normalizes over the batch axis" in n for n in ctx.graph_notes), ctx.graph_notes


def test_new_data_each_call_and_device_api(tmp_path, rng):
    path = _mlp(tmp_path)
    with emulated_graphs():
        eng = ember.build(path, device="cpu")
        ctx = eng.create_execution_context()
        for _ in range(3):  # the same signature: the graph must read this call's data
            x = rng.standard_normal((4, 8)).astype(np.float32)
            np.testing.assert_allclose(ctx.run({"x": x})["y"], _ort(path, {"x": x})["y"], rtol=1e-5, atol=1e-6)
            t = torch.from_numpy(rng.standard_normal((3, 8)).astype(np.float32))
            out = ctx.run_device({"x": t})["y"]
            np.testing.assert_allclose(out.numpy(), _ort(path, {"x": t.numpy()})["y"], rtol=1e-5, atol=1e-6)
        bufs = ctx.input_buffers({"x": torch.zeros(4, 8)})
        bufs["x"].copy_(torch.ones(4, 8))
        direct = ctx.run_device(bufs, reuse_outputs=True)["y"]
        np.testing.assert_allclose(direct.numpy(), _ort(path, {"x": np.ones((4, 8), np.float32)})["y"], rtol=1e-5)


def _nonzero_model(tmp_path):
    """y = 2 * x[x > 0] (a data-dependent count K), s = sum(y): a tail after NonZero."""
    two = helper.make_tensor("two", F, [], [2.0])
    zero = helper.make_tensor("zero", F, [], [0.0])
    nodes = [
        helper.make_node("Greater", ["x", "zero"], ["m"]),
        helper.make_node("NonZero", ["m"], ["idx"], name="nz"),
        helper.make_node("Transpose", ["idx"], ["idxT"], perm=[1, 0]),
        helper.make_node("GatherND", ["x", "idxT"], ["vals"]),
        helper.make_node("Mul", ["vals", "two"], ["y"]),
        helper.make_node("ReduceSum", ["y"], ["s"], keepdims=0),
    ]
    return _save(tmp_path, nodes, [helper.make_tensor_value_info("x", F, [4, 5])],
                 [helper.make_tensor_value_info("y", F, ["k"]), helper.make_tensor_value_info("s", F, [])],
                 [two, zero], name="nz.onnx")


def test_data_dependent_shapes_split_the_plan_into_a_tail(tmp_path, rng):
    path = _nonzero_model(tmp_path)
    with emulated_graphs():
        eng = ember.build(path, device="cpu")
        ctx = eng.create_execution_context()
        counts = set()
        for _ in range(6):
            x = rng.standard_normal((4, 5)).astype(np.float32)
            got, want = ctx.run({"x": x}), _ort(path, {"x": x})
            np.testing.assert_allclose(got["y"], want["y"], rtol=1e-6)
            np.testing.assert_allclose(got["s"], want["s"], rtol=1e-5)
            counts.add(got["y"].shape[0])
        report = ctx.capture_report()
        assert not report["one_graph"]
        assert any(b["node"] == "nz" and b["kind"] == "shapes" for b in report["breaks"]), report
        plan = next(iter(ctx._plans.values()))
        # a tail runs eagerly the first time its shapes are seen and is captured the second time
        assert sum(plan.tail_seen.values()) == 6 and len(plan.tail_seen) == len(counts)
        assert len(plan.tails) == sum(1 for n in plan.tail_seen.values() if n >= 2)
        x = rng.standard_normal((4, 5)).astype(np.float32)
        for _ in range(3):  # seen, captured, replayed
            np.testing.assert_allclose(ctx.run({"x": x})["y"], _ort(path, {"x": x})["y"], rtol=1e-6)
        assert ctx.capture_report()["tails_captured"] >= 1
    # the same decision on the plain CPU path, from the specializer
    spec = eng._interp.specialization({"x": torch.zeros(4, 5)})
    assert spec.tail is not None and not spec.capturable
    assert [b.node for b in spec.breaks] == ["nz"]


def _if_model(tmp_path, cond_from_value_input: bool):
    then_g = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", F, [2, 3])])
    else_g = helper.make_graph([helper.make_node("Sub", ["x", "two"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", F, [2, 3])])
    two = helper.make_tensor("two", F, [], [2.0])
    if cond_from_value_input:
        k = helper.make_tensor("k16", TensorProto.INT64, [], [16000])
        nodes = [helper.make_node("Equal", ["sr", "k16"], ["c"])]
        inputs = [helper.make_tensor_value_info("x", F, [2, 3]), helper.make_tensor_value_info("sr", TensorProto.INT64, [])]
        inits = [two, k]
    else:
        zero = helper.make_tensor("zero", F, [], [0.0])
        nodes = [helper.make_node("ReduceSum", ["x"], ["sum"], keepdims=0), helper.make_node("Greater", ["sum", "zero"], ["c"])]
        inputs = [helper.make_tensor_value_info("x", F, [2, 3])]
        inits = [two, zero]
    nodes.append(helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_g, else_branch=else_g))
    return _save(tmp_path, nodes, inputs, [helper.make_tensor_value_info("y", F, [2, 3])], inits,
                 name=f"if{int(cond_from_value_input)}.onnx")


def test_if_on_a_data_condition_is_a_host_step(tmp_path, rng):
    path = _if_model(tmp_path, cond_from_value_input=False)
    with emulated_graphs():
        eng = ember.build(path, device="cpu")
        ctx = eng.create_execution_context()
        for sign in (1, -1, 1):
            x = sign * np.abs(rng.standard_normal((2, 3))).astype(np.float32)
            np.testing.assert_allclose(ctx.run({"x": x})["y"], _ort(path, {"x": x})["y"], rtol=1e-6)
        report = ctx.capture_report()
        assert report["host_steps"] == 1 and report["segments"] == 1, report
        assert [b["node"] for b in report["breaks"]] == ["branch"]


def test_if_on_a_value_input_is_inlined_into_one_graph(tmp_path, rng):
    path = _if_model(tmp_path, cond_from_value_input=True)
    with emulated_graphs():
        eng = ember.build(path, device="cpu")
        assert eng._interp.value_inputs == {"sr"}
        ctx = eng.create_execution_context()
        for sr in (16000, 8000, 16000):
            x = rng.standard_normal((2, 3)).astype(np.float32)
            feeds = {"x": x, "sr": np.array(sr, np.int64)}
            np.testing.assert_allclose(ctx.run(feeds)["y"], _ort(path, feeds)["y"], rtol=1e-6)
            assert ctx.capture_report()["one_graph"]
        assert len(ctx._plans) == 2  # one plan per value of sr


def test_plan_cache_stays_under_its_byte_cap(tmp_path, rng):
    path = _mlp(tmp_path)
    with emulated_graphs():
        eng = ember.build(path, device="cpu")
        ctx = eng.create_execution_context(max_graph_bytes=600, buckets=False)
        for n in (2, 3, 5, 7, 2):
            x = rng.standard_normal((n, 8)).astype(np.float32)
            np.testing.assert_allclose(ctx.run({"x": x})["y"], _ort(path, {"x": x})["y"], rtol=1e-5, atol=1e-6)
        mem = ctx.memory()
        assert mem["evictions"] >= 1 and mem["plan_bytes"] <= 600 or mem["plans"] == 1, mem


def test_engine_run_draws_on_a_bounded_pool_of_contexts(tmp_path, rng):
    path = _mlp(tmp_path)
    with emulated_graphs():
        eng = ember.build(path, device="cpu")
        eng.max_contexts = 3
        seen, errors = [], []

        def worker(seed):
            try:
                r = np.random.default_rng(seed)
                for _ in range(5):
                    x = r.standard_normal((4, 8)).astype(np.float32)
                    np.testing.assert_allclose(eng.run({"x": x})["y"], _ort(path, {"x": x})["y"], rtol=1e-5,
                                               atol=1e-6)
                seen.append(id(eng.context()))
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert 1 <= len(set(seen)) <= 3 and eng._made <= 3  # 8 threads, at most 3 contexts (streams, arenas)


def test_math_modes_take_turns_and_restore_the_process_switches():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    cuda = torch.device("cuda")  # the switches are what is tested; no kernel runs
    tf32, ieee = mathmode.MathMode(tf32=True), mathmode.MathMode(tf32=False)
    inside, overlap = [], []
    gate = threading.Barrier(2)

    def run(mode, tag):
        gate.wait()
        for _ in range(50):
            with mathmode.applied(mode, cuda):
                inside.append(tag)
                if torch.backends.cuda.matmul.allow_tf32 != mode.tf32:
                    overlap.append(tag)
                inside.remove(tag)

    threads = [threading.Thread(target=run, args=(m, t)) for m, t in ((tf32, "a"), (ieee, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not overlap, "a run saw another engine's math mode"
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    with mathmode.applied(tf32, cuda):
        with pytest.raises(ember.EmberError, match="math mode"):
            with mathmode.applied(ieee, cuda):
                pass


def test_staged_runs_fill_pinned_buffers_and_overlap_two_slots(tmp_path, rng):
    """The server path: the batcher writes rows into the staged inputs, submits, and gathers the
    next batch into the other slot while the first runs."""
    path = _mlp(tmp_path)
    with emulated_graphs():
        eng = ember.build(path, device="cpu")
        ctx = eng.create_execution_context()
        xs = [rng.standard_normal((n, 8)).astype(np.float32) for n in (3, 5, 3, 3)]
        pending = []
        for x in xs:
            run = ctx.stage({"x": (x.shape, np.float32)})
            assert run.inputs["x"].shape == x.shape
            run.inputs["x"][...] = x  # straight into the slot's buffer
            run.submit()
            pending.append((x, run))
            if len(pending) == 2:  # two in flight, then collect the older
                x0, r0 = pending.pop(0)
                np.testing.assert_allclose(r0.wait()["y"], _ort(path, {"x": x0})["y"], rtol=1e-5, atol=1e-6)
                r0.release()  # done with its outputs: the slot can take the next batch
        for x0, r0 in pending:
            np.testing.assert_allclose(r0.wait()["y"], _ort(path, {"x": x0})["y"], rtol=1e-5, atol=1e-6)
        plan = ctx._plans[ctx._routes[ctx._signature({"x": ((3, 8), np.float32)}, {})][0]]
        assert len(plan.slots) == 2
        # without release(), up to MAX_SLOTS slots hold outputs, then the oldest is reused
        from ember.runtime.context import MAX_SLOTS

        runs = []
        for _ in range(MAX_SLOTS + 2):
            r = ctx.stage({"x": ((3, 8), np.float32)})
            r.inputs["x"][...] = xs[0]
            r.submit()
            runs.append(r)
        assert len(plan.slots) == MAX_SLOTS
        np.testing.assert_allclose(runs[-1].wait()["y"], _ort(path, {"x": xs[0]})["y"], rtol=1e-5, atol=1e-6)
        assert ctx.can_stage and ctx.bucket_sizes(10) == [1, 2, 4, 8, 16]


def test_inspect_says_whether_a_model_is_one_graph_and_what_breaks_it(tmp_path):
    from click.testing import CliRunner

    from ember.cli.main import cli
    from ember.tools.plan_report import graph_plan

    nz = _nonzero_model(tmp_path)
    out = CliRunner().invoke(cli, ["inspect", nz]).output
    assert "1 host step" in out and "nz (NonZero): its output shapes depend on the data" in out, out
    mlp = _mlp(tmp_path)
    assert "runs as one CUDA graph" in CliRunner().invoke(cli, ["inspect", mlp]).output
    # a value input decides the If: one graph for any value given, the value keys the plan
    eng = ember.build(_if_model(tmp_path, cond_from_value_input=True), device="cpu")
    for sr in (16000, 8000):
        plan = graph_plan(eng.graph, {"x": (2, 3), "sr": ()}, {"sr": sr})
        assert plan["one_graph"] and plan["value_inputs"] == ["sr"], plan
    data_if = ember.build(_if_model(tmp_path, cond_from_value_input=False), device="cpu")
    plan = graph_plan(data_if.graph, {"x": (2, 3)})
    assert not plan["one_graph"] and [b["node"] for b in plan["breaks"]] == ["branch"]


def test_math_modes_follow_torchs_newer_tf32_switches():
    """A process that set TF32 through fp32_precision (torch >= 2.9) cannot read allow_tf32 any more:
    ember then speaks the same API, and restores the process's setting."""
    m = torch.backends.cuda.matmul
    if not hasattr(m, "fp32_precision"):
        pytest.skip("this torch has only the legacy TF32 switches")
    before = (m.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    try:
        m.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        with mathmode.applied(mathmode.MathMode(tf32=False), torch.device("cuda")):
            assert m.fp32_precision == "ieee" and torch.backends.cudnn.conv.fp32_precision == "ieee"
        assert m.fp32_precision == "tf32"
    finally:
        m.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before


def test_tuning_feeds_take_value_inputs_from_the_constants_they_are_compared_with(tmp_path):
    """Silero-style: sr selects a branch; a random sr would tune and check fp16 on a branch the
    model rejects at the other inputs' shapes."""
    from ember.builder.profiles import opt_feeds, value_hints

    eng = ember.build(_if_model(tmp_path, cond_from_value_input=True), device="cpu")
    assert {k: int(v) for k, v in value_hints(eng.graph).items()} == {"sr": 16000}
    assert int(opt_feeds(eng.graph, [], torch.device("cpu"))["sr"]) == 16000
