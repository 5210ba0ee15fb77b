"""Binary tensors are decoded without copying: numpy views of the request body (HTTP binary
extension) or of the received gRPC message (raw_input_contents, read by grpc_wire), checked for size
before they are used."""
from __future__ import annotations

import json

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from ember.serve import grpc_service_pb2 as pb
from ember.serve import grpc_server
from ember.serve.errors import BadRequestError
from ember.serve.grpc_server import parse_grpc_request
from ember.serve.grpc_wire import MAX_FIELDS, WireInferRequest, read_infer_request
from ember.serve.http_codec import parse_infer_request

from .conftest import RepoBuilder

pytestmark = pytest.mark.timeout(120)


def _owner(arr: np.ndarray) -> object:
    """The object whose memory an array views: through numpy bases, then a memoryview's exporter."""
    base = arr
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    assert isinstance(base, memoryview), f"{type(base).__name__}: the array owns (copied) its data"
    return base.obj


def _http_body(tensors: dict[str, tuple[str, np.ndarray]]) -> tuple[bytes, int]:
    header = {"inputs": [{"name": k, "datatype": dt, "shape": list(a.shape),
                          "parameters": {"binary_data_size": a.nbytes}} for k, (dt, a) in tensors.items()]}
    head = json.dumps(header).encode()
    return head + b"".join(a.tobytes() for _, a in tensors.values()), len(head)


def test_http_binary_inputs_are_views_of_the_body():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4)).astype(np.float16)
    ids = rng.integers(0, 1000, (2, 7)).astype(np.int64)
    body, n = _http_body({"x": ("FP16", x), "ids": ("INT64", ids)})
    req = parse_infer_request(body, str(n), "m", None)
    np.testing.assert_array_equal(req.inputs["x"], x)
    np.testing.assert_array_equal(req.inputs["ids"], ids)
    assert _owner(req.inputs["x"]) is body and _owner(req.inputs["ids"]) is body


@pytest.mark.parametrize("shape, size, what", [
    ([2, 4], 31, "needs 32 bytes, got 31"),
    ([2 ** 40], 8, "needs 4398046511104 bytes, got 8"),  # refused before anything is allocated
    ([0, 4], 4, "4 bytes of binary data follow the inputs"),
])
def test_http_binary_sizes_are_checked_before_use(shape, size, what):
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": shape,
                                     "parameters": {"binary_data_size": size if shape[0] else 0}}]}).encode()
    with pytest.raises(BadRequestError, match=what):
        parse_infer_request(header + b"\x01" * size, str(len(header)), "m", None)


def _grpc_request() -> tuple[pb.ModelInferRequest, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    m = rng.integers(0, 2, (3, 5)).astype(np.int64)
    req = pb.ModelInferRequest(model_name="affine", model_version="1", id="r7")
    req.parameters["priority"].int64_param = 1
    req.parameters["timeout"].int64_param = 5000
    req.inputs.add(name="x", datatype="FP32", shape=[3, 4])
    req.raw_input_contents.append(x.tobytes())
    req.inputs.add(name="mask", datatype="INT64", shape=[3, 5])
    req.raw_input_contents.append(m.tobytes())
    req.outputs.add(name="y")
    return req, x, m


def test_grpc_raw_contents_are_views_of_the_received_message():
    req, x, m = _grpc_request()
    data = req.SerializeToString()
    wire = read_infer_request(data)
    assert wire.raw is not None and [bytes(r) for r in wire.raw] == list(req.raw_input_contents)
    whole = pb.ModelInferRequest.FromString(data)
    del whole.raw_input_contents[:]
    assert wire.message == whole  # every other field as protobuf reads it
    parsed = parse_grpc_request(wire)
    np.testing.assert_array_equal(parsed.inputs["x"], x)
    np.testing.assert_array_equal(parsed.inputs["mask"], m)
    assert _owner(parsed.inputs["x"]) is data and _owner(parsed.inputs["mask"]) is data
    assert (parsed.id, parsed.priority, parsed.timeout_us, parsed.model) == ("r7", 1, 5000, "affine")


def test_grpc_raw_contents_in_any_field_order():
    """Protobuf allows fields in any order: raw contents before, between and after the others."""
    req, x, m = _grpc_request()
    raw = list(req.raw_input_contents)
    del req.raw_input_contents[:]
    first = pb.ModelInferRequest(raw_input_contents=raw[:1]).SerializeToString()
    second = pb.ModelInferRequest(raw_input_contents=raw[1:]).SerializeToString()
    head = pb.ModelInferRequest(model_name=req.model_name, id=req.id).SerializeToString()
    rest = pb.ModelInferRequest(inputs=req.inputs, outputs=req.outputs).SerializeToString()
    data = first + head + second + rest
    parsed = parse_grpc_request(read_infer_request(data))
    np.testing.assert_array_equal(parsed.inputs["x"], x)
    np.testing.assert_array_equal(parsed.inputs["mask"], m)
    assert parsed.id == "r7" and _owner(parsed.inputs["x"]) is data


def test_grpc_sizes_are_checked_before_use():
    req, _, _ = _grpc_request()
    req.raw_input_contents[0] = req.raw_input_contents[0][:-1]
    with pytest.raises(BadRequestError, match="input 'x': FP32 tensor of shape \\[3, 4\\] needs 48 bytes, got 47"):
        parse_grpc_request(read_infer_request(req.SerializeToString()))
    req, _, _ = _grpc_request()
    del req.raw_input_contents[1]
    with pytest.raises(BadRequestError, match="raw_input_contents has 1 entries for 2 inputs"):
        parse_grpc_request(read_infer_request(req.SerializeToString()))


def test_grpc_messages_the_scan_does_not_expect_go_to_protobuf():
    req, x, _ = _grpc_request()
    data = req.SerializeToString()
    with pytest.raises(DecodeError):  # truncated: protobuf's own error, as before
        read_infer_request(data[:-3])
    plain = pb.ModelInferRequest(model_name="m", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="x", datatype="FP32", shape=[2], contents=pb.InferTensorContents(fp32_contents=[1, 2]))])
    wire = read_infer_request(plain.SerializeToString())
    assert wire.raw is None and wire.message == plain
    np.testing.assert_array_equal(parse_grpc_request(wire).inputs["x"], np.array([1, 2], np.float32))
    # a flood of tiny fields: the scan stops at MAX_FIELDS and protobuf parses the whole message
    flood = pb.ModelInferRequest(id="x").SerializeToString() * (MAX_FIELDS + 1) + data
    wire = read_infer_request(flood)
    assert isinstance(wire, WireInferRequest) and wire.raw is None
    np.testing.assert_array_equal(parse_grpc_request(wire).inputs["x"], x)


def test_the_grpc_server_reads_infer_requests_with_the_wire_reader(engines, tmp_path, make_server, monkeypatch):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    seen: list[WireInferRequest] = []

    def spy(data: bytes) -> WireInferRequest:
        wire = read_infer_request(data)
        seen.append(wire)
        return wire

    monkeypatch.setattr(grpc_server, "read_infer_request", spy)
    rb = RepoBuilder(tmp_path / "repo", engines)
    rb.add("affine", "affine", "max_batch_size: 8\ndynamic_batching: true\n")
    srv = make_server(rb.root, cache_dir=tmp_path / "cache")
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    inp = grpcclient.InferInput("x", [2, 4], "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_array_equal(c.infer("affine", [inp]).as_numpy("y"), x * 2 + 1)
    c.close()
    assert len(seen) == 1 and seen[0].raw is not None and bytes(seen[0].raw[0]) == x.tobytes()
