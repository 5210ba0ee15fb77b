"""KServe v2 HTTP endpoints, byte for byte: binary extension, errors, limits, auth, metrics."""
from __future__ import annotations

import gzip
import json

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30) as c:
        yield c


def _binary_body(x: np.ndarray, outputs_binary: bool = True) -> tuple[bytes, dict]:
    header = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "y", "parameters": {"binary_data": outputs_binary}}]}).encode()
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                  "Content-Type": "application/octet-stream"}


def test_health_metadata_and_unknown_paths(client):
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2").json()["name"] == "ember"
    assert client.get("/v2/models/affine/versions/1").json()["versions"] == ["1"]
    assert client.get("/v2/models/affine/versions/1/ready").status_code == 200
    assert client.get("/v2/models/affine/ready").status_code == 200
    r = client.get("/v2/models/ghost")
    assert r.status_code == 404 and "model 'ghost' is not loaded" in r.json()["error"]
    r = client.get("/v2/models/affine/versions/abc")
    assert r.status_code == 404 and "versions are integers" in r.json()["error"]
    r = client.get("/v2/nothing/here")
    assert r.status_code == 404 and "no endpoint" in r.json()["error"]
    r = client.delete("/v2/models/affine/infer")
    assert r.status_code == 405
    r = client.post("/v2/systemsharedmemory/region/x/register", json={})
    assert r.status_code == 400 and "not supported" in r.json()["error"]


def test_json_infer_nested_and_flat(client):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    for data in (x.reshape(-1).tolist(), x.tolist()):
        r = client.post("/v2/models/affine/infer",
                        json={"id": "a", "inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": data}]})
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["id"] == "a" and doc["model_name"] == "affine" and doc["model_version"] == "1"
        out = doc["outputs"][0]
        assert out["name"] == "y" and out["shape"] == [2, 4] and out["datatype"] == "FP32"
        assert out["data"] == (x * 2 + 1).reshape(-1).tolist()


def test_binary_request_and_response(client):
    x = np.random.default_rng(0).random((3, 4), dtype=np.float32)
    body, headers = _binary_body(x)
    r = client.post("/v2/models/affine/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    header = json.loads(r.content[:n])
    assert header["outputs"][0]["parameters"]["binary_data_size"] == 48
    y = np.frombuffer(r.content[n:], dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(y, x * 2 + 1)


def test_binary_data_output_parameter(client):
    x = np.ones((1, 4), np.float32)
    r = client.post("/v2/models/affine/infer", json={
        "parameters": {"binary_data_output": True},
        "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}]})
    n = int(r.headers["Inference-Header-Content-Length"])
    np.testing.assert_array_equal(np.frombuffer(r.content[n:], np.float32), (x * 2 + 1).reshape(-1))


@pytest.mark.parametrize("mutate,status,message", [
    (lambda b, h: (b[:-5], h), 400, "the body is truncated"),
    (lambda b, h: (b + b"xx", h), 400, "belong to none"),
    (lambda b, h: (b, {**h, "Inference-Header-Content-Length": "99999"}), 400, "the body is truncated"),
    (lambda b, h: (b, {**h, "Inference-Header-Content-Length": "ten"}), 400, "must be an integer"),
    (lambda b, h: (b, {**h, "Inference-Header-Content-Length": "5"}), 400, "not valid JSON"),
])
def test_binary_framing_errors(client, mutate, status, message):
    body, headers = _binary_body(np.zeros((2, 4), np.float32))
    body, headers = mutate(body, headers)
    r = client.post("/v2/models/affine/infer", content=body, headers=headers)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


@pytest.mark.parametrize("doc,message", [
    ("{", "not valid JSON"),
    ("[]", "must be a JSON object"),
    ({"inputs": 3}, "needs an 'inputs' list"),
    ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32"}]}, "neither 'data' nor"),
    ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FLOAT", "data": [1, 2, 3, 4]}]},
     "'datatype' must be one of"),
    ({"inputs": [{"name": "x", "shape": [1, -4], "datatype": "FP32", "data": [1]}]}, "non-negative integers"),
    ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3]}]},
     "needs 4 elements, data has 3"),
    ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": ["a", "b", "c", "d"]}]},
     "must be JSON numbers"),
    ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [[1, 2], [3]]}]}, "rectangular"),
    ({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}]}, "the model takes [-1, 4]"),
    ({"inputs": [{"name": "x", "shape": [0, 4], "datatype": "FP32", "data": []}]}, "batch size 0 is out of range"),
    ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}],
      "outputs": [{"name": "z"}]}, "unknown output 'z'"),
    ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}],
      "parameters": {"priority": 9}}, "priority 9 is out of range"),
    ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}],
      "parameters": {"timeout": -1}}, "'timeout' must be a non-negative integer"),
    ({"id": 5, "inputs": []}, "'id' must be a string"),
    ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
                 {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}, "appears twice"),
])
def test_malformed_json_requests_get_400_naming_the_problem(client, doc, message):
    body = doc if isinstance(doc, str) else json.dumps(doc)
    r = client.post("/v2/models/affine/infer", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]


