"""The per-request path of the server, made cheaper (issue 11; benchmarks/serve_overhead.py measures
it): each mechanism is checked for what it must still do, on a real server.

- HTTP inference requests are answered by their own ASGI handler (http_infer.py), not through
  Starlette's routing, with the same answers, errors and headers; only work that grows with the data
  in Python (JSON, BYTES) is moved to a thread."""
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
