"""The load generator behind `ember perf`: several processes, each an asyncio loop over many
connections, so that the client is not what limits the measured throughput.

A Python client with one thread per connection tops out at a few thousand requests per second
(the GIL, and building each request in Python), which is less than a GPU engine serves. Here
the request is built once (raw HTTP/1.1 bytes with binary tensors, or a serialized
ModelInferRequest), and `processes` worker processes (loadgen_worker.py) send it back to back
over their share of the connections. Each worker reports its latencies, failures and its own
CPU time over the measured window, so `ember perf` can say when the client itself saturates.

Only the KServe v2 protocol is spoken (HTTP/REST with Triton's binary tensor extension, or
gRPC `inference.GRPCInferenceService/ModelInfer`), so the same run measures Triton Inference
Server as well as ember.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EmberError
from .datatypes import tensor_to_raw

WORKER = Path(__file__).with_name("loadgen_worker.py")
GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"
SATURATED = 0.85  # a worker busier than this share of one core is (close to) the bottleneck


class LoadGenError(EmberError):
    """A load-generator process failed to start or to report."""


@dataclass
class LoadJob:
    """One prebuilt request and where to send it."""

    protocol: str  # http | grpc
    host: str
    port: int
    payload: bytes  # the whole HTTP request, or the serialized ModelInferRequest
    metadata: list[tuple[str, str]] = field(default_factory=list)  # gRPC call metadata
    timeout_s: float = 30.0


@dataclass
class LevelRun:
    latencies_s: np.ndarray  # of successful requests started in the measured window
    errors: Counter
    processes: int
    client_cpu_s: float  # CPU seconds the workers used during the window, all together
    busiest_worker: float  # the highest share of one core a worker used (1.0 = a whole core)
    window_s: float


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_processes(concurrency: int) -> int:
    """Half the CPUs (the server may share the machine), at most one per connection, at most 16."""
    return max(1, min(concurrency, available_cpus() // 2, 16))


def http_request(host: str, port: int, path: str, inputs: dict[str, tuple[str, np.ndarray]], binary: bool,
                 token: str | None) -> bytes:
    """A whole HTTP/1.1 inference request: headers and body (binary tensors, or JSON data)."""
    entries, blobs = [], []
    for name, (dt, arr) in inputs.items():
        e: dict[str, Any] = {"name": name, "datatype": dt, "shape": list(arr.shape)}
        if binary:
            raw = tensor_to_raw(arr, dt)
            e["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            e["data"] = arr.reshape(-1).tolist() if dt != "BYTES" else [x.decode() for x in arr.reshape(-1)]
        entries.append(e)
    header = json.dumps({"inputs": entries, "parameters": {"binary_data_output": binary}}).encode()
    body = header + b"".join(blobs)
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}",
             "Content-Type: " + ("application/octet-stream" if blobs else "application/json")]
    if blobs:
        lines.append(f"Inference-Header-Content-Length: {len(header)}")
    if token:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def grpc_request(model: str, version: str, inputs: dict[str, tuple[str, np.ndarray]]) -> bytes:
    """A serialized ModelInferRequest with raw tensor contents."""
    from . import grpc_service_pb2 as pb

    req = pb.ModelInferRequest(model_name=model, model_version=version)
    for name, (dt, arr) in inputs.items():
        req.inputs.add(name=name, datatype=dt, shape=list(arr.shape))
        req.raw_input_contents.append(tensor_to_raw(arr, dt))
    return req.SerializeToString()


def run_level(job: LoadJob, concurrency: int, duration_s: float, warmup_s: float,
              processes: int | None = None) -> LevelRun:
    """`concurrency` connections sending back to back, spread over worker processes; measured for
    `duration_s` after an unmeasured `warmup_s`."""
    procs_n = max(1, min(processes or default_processes(concurrency), concurrency))
    shares = [concurrency // procs_n + (1 if i < concurrency % procs_n else 0) for i in range(procs_n)]
    workers: list[subprocess.Popen] = []
    try:
        for n in shares:
            p = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
            workers.append(p)
            pickle.dump({"protocol": job.protocol, "host": job.host, "port": job.port, "payload": job.payload,
                         "metadata": job.metadata, "timeout_s": job.timeout_s, "connections": n,
                         "grpc_method": GRPC_INFER}, p.stdin)
            p.stdin.flush()
        for p in workers:  # every connection is open before the clock starts
            if p.stdout.read(1) != b"R":
                raise LoadGenError(f"a load-generator process failed to start: {_stderr(p)}")
        t_measure = time.monotonic() + 0.05 + warmup_s
        t_end = t_measure + duration_s
        for p in workers:
            pickle.dump((t_measure, t_end), p.stdin)
            p.stdin.flush()
        results = []
        for p in workers:
            try:
                results.append(pickle.load(p.stdout))
            except (EOFError, pickle.UnpicklingError):
                raise LoadGenError(f"a load-generator process died: {_stderr(p)}") from None
    finally:
        for p in workers:
            if p.poll() is None:
                try:
                    p.wait(max(5.0, job.timeout_s))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
            for f in (p.stdin, p.stdout, p.stderr):
                f.close()
    latencies = np.concatenate([np.frombuffer(r["latencies"], dtype=np.float64) for r in results])
    errors: Counter = Counter()
    for r in results:
        errors.update(r["errors"])
    return LevelRun(latencies, errors, procs_n, sum(r["cpu_s"] for r in results),
                    max(r["cpu_s"] / r["busy_s"] for r in results), duration_s)


def _stderr(p: subprocess.Popen) -> str:
    if p.poll() is None:
        p.kill()
    p.wait(5)
    return p.stderr.read().decode(errors="replace")[-2000:] or f"exit code {p.returncode}"
