"""`ember serve --frontends N`: front-end processes on shared ports hand requests to one engine
process through shared memory. The answers (results, errors, metadata) must be those of one
process; a killed front end comes back; SIGTERM finishes the requests in flight."""
from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from ember.serve import grpc_service_pb2 as pb
from ember.serve import grpc_service_pb2_grpc as pb_grpc
from ember.serve.ipc import RingArena

from .conftest import AFFINE_CONFIG, free_port

pytestmark = pytest.mark.timeout(240)
SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(scope="module")
def fe_server(standard_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    """The standard repository served by 2 front-end processes (explicit model control)."""
    from ember.serve import ServerSettings, ServerThread

    settings = ServerSettings(standard_repo, host="127.0.0.1", http_port=0, grpc_port=0,
                              model_control_mode="explicit", cache_dir=tmp_path_factory.mktemp("fe_cache"),
                              max_request_size=1 << 20, gpu_metrics=False, frontends=2,
                              frontend_arena_bytes=1 << 20)
    with ServerThread(settings) as srv:
        yield srv


def _binary_body(x: np.ndarray) -> tuple[bytes, dict]:
    header = (b'{"inputs":[{"name":"x","shape":[%d,4],"datatype":"FP32","parameters":{"binary_data_size":%d}}],'
              b'"parameters":{"binary_data_output":true}}' % (x.shape[0], x.nbytes))
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def _http_binary(c: httpx.Client, x: np.ndarray) -> np.ndarray:
    body, headers = _binary_body(x)
    r = c.post("/v2/models/affine/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    return np.frombuffer(r.content[n:], np.float32).reshape(x.shape)


def _grpc_infer(stub, x: np.ndarray) -> np.ndarray:
    req = pb.ModelInferRequest(model_name="affine", id="q")
    req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    resp = stub.ModelInfer(req, timeout=30)
    assert resp.id == "q"
    return np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(x.shape)


def test_ring_arena_reuses_space_freed_out_of_order():
    a = RingArena(1024)
    blocks = [a.alloc(200) for _ in range(4)]  # 256 each after alignment
    assert blocks == [0, 256, 512, 768] and a.alloc(64) is None
    a.free(256)
    assert a.alloc(64) is None  # the oldest block (0) still holds the tail
    a.free(0)
    assert a.alloc(500) == 0  # wraps to the start once both are free
    assert a.alloc(64) is None
    for b in (512, 768, 0):
        a.free(b)
    assert a.used_blocks == 0 and a.alloc(1024) == 0


def test_http_and_grpc_results_under_concurrency(fe_server):
    """Several clients on both protocols at once; each answer is its own input's y = 2x + 1."""
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((int(rng.integers(1, 9)), 4)).astype(np.float32) for _ in range(96)]
    base = f"http://127.0.0.1:{fe_server.http_port}"

    def http_worker(k: int) -> int:
        with httpx.Client(base_url=base, timeout=30) as c:
            for x in inputs[k::6]:
                np.testing.assert_array_equal(_http_binary(c, x), x * 2 + 1)
                r = c.post("/v2/models/affine/infer", json={"inputs": [
                    {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]})
                assert r.status_code == 200
                np.testing.assert_allclose(r.json()["outputs"][0]["data"], (x * 2 + 1).ravel(), rtol=1e-6)
        return k

    def grpc_worker(k: int) -> int:
        with grpc.insecure_channel(f"127.0.0.1:{fe_server.grpc_port}") as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            for x in inputs[k::6]:
                np.testing.assert_array_equal(_grpc_infer(stub, x), x * 2 + 1)
        return k

    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(http_worker, k) for k in range(6)] + [pool.submit(grpc_worker, k) for k in range(6)]
        for f in futures:
            f.result(timeout=120)


def test_two_outputs_and_int64(fe_server):
    with grpc.insecure_channel(f"127.0.0.1:{fe_server.grpc_port}") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        req = pb.ModelInferRequest(model_name="addsub")
        a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.full((2, 3), 0.5, np.float32)
        for name, v in (("a", a), ("b", b)):
            req.inputs.add(name=name, datatype="FP32", shape=[2, 3])
            req.raw_input_contents.append(v.tobytes())
        out = stub.ModelInfer(req, timeout=30)
        got = {o.name: np.frombuffer(raw, np.float32).reshape(2, 3)
               for o, raw in zip(out.outputs, out.raw_output_contents)}
        np.testing.assert_array_equal(got["sum"], a + b)
        np.testing.assert_array_equal(got["diff"], a - b)
        req = pb.ModelInferRequest(model_name="scale")
        req.inputs.add(name="idx", datatype="INT64", shape=[1, 2]).contents.int64_contents.extend([5, -7])
        np.testing.assert_array_equal(np.frombuffer(stub.ModelInfer(req, timeout=30).raw_output_contents[0], np.int64),
                                      [15, -21])
    r = httpx.post(f"http://127.0.0.1:{fe_server.http_port}/v2/models/affine/infer", json={
        "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}],
        "outputs": [{"name": "y", "parameters": {"classification": 2}}]}, timeout=30)
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == ["9.000000:3", "7.000000:2"]


BAD_HTTP = [
    ("/v2/models/nope/infer", {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0] * 4}]}),
    ("/v2/models/affine/infer", {"inputs": [{"name": "x", "shape": [1, 5], "datatype": "FP32", "data": [0] * 5}]}),
    ("/v2/models/affine/infer", {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "INT32", "data": [0] * 4}]}),
    ("/v2/models/affine/infer", {"inputs": [{"name": "x", "shape": [9, 4], "datatype": "FP32", "data": [0] * 36}]}),
    ("/v2/models/affine/versions/7/infer", {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                                        "data": [0] * 4}]}),
    ("/v2/models/affine/infer", {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0] * 4}],
                                 "outputs": [{"name": "nope"}]}),
]


