"""`ember perf`'s load generator: worker processes with asyncio connections, the client's own CPU
use, and only the KServe v2 protocol on the wire (so it measures Triton the same way)."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from click.testing import CliRunner

from ember.cli.main import cli
from ember.serve.loadgen import WORKER, LoadJob, grpc_request, http_request, run_level
from ember.serve.perf import PerfResult

pytestmark = pytest.mark.timeout(120)

INPUTS = {"a": ("FP32", np.ones((2, 3), np.float32)), "b": ("FP32", np.full((2, 3), 2, np.float32))}


def test_worker_starts_without_importing_ember():
    code = ("import runpy, sys; runpy.run_path(sys.argv[1], run_name='not_main'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ember', 'torch')))")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code, str(WORKER)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_processes_share_the_connections_and_report_cpu(server, protocol):
    if protocol == "http":
        job = LoadJob("http", "127.0.0.1", server.http_port,
                      http_request("127.0.0.1", server.http_port, "/v2/models/addsub/infer", INPUTS, True, None))
    else:
        job = LoadJob("grpc", "127.0.0.1", server.grpc_port, grpc_request("addsub", "", INPUTS))
    run = run_level(job, concurrency=5, duration_s=1.0, warmup_s=0.2, processes=2)
    assert run.processes == 2 and not run.errors, run.errors
    assert len(run.latencies_s) > 5 and 0 < float(np.median(run.latencies_s)) < 1.0
    assert 0 < run.client_cpu_s < 2 * 1.5  # two processes, at most their share of the window
    assert 0 < run.busiest_worker <= 1.2


def test_failures_are_counted_by_reason(server):
    body = http_request("127.0.0.1", server.http_port, "/v2/models/ghost/infer", INPUTS, True, None)
    run = run_level(LoadJob("http", "127.0.0.1", server.http_port, body), concurrency=2, duration_s=0.5,
                    warmup_s=0.1, processes=1)
    assert len(run.latencies_s) == 0 and set(run.errors) == {"HTTP 404"} and run.errors["HTTP 404"] > 2
    bad = grpc_request("ghost", "", INPUTS)
    run = run_level(LoadJob("grpc", "127.0.0.1", server.grpc_port, bad), concurrency=1, duration_s=0.3,
                    warmup_s=0.0, processes=1)
    assert set(run.errors) == {"gRPC NOT_FOUND"}


# ---- perf speaks only KServe v2, so it measures Triton too -------------------------------------------------------

TRITON_METADATA = {"name": "resnet", "versions": ["1"], "platform": "tensorrt_plan",
                   "inputs": [{"name": "input__0", "datatype": "FP32", "shape": [-1, 3]}],
                   "outputs": [{"name": "output__0", "datatype": "FP32", "shape": [-1, 3]}]}
TRITON_CONFIG = {"name": "resnet", "platform": "tensorrt_plan", "max_batch_size": 8,
                 "input": [{"name": "input__0", "data_type": "TYPE_FP32", "dims": [3]}],
                 "output": [{"name": "output__0", "data_type": "TYPE_FP32", "dims": [3]}]}


class _TritonLikeHTTP(BaseHTTPRequestHandler):
    """Only the endpoints Triton serves, answered as Triton answers them (the infer response chunked)."""

    protocol_version = "HTTP/1.1"
    seen: list = []

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes, chunked: bool = False, headers: dict | None = None):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            half = len(body) // 2
            for part in (body[:half], body[half:]):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def do_GET(self):
        self.seen.append(("GET", self.path))
        docs = {"/v2/models/resnet": TRITON_METADATA, "/v2/models/resnet/config": TRITON_CONFIG}
        if self.path in docs:
            return self._send(200, json.dumps(docs[self.path]).encode())
        self._send(404, b'{"error": "not found"}')

    def do_POST(self):
        self.seen.append(("POST", self.path))
        body = self.rfile.read(int(self.headers["Content-Length"]))
        n = int(self.headers["Inference-Header-Content-Length"])
        header, tensor = json.loads(body[:n]), body[n:]
        shape = header["inputs"][0]["shape"]
        assert header["parameters"]["binary_data_output"] is True and len(tensor) == 4 * shape[0] * shape[1]
        out = json.dumps({"model_name": "resnet", "model_version": "1", "outputs": [
            {"name": "output__0", "datatype": "FP32", "shape": shape,
             "parameters": {"binary_data_size": len(tensor)}}]}).encode()
        self._send(200, out + tensor, chunked=True, headers={"Inference-Header-Content-Length": str(len(out))})


def test_perf_measures_a_server_that_speaks_only_kserve_v2_http():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _TritonLikeHTTP)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    _TritonLikeHTTP.seen = []
    try:
        r = CliRunner().invoke(cli, ["perf", "resnet", "-u", f"127.0.0.1:{srv.server_address[1]}", "-b", "4",
                                     "--concurrency-range", "2", "--duration", "0.5", "--warmup", "0.1"])
    finally:
        srv.shutdown()
        srv.server_close()
    assert r.exit_code == 0, r.output
    row = r.output.splitlines()[2].split()
    assert row[0] == "2" and float(row[1]) > 0 and int(row[6]) > 0 and row[7] == "0"
    assert set(_TritonLikeHTTP.seen) == {("GET", "/v2/models/resnet"), ("GET", "/v2/models/resnet/config"),
                                         ("POST", "/v2/models/resnet/infer")}


def test_perf_measures_a_grpc_server_built_from_tritons_own_proto():
    grpc = pytest.importorskip("grpc")
    service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
    service_pb2_grpc = pytest.importorskip("tritonclient.grpc.service_pb2_grpc")
    from concurrent import futures

    from google.protobuf import json_format

    calls: list = []

    class Triton(service_pb2_grpc.GRPCInferenceServiceServicer):
        def ModelMetadata(self, request, context):
            calls.append("ModelMetadata")
            return json_format.ParseDict(TRITON_METADATA, service_pb2.ModelMetadataResponse())

        def ModelConfig(self, request, context):
            calls.append("ModelConfig")
            resp = service_pb2.ModelConfigResponse()
            json_format.ParseDict(TRITON_CONFIG, resp.config)
            return resp

        def ModelInfer(self, request, context):
            calls.append("ModelInfer")
            resp = service_pb2.ModelInferResponse(model_name="resnet", model_version="1")
            resp.outputs.add(name="output__0", datatype="FP32", shape=request.inputs[0].shape)
            resp.raw_output_contents.append(request.raw_input_contents[0])
            return resp

    server = grpc.server(futures.ThreadPoolExecutor(4))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Triton(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        r = CliRunner().invoke(cli, ["perf", "resnet", "-u", f"127.0.0.1:{port}", "-i", "grpc", "-b", "2",
                                     "--concurrency-range", "2", "--duration", "0.5", "--warmup", "0.1"])
    finally:
        server.stop(0)
    assert r.exit_code == 0, r.output
    assert int(r.output.splitlines()[2].split()[6]) > 0
    assert set(calls) == {"ModelMetadata", "ModelConfig", "ModelInfer"}


def test_perf_warns_when_the_client_saturates(monkeypatch):
    import ember.serve.perf as perf

    def fake_sweep(target, levels, duration_s, warmup_s, on_result):
        r = PerfResult(8, 100, 0, 1.0, 100.0, 1, 2, 3, 4, 2.0, {}, processes=2, client_cpu=1.9, client_busiest=0.97)
        on_result(r)
        return [r]

    monkeypatch.setattr(perf, "sweep", fake_sweep)
    r = CliRunner().invoke(cli, ["perf", "m", "--duration", "1"])
    assert r.exit_code == 0, r.output
    assert "warning: the client may be the bottleneck" in r.output and "97% of a core" in r.output
    assert PerfResult(1, 1, 0, 1, 1, 1, 1, 1, 1, 1, client_busiest=0.97).client_saturated
    assert not PerfResult(1, 1, 0, 1, 1, 1, 1, 1, 1, 1, client_busiest=0.3, client_cpu=0.3).client_saturated
