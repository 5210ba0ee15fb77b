"""Model instances on the one run path, on the CPU: ``emulated_graphs()`` runs the GPU path's plans
(staging slots, shape buckets, two batches in flight) without a GPU, so the server's staged path is
tested here with concurrent clients; tests/serve/test_serve_cuda.py runs it on real CUDA engines.

What must hold: every request gets its own rows back whatever bucket its batch ran in; outputs are
views of the slot's pinned memory, one request's rows next to the next's; a slot is not written
again while a response still holds views of it; nothing is planned per request after load."""
from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

import ember
from ember.runtime.context import emulated_graphs
from ember.serve import instance as instance_mod
from ember.serve.batcher import BatchPolicy, DynamicBatcher
from ember.serve.config import QueuePolicy
from ember.serve.engine import EngineAdapter
from ember.serve.instance import EngineInstance

from .conftest import RepoBuilder, start_server

pytestmark = pytest.mark.timeout(300)

STAGED_AFFINE = """
max_batch_size: 16
dynamic_batching: {max_queue_delay_us: 2000}
instance_count: 2
"""

STAGED_ADDSUB = """
max_batch_size: 8
dynamic_batching: {max_queue_delay_us: 1000}
instance_count: 1
"""


def _staged_batcher(engine_path: Path, instances: int = 1, max_batch: int = 16, delay_ms: float = 20):
    adapter = EngineAdapter(ember.Engine.load(str(engine_path)), engine_path)
    runners = [EngineInstance(adapter, f"test instance {i}") for i in range(instances)]
    policy = BatchPolicy(max_batch, dynamic=True, max_queue_delay_ns=int(delay_ms * 1e6),
                         queue_policies={1: QueuePolicy(max_queue_size=256)})
    return DynamicBatcher("test", runners, policy), runners


