"""Probes of issue 11's reliability list that are not about connections (see test_connections.py)
or the registry (test_registry_race.py): BYTES shapes that would allocate before validating,
binding beyond loopback, non-ASCII version numbers, and paths that leave the model's folder."""
from __future__ import annotations

import json
import os
import resource
import struct

import grpc
import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from ember.cli.main import cli
from ember.serve import ServerSettings, ServeStartupError
from ember.serve import grpc_service_pb2 as pb
from ember.serve import grpc_service_pb2_grpc as pb_grpc
from ember.serve.datatypes import tensor_from_raw
from ember.serve.errors import BadRequestError
from ember.serve.http_codec import parse_infer_request

pytestmark = pytest.mark.timeout(120)


# ---- BYTES: element counts are checked against the body before anything is allocated ----------------------


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.mark.parametrize("count", [2 ** 27, 2 ** 40])
def test_bytes_shape_larger_than_its_data_is_refused_before_allocating(count):
    raw = struct.pack("<I", 4) + b"abcd"  # one element, 8 bytes
    before = _rss()
    with pytest.raises(BadRequestError, match=rf"input 'x': a BYTES tensor of {count} elements needs at least "):
        tensor_from_raw(raw, "BYTES", (count,), "x")
    header = json.dumps({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [count],
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    with pytest.raises(BadRequestError, match="check the shape"):
        parse_infer_request(header + raw, str(len(header)), "m", None)
    doc = json.dumps({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [count], "data": ["abcd"]}]}).encode()
    with pytest.raises(BadRequestError, match=f"needs {count} elements, data has 1"):
        parse_infer_request(doc, None, "m", None)
    assert _rss() - before < 64 << 20  # 2**27 object pointers would be 1 GiB


