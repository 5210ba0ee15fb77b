"""`ember perf` (like Triton's perf_analyzer): a concurrency sweep against a KServe v2 server.

For each concurrency level, that many connections send requests back to back for a fixed time
(after a short warm-up that is not measured) over HTTP (binary tensors, keep-alive) or gRPC,
spread over several client processes (loadgen.py) so that the client is not the bottleneck.
Reports throughput, latency percentiles and the client's own CPU use per level, and says when
the client saturates; failures are counted by reason, never hidden. Only standard KServe v2
endpoints are used (model metadata and config, infer), so it measures Triton the same way.
"""
from __future__ import annotations

import csv
import http.client
import json
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

import numpy as np

from ..errors import EmberError
from .datatypes import KSERVE_TO_NUMPY
from .loadgen import SATURATED, LoadJob, available_cpus, grpc_request, http_request, run_level


class PerfError(EmberError):
    """The target server or model cannot be measured (unreachable, unknown model, bad shape)."""


@dataclass
class PerfTarget:
    url: str  # host:port, or http://host:port
    model: str
    version: str = ""
    protocol: str = "http"  # http | grpc
    batch_size: int = 1
    shapes: dict[str, list[int]] = field(default_factory=dict)  # overrides for variable dims
    binary: bool = True  # HTTP: binary tensors (else JSON)
    token: str | None = None
    timeout_s: float = 30.0
    processes: int | None = None  # client processes; None: loadgen.default_processes


@dataclass
class PerfResult:
    concurrency: int
    requests: int
    failures: int
    duration_s: float
    throughput: float  # inferences per second (requests x batch size)
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    avg_ms: float
    errors: dict[str, int] = field(default_factory=dict)
    processes: int = 1  # client processes that generated the load
    client_cpu: float = 0.0  # CPU the client used, in cores (1.0 = one core busy the whole level)
    client_busiest: float = 0.0  # the busiest client process's share of one core

    @property
    def client_saturated(self) -> bool:
        """The client may have limited the throughput: a process near a full core, or the client
        using most of the machine's CPUs."""
        return self.client_busiest >= SATURATED or self.client_cpu >= SATURATED * available_cpus()

    def row(self) -> dict[str, Any]:
        return {"concurrency": self.concurrency, "throughput_infer_per_s": round(self.throughput, 2),
                "p50_ms": round(self.p50_ms, 3), "p90_ms": round(self.p90_ms, 3), "p95_ms": round(self.p95_ms, 3),
                "p99_ms": round(self.p99_ms, 3), "avg_ms": round(self.avg_ms, 3), "requests": self.requests,
                "failures": self.failures, "client_processes": self.processes,
                "client_cpu_cores": round(self.client_cpu, 3), "client_saturated": int(self.client_saturated)}


def _hostport(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if not parts.hostname or not parts.port:
        raise PerfError(f"url '{url}' needs a host and port, like 127.0.0.1:8000")
    return parts.hostname, parts.port


def _http(target: PerfTarget, method: str, path: str, body: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    host, port = _hostport(target.url)
    conn = http.client.HTTPConnection(host, port, timeout=target.timeout_s)
    h = dict(headers or {})
    if target.token:
        h["Authorization"] = f"Bearer {target.token}"
    try:
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        return r.status, r.read()
    except OSError as e:
        raise PerfError(f"cannot reach {target.url}: {e}; is `ember serve` running?") from None
    finally:
        conn.close()


def _model_path(target: PerfTarget) -> str:
    return f"/v2/models/{target.model}" + (f"/versions/{target.version}" if target.version else "")


def fetch_metadata(target: PerfTarget) -> tuple[dict, dict]:
    """(metadata, config) of the target model, over HTTP or gRPC."""
    if target.protocol == "grpc":
        import grpc
        from google.protobuf import json_format

        from . import grpc_service_pb2 as pb
        from . import grpc_service_pb2_grpc as pb_grpc

        host, port = _hostport(target.url)
        md = [("authorization", f"Bearer {target.token}")] if target.token else None
        with grpc.insecure_channel(f"{host}:{port}") as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            try:
                meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=target.model, version=target.version),
                                          metadata=md, timeout=target.timeout_s)
                cfg = stub.ModelConfig(pb.ModelConfigRequest(name=target.model, version=target.version),
                                       metadata=md, timeout=target.timeout_s)
            except grpc.RpcError as e:
                raise PerfError(f"{target.url}: {e.code().name}: {e.details()}") from None
        to_dict = lambda m: json_format.MessageToDict(m, preserving_proto_field_name=True)  # noqa: E731
        meta_d = to_dict(meta)
        for t in meta_d.get("inputs", []) + meta_d.get("outputs", []):
            t["shape"] = [int(d) for d in t.get("shape", [])]
        return meta_d, to_dict(cfg.config)
    status, body = _http(target, "GET", _model_path(target))
    if status != 200:
        raise PerfError(f"{target.url}: model '{target.model}': HTTP {status}: {body[:300].decode(errors='replace')}")
    meta = json.loads(body)
    status, body = _http(target, "GET", _model_path(target) + "/config")
    return meta, (json.loads(body) if status == 200 else {})


def make_inputs(target: PerfTarget, meta: dict, config: dict) -> dict[str, tuple[str, np.ndarray]]:
    """One request's inputs: random data of the shapes ``request_shape`` picks."""
    rng = np.random.default_rng(0)
    out = {}
    for t in meta["inputs"]:
        name, dt = t["name"], t["datatype"]
        shape = request_shape(target, t, config)
        dtype = KSERVE_TO_NUMPY[dt]
        if dt == "BYTES":
            arr = np.full(shape, b"ember", dtype=object)
        elif dtype.kind == "f":
            arr = rng.random(shape).astype(dtype)
        elif dtype.kind == "b":
            arr = rng.integers(0, 2, shape).astype(bool)
        else:
            arr = rng.integers(0, 2, shape).astype(dtype)
        out[name] = (dt, arr)
    return out