def _scalar_sum_engine(path: Path) -> Path:
    """s = sum(x), x: float32[3], s a scalar: a model without a batch dim and with a 0-d output."""
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0)], "sum",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                          [helper.make_tensor_value_info("s", TensorProto.FLOAT, [])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    ember.build(model.SerializeToString()).save(str(path))
    return path


@pytest.fixture(scope="module")
def staged_server(tmp_path_factory, engines):
    rb = RepoBuilder(tmp_path_factory.mktemp("staged") / "repo", engines)
    rb.add("affine", "affine", STAGED_AFFINE)
    rb.add("addsub", "addsub", STAGED_ADDSUB)
    rb.add("nobatch", "affine", "max_batch_size: 0\ninstance_count: 1\n")
    (rb.root / "scalar" / "1").mkdir(parents=True)
    _scalar_sum_engine(rb.root / "scalar" / "1" / "model.engine")
    # the switch is read when a context is made (at load, on each instance's thread); it is global, so
    # it is on only while the server starts
    with emulated_graphs():
        srv = start_server(rb.root, cache_dir=tmp_path_factory.mktemp("cache"))
    try:
        yield srv
    finally:
        srv.stop()


def _served(srv, name: str):
    return srv.service.repository.get(name, None)


def test_instances_are_staged_and_buckets_captured_at_load(staged_server):
    for name, buckets in (("affine", [1, 2, 4, 8, 16]), ("addsub", [1, 2, 4, 8])):
        model = _served(staged_server, name)
        assert all(r.staged and r.depth == 2 for r in model.batcher.runners), name
        assert all(r.captured == buckets for r in model.batcher.runners), [r.captured for r in model.batcher.runners]


def test_concurrent_clients_get_their_own_rows_across_bucket_sizes(staged_server):
    """24 clients over HTTP (binary and JSON) and gRPC, 1 to 5 rows per request: batches of many sizes
    pad into the captured buckets; each response holds exactly its own request's rows."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    import tritonclient.http as httpclient

    model = _served(staged_server, "affine")
    plans_before = [len(r.ctx._plans) for r in model.batcher.runners]
    before = model.stats.as_dict()
    errors: list[BaseException] = []
    barrier = threading.Barrier(24)

    def client(i: int) -> None:
        rng = np.random.default_rng(i)
        try:
            if i % 3 == 2:
                c = grpcclient.InferenceServerClient(f"127.0.0.1:{staged_server.grpc_port}")
                mk = grpcclient.InferInput
            else:
                c = httpclient.InferenceServerClient(f"127.0.0.1:{staged_server.http_port}", concurrency=1)
                mk = httpclient.InferInput
            barrier.wait(30)
            for _ in range(12):
                rows = int(rng.integers(1, 6))
                x = rng.standard_normal((rows, 4)).astype(np.float32)
                inp = mk("x", [rows, 4], "FP32")
                if i % 3 == 1:
                    inp.set_data_from_numpy(x, binary_data=False)
                else:
                    inp.set_data_from_numpy(x)
                y = c.infer("affine", [inp]).as_numpy("y")
                np.testing.assert_allclose(y, x * 2 + 1, rtol=1e-6, atol=1e-6)
            c.close()
        except BaseException as e:  # reported below with the client's number
            errors.append(AssertionError(f"client {i}: {type(e).__name__}: {e}"))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    after = model.stats.as_dict()
    runs = after["execution_count"] - before["execution_count"]
    assert after["inference_count"] - before["inference_count"] >= 24 * 12
    assert runs < 24 * 12, "no request shared a batch"
    sizes = {b["batch_size"] for b in after["batch_stats"]}
    assert len(sizes) >= 3 and max(sizes) > 4, sizes
    # the buckets were planned at load: traffic of any batch size made no new plan
    assert [len(r.ctx._plans) for r in model.batcher.runners] == plans_before


def test_two_inputs_two_outputs_staged(staged_server):
    rng = np.random.default_rng(3)
    base = f"http://127.0.0.1:{staged_server.http_port}"

    def one(rows: int) -> None:
        a, b = (rng.standard_normal((rows, 3)).astype(np.float32) for _ in range(2))
        with httpx.Client(base_url=base, timeout=30) as c:
            r = c.post("/v2/models/addsub/infer", json={"inputs": [
                {"name": "a", "shape": [rows, 3], "datatype": "FP32", "data": a.ravel().tolist()},
                {"name": "b", "shape": [rows, 3], "datatype": "FP32", "data": b.ravel().tolist()}]})
        assert r.status_code == 200, r.text
        out = {o["name"]: np.array(o["data"], np.float32).reshape(o["shape"]) for o in r.json()["outputs"]}
        np.testing.assert_allclose(out["sum"], a + b, rtol=1e-6)
        np.testing.assert_allclose(out["diff"], a - b, rtol=1e-6)

    threads = [threading.Thread(target=one, args=(1 + i % 3,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


def test_models_without_a_batch_dim_and_scalar_outputs_run_staged(staged_server):
    base = f"http://127.0.0.1:{staged_server.http_port}"
    assert all(r.staged for m in ("nobatch", "scalar") for r in _served(staged_server, m).batcher.runners)
    with httpx.Client(base_url=base, timeout=30) as c:
        for rows in (1, 3, 2):
            x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
            r = c.post("/v2/models/nobatch/infer", json={"inputs": [
                {"name": "x", "shape": [rows, 4], "datatype": "FP32", "data": x.ravel().tolist()}]})
            assert r.status_code == 200, r.text
            np.testing.assert_array_equal(np.array(r.json()["outputs"][0]["data"]), (x * 2 + 1).ravel())
        r = c.post("/v2/models/scalar/infer", json={"inputs": [
            {"name": "x", "shape": [3], "datatype": "FP32", "data": [1.5, 2, 3]}]})
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        assert out["shape"] == [] and out["data"] == [6.5]


def test_outputs_are_views_of_one_slot_sliced_per_request(engines):
    """Three requests in one batch: each output is a view (no copy) of its rows of the slot's pinned
    output buffer, the second request's rows right after the first's."""
    async def main():
        with emulated_graphs():
            b, runners = _staged_batcher(engines["affine"], delay_ms=50)
            await b.open()
            b.start()
            xs = [np.full((n, 4), i, np.float32) for i, n in enumerate((2, 3, 1))]
            res = await asyncio.gather(*[b.submit({"x": x}, x.shape[0]) for x in xs])
            await b.close()
        return xs, res

    xs, res = asyncio.run(main())
    assert {r.timings.batch_size for r in res} == {6}  # one batch of 6 (bucket 8)
    ys = [r.outputs["y"] for r in res]
    for x, y in zip(xs, ys):
        np.testing.assert_array_equal(y, x * 2 + 1)
        assert not y.flags.owndata and isinstance(y.base.base, memoryview)  # a view, rooted in a buffer export
    addr = [y.__array_interface__["data"][0] for y in ys]
    row = 4 * 4
    assert addr[1] == addr[0] + 2 * row and addr[2] == addr[1] + 3 * row  # slices of one buffer, in batch order


def test_a_slot_is_not_overwritten_while_a_response_holds_its_outputs(engines, monkeypatch, caplog):
    """Hold batch 1's outputs and keep the server busy with batches of the same bucket: two batches
    later its slot comes round again; the instance must not overwrite it (it runs unstaged after
    LEASE_WAIT_S), and once the outputs are dropped the staged path resumes."""
    monkeypatch.setattr(instance_mod, "LEASE_WAIT_S", 0.2)

    async def main():
        with emulated_graphs():
            b, (runner,) = _staged_batcher(engines["affine"], delay_ms=0)
            await b.open()
            b.start()
            held = await b.submit({"x": np.full((3, 4), 7, np.float32)}, 3)
            y_held = held.outputs["y"]
            for v in range(6):  # batches of 3: the same plan (bucket 4) and its two slots
                r = await b.submit({"x": np.full((3, 4), v, np.float32)}, 3)
                np.testing.assert_array_equal(r.outputs["y"], np.full((3, 4), 2 * v + 1, np.float32))
                del r
            np.testing.assert_array_equal(y_held, np.full((3, 4), 15, np.float32))  # untouched
            fallbacks = sum("still referenced" in m for m in caplog.messages)
            del held, y_held
            caplog.clear()
            for v in range(4):
                r = await b.submit({"x": np.full((3, 4), v, np.float32)}, 3)
                np.testing.assert_array_equal(r.outputs["y"], np.full((3, 4), 2 * v + 1, np.float32))
                del r
            resumed = not any("still referenced" in m for m in caplog.messages)
            await b.close()
            return fallbacks, resumed

    with caplog.at_level(logging.WARNING, logger="ember.serve"):
        fallbacks, resumed = asyncio.run(main())
    assert fallbacks >= 1, "the held slot came round again without the instance noticing"
    assert resumed, "the staged path did not resume after the outputs were released"


def test_a_bad_batch_is_rerun_request_by_request_on_the_staged_path(engines):
    """A request whose shape the engine refuses (a wrong non-batch dim slipped past the config) fails
    alone with a 400-class error; its batch mates still get their rows."""
    from ember.serve.errors import BadRequestError

    async def main():
        with emulated_graphs():
            b, _ = _staged_batcher(engines["affine"], delay_ms=50)
            await b.open()
            b.start()
            good = [b.submit({"x": np.full((1, 4), i, np.float32)}, 1) for i in range(3)]
            bad = b.submit({"x": np.zeros((1, 5), np.float32)}, 1)  # 5 columns: another signature, alone
            res = await asyncio.gather(*good, bad, return_exceptions=True)
            await b.close()
            return res

    res = asyncio.run(main())
    for i, r in enumerate(res[:3]):
        np.testing.assert_array_equal(r.outputs["y"], np.full((1, 4), 2 * i + 1, np.float32))
    assert isinstance(res[3], BadRequestError) and "x" in str(res[3])


def test_cpu_engines_keep_the_plain_path(engines):
    async def main():
        b, (runner,) = _staged_batcher(engines["affine"])
        await b.open()
        b.start()
        r = await b.submit({"x": np.ones((2, 4), np.float32)}, 2)
        await b.close()
        return runner, r

    runner, r = asyncio.run(main())
    assert not runner.staged and runner.depth == 1 and runner.capture_buckets({"x": (4,)}, 8) == []
    np.testing.assert_array_equal(r.outputs["y"], np.full((2, 4), 3, np.float32))


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_64_clients_on_the_staged_path_zero_failures_and_no_held_slots(staged_server, protocol, caplog):
    """ember perf's load generator, 64 connections for 4 s: no failure, and the front ends release
    every output view in time (no batch had to run unstaged because a slot was still held)."""
    from ember.serve.perf import PerfTarget, measure

    port = staged_server.http_port if protocol == "http" else staged_server.grpc_port
    model = _served(staged_server, "affine")
    before = model.stats.as_dict()["execution_count"]
    with caplog.at_level(logging.WARNING, logger="ember.serve"):
        r = measure(PerfTarget(f"127.0.0.1:{port}", "affine", protocol=protocol, processes=2), 64, 4.0, 0.5)
    assert r.failures == 0 and r.requests > 0, r.errors
    assert model.stats.as_dict()["execution_count"] > before
    assert not [m for m in caplog.messages if "still referenced" in m]
