"""Fuzzing the HTTP endpoints with malformed bodies: every answer is < 500, the server stays up.

Two generators, both bounded in count and time: a seeded mutator over valid requests (JSON and
binary: dropped keys, wrong types, odd shapes, lying length headers, truncated and padded
bodies, corrupted bytes) and hypothesis over arbitrary JSON documents in the request's shape.
"""
from __future__ import annotations

import json
import random
import struct
import time

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.timeout(180)

MODELS = ["affine", "addsub", "scale", "nobatch", "triton_affine", "ghost", "bad name", "..", "%2e%2e"]
DATATYPES = ["FP32", "FP16", "FP64", "INT64", "INT32", "INT8", "UINT8", "BOOL", "BYTES", "BF16", "fp32", "",
             "TYPE_FP32"]
KEYS = ["inputs", "outputs", "name", "shape", "datatype", "data", "parameters", "binary_data_size", "binary_data",
        "binary_data_output", "priority", "classification", "id", "shared_memory_region", "ready", "config"]


def _valid(model: str, rng: random.Random) -> dict:
    rows = rng.randint(1, 3)
    if model == "addsub":
        return {"inputs": [{"name": n, "shape": [rows, 3], "datatype": "FP32", "data": [rng.random()] * rows * 3}
                           for n in ("a", "b")]}
    if model == "scale":
        data = [rng.randint(-9, 9)] * rows * 2
        return {"inputs": [{"name": "idx", "shape": [rows, 2], "datatype": "INT64", "data": data}]}
    return {"inputs": [{"name": "x", "shape": [rows, 4], "datatype": "FP32", "data": [rng.random()] * rows * 4}]}


