"""Load on loopback against a real `ember serve` process: 64 concurrent clients for 20 s with
zero failures and bounded memory; then a flood beyond a queue limit gets 503 / UNAVAILABLE
with a clear message, and the server recovers."""
from __future__ import annotations

import http.client
import json
import math
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ember.serve.perf import PerfTarget, measure

from .conftest import RepoBuilder, free_port
from .test_lifecycle import _wait_ready, serve_process

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

LOAD_CONFIG = """
max_batch_size: 16
dynamic_batching: {max_queue_delay_us: 1000}
instance_count: 2
"""

# A queue of 4 and a long batching delay: anything beyond 4 waiting requests is refused.
FLOOD_CONFIG = """
max_batch_size: 8
dynamic_batching: {max_queue_delay_ms: 200, max_queue_size: 4}
instance_count: 1
"""


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _post(port: int, path: str, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def load_server(tmp_path_factory, engines):
    rb = RepoBuilder(tmp_path_factory.mktemp("load") / "repo", engines)
    rb.add("affine", "affine", LOAD_CONFIG)
    rb.add("flood", "affine", FLOOD_CONFIG)
    http_port, grpc_port = free_port(), free_port()
    proc = serve_process(rb.root, http_port, grpc_port, "--cache-dir", str(tmp_path_factory.mktemp("c")))
    try:
        _wait_ready(f"http://127.0.0.1:{http_port}", proc, timeout=90)
        yield proc, http_port, grpc_port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except Exception:
                proc.kill()


def test_64_clients_for_20_seconds_zero_failures_bounded_memory(load_server, record_property):
    proc, http_port, _ = load_server
    if not Path(f"/proc/{proc.pid}/status").exists():
        pytest.skip("needs /proc to read the server's memory")
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not done.wait(0.25):
            samples.append((time.monotonic() - t0, _rss_bytes(proc.pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    target = PerfTarget(f"127.0.0.1:{http_port}", "affine", timeout_s=30)
    try:
        result = measure(target, concurrency=64, duration_s=20, warmup_s=2)
    finally:
        done.set()
        sampler.join(5)
    print(f"\n64 clients x 20 s: {result.requests} requests, {result.throughput:.0f} infer/s, "
          f"p50 {result.p50_ms:.1f} ms, p90 {result.p90_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, "
          f"failures {result.failures} {result.errors}")
    for k, v in result.row().items():
        record_property(k, v)
    assert result.failures == 0, result.errors
    assert result.requests > 64 and math.isfinite(result.p99_ms) and result.p99_ms > 0
    # memory: after the first few seconds of load, RSS stays flat (no per-request growth)
    baseline = max(rss for t, rss in samples if t <= 5)
    peak = max(rss for _, rss in samples)
    print(f"server RSS: {baseline / 2**20:.0f} MiB after 5 s, peak {peak / 2**20:.0f} MiB")
    assert peak - baseline < 64 * 2 ** 20, f"RSS grew from {baseline} to {peak} bytes under steady load"
    assert proc.poll() is None


def test_flood_beyond_queue_limit_gets_503_then_recovers(load_server):
    proc, http_port, grpc_port = load_server
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}).encode()
    n = 120
    barrier = threading.Barrier(n)
    results: list[tuple[int, bytes]] = []
    lock = threading.Lock()

    def one() -> None:
        barrier.wait(30)
        r = _post(http_port, "/v2/models/flood/infer", body)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    statuses = [s for s, _ in results]
    assert len(results) == n and set(statuses) <= {200, 503}, sorted(set(statuses))
    refused = [json.loads(b)["error"] for s, b in results if s == 503]
    assert refused and statuses.count(200) >= 4
    assert all("queue is full" in m and "retry" in m for m in refused), refused[0]

    import grpc

    from ember.serve import grpc_service_pb2 as pb
    from ember.serve import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        req = pb.ModelInferRequest(model_name="flood")
        req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        req.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
        futures = [stub.ModelInfer.future(req, timeout=30) for _ in range(60)]
        codes = []
        for f in futures:
            try:
                f.result()
                codes.append("OK")
            except grpc.RpcError as e:
                codes.append(e.code().name)
                assert e.code() != grpc.StatusCode.UNAVAILABLE or "queue is full" in e.details()
        assert "UNAVAILABLE" in codes and "OK" in codes and set(codes) <= {"OK", "UNAVAILABLE"}

    # recovered: sequential requests all succeed, on the flooded model and the others
    for _ in range(3):
        status, out = _post(http_port, "/v2/models/flood/infer", body)
        assert status == 200 and json.loads(out)["outputs"][0]["data"] == [3, 5, 7, 9]
    assert _post(http_port, "/v2/models/affine/infer", body)[0] == 200
    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
    conn.request("GET", "/metrics")
    metrics = conn.getresponse().read().decode()
    conn.close()
    line = next(ln for ln in metrics.splitlines()
                if ln.startswith('nv_inference_request_failure{model="flood",version="1",reason="QUEUE_FULL"}'))
    assert float(line.split()[-1]) >= len(refused)
    assert proc.poll() is None


def test_sigterm_after_load_exits_cleanly(load_server):
    proc, _, _ = load_server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
