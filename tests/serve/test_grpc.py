"""gRPC: our proto is wire compatible with Triton's, typed contents work, malformed requests get
INVALID_ARGUMENT with a message, and the committed stubs coexist with tritonclient's."""
from __future__ import annotations

import random

import grpc
import numpy as np
import pytest

from ember.serve import grpc_service_pb2 as pb
from ember.serve import grpc_service_pb2_grpc as pb_grpc
from ember.serve import model_config_pb2 as model_config

pytestmark = pytest.mark.timeout(120)


def _fields(desc) -> dict:
    return {f.name: (f.number, f.type, f.is_repeated if hasattr(f, "is_repeated") else f.label == 3)
            for f in desc.fields}


def test_proto_is_wire_compatible_with_tritons():
    service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
    ours, theirs = pb.DESCRIPTOR, service_pb2.DESCRIPTOR
    assert ours.package == "inference"
    svc, tsvc = ours.services_by_name["GRPCInferenceService"], theirs.services_by_name["GRPCInferenceService"]
    assert [m.name for m in svc.methods] == [m.name for m in tsvc.methods]
    for m in svc.methods:
        tm = tsvc.methods_by_name[m.name]
        assert (m.client_streaming, m.server_streaming) == (tm.client_streaming, tm.server_streaming)

    def walk(d, td, path):
        for name, spec in _fields(d).items():
            tf = td.fields_by_name.get(name)
            assert tf is not None, f"{path}.{name} is not in Triton's proto"
            assert spec == _fields(td)[name], f"{path}.{name}: {spec} != {_fields(td)[name]}"
        for nested in d.nested_types:
            if nested.name in td.nested_types_by_name:
                walk(nested, td.nested_types_by_name[nested.name], f"{path}.{nested.name}")

    triton_msgs = dict(theirs.message_types_by_name)
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    triton_msgs.update(model_config_pb2.DESCRIPTOR.message_types_by_name)
    ours_msgs = {**ours.message_types_by_name, **model_config.DESCRIPTOR.message_types_by_name}
    for name, d in ours_msgs.items():
        walk(d, triton_msgs[name], name)
    # ember's model_config.proto is Triton's whole schema, so every Triton config.pbtxt parses
    assert set(model_config.DESCRIPTOR.message_types_by_name) == set(model_config_pb2.DESCRIPTOR.message_types_by_name)
    assert set(model_config.DESCRIPTOR.enum_types_by_name) == set(model_config_pb2.DESCRIPTOR.enum_types_by_name)


def test_stubs_coexist_with_tritonclient_in_one_process():
    pytest.importorskip("tritonclient.grpc")  # registers Triton's own grpc_service.proto
    msg = pb.ModelInferRequest(model_name="m")
    msg.parameters["priority"].int64_param = 2
    from tritonclient.grpc import service_pb2

    theirs = service_pb2.ModelInferRequest.FromString(msg.SerializeToString())
    assert theirs.model_name == "m" and theirs.parameters["priority"].int64_param == 2


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        yield pb_grpc.GRPCInferenceServiceStub(ch)


def _req(model="affine", shape=(2, 4), datatype="FP32") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, id="r")
    req.inputs.add(name="x", datatype=datatype, shape=list(shape))
    return req


def test_typed_contents_and_raw_contents(stub):
    req = _req()
    req.inputs[0].contents.fp32_contents.extend([0, 1, 2, 3, 4, 5, 6, 7])
    resp = stub.ModelInfer(req, timeout=30)
    assert resp.id == "r" and resp.outputs[0].name == "y" and list(resp.outputs[0].shape) == [2, 4]
    y = np.frombuffer(resp.raw_output_contents[0], np.float32)
    np.testing.assert_array_equal(y, np.arange(8, dtype=np.float32) * 2 + 1)
    req = pb.ModelInferRequest(model_name="scale")
    req.inputs.add(name="idx", datatype="INT64", shape=[1, 2]).contents.int64_contents.extend([5, -7])
    out = stub.ModelInfer(req, timeout=30)
    np.testing.assert_array_equal(np.frombuffer(out.raw_output_contents[0], np.int64), [15, -21])