@pytest.mark.parametrize("path,doc", BAD_HTTP)
def test_errors_match_one_process(fe_server, server, path, doc):
    """Unknown model or version, bad shape, dtype, batch size, output: same status and message."""
    one = httpx.post(f"http://127.0.0.1:{server.http_port}{path}", json=doc, timeout=30)
    fe = httpx.post(f"http://127.0.0.1:{fe_server.http_port}{path}", json=doc, timeout=30)
    assert one.status_code >= 400
    assert (fe.status_code, fe.json()) == (one.status_code, one.json())
    req = pb.ModelInferRequest(model_name=path.split("/")[3], model_version="7" if "versions" in path else "")
    t = doc["inputs"][0]
    req.inputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
    req.raw_input_contents.append(b"\0" * (4 * len(t["data"])))
    for o in doc.get("outputs", []):
        req.outputs.add(name=o["name"])
    results = []
    for port in (server.grpc_port, fe_server.grpc_port):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=30)
            results.append((e.value.code(), e.value.details()))
    assert results[0] == results[1]


def test_malformed_requests_do_not_hurt_the_engine(fe_server):
    base = f"http://127.0.0.1:{fe_server.http_port}"
    body, headers = _binary_body(np.zeros((2, 4), np.float32))
    assert httpx.post(f"{base}/v2/models/affine/infer", content=body[:-3], headers=headers).status_code == 400
    assert httpx.post(f"{base}/v2/models/affine/infer", content=b"{not json").status_code == 400
    assert httpx.post(f"{base}/v2/models/affine/infer", content=b"x" * (2 << 20)).status_code == 413
    with httpx.Client(base_url=base, timeout=30) as c:
        np.testing.assert_array_equal(_http_binary(c, np.ones((1, 4), np.float32)), np.full((1, 4), 3, np.float32))


def test_metadata_health_and_statistics(fe_server, server):
    for path in ("/v2", "/v2/models/affine", "/v2/models/triton_affine/versions/2", "/v2/models/affine/config"):
        one = httpx.get(f"http://127.0.0.1:{server.http_port}{path}", timeout=10)
        fe = httpx.get(f"http://127.0.0.1:{fe_server.http_port}{path}", timeout=10)
        assert (fe.status_code, fe.json()) == (one.status_code, one.json()), path
    base = f"http://127.0.0.1:{fe_server.http_port}"
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/affine/ready"):
        assert httpx.get(base + path, timeout=10).status_code == 200
    assert httpx.get(base + "/v2/models/nope/ready", timeout=10).status_code == 400
    assert httpx.get(base + "/v2/models/nope", timeout=10).status_code == 404
    stats = httpx.get(base + "/v2/models/affine/stats", timeout=10).json()["model_stats"]
    assert stats[0]["name"] == "affine"
    index = httpx.post(base + "/v2/repository/index", json={}, timeout=10).json()
    assert {"name": "affine", "version": "1", "state": "READY"} in [
        {k: e[k] for k in ("name", "version", "state")} for e in index]
    with grpc.insecure_channel(f"127.0.0.1:{fe_server.grpc_port}") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        assert stub.ModelMetadata(pb.ModelMetadataRequest(name="affine"), timeout=10).inputs[0].name == "x"
        assert stub.ModelConfig(pb.ModelConfigRequest(name="affine"), timeout=10).config.max_batch_size == 8
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def _metric(text: str, prefix: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def test_metrics_show_the_engine_processes_counts(fe_server):
    base = f"http://127.0.0.1:{fe_server.http_port}"
    key = 'nv_inference_request_success{model="scale",version="1"}'
    before = _metric(httpx.get(base + "/metrics", timeout=10).text, key)
    for _ in range(5):
        r = httpx.post(base + "/v2/models/scale/infer", json={"inputs": [
            {"name": "idx", "shape": [1, 2], "datatype": "INT64", "data": [1, 2]}]}, timeout=30)
        assert r.status_code == 200
    httpx.post(base + "/v2/models/nope/infer", json={"inputs": []}, timeout=30)
    text = httpx.get(base + "/metrics", timeout=10).text
    assert _metric(text, key) == before + 5
    assert _metric(text, "ember_frontends ") == 2
    assert _metric(text, 'ember_request_errors_total{protocol="http",reason="NOT_FOUND"}') >= 1


def test_load_and_unload_in_explicit_mode(fe_server):
    base = f"http://127.0.0.1:{fe_server.http_port}"
    doc = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 1, 2, 3]}]}
    assert httpx.post(base + "/v2/repository/models/nobatch/unload", timeout=60).status_code == 200
    assert httpx.get(base + "/v2/models/nobatch/ready", timeout=10).status_code == 400
    r = httpx.post(base + "/v2/models/nobatch/infer", json={"inputs": [
        {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 1, 2, 3]}]}, timeout=30)
    assert r.status_code in (404, 503)
    with grpc.insecure_channel(f"127.0.0.1:{fe_server.grpc_port}") as ch:
        pb_grpc.GRPCInferenceServiceStub(ch).RepositoryModelLoad(
            pb.RepositoryModelLoadRequest(model_name="nobatch"), timeout=120)
    r = httpx.post(base + "/v2/models/nobatch/infer", json={"inputs": [
        {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 1, 2, 3]}]}, timeout=30)
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [1, 3, 5, 7]
    r = httpx.post(base + "/v2/repository/models/nosuch/load", timeout=60)
    assert r.status_code >= 400 and "nosuch" in r.json()["error"]
    assert httpx.post(base + "/v2/models/affine/infer", json=doc, timeout=30).status_code == 200


