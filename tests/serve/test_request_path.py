"""The per-request path of the server, made cheaper (issue 11; benchmarks/serve_overhead.py measures
it): each mechanism is checked for what it must still do, on a real server.

- HTTP inference requests are answered by their own ASGI handler (http_infer.py), not through
  Starlette's routing, with the same answers, errors and headers; only work that grows with the data
  in Python (JSON, BYTES) is moved to a thread.
- gRPC ModelInfer responses are written by grpc_wire: each output is copied once, into the reply.
- A model version's histograms are looked up once, not per request."""
from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from starlette.routing import Router

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30) as c:
        yield c


def _binary(x: np.ndarray) -> tuple[bytes, dict]:
    header = json.dumps({"id": "r1", "inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                                "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                  "Content-Type": "application/octet-stream"}


def test_http_inference_skips_starlette_routing(client, monkeypatch):
    routed = []
    original = Router.__call__

    async def counting(self, scope, receive, send):
        routed.append(scope["path"])
        return await original(self, scope, receive, send)

    monkeypatch.setattr(Router, "__call__", counting)
    x = np.random.default_rng(3).standard_normal((3, 4)).astype(np.float32)
    body, headers = _binary(x)
    for path in ("/v2/models/affine/infer", "/v2/models/affine/versions/1/infer"):
        r = client.post(path, content=body, headers=headers)
        assert r.status_code == 200, r.text
        n = int(r.headers["inference-header-content-length"])
        assert r.headers["content-type"] == "application/octet-stream"
        assert int(r.headers["content-length"]) == len(r.content)
        head = json.loads(r.content[:n])
        assert head["id"] == "r1" and head["model_name"] == "affine" and head["model_version"] == "1"
        y = np.frombuffer(r.content[n:], np.float32).reshape(3, 4)
        np.testing.assert_allclose(y, x * 2 + 1, rtol=1e-6)
    assert routed == []
    # everything else still goes through Starlette
    assert client.get("/v2/models/affine").status_code == 200
    r = client.get("/v2/models/affine/infer")
    assert r.status_code == 405 and "not allowed" in r.json()["error"]
    assert routed == ["/v2/models/affine", "/v2/models/affine/infer"]


@pytest.mark.parametrize("path, status, message", [
    ("/v2/models/ghost/infer", 404, "model 'ghost' is not loaded"),
    ("/v2/models/affine/versions/9/infer", 404, "version 9"),
    ("/v2/models/affine/versions/x1/infer", 404, "versions are integers"),
])
def test_http_inference_errors_are_json_with_their_status(client, path, status, message):
    body, headers = _binary(np.ones((1, 4), np.float32))
    r = client.post(path, content=body, headers=headers)
    assert r.status_code == status and r.headers["content-type"] == "application/json"
    assert message in r.json()["error"]


def test_http_inference_bad_bodies(client):
    r = client.post("/v2/models/affine/infer", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = client.post("/v2/models/affine/infer", content=b"{}", headers={"Content-Encoding": "br"})
    assert r.status_code == 400 and "Content-Encoding 'br' is not supported" in r.json()["error"]
    # a body in several chunks (chunked transfer encoding, no Content-Length) is joined
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    body, headers = _binary(x)
    r = client.post("/v2/models/affine/infer", content=iter([body[:7], body[7:40], body[40:]]), headers=headers)
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    np.testing.assert_allclose(np.frombuffer(r.content[n:], np.float32).reshape(2, 4), x * 2 + 1)


def test_only_json_and_bytes_work_goes_to_a_thread():
    """A thread hop costs the event loop more than parsing a binary request (views of the body), so a
    300 KB image is parsed on the loop; 300 KB of JSON, or of BYTES elements, is not."""
    from ember.serve.http_infer import OFFLOAD_BYTES, _encode_work, _parse_work
    from ember.serve.protocol import InferResponse, OutputTensor

    image = np.zeros((1, 3, 224, 224), np.float16)
    head = json.dumps({"inputs": [{"name": "images", "datatype": "FP16", "shape": list(image.shape),
                                   "parameters": {"binary_data_size": image.nbytes}}]}).encode()
    assert _parse_work(head + image.tobytes(), str(len(head))) < OFFLOAD_BYTES
    strings = head.replace(b'"FP16"', b'"BYTES"')
    assert _parse_work(strings + image.tobytes(), str(len(strings))) > OFFLOAD_BYTES
    as_json = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [80000],
                                      "data": [0.5] * 80000}]}).encode()
    assert _parse_work(as_json, None) > OFFLOAD_BYTES

    big = np.zeros((1, 100000), np.float32)
    resp = InferResponse("m", "1", "", [OutputTensor("y", "FP32", big)])
    assert _encode_work(resp, default_binary=True) == 0
    assert _encode_work(resp, default_binary=False) > OFFLOAD_BYTES
    resp.outputs[0].binary = True
    assert _encode_work(resp, default_binary=False) == 0