@pytest.mark.parametrize("build,code,message", [
    (lambda r: r.raw_input_contents.extend([b"\0" * 32, b"\0" * 4]), "INVALID_ARGUMENT", "2 entries for 1 inputs"),
    (lambda r: r.raw_input_contents.append(b"\0" * 31), "INVALID_ARGUMENT", "needs 32 bytes, got 31"),
    (lambda r: r.inputs[0].contents.fp32_contents.extend([1.0] * 7), "INVALID_ARGUMENT", "needs 8 elements"),
    (lambda r: (r.inputs[0].contents.int_contents.extend([1] * 8), setattr(r.inputs[0], "datatype", "INT32")),
     "INVALID_ARGUMENT", "must be FP32, the request sent INT32"),
    (lambda r: (r.raw_input_contents.append(b"\0" * 32), setattr(r, "model_version", "9")), "NOT_FOUND",
     "no loaded version 9"),
    (lambda r: (r.raw_input_contents.append(b"\0" * 32), r.parameters["priority"].string_param.__class__,
                r.parameters["priority"].MergeFrom(pb.InferParameter(string_param="high"))),
     "INVALID_ARGUMENT", "'priority' must be a non-negative integer"),
    (lambda r: (r.raw_input_contents.append(b"\0" * 32), r.outputs.add(name="nope")), "INVALID_ARGUMENT",
     "unknown output 'nope'"),
])
def test_malformed_grpc_requests(stub, build, code, message):
    req = _req()
    build(req)
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(req, timeout=30)
    assert e.value.code().name == code and message in e.value.details()


def test_unimplemented_extensions_say_so(stub):
    for call in (lambda: stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=10),
                 lambda: stub.CudaSharedMemoryRegister(pb.CudaSharedMemoryRegisterRequest(), timeout=10),
                 lambda: stub.TraceSetting(pb.TraceSettingRequest(), timeout=10),
                 lambda: stub.LogSettings(pb.LogSettingsRequest(), timeout=10)):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED and "not supported by ember" in e.value.details()


def test_grpc_fuzz_random_tensors_never_internal(stub):
    rng = random.Random(7)
    dts = ["FP32", "FP16", "INT64", "INT8", "BOOL", "BYTES", "BF16", "FP64", "UINT64", "", "XYZ"]
    for _ in range(400):
        req = pb.ModelInferRequest(model_name=rng.choice(["affine", "addsub", "scale", "nobatch", "ghost", ""]),
                                   model_version=rng.choice(["", "1", "x", "-1"]))
        for _ in range(rng.randint(0, 3)):
            t = req.inputs.add(name=rng.choice(["x", "a", "b", "idx", ""]), datatype=rng.choice(dts),
                               shape=[rng.randint(-1, 5) for _ in range(rng.randint(0, 4))])
            if rng.random() < 0.5:
                req.raw_input_contents.append(bytes(rng.randrange(256) for _ in range(rng.randint(0, 64))))
            else:
                t.contents.fp32_contents.extend([rng.random()] * rng.randint(0, 16))
                t.contents.bytes_contents.extend([b"ab"] * rng.randint(0, 2))
        if rng.random() < 0.3:
            req.parameters[rng.choice(["priority", "timeout", "other"])].int64_param = rng.randint(-5, 5)
        try:
            stub.ModelInfer(req, timeout=30)
        except grpc.RpcError as e:
            assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (e.code(), e.details())
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready


def test_grpc_timeout_parameter_is_deadline_exceeded(stub):
    req = _req(model="batching", shape=(1, 4))
    req.raw_input_contents.append(np.zeros((1, 4), np.float32).tobytes())
    req.parameters["timeout"].int64_param = 1000  # µs; the model waits up to 100 ms to fill a batch
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(req, timeout=30)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "timed out" in e.value.details()