def test_bytes_probe_answers_400_over_http_and_grpc(server):
    raw = struct.pack("<I", 4) + b"abcd"
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30) as c:
        for count in (2 ** 27, 2 ** 40):
            header = json.dumps({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [count],
                                             "parameters": {"binary_data_size": len(raw)}}]}).encode()
            r = c.post("/v2/models/affine/infer", content=header + raw,
                       headers={"Inference-Header-Content-Length": str(len(header))})
            assert r.status_code == 400 and "BYTES tensor of" in r.json()["error"]
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        req = pb.ModelInferRequest(model_name="affine")
        req.inputs.add(name="x", datatype="BYTES", shape=[2 ** 40])
        req.raw_input_contents.append(raw)
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(req, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "BYTES tensor of" in e.value.details()
        req = pb.ModelInferRequest(model_name="affine")
        t = req.inputs.add(name="x", datatype="BYTES", shape=[2 ** 40])
        t.contents.bytes_contents.append(b"abcd")
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(req, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "needs 1099511627776 elements" in e.value.details()


def test_bytes_tensors_still_decode():
    raw = b"".join(struct.pack("<I", len(s)) + s for s in (b"", b"ab", b"xyz"))
    arr = tensor_from_raw(raw, "BYTES", (3,), "x")
    assert list(arr) == [b"", b"ab", b"xyz"]
    with pytest.raises(BadRequestError, match="left over"):
        tensor_from_raw(raw, "BYTES", (2,), "x")


# ---- binding beyond loopback needs a token or --insecure ---------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "myhost.example"])
def test_binding_beyond_loopback_without_a_token_is_refused(tmp_path, host):
    with pytest.raises(ServeStartupError, match="--auth-token-file.*--insecure"):
        ServerSettings(tmp_path, host=host).check_exposure()
    ServerSettings(tmp_path, host=host, auth_token="t").check_exposure()
    ServerSettings(tmp_path, host=host, insecure=True).check_exposure()


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_needs_no_token(tmp_path, host):
    ServerSettings(tmp_path, host=host).check_exposure()


def test_cli_refuses_an_open_bind_and_names_both_ways_out(tmp_path, monkeypatch):
    monkeypatch.delenv("EMBER_SERVE_TOKEN", raising=False)
    r = CliRunner().invoke(cli, ["serve", str(tmp_path), "--host", "0.0.0.0"])
    assert r.exit_code == 2
    assert "refusing to bind 0.0.0.0 without a token" in r.output
    assert "--auth-token-file" in r.output and "--insecure" in r.output


def test_embedded_server_refuses_an_open_bind_too(tmp_path):
    from ember.serve import ServerThread

    with pytest.raises(ServeStartupError, match="refusing to bind 0.0.0.0"):
        ServerThread(ServerSettings(tmp_path, host="0.0.0.0", http_port=0, grpc_port=0, gpu_metrics=False)).start()


# ---- versions are ASCII digits -------------------------------------------------------------------------------------


def test_version_folders_are_ascii_digits_only(repo_builder, make_server):
    model_dir = repo_builder.add("m", "affine", "max_batch_size: 8\nversion_policy: all\n", versions=(1, 2))
    for name in ("\u0663", "\u00b3", "\uff14", "05", "0"):  # Arabic-Indic 3, superscript 3, fullwidth 4, leading 0
        (model_dir / name).mkdir()
        (model_dir / name / "model.engine").write_bytes((model_dir / "1" / "model.engine").read_bytes())
    srv = make_server(repo_builder.root)
    with httpx.Client(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=30) as c:
        assert c.get("/v2/models/m").json()["versions"] == ["1", "2"]
        assert c.get("/v2/models/m/versions/2/ready").status_code == 200
        for v in ("\u0661", "\u00b2", "\uff11"):  # read as 1 and 2 by int()
            r = c.get(f"/v2/models/m/versions/{v}")
            assert r.status_code == 404 and "versions are integers" in r.json()["error"]
    with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        assert not stub.ModelReady(pb.ModelReadyRequest(name="m", version="\u0661"), timeout=10).ready
        assert stub.ModelReady(pb.ModelReadyRequest(name="m", version="1"), timeout=10).ready


# ---- every path a configuration names stays inside the model's folder -----------------------------------------


def _load(c: httpx.Client, model: str, config: dict) -> httpx.Response:
    return c.post(f"/v2/repository/models/{model}/load", json={"parameters": {"config": json.dumps(config)}})


WARM_X = {"name": "w", "batch_size": 1, "inputs": {"x": {"data_type": "TYPE_FP32", "dims": [4]}}}


def test_load_overrides_cannot_reach_outside_the_model_folder(repo_builder, make_server, tmp_path):
    model_dir = repo_builder.add("m", "affine", "max_batch_size: 8\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "model.engine").write_bytes((model_dir / "1" / "model.engine").read_bytes())
    (model_dir / "1" / "link.engine").symlink_to(outside / "model.engine")
    (model_dir / "warmup").mkdir()
    (model_dir / "warmup" / "zero").symlink_to("/dev/zero")
    os.mkfifo(model_dir / "warmup" / "fifo")
    (model_dir / "warmup" / "short").write_bytes(b"\0" * 8)
    srv = make_server(repo_builder.root, model_control_mode="explicit")
    base = {"max_batch_size": 8}
    with httpx.Client(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=30) as c:
        for name in ("/etc/passwd", str(outside / "model.engine"), "../../../outside/model.engine", "a/../../b"):
            r = _load(c, "m", {**base, "default_model_filename": name})
            assert r.status_code == 400, r.text
            assert "default_model_filename must be a relative path inside the model's folder" in r.json()["error"]
        r = _load(c, "m", {**base, "default_model_filename": "link.engine"})
        assert r.status_code == 400 and "outside" in r.json()["error"] and "link.engine" in r.json()["error"]
        for file, message in (("/etc/passwd", "must be a relative path inside the model's folder"),
                              ("../config.yaml", "must be a relative path inside the model's folder"),
                              ("zero", "outside"),  # a symlink to /dev/zero
                              ("fifo", "is not a regular file"),
                              ("short", "has 8 bytes; exactly 16 are expected"),
                              ("missing", "cannot open")):
            warm = {**WARM_X, "inputs": {"x": {"data_type": "TYPE_FP32", "dims": [4], "input_data_file": file}}}
            r = _load(c, "m", {**base, "model_warmup": [warm]})
            assert r.status_code == 400 and message in r.json()["error"], (file, r.text)
        huge = {**WARM_X, "inputs": {"x": {"data_type": "TYPE_FP32", "dims": [1 << 20, 1 << 20], "zero_data": True}}}
        r = _load(c, "m", {**base, "model_warmup": [huge]})
        assert r.status_code == 400 and "more than the limit" in r.json()["error"]
        # the model still serves its on-disk configuration after every refused load
        doc = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 1, 2, 3]}]}
        assert c.post("/v2/models/m/infer", json=doc).json()["outputs"][0]["data"] == [1, 3, 5, 7]
        # a warm-up file inside warmup/ of the right size is read, as in Triton
        (model_dir / "warmup" / "good").write_bytes(np.arange(8, dtype="<f4").tobytes())
        warm = {**WARM_X, "batch_size": 2,
                "inputs": {"x": {"data_type": "TYPE_FP32", "dims": [4], "input_data_file": "good"}}}
        assert _load(c, "m", {**base, "model_warmup": [warm]}).status_code == 200


def test_symlinked_version_folder_outside_the_model_is_refused(repo_builder, make_server, tmp_path):
    model_dir = repo_builder.add("m", "affine", "max_batch_size: 8\n")
    elsewhere = tmp_path / "v2"
    elsewhere.mkdir()
    (elsewhere / "model.engine").write_bytes((model_dir / "1" / "model.engine").read_bytes())
    (model_dir / "2").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ServeStartupError, match=r"the model file .* outside"):
        make_server(repo_builder.root)
