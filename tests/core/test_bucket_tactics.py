"""Tactics per shape bucket (issue 11): the builder times anchor ops at a few sizes of the profile's
dynamic batch and records per node the winner of each bucket where they differ; the runtime gives each
specialized input signature its bucket's choice.

On the CPU, two stand-in GEMM choices (both compute the reference's result and log their calls) and a
fake timing table make ``test.small`` win at batch <= 8 and ``test.big`` above; builds time tactics as
GPU builds do (``tunes_on`` patched).
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

import ember
from ember.builder import builder as builder_mod
from ember.builder import tuner
from ember.builder.bucket_tuning import bucket_sizes, varying_symbol
from ember.errors import EngineFileError
from ember.kernels import TACTICS, Tactic, candidates
from ember.ops import get
from ember.runtime.context import emulated_graphs
from ember.runtime.engine import FallbackError
from ember.runtime.tactic_buckets import KEY, BucketChoices

from .engine_crafting import craft, members

F = TensorProto.FLOAT
PROFILE = [{"x": ((1, 8), (64, 8), (64, 8))}]


def _mlp(tmp_path) -> str:
    """y = relu(x @ W1 + b1) @ W2: two GEMMs whose M is the batch."""
    rng = np.random.default_rng(0)
    inits = [helper.make_tensor("w1", F, [8, 16], rng.standard_normal((8, 16)).astype(np.float32).ravel()),
             helper.make_tensor("b1", F, [16], rng.standard_normal(16).astype(np.float32)),
             helper.make_tensor("w2", F, [16, 4], rng.standard_normal((16, 4)).astype(np.float32).ravel())]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", F, ["batch", 8])],
                          [helper.make_tensor_value_info("y", F, ["batch", 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = tmp_path / "mlp.onnx"
    onnx.save(m, str(path))
    return str(path)


@pytest.fixture
def tuned(monkeypatch):
    """Two CPU GEMM choices, timings where 'test.small' wins at batch <= 8 and 'test.big' above, and
    builds that time tactics on the CPU. Yields the list of (choice, rows) calls."""
    calls: list[tuple[str, int]] = []

    def choice(name):
        def run(args, attrs, ctx):
            calls.append((name, int(args[0].shape[0])))
            return get("ember.Gemm").call(args, attrs, ctx)
        return run

    def fake_time(fn, reps, device, inner=1):
        del calls[:]
        fn()
        if not calls:
            return 5.0  # the reference: never the winner
        name, rows = calls[-1]
        return {"test.small": 1.0 if rows <= 8 else 3.0, "test.big": 2.0}[name]

    from ember.ir.graph import Node

    candidates(Node("ember.Gemm", [], [], {}, "probe"), torch.device("cpu"))  # fill the registry first
    for name in ("test.small", "test.big"):
        TACTICS[name] = Tactic(name, ("ember.Gemm",), lambda n, d: True, choice(name))
    monkeypatch.setattr(tuner, "_time", fake_time)
    monkeypatch.setattr(builder_mod, "tunes_on", lambda device: True)
    try:
        yield calls
    finally:
        for name in ("test.small", "test.big"):
            TACTICS.pop(name, None)


def _ort(path, x):
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _ran(calls) -> set[str]:
    return {name for name, _ in calls}


def test_bucket_sizes_and_the_bucketed_dim():
    assert bucket_sizes(1, 64) == [1, 8, 64]
    assert bucket_sizes(1, 2) == [1, 2] and bucket_sizes(4, 16) == [4, 8, 16] and bucket_sizes(8, 8) == [8]
    rec = BucketChoices("batch", (1, 8, 64), ("a", "b", "c"))
    assert [rec.choice_for(n) for n in (1, 2, 8, 9, 64, 200)] == ["a", "b", "b", "c", "c", "c"]
    from ember.frontend.onnx import import_onnx

    g = import_onnx(helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", F, ["batch", "seq"])], [helper.make_tensor_value_info("y", F, None)])))
    assert varying_symbol(g, {"x": ((1, 128), (64, 128), (64, 128))}) == ("batch", 1, 64)
    assert varying_symbol(g, {"x": ((4, 16), (4, 128), (4, 256))}) == ("seq", 16, 128)  # the batch is fixed
    assert varying_symbol(g, {"x": ((1, 128), (1, 128), (64, 128))}) is None  # opt at min: nothing below it


def test_build_records_choices_per_bucket_and_runs_each_buckets_choice(tmp_path, tuned):
    path = _mlp(tmp_path)
    eng = ember.build(path, device="cpu", profiles=PROFILE, timing_cache=None)
    gemms = [n for n in eng.graph.nodes if n.op == "ember.Gemm"]
    assert len(gemms) == 2
    for n in gemms:
        assert n.meta["tactic"] == "test.big"  # the opt winner, what older embers run
        assert n.meta[KEY] == {"version": 1, "symbol": "batch", "buckets": [
            {"upto": 1, "tactic": "test.small"}, {"upto": 8, "tactic": "test.small"},
            {"upto": 64, "tactic": "test.big"}]}
    assert eng.manifest["tactic_buckets"] == {"symbol": "batch", "sizes": [1, 8, 64], "nodes": 2}

    eng.save(tmp_path / "m.engine")
    loaded = ember.Engine.load(tmp_path / "m.engine")
    assert [n.meta[KEY] for n in loaded.graph.nodes if n.op == "ember.Gemm"] == [n.meta[KEY] for n in gemms]
    rng = np.random.default_rng(1)
    for e in (eng, loaded):
        for batch, want in ((1, "test.small"), (3, "test.small"), (8, "test.small"), (9, "test.big"),
                            (64, "test.big"), (33, "test.big")):
            x = rng.standard_normal((batch, 8)).astype(np.float32)
            del tuned[:]
            got = e.run({"x": x})["y"]
            assert _ran(tuned) == {want}, (batch, tuned)
            np.testing.assert_allclose(got, _ort(path, x), rtol=1e-5, atol=1e-5)


def test_padded_plans_and_run_device_take_the_buckets_choice(tmp_path, tuned):
    """The GPU path (emulated): a batch of 3 runs in bucket 4's plan with the <= 8 choice; 40 with
    64's; run_device and run are the same plans."""
    path = _mlp(tmp_path)
    rng = np.random.default_rng(2)
    with emulated_graphs():
        eng = ember.build(path, device="cpu", profiles=PROFILE, timing_cache=None)
        ctx = eng.create_execution_context()
        for batch, want in ((3, "test.small"), (1, "test.small"), (40, "test.big"), (3, "test.small")):
            x = rng.standard_normal((batch, 8)).astype(np.float32)
            del tuned[:]
            got = ctx.run({"x": x})["y"]
            assert _ran(tuned) == {want}, (batch, tuned)
            np.testing.assert_allclose(got, _ort(path, x), rtol=1e-5, atol=1e-5)
            del tuned[:]
            dev = ctx.run_device({"x": torch.from_numpy(x)})["y"]
            assert _ran(tuned) == {want}
            np.testing.assert_allclose(dev.numpy(), got, rtol=1e-6, atol=1e-6)
        assert ctx.capture_report({"x": rng.standard_normal((3, 8)).astype(np.float32)})["bucket"] == 4