def test_grpc_responses_copy_each_output_once_and_parse_as_protobuf():
    """encode_grpc_response keeps views of the outputs; write_infer_response joins them into the reply
    (the one copy), and the reply is the message protobuf would have made."""
    from ember.serve import grpc_service_pb2 as pb
    from ember.serve.grpc_server import encode_grpc_response
    from ember.serve.grpc_wire import write_infer_response
    from ember.serve.protocol import InferResponse, OutputTensor

    rng = np.random.default_rng(5)
    logits = rng.standard_normal((2, 1000)).astype(np.float16)
    ids = rng.integers(0, 1 << 40, (2, 3)).astype(np.int64)
    words = np.array([b"ember", b"", "ünï".encode()], dtype=object)
    resp = InferResponse("m", "3", "req-9", [OutputTensor("logits", "FP16", logits), OutputTensor("ids", "INT64", ids),
                                              OutputTensor("words", "BYTES", words)])
    wire = encode_grpc_response(resp)
    assert wire.raw[0].obj is logits or np.shares_memory(np.frombuffer(wire.raw[0], np.float16), logits)
    assert np.shares_memory(np.frombuffer(wire.raw[1], np.int64), ids)
    data = write_infer_response(wire)
    got = pb.ModelInferResponse.FromString(data)
    assert (got.model_name, got.model_version, got.id) == ("m", "3", "req-9")
    assert [(o.name, o.datatype, list(o.shape)) for o in got.outputs] == [
        ("logits", "FP16", [2, 1000]), ("ids", "INT64", [2, 3]), ("words", "BYTES", [3])]
    np.testing.assert_array_equal(np.frombuffer(got.raw_output_contents[0], np.float16).reshape(2, 1000), logits)
    np.testing.assert_array_equal(np.frombuffer(got.raw_output_contents[1], np.int64).reshape(2, 3), ids)
    assert got.raw_output_contents[2] == b"\x05\x00\x00\x00ember\x00\x00\x00\x00\x05\x00\x00\x00" + "ünï".encode()
    assert wire.to_message() == got  # the stream path serializes the same message through protobuf


def test_grpc_infer_over_the_wire(server):
    import grpc

    from ember.serve import grpc_service_pb2 as pb
    from ember.serve import grpc_service_pb2_grpc as pb_grpc

    x = np.random.default_rng(6).standard_normal((5, 4)).astype(np.float32)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        req = pb.ModelInferRequest(model_name="affine", id="a1")
        req.inputs.add(name="x", datatype="FP32", shape=[5, 4])
        req.raw_input_contents.append(x.tobytes())
        got = stub.ModelInfer(req, timeout=30)
        assert got.id == "a1" and got.model_version == "1" and list(got.outputs[0].shape) == [5, 4]
        np.testing.assert_allclose(np.frombuffer(got.raw_output_contents[0], np.float32).reshape(5, 4), x * 2 + 1)
        req.model_name = "ghost"
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(req, timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "ghost" in e.value.details()


def test_request_histograms_are_looked_up_once_per_model_version(server, client, monkeypatch):
    from prometheus_client.metrics import MetricWrapperBase

    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    assert client.post("/v2/models/affine/infer", json=doc).status_code == 200  # the version's histograms exist

    def count(text: str) -> float:
        key = 'ember_request_duration_seconds_count{model="affine",version="1"}'
        return next(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(key))

    before = count(client.get("/metrics").text)
    lookups = []
    original = MetricWrapperBase.labels
    monkeypatch.setattr(MetricWrapperBase, "labels", lambda self, *a, **k: lookups.append(a) or original(self, *a, **k))
    for _ in range(5):
        assert client.post("/v2/models/affine/infer", json=doc).status_code == 200
    monkeypatch.undo()
    assert count(client.get("/metrics").text) == before + 5
    assert [a for a in lookups if a[:1] == ("affine",)] == []