def _junk(rng: random.Random, depth: int = 0):
    kind = rng.randrange(11 if depth < 4 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 2 ** 63, -(2 ** 64), 10 ** 30, 7, 2 ** 31])
    if kind == 3:
        return rng.choice([0.5, -1e308, 1e308, float("nan"), float("inf")])
    if kind == 4:
        return rng.choice(["", "x", "FP32", "\u0000", "é" * 50, "a" * 1000, "1,2"])
    if kind == 5:
        return rng.choice(DATATYPES)
    if kind == 6:
        return [rng.randint(-2, 5) for _ in range(rng.randint(0, 6))]
    if kind == 7:
        return rng.choice(KEYS)
    if kind == 8:
        return [_junk(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if kind == 9:
        return {rng.choice(KEYS): _junk(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    return [[[_junk(rng, depth + 1)]]]


def _mutate(doc, rng: random.Random):
    """Replace, delete or add one thing somewhere inside doc."""
    if isinstance(doc, dict) and doc:
        key = rng.choice(list(doc))
        op = rng.randrange(4)
        if op == 0:
            del doc[key]
        elif op == 1:
            doc[key] = _junk(rng)
        elif op == 2:
            doc[rng.choice(KEYS)] = _junk(rng)
        else:
            doc[key] = _mutate(doc[key], rng)
        return doc
    if isinstance(doc, list) and doc:
        i = rng.randrange(len(doc))
        op = rng.randrange(4)
        if op == 0:
            del doc[i]
        elif op == 1:
            doc[i] = _junk(rng)
        elif op == 2:
            doc.append(_junk(rng))
        else:
            doc[i] = _mutate(doc[i], rng)
        return doc
    return _junk(rng)


def _binary(doc: dict, rng: random.Random) -> tuple[bytes, dict]:
    """A valid request in binary form, whose JSON header is then mutated and whose framing may lie."""
    blobs = []
    for t in doc["inputs"]:
        raw = np.asarray(t.pop("data"), dtype="<i8" if t["datatype"] == "INT64" else "<f4").tobytes()
        t["parameters"] = {"binary_data_size": len(raw)}
        blobs.append(raw)
    doc["parameters"] = {"binary_data_output": rng.random() < 0.5}
    for _ in range(rng.randint(0, 3)):
        doc = _mutate(doc, rng)
    header = json.dumps(doc, allow_nan=True).encode()
    body = header + b"".join(blobs)
    hlen: object = len(header)
    roll = rng.randrange(6)
    if roll == 0:
        body = body[: rng.randrange(len(body) + 1)]
    elif roll == 1:
        body += bytes(rng.randrange(256) for _ in range(rng.randint(1, 20)))
    elif roll == 2:
        hlen = rng.choice([-1, 0, len(body) + 1, 2 ** 40, "x", "", "+12", "1e3", "0x10"])
    elif roll == 3 and len(body) > 2:
        b = bytearray(body)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        body = bytes(b)
    return body, {"Inference-Header-Content-Length": str(hlen), "Content-Type": "application/octet-stream"}


def _case(rng: random.Random) -> tuple[str, str, bytes, dict]:
    model = rng.choice(MODELS)
    version = rng.choice(["", "", "/versions/1", "/versions/2", "/versions/0", "/versions/x", "/versions/99999999999"])
    path = f"/v2/models/{model}{version}/infer"
    kind = rng.randrange(10)
    if kind == 0:
        return "POST", path, bytes(rng.randrange(256) for _ in range(rng.randint(0, 300))), {}
    doc = _valid(model if model in ("addsub", "scale") else "affine", rng)
    if kind <= 3:
        body, headers = _binary(doc, rng)
        return "POST", path, body, headers
    for _ in range(rng.randint(1, 4)):
        doc = _mutate(doc, rng)
    text = json.dumps(doc, allow_nan=True)
    if kind == 4 and text:
        cut = rng.randrange(len(text))
        text = text[:cut] + rng.choice(["", "}", "]", '"', "\\", "\ud800", ",,"]) + text[cut + 1:]
    if kind == 5:
        return "GET", f"/v2/models/{model}{version}" + rng.choice(["", "/ready", "/config", "/stats"]), b"", {}
    if kind == 6:
        return "POST", "/v2/repository/index", text.encode("utf-8", "surrogatepass"), {}
    return "POST", path, text.encode("utf-8", "surrogatepass"), {"Content-Type": "application/json"}


def _check(r: httpx.Response, method: str, path: str, body: bytes) -> None:
    assert r.status_code < 500, f"{method} {path} -> {r.status_code} {r.text[:300]!r}\nbody: {body[:300]!r}"
    if r.status_code >= 400 and r.content:  # health checks answer with the status alone
        assert r.json()["error"], r.text


def test_mutated_requests_never_get_5xx(server):
    rng = random.Random(1234)
    base = f"http://127.0.0.1:{server.http_port}"
    cases, deadline = 0, time.monotonic() + 60
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=base, timeout=30) as c:
        while cases < 4000 and time.monotonic() < deadline:
            method, path, body, headers = _case(rng)
            r = c.request(method, path, content=body, headers=headers)
            _check(r, method, path, body)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            cases += 1
        assert c.get("/v2/health/live").status_code == 200
        assert c.get("/v2/health/ready").status_code == 200
        ok = c.post("/v2/models/affine/infer", json=_valid("affine", rng))
        assert ok.status_code == 200
    assert cases >= 1000, f"only {cases} cases ran in the time budget"
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > cases // 3, statuses


def test_repository_endpoints_with_malformed_bodies(server):
    rng = random.Random(99)
    base = f"http://127.0.0.1:{server.http_port}"
    with httpx.Client(base_url=base, timeout=60) as c:
        for _ in range(300):
            action = rng.choice(["load", "unload", "index"])
            body = rng.choice([
                json.dumps(_junk(rng)).encode(),
                json.dumps({"parameters": {"config": json.dumps(_mutate({"max_batch_size": 8, "input": [
                    {"name": "x", "data_type": "TYPE_FP32", "dims": [4]}]}, rng))}}).encode(),
                json.dumps({"parameters": _junk(rng)}).encode(),
                bytes(rng.randrange(256) for _ in range(rng.randint(0, 50))),
            ])
            # only nobatch is touched, so the fuzz cannot starve itself of models
            model = rng.choice(["nobatch", "ghost", ".."])
            path = "/v2/repository/index" if action == "index" else f"/v2/repository/models/{model}/{action}"
            r = c.post(path, content=body)
            _check(r, "POST", path, body)
        assert c.post("/v2/repository/models/nobatch/load").status_code == 200
        assert c.get("/v2/models/nobatch/ready").status_code == 200


def test_structured_json_fuzz_with_hypothesis(server):
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    base = f"http://127.0.0.1:{server.http_port}"
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 65), 2 ** 65), st.floats(allow_nan=True),
                        st.text(max_size=8), st.sampled_from(DATATYPES))
    json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                               | st.dictionaries(st.sampled_from(KEYS), inner, max_size=5), max_leaves=20)
    tensor = st.fixed_dictionaries({}, optional={
        "name": st.one_of(st.sampled_from(["x", "a", "b", "idx", ""]), json_values),
        "shape": st.one_of(st.lists(st.integers(-2, 5), max_size=4), json_values),
        "datatype": st.one_of(st.sampled_from(DATATYPES), json_values),
        "data": json_values,
        "parameters": st.one_of(st.dictionaries(st.sampled_from(KEYS), json_values, max_size=3), json_values),
    })
    request = st.fixed_dictionaries({}, optional={
        "id": json_values, "inputs": st.one_of(st.lists(tensor, max_size=3), json_values),
        "outputs": st.one_of(st.lists(tensor, max_size=3), json_values),
        "parameters": st.one_of(st.dictionaries(st.sampled_from(["priority", "binary_data_output"]), json_values),
                                json_values),
    })

    with httpx.Client(base_url=base, timeout=30) as c:
        @settings(max_examples=200, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(model=st.sampled_from(["affine", "addsub", "scale", "nobatch"]), doc=request)
        def run(model, doc):
            body = json.dumps(doc, allow_nan=True).encode()
            r = c.post(f"/v2/models/{model}/infer", content=body, headers={"Content-Type": "application/json"})
            _check(r, "POST", model, body)

        run()
        assert c.get("/v2/health/ready").status_code == 200
    assert hypothesis


def test_bytes_tensor_framing_fuzz():
    """The BYTES decoder on its own: arbitrary bytes never raise anything but BadRequestError."""
    from ember.serve.datatypes import deserialize_bytes_tensor
    from ember.serve.errors import BadRequestError

    rng = random.Random(5)
    for _ in range(2000):
        n = rng.randint(0, 4)
        raw = b"".join(struct.pack("<I", rng.choice([0, 1, 3, 2 ** 31])) + b"ab" for _ in range(rng.randint(0, 4)))
        try:
            out = deserialize_bytes_tensor(raw, n, "t")
            assert len(out) == n
        except BadRequestError:
            pass
