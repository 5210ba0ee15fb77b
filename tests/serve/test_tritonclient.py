"""The official Triton client libraries, unmodified, against ember serve."""
from __future__ import annotations

import queue
from functools import partial

import numpy as np
import pytest

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def http(server):
    c = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}", concurrency=16)
    yield c
    c.close()


@pytest.fixture(scope="module")
def grpc_(server):
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    yield c
    c.close()


def _x(rows: int, start: float = 0.0) -> np.ndarray:
    return (np.arange(rows * 4, dtype=np.float32) + start).reshape(rows, 4)


# ---- HTTP -----------------------------------------------------------------------------------------


def test_http_health_and_metadata(http):
    assert http.is_server_live() and http.is_server_ready()
    meta = http.get_server_metadata()
    assert meta["name"] == "ember" and "binary_tensor_data" in meta["extensions"]
    assert http.is_model_ready("affine") and http.is_model_ready("affine", "1")
    assert not http.is_model_ready("affine", "7") and not http.is_model_ready("no_such_model")
    md = http.get_model_metadata("affine")
    assert md["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert md["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]
    cfg = http.get_model_config("affine")
    assert cfg["max_batch_size"] == 8 and cfg["input"][0]["dims"] == [4]


@pytest.mark.parametrize("binary_in,binary_out", [(True, True), (False, False), (True, False), (False, True)])
def test_http_infer_binary_and_json(http, binary_in, binary_out):
    x = _x(3)
    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary_in)
    out = httpclient.InferRequestedOutput("y", binary_data=binary_out)
    result = http.infer("affine", [inp], outputs=[out], request_id="req-7")
    np.testing.assert_array_equal(result.as_numpy("y"), x * 2 + 1)
    assert result.get_response()["id"] == "req-7"


def test_http_two_inputs_two_outputs_and_default_outputs(http):
    a = np.random.default_rng(1).random((2, 3), dtype=np.float32)
    b = np.random.default_rng(2).random((2, 3), dtype=np.float32)
    ins = [httpclient.InferInput("a", [2, 3], "FP32"), httpclient.InferInput("b", [2, 3], "FP32")]
    ins[0].set_data_from_numpy(a)
    ins[1].set_data_from_numpy(b, binary_data=False)
    r = http.infer("addsub", ins)  # no outputs named: all of them, binary
    np.testing.assert_allclose(r.as_numpy("sum"), a + b, rtol=1e-6)
    np.testing.assert_allclose(r.as_numpy("diff"), a - b, rtol=1e-6)
    r = http.infer("addsub", ins, outputs=[httpclient.InferRequestedOutput("diff")])
    assert r.as_numpy("sum") is None
    np.testing.assert_allclose(r.as_numpy("diff"), a - b, rtol=1e-6)


def test_http_int64_and_versions_and_pbtxt_model(http):
    idx = np.array([[1, 2], [-3, 40]], dtype=np.int64)
    inp = httpclient.InferInput("idx", [2, 2], "INT64")
    inp.set_data_from_numpy(idx)
    np.testing.assert_array_equal(http.infer("scale", [inp]).as_numpy("out"), idx * 3)
    # Triton config.pbtxt with latest-2 policy: versions 2 and 3 are served, 1 is not
    md = http.get_model_metadata("triton_affine")
    assert md["versions"] == ["2", "3"]
    x = _x(4)
    inp = httpclient.InferInput("x", [4, 4], "FP32")
    inp.set_data_from_numpy(x)
    for v in ("2", "3", ""):
        r = http.infer("triton_affine", [inp], model_version=v)
        np.testing.assert_array_equal(r.as_numpy("y"), x * 2 + 1)
        assert r.get_response()["model_version"] == (v or "3")
    with pytest.raises(InferenceServerException, match="no loaded version 1"):
        http.infer("triton_affine", [inp], model_version="1")