def test_a_second_build_times_nothing_again(tmp_path, tuned):
    path, cache = _mlp(tmp_path), str(tmp_path / "cache.json")
    first = ember.build(path, device="cpu", profiles=PROFILE, timing_cache=cache)
    assert first.bucket_tuning.timed == 4  # two GEMMs at batch 1 and 8
    again = ember.build(path, device="cpu", profiles=PROFILE, timing_cache=cache)
    assert again.bucket_tuning.timed == 0 and again.bucket_tuning.cached == 4
    assert [n.meta.get(KEY) for n in again.graph.nodes] == [n.meta.get(KEY) for n in first.graph.nodes]


def test_same_winner_everywhere_records_nothing(tmp_path, tuned, monkeypatch):
    def big_wins(fn, reps, device, inner=1):
        del tuned[:]
        fn()
        return {"test.small": 2.0, "test.big": 1.0}[tuned[-1][0]] if tuned else 5.0

    monkeypatch.setattr(tuner, "_time", big_wins)
    eng = ember.build(_mlp(tmp_path), device="cpu", profiles=PROFILE, timing_cache=None)
    assert all(KEY not in n.meta for n in eng.graph.nodes)
    assert eng.manifest["tactic_buckets"]["nodes"] == 0


def _edit_graph(src, dst, edit):
    g = json.loads(members(src)["graph.json"])
    for nd in g["nodes"]:
        if "meta" in nd and KEY in nd["meta"]:
            edit(nd["meta"])
    return craft(src, dst, replace={"graph.json": json.dumps(g).encode()})


