"""KServe v2 HTTP/REST inference bodies: JSON tensors and the binary tensor extension.

With binary data the body is the JSON header (`Inference-Header-Content-Length` bytes long)
followed by each binary tensor in the order the header lists them; a tensor's JSON entry names
its size in `parameters.binary_data_size`.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from .datatypes import KSERVE_TO_NUMPY, tensor_from_json, tensor_from_raw, tensor_raw_view, tensor_to_json
from .errors import BadRequestError, UnsupportedError
from .protocol import InferRequest, InferResponse, RequestedOutput, request_parameter_int

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_RANK = 32


def loads_json(data: bytes | memoryview, what: str) -> Any:
    try:
        return json.loads(bytes(data))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise BadRequestError(f"{what} is not valid JSON: {str(e)[:200]}") from None


def _shape(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_RANK:
        raise BadRequestError(f"input '{name}': 'shape' must be a list of at most {MAX_RANK} dims, got {value!r:.100}")
    for d in value:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0 or d > 1 << 40:
            raise BadRequestError(f"input '{name}': 'shape' entries must be non-negative integers, got {d!r:.50}")
    return tuple(value)


def _params(obj: dict, where: str) -> dict:
    p = obj.get("parameters", {})
    if p is None:
        return {}
    if not isinstance(p, dict):
        raise BadRequestError(f"{where}: 'parameters' must be a JSON object")
    return p


def parse_infer_request(body: bytes, header_length: str | None, model: str, version: str | None) -> InferRequest:
    """Parse one inference request body. Raises BadRequestError naming what is wrong."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise BadRequestError(f"{HEADER_LENGTH} must be an integer, got {header_length!r:.50}") from None
        if not 0 <= n <= len(body):
            raise BadRequestError(f"{HEADER_LENGTH} is {n} but the body has {len(body)} bytes; the body is truncated")
        header, binary = memoryview(body)[:n], memoryview(body)[n:]
    else:
        header, binary = memoryview(body), memoryview(b"")
    doc = loads_json(header, "the request body" if header_length is None else "the JSON header of the request")
    if not isinstance(doc, dict):
        raise BadRequestError("the request body must be a JSON object with an 'inputs' list")
    rid = doc.get("id", "")
    if not isinstance(rid, str):
        raise BadRequestError(f"'id' must be a string, got {type(rid).__name__}")
    params = _params(doc, "request")
    priority = request_parameter_int(params, "priority", "request") or 0
    timeout = request_parameter_int(params, "timeout", "request")
    default_binary = params.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise BadRequestError("parameter 'binary_data_output' must be true or false")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list):
        raise BadRequestError("the request needs an 'inputs' list")
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    offset = 0
    for i, t in enumerate(raw_inputs):
        if not isinstance(t, dict):
            raise BadRequestError(f"inputs[{i}] must be a JSON object with name, shape, datatype and data")
        name = t.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequestError(f"inputs[{i}] needs a 'name' string")
        if name in inputs:
            raise BadRequestError(f"input '{name}' appears twice")
        dt = t.get("datatype")
        if not isinstance(dt, str) or dt not in KSERVE_TO_NUMPY:
            raise BadRequestError(f"input '{name}': 'datatype' must be one of {', '.join(KSERVE_TO_NUMPY)}, "
                                  f"got {dt!r:.50}")
        shape = _shape(t.get("shape"), name)
        tparams = _params(t, f"input '{name}'")
        if "shared_memory_region" in tparams:
            raise UnsupportedError(f"input '{name}': the shared-memory extension is not supported by ember; "
                                   "send the data in the body")
        if "binary_data_size" in tparams:
            size = tparams["binary_data_size"]
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise BadRequestError(f"input '{name}': binary_data_size must be a non-negative integer")
            if "data" in t:
                raise BadRequestError(f"input '{name}' has both 'data' and binary_data_size; send one")
            if offset + size > len(binary):
                raise BadRequestError(f"input '{name}': binary_data_size is {size} bytes at offset {offset}, but only "
                                      f"{len(binary) - offset} bytes of binary data remain; the body is truncated")
            arr = tensor_from_raw(binary[offset:offset + size], dt, shape, name)
            offset += size
        elif "data" in t:
            arr = tensor_from_json(t["data"], dt, shape, name)
        else:
            raise BadRequestError(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
        inputs[name] = arr
        datatypes[name] = dt
    if offset != len(binary):
        raise BadRequestError(f"{len(binary) - offset} bytes of binary data follow the inputs and belong to none; "
                              "check binary_data_size and " + HEADER_LENGTH)
    return InferRequest(model, version, inputs, datatypes, _requested(doc, default_binary), rid, priority, timeout,
                        params)


def _requested(doc: dict, default_binary: bool) -> list[RequestedOutput] | None:
    raw = doc.get("outputs")
    if raw is None:
        return None  # every output; binary_data_output picks their form
    if not isinstance(raw, list):
        raise BadRequestError("'outputs' must be a list of {name, parameters}")
    out = []
    seen = set()
    for i, o in enumerate(raw):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise BadRequestError(f"outputs[{i}] must be a JSON object with a 'name' string")
        if o["name"] in seen:
            raise BadRequestError(f"output '{o['name']}' is requested twice")
        seen.add(o["name"])
        p = _params(o, f"output '{o['name']}'")
        if "shared_memory_region" in p:
            raise UnsupportedError(f"output '{o['name']}': the shared-memory extension is not supported by ember")
        binary = p.get("binary_data", default_binary)
        if not isinstance(binary, bool):
            raise BadRequestError(f"output '{o['name']}': binary_data must be true or false")
        k = p.get("classification", 0)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise BadRequestError(f"output '{o['name']}': classification must be a non-negative integer")
        out.append(RequestedOutput(o["name"], binary, k))
    return out


def encode_infer_response(resp: InferResponse, default_binary: bool) -> tuple[bytes, dict[str, str], str]:
    """-> (body, extra headers, media type)."""
    outputs, blobs = [], []
    for o in resp.outputs:
        binary = default_binary if o.binary is None else o.binary
        entry: dict[str, Any] = {"name": o.name, "datatype": o.datatype, "shape": list(o.data.shape)}
        if binary or o.datatype == "BF16":
            raw = tensor_raw_view(o.data, o.datatype)  # copied once, into the body below
            entry["parameters"] = {**o.parameters, "binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            if o.parameters:
                entry["parameters"] = o.parameters
            entry["data"] = tensor_to_json(o.data, o.datatype)
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": resp.model, "model_version": resp.version, "outputs": outputs}
    if resp.id:
        doc["id"] = resp.id
    if resp.parameters:
        doc["parameters"] = resp.parameters
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return header, {}, "application/json"
    return b"".join([header, *blobs]), {HEADER_LENGTH: str(len(header))}, "application/octet-stream"