def test_a_killed_front_end_is_restarted(fe_server):
    sup = fe_server.server._supervisor
    old = {i: link.proc.pid for i, link in sup.links.items()}
    assert len(old) == 2
    os.kill(old[0], signal.SIGKILL)
    base = f"http://127.0.0.1:{fe_server.http_port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        links = dict(sup.links)
        if 0 in links and links[0].proc.pid != old[0] and links[0].up.done():
            break
        time.sleep(0.05)
    else:
        raise AssertionError("front end 0 was not restarted within 60 s")
    assert sup.links[1].proc.pid == old[1]
    with httpx.Client(base_url=base, timeout=30) as c:  # connections now land on either process
        for _ in range(20):
            np.testing.assert_array_equal(_http_binary(c, np.ones((2, 4), np.float32)), np.full((2, 4), 3, np.float32))
            c.headers["connection"] = "close"
    assert _metric(httpx.get(base + "/metrics", timeout=10).text, "ember_frontend_restarts_total") >= 1


def test_arena_full_falls_back_to_inline(repo_builder, make_server, tmp_path):
    """Requests larger than the arena still get their answer (their bytes go on the socket)."""
    repo_builder.add("affine", "affine", "max_batch_size: 8192\ndynamic_batching: {max_queue_delay_us: 0}\n")
    srv = make_server(repo_builder.root, frontends=1, frontend_arena_bytes=64 << 10, cache_dir=tmp_path / "c")
    x = np.arange(4 * 5000, dtype=np.float32).reshape(5000, 4)  # 80 KB: more than the arena holds
    with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        with ThreadPoolExecutor(4) as pool:
            for y in pool.map(lambda _: _grpc_infer(stub, x), range(8)):
                np.testing.assert_array_equal(y, x * 2 + 1)
    text = httpx.get(f"http://127.0.0.1:{srv.http_port}/metrics", timeout=10).text
    assert _metric(text, "ember_frontend_inline_tensors_total") >= 1


def test_sigterm_completes_in_flight_requests(repo_builder, tmp_path):
    repo_builder.add("slow", "affine", "max_batch_size: 8\ndynamic_batching: {max_queue_delay_ms: 1500}\n")
    http, grpc_port = free_port(), free_port()
    base = f"http://127.0.0.1:{http}"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "ember.cli.main", "serve", str(repo_builder.root), "--http-port",
                             str(http), "--grpc-port", str(grpc_port), "--log-level", "warning", "--frontends", "2",
                             "--cache-dir", str(tmp_path / "c")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            try:
                if httpx.get(f"{base}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "not ready within 90 s"
            time.sleep(0.2)
        results: list = []

        def one(i: int) -> None:
            with httpx.Client(base_url=base, timeout=30) as c:
                r = c.post("/v2/models/slow/infer", json={"inputs": [
                    {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [float(i)] * 4}]})
                results.append((i, r.status_code, r.json()))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # all wait out the batching delay in the engine process
            text = httpx.get(f"{base}/metrics", timeout=5).text
            if _metric(text, 'ember_queued_requests{model="slow"') >= 6:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        assert proc.wait(30) == 0, proc.communicate()[1][-2000:]
        assert sorted(r[1] for r in results) == [200] * 6
        for i, _, doc in results:
            assert doc["outputs"][0]["data"] == [2.0 * i + 1] * 4
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/v2/health/live", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_cli_frontends_option(repo_builder):
    from click.testing import CliRunner

    from ember.cli.serve import serve_cmd

    repo_builder.add("m", "affine", AFFINE_CONFIG)
    r = CliRunner().invoke(serve_cmd, [str(repo_builder.root), "--frontends", "many"])
    assert r.exit_code != 0 and "--frontends" in r.output
    assert struct.calcsize("<I") == 4