def request_shape(target: PerfTarget, meta_input: dict, config: dict) -> list[int]:
    """The shape to send for one input. Its metadata shape (the batch dim first when the model
    batches) with the batch dim set to --batch-size; a variable dim (-1) takes its size from
    --shape, else the model's config (its input dims), else the model's warm-up entries, which
    the server ran at load time. With none of these, the error says which --shape to give."""
    name, full = meta_input["name"], [int(d) for d in meta_input["shape"]]
    batched = int(config.get("max_batch_size", 0) or 0) > 0
    lead = 1 if batched and full else 0
    if name in target.shapes:
        given = list(target.shapes[name])
        if len(given) == len(full):
            return given
        if lead and len(given) == len(full) - 1:  # perf_analyzer's --shape: without the batch dim
            return [target.batch_size] + given
        raise PerfError(f"--shape {name}:{','.join(map(str, given))} has {len(given)} dims; input '{name}' has "
                        f"{len(full)} ({full}, -1 = variable{', the batch dim first' if lead else ''}): "
                        f"give --shape {name}:{','.join(str(d if d >= 0 else 1) for d in full)}")
    shape = ([target.batch_size] if lead else []) + full[lead:]
    for dims in _config_dims(config, name):
        if len(dims) == len(shape) - lead:
            shape = shape[:lead] + [d if d >= 0 else c for d, c in zip(shape[lead:], dims)]
    if any(d < 0 for d in shape):
        example = ",".join(str(d if d >= 0 else 1) for d in shape)
        raise PerfError(f"input '{name}' has variable dims {full} (-1), and neither the model's config nor its "
                        f"warm-up says what size to send; give them with --shape {name}:{example} "
                        f"(the whole request shape{', or without the batch dim' if lead else ''}), or put "
                        "the dims in the model's config or a warmup entry")
    return shape


def _config_dims(config: dict, name: str) -> list[list[int]]:
    """Dims the model's configuration gives an input (without the batch dim when it batches):
    its input entry, then each warm-up request that feeds it."""
    out = [[int(d) for d in t.get("dims", [])] for t in config.get("input", []) if t.get("name") == name]
    for w in config.get("model_warmup", []):
        spec = (w.get("inputs") or {}).get(name)
        if spec and spec.get("dims"):
            out.append([int(d) for d in spec["dims"]])
    return out


def load_job(target: PerfTarget, inputs: dict[str, tuple[str, np.ndarray]]) -> LoadJob:
    """The one request every connection sends, prebuilt for the load generator."""
    host, port = _hostport(target.url)
    if target.protocol == "grpc":
        md = [("authorization", f"Bearer {target.token}")] if target.token else []
        return LoadJob("grpc", host, port, grpc_request(target.model, target.version, inputs), md, target.timeout_s)
    path = _model_path(target) + "/infer"
    return LoadJob("http", host, port, http_request(host, port, path, inputs, target.binary, target.token),
                   timeout_s=target.timeout_s)


def measure(target: PerfTarget, concurrency: int, duration_s: float, warmup_s: float = 1.0,
            job: LoadJob | None = None) -> PerfResult:
    """Run one concurrency level and return its numbers."""
    if job is None:
        meta, config = fetch_metadata(target)
        job = load_job(target, make_inputs(target, meta, config))
    run = run_level(job, concurrency, duration_s, warmup_s, target.processes)
    lat = run.latencies_s * 1000.0
    n = len(lat)
    pct = np.percentile(lat, [50, 90, 95, 99]) if n else np.full(4, float("nan"))
    return PerfResult(concurrency, n, sum(run.errors.values()), duration_s, n * target.batch_size / duration_s,
                      *[float(p) for p in pct], float(lat.mean()) if n else float("nan"), dict(run.errors),
                      run.processes, run.client_cpu_s / duration_s, run.busiest_worker)


def sweep(target: PerfTarget, levels: list[int], duration_s: float, warmup_s: float = 1.0,
          on_result: Callable[[PerfResult], None] | None = None) -> list[PerfResult]:
    meta, config = fetch_metadata(target)
    job = load_job(target, make_inputs(target, meta, config))
    results = []
    for c in levels:
        r = measure(target, c, duration_s, warmup_s, job)
        results.append(r)
        if on_result is not None:
            on_result(r)
    return results


def write_csv(path: str, results: list[PerfResult]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(results[0].row()) if results else ["concurrency"])
        w.writeheader()
        for r in results:
            w.writerow(r.row())


def parse_range(text: str) -> list[int]:
    """'1:16:2' (start:end:step, like perf_analyzer), '1,2,4,8', or '8'."""
    try:
        if ":" in text:
            parts = [int(p) for p in text.split(":")]
            start, end = parts[0], parts[1] if len(parts) > 1 else parts[0]
            step = parts[2] if len(parts) > 2 else 1
            if step < 1:
                raise ValueError
            return list(range(start, end + 1, step))
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise PerfError(f"concurrency range '{text}' is not start:end:step or a comma list of integers") from None


def parse_shapes(items: tuple[str, ...]) -> dict[str, list[int]]:
    out = {}
    for item in items:
        name, _, dims = item.partition(":")
        try:
            out[name] = [int(d) for d in dims.split(",") if d.strip()]
        except ValueError:
            raise PerfError(f"--shape '{item}' must look like name:1,3,224,224") from None
        if not name or not out[name]:
            raise PerfError(f"--shape '{item}' must look like name:1,3,224,224")
    return out