def test_an_engine_without_bucket_records_loads_and_runs_its_opt_tactic(tmp_path, tuned):
    """graph.json as written before per-bucket tactics: meta.tactic only."""
    path = _mlp(tmp_path)
    ember.build(path, device="cpu", profiles=PROFILE, timing_cache=None).save(tmp_path / "new.engine")
    old = _edit_graph(tmp_path / "new.engine", tmp_path / "old.engine", lambda meta: meta.pop(KEY))
    assert KEY.encode() not in members(old)["graph.json"]
    eng = ember.Engine.load(old)
    x = np.random.default_rng(3).standard_normal((1, 8)).astype(np.float32)
    del tuned[:]
    np.testing.assert_allclose(eng.run({"x": x})["y"], _ort(path, x), rtol=1e-5, atol=1e-5)
    assert _ran(tuned) == {"test.big"}


def test_newer_malformed_or_unknown_bucket_records_are_errors(tmp_path, tuned):
    path = _mlp(tmp_path)
    ember.build(path, device="cpu", profiles=PROFILE, timing_cache=None).save(tmp_path / "m.engine")

    def newer(meta):
        meta[KEY]["$dict"]["version"] = 2

    def unsorted(meta):
        meta[KEY]["$dict"]["buckets"].reverse()

    def unknown(meta):
        meta[KEY]["$dict"]["buckets"][0]["$dict"]["tactic"] = "test.gone"

    with pytest.raises(EngineFileError, match=r"node '.*'.*format version 2; this ember reads version 1"):
        ember.Engine.load(_edit_graph(tmp_path / "m.engine", tmp_path / "v2.engine", newer))
    with pytest.raises(EngineFileError, match="ascending order"):
        ember.Engine.load(_edit_graph(tmp_path / "m.engine", tmp_path / "bad.engine", unsorted))
    with pytest.raises(FallbackError, match=r"tactic test.gone \(batch <= 1\)"):
        ember.Engine.load(_edit_graph(tmp_path / "m.engine", tmp_path / "gone.engine", unknown))
    eng = ember.Engine.load(tmp_path / "gone.engine", allow_fallback=True)  # the reference at batch 1
    x = np.random.default_rng(4).standard_normal((1, 8)).astype(np.float32)
    del tuned[:]
    np.testing.assert_allclose(eng.run({"x": x})["y"], _ort(path, x), rtol=1e-5, atol=1e-5)
    assert not tuned


def test_inspect_shows_the_choice_per_bucket(tmp_path, tuned):
    from ember.cli.main import cli

    ember.build(_mlp(tmp_path), device="cpu", profiles=PROFILE, timing_cache=None).save(tmp_path / "m.engine")
    res = CliRunner().invoke(cli, ["inspect", str(tmp_path / "m.engine"), "--json"])
    assert res.exit_code == 0, res.output
    rows = [r for r in json.loads(res.output)["layers"] if r["op"] == "ember.Gemm"]
    assert rows and all(r["tactic_buckets"]["buckets"][0] == {"upto": 1, "tactic": "test.small"} for r in rows)
    res = CliRunner().invoke(cli, ["inspect", str(tmp_path / "m.engine")], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert "batch<=1: test.small; <=8: test.small; <=64+: test.big" in res.output


def test_bucket_tactics_off_tunes_at_opt_only(tmp_path, tuned):
    eng = ember.build(_mlp(tmp_path), device="cpu", profiles=PROFILE, timing_cache=None, bucket_tactics=False)
    assert all(KEY not in n.meta for n in eng.graph.nodes) and "tactic_buckets" not in eng.manifest
    x = np.ones((1, 8), np.float32)
    del tuned[:]
    eng.run({"x": x})
    assert _ran(tuned) == {"test.big"}