def test_integer_range_and_type_checks(client):
    r = client.post("/v2/models/scale/infer", json={"inputs": [
        {"name": "idx", "shape": [1, 2], "datatype": "INT64", "data": [1.5, 2]}]})
    assert r.status_code == 400 and "must be JSON integers" in r.json()["error"]
    r = client.post("/v2/models/scale/infer", json={"inputs": [
        {"name": "idx", "shape": [1, 2], "datatype": "INT64", "data": [2 ** 70, 2]}]})
    assert r.status_code == 400
    r = client.post("/v2/models/scale/infer", json={"inputs": [
        {"name": "idx", "shape": [1, 2], "datatype": "INT64", "data": [7, -2]}]})
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [21, -6]


def test_request_size_limit_and_gzip(client):
    big = b'{"inputs": [' + b" " * (2 << 20) + b"]}"
    r = client.post("/v2/models/affine/infer", content=big)
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]
    doc = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 1, 2, 3]}]}
    r = client.post("/v2/models/affine/infer", content=gzip.compress(json.dumps(doc).encode()),
                    headers={"Content-Encoding": "gzip"})
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [1, 3, 5, 7]
    bomb = gzip.compress(b" " * (4 << 20))  # small on the wire, 4 MiB inflated
    r = client.post("/v2/models/affine/infer", content=bomb, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413
    r = client.post("/v2/models/affine/infer", content=b"\x1f\x8b garbage", headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400 and "corrupt" in r.json()["error"]


def test_config_stats_index_endpoints(client):
    cfg = client.get("/v2/models/triton_affine/config").json()
    assert cfg["dynamic_batching"]["preferred_batch_size"] == [4, 8]
    assert cfg["model_warmup"][0]["name"] == "w"
    stats = client.get("/v2/models/stats").json()["model_stats"]
    assert {"affine", "addsub", "triton_affine"} <= {s["name"] for s in stats}
    one = client.get("/v2/models/triton_affine/versions/2/stats").json()["model_stats"]
    assert [(s["name"], s["version"]) for s in one] == [("triton_affine", "2")]
    index = client.post("/v2/repository/index", json={"ready": True}).json()
    assert {"name": "affine", "version": "1", "state": "READY", "reason": ""} in index
    r = client.post("/v2/repository/index", content=b"{nope")
    assert r.status_code == 400


def test_metrics_endpoint_has_triton_and_ember_families(client):
    client.post("/v2/models/affine/infer", json={"inputs": [
        {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 1, 2, 3]}]})
    client.post("/v2/models/affine/infer", json={"inputs": [
        {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [0, 1, 2]}]})
    text = client.get("/metrics").text
    for family in ("nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
                   "nv_inference_exec_count", "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
                   "nv_inference_compute_infer_duration_us", "nv_inference_pending_request_count",
                   "ember_request_duration_seconds_bucket", "ember_queue_duration_seconds_bucket",
                   "ember_compute_duration_seconds_bucket", "ember_batch_size_bucket", "ember_inflight_requests",
                   "ember_queued_requests", "ember_model_ready", "process_resident_memory_bytes"):
        assert f"\n{family}" in text, family
    assert "# TYPE nv_inference_request_success counter" in text
    line = [ln for ln in text.splitlines()
            if ln.startswith('nv_inference_request_failure{model="affine",version="1",reason="INVALID_INPUT"}')]
    assert line and float(line[0].split()[-1]) >= 1
    client.post("/v2/models/ghost/infer", json={"inputs": []})
    text = client.get("/metrics").text
    assert 'ember_request_errors_total{protocol="http",reason="NOT_FOUND"}' in text
    assert 'model="ghost"' not in text  # names from requests never become labels


def test_load_unload_refused_without_explicit_mode(make_server, standard_repo):
    srv = make_server(standard_repo, model_control_mode="none", load_models=["affine"])
    with httpx.Client(base_url=f"http://127.0.0.1:{srv.http_port}") as c:
        r = c.post("/v2/repository/models/affine/unload")
        assert r.status_code == 403 and "--model-control-mode explicit" in r.json()["error"]
        index = {(m["name"], m["version"]): m for m in c.post("/v2/repository/index").json()}
        assert index[("affine", "1")]["state"] == "READY"
        assert index[("addsub", "")]["state"] == "UNAVAILABLE"


def test_bearer_token_auth_and_separate_metrics_port(make_server, standard_repo):
    srv = make_server(standard_repo, auth_token="s3cret", load_models=["affine"], metrics_port=0)
    base = f"http://127.0.0.1:{srv.http_port}"
    doc = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 1, 2, 3]}]}
    with httpx.Client(base_url=base) as c:
        assert c.get("/v2/health/ready").status_code == 200  # probes need no token
        r = c.post("/v2/models/affine/infer", json=doc)
        assert r.status_code == 401 and "bearer token" in r.json()["error"]
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert c.post("/v2/models/affine/infer", json=doc, headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = c.post("/v2/models/affine/infer", json=doc, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200
        assert c.get("/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 404  # on its own port
    with httpx.Client(base_url=f"http://127.0.0.1:{srv.metrics_port}") as m:
        assert m.get("/metrics").status_code == 401
        text = m.get("/metrics", headers={"Authorization": "Bearer s3cret"}).text
        assert "nv_inference_request_success" in text
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    g = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
    assert g.is_server_live()
    with pytest.raises(InferenceServerException, match="bearer token"):
        g.get_model_metadata("affine")
    assert g.get_model_metadata("affine", headers={"authorization": "Bearer s3cret"}).name == "affine"
    g.close()


def test_concurrency_limit_answers_503_json(make_server, repo_builder):
    import threading

    repo_builder.add("slow", "affine", "max_batch_size: 8\ndynamic_batching: {max_queue_delay_ms: 300}\n")
    srv = make_server(repo_builder.root, max_connections=2)
    base = f"http://127.0.0.1:{srv.http_port}"
    doc = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 1, 2, 3]}]}
    results = []

    def one():
        with httpx.Client(base_url=base, timeout=30) as c:
            r = c.post("/v2/models/slow/infer", json=doc)
            results.append((r.status_code, r.json()))

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    codes = sorted(code for code, _ in results)
    assert codes.count(200) >= 2 and 503 in codes and set(codes) <= {200, 503}
    assert all("--max-connections" in doc["error"] for code, doc in results if code == 503)
    with httpx.Client(base_url=base) as c:
        assert c.get("/v2/health/live").status_code == 200


def test_request_timeout_in_queue_is_504(client):
    # "batching" waits up to 100 ms to fill a batch; a 1 ms timeout expires in the queue
    doc = {"parameters": {"timeout": 1000},
           "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 1, 2, 3]}]}
    r = client.post("/v2/models/batching/infer", json=doc)
    assert r.status_code == 504 and "timed out after waiting 1 ms in the queue" in r.json()["error"]
    doc["parameters"]["timeout"] = 5_000_000
    assert client.post("/v2/models/batching/infer", json=doc).status_code == 200