def test_http_errors_are_client_errors_with_clear_messages(http):
    x = _x(2)
    bad_name = httpclient.InferInput("nope", [2, 4], "FP32")
    bad_name.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match=r"missing input\(s\) \['x'\].*unknown input\(s\) \['nope'\]"):
        http.infer("affine", [bad_name])
    bad_dtype = httpclient.InferInput("x", [2, 4], "FP64")
    bad_dtype.set_data_from_numpy(x.astype(np.float64))
    with pytest.raises(InferenceServerException, match="input 'x' must be FP32, the request sent FP64"):
        http.infer("affine", [bad_dtype])
    bad_shape = httpclient.InferInput("x", [2, 5], "FP32")
    bad_shape.set_data_from_numpy(np.zeros((2, 5), np.float32))
    with pytest.raises(InferenceServerException, match=r"shape \[2, 5\], the model takes \[-1, 4\]"):
        http.infer("affine", [bad_shape])
    too_big = httpclient.InferInput("x", [9, 4], "FP32")
    too_big.set_data_from_numpy(np.zeros((9, 4), np.float32))
    with pytest.raises(InferenceServerException, match="batch size 9 is out of range; the model takes 1 to 8"):
        http.infer("affine", [too_big])
    good = httpclient.InferInput("x", [2, 4], "FP32")
    good.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="model 'ghost' is not loaded"):
        http.infer("ghost", [good])
    assert http.is_server_live()


def test_http_async_infer_batches(http, server):
    before = http.get_inference_statistics("batching")["model_stats"][0]
    n = 12
    xs = [_x(1, start=10.0 * i) for i in range(n)]
    handles = []
    for x in xs:
        inp = httpclient.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(x)
        handles.append(http.async_infer("batching", [inp]))
    for x, h in zip(xs, handles):
        np.testing.assert_array_equal(h.get_result(timeout=30).as_numpy("y"), x * 2 + 1)
    after = http.get_inference_statistics("batching")["model_stats"][0]
    runs = after["execution_count"] - before["execution_count"]
    assert after["inference_count"] - before["inference_count"] == n
    assert runs < n, f"{n} concurrent requests took {runs} engine runs; expected batching"


def test_http_statistics_and_repository(http):
    stats = http.get_inference_statistics("affine")["model_stats"]
    assert stats and stats[0]["name"] == "affine" and stats[0]["inference_stats"]["success"]["count"] >= 1
    index = {(m["name"], m.get("version", "")): m["state"] for m in http.get_model_repository_index()}
    assert index[("affine", "1")] == "READY" and index[("triton_affine", "3")] == "READY"


def test_http_load_unload(http):
    http.unload_model("nobatch")
    assert not http.is_model_ready("nobatch")
    with pytest.raises(InferenceServerException, match="not loaded"):
        inp = httpclient.InferInput("x", [2, 4], "FP32")
        inp.set_data_from_numpy(_x(2))
        http.infer("nobatch", [inp])
    http.load_model("nobatch")
    assert http.is_model_ready("nobatch")
    inp = httpclient.InferInput("x", [3, 4], "FP32")  # max_batch_size 0: full shapes, any first dim
    inp.set_data_from_numpy(_x(3))
    np.testing.assert_array_equal(http.infer("nobatch", [inp]).as_numpy("y"), _x(3) * 2 + 1)
    with pytest.raises(InferenceServerException, match="no model 'ghost' in repository"):
        http.load_model("ghost")


def test_http_load_with_config_override(http):
    cfg = '{"max_batch_size": 2, "dynamic_batching": {"max_queue_delay_microseconds": 100}}'
    http.load_model("nobatch", config=cfg)
    try:
        assert http.get_model_config("nobatch")["max_batch_size"] == 2
    finally:
        http.load_model("nobatch")
    assert http.get_model_config("nobatch")["max_batch_size"] == 0


def test_http_classification_extension(http):
    x = np.array([[0.5, 3.0, -1.0, 2.0]], dtype=np.float32)
    inp = httpclient.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(x)
    r = http.infer("affine", [inp], outputs=[httpclient.InferRequestedOutput("y", class_count=2)])
    top = [s.decode() if isinstance(s, bytes) else s for s in r.as_numpy("y").reshape(-1)]
    assert top == ["7.000000:1", "5.000000:3"]


