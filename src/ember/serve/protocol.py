"""Protocol-neutral request and response types shared by the HTTP and gRPC front ends."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import BadRequestError


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None = None  # HTTP only: send as binary data (None: the request's default)
    class_count: int = 0  # Triton classification extension: top-k "value:index" strings


@dataclass
class InferRequest:
    model: str
    version: str | None  # None or "": the highest ready version
    inputs: dict[str, np.ndarray]  # name -> array; datatype-checked by the front end
    datatypes: dict[str, str]  # name -> KServe datatype the client declared
    outputs: list[RequestedOutput] | None = None  # None: every output
    id: str = ""
    priority: int = 0
    timeout_us: int | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class OutputTensor:
    name: str
    datatype: str
    data: np.ndarray
    binary: bool | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferResponse:
    model: str
    version: str
    id: str
    outputs: list[OutputTensor]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TensorMeta:
    name: str
    datatype: str
    shape: tuple[int, ...]  # full shape as clients send it; -1 = any (the batch dim of batched models)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def request_parameter_int(params: dict[str, Any], key: str, where: str) -> int | None:
    """An integer request parameter such as priority or timeout; None when absent."""
    if key not in params:
        return None
    v = params[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise BadRequestError(f"{where}: parameter '{key}' must be a non-negative integer, got {v!r}")
    return v