# ---- gRPC -----------------------------------------------------------------------------------------


def test_grpc_health_metadata_config(grpc_):
    assert grpc_.is_server_live() and grpc_.is_server_ready()
    assert grpc_.get_server_metadata().name == "ember"
    assert grpc_.is_model_ready("affine")
    md = grpc_.get_model_metadata("addsub", as_json=True)
    assert [i["name"] for i in md["inputs"]] == ["a", "b"]
    cfg = grpc_.get_model_config("triton_affine").config
    assert cfg.max_batch_size == 8 and list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert cfg.dynamic_batching.default_queue_policy.max_queue_size == 32


def test_grpc_infer_and_errors(grpc_):
    x = _x(5)
    inp = grpcclient.InferInput("x", [5, 4], "FP32")
    inp.set_data_from_numpy(x)
    r = grpc_.infer("affine", [inp], outputs=[grpcclient.InferRequestedOutput("y")], request_id="g1")
    np.testing.assert_array_equal(r.as_numpy("y"), x * 2 + 1)
    assert r.get_response().id == "g1"
    bad = grpcclient.InferInput("x", [5, 4], "INT32")
    bad.set_data_from_numpy(x.astype(np.int32))
    with pytest.raises(InferenceServerException, match="must be FP32") as e:
        grpc_.infer("affine", [bad])
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException) as e:
        grpc_.infer("ghost", [inp])
    assert e.value.status() == "StatusCode.NOT_FOUND"


def test_grpc_async_infer_batches(grpc_):
    before = grpc_.get_inference_statistics("batching", as_json=True)["model_stats"][0]
    n = 10
    results: queue.Queue = queue.Queue()
    xs = [_x(1, start=3.0 * i) for i in range(n)]
    for i, x in enumerate(xs):
        inp = grpcclient.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(x)
        grpc_.async_infer("batching", [inp], partial(lambda i, result, error: results.put((i, result, error)), i))
    for _ in range(n):
        i, r, e = results.get(timeout=10)
        assert e is None, e
        np.testing.assert_array_equal(r.as_numpy("y"), xs[i] * 2 + 1)
    after = grpc_.get_inference_statistics("batching", as_json=True)["model_stats"][0]
    assert int(after["execution_count"]) - int(before["execution_count"]) < n


def test_grpc_stream_infer(grpc_):
    results: queue.Queue = queue.Queue()
    grpc_.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        xs = {f"s{i}": _x(1, start=float(i)) for i in range(6)}
        for rid, x in xs.items():
            inp = grpcclient.InferInput("x", [1, 4], "FP32")
            inp.set_data_from_numpy(x)
            grpc_.async_stream_infer("affine", [inp], request_id=rid)
        bad = grpcclient.InferInput("x", [1, 3], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 3), np.float32))
        grpc_.async_stream_infer("affine", [bad], request_id="bad")
        seen = {}
        for _ in range(len(xs) + 1):
            r, e = results.get(timeout=10)
            if e is not None:
                seen["bad"] = str(e)
            else:
                seen[r.get_response().id] = r.as_numpy("y")
        for rid, x in xs.items():
            np.testing.assert_array_equal(seen[rid], x * 2 + 1)
        assert "shape [1, 3]" in seen["bad"]
    finally:
        grpc_.stop_stream()


def test_grpc_statistics_repository_load_unload(grpc_):
    stats = grpc_.get_inference_statistics("affine", as_json=True)["model_stats"]
    assert stats[0]["name"] == "affine"
    index = grpc_.get_model_repository_index(as_json=True)["models"]
    assert any(m["name"] == "addsub" and m.get("state") == "READY" for m in index)
    grpc_.unload_model("scale")
    assert not grpc_.is_model_ready("scale")
    grpc_.load_model("scale")
    assert grpc_.is_model_ready("scale")
    with pytest.raises(InferenceServerException, match="not supported"):
        grpc_.get_system_shared_memory_status()
