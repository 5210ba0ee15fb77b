"""Prometheus metrics. Every metric is documented in docs/serve.md.

The `nv_*` families carry Triton's names, types and labels so existing dashboards keep working;
they are read from the per-version statistics at scrape time. The `ember_*` histograms add the
distributions Triton only offers as cumulative sums.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

from prometheus_client import (CollectorRegistry, Counter, Histogram, ProcessCollector, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import Metric
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from .model import ServedModel

log = logging.getLogger("ember.serve")

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_FAILURE_REASONS = ("INVALID_INPUT", "QUEUE_FULL", "TIMEOUT", "UNAVAILABLE", "BACKEND", "CANCELED", "OTHER")


def _metric(name: str, doc: str, typ: str) -> Metric:
    # Metric() rather than CounterMetricFamily: Triton's counters have no `_total` suffix.
    return Metric(name, doc, typ)


class _ModelCollector:
    """Triton-compatible per-model counters and ember's gauges, computed at scrape time."""

    def __init__(self, served: Callable[[], list["ServedModel"]]):
        self._served = served

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        models = self._served()
        counters = {
            "nv_inference_request_success": "Successful inference requests",
            "nv_inference_request_failure": "Failed inference requests, by reason",
            "nv_inference_count": "Inferences performed (a batch of N requests counts N)",
            "nv_inference_exec_count": "Engine runs (batches executed)",
            "nv_inference_request_duration_us": "Cumulative end-to-end request duration, microseconds",
            "nv_inference_queue_duration_us": "Cumulative time requests waited in the queue, microseconds",
            "nv_inference_compute_input_duration_us": "Cumulative time gathering batch inputs, microseconds",
            "nv_inference_compute_infer_duration_us": "Cumulative engine run time, microseconds",
            "nv_inference_compute_output_duration_us": "Cumulative time splitting batch outputs, microseconds",
        }
        fams = {n: _metric(n, d, "counter") for n, d in counters.items()}
        pending = _metric("nv_inference_pending_request_count", "Requests waiting in the queue", "gauge")
        inflight = _metric("ember_inflight_requests", "Requests accepted and not yet answered", "gauge")
        queued = _metric("ember_queued_requests", "Requests waiting in the queue (same as pending)", "gauge")
        executing = _metric("ember_executing_requests", "Requests inside a running batch", "gauge")
        ready = _metric("ember_model_ready", "1 when the model version serves requests", "gauge")
        for m in models:
            lab = {"model": m.name, "version": m.version}
            s = m.stats
            fams["nv_inference_request_success"].add_sample("nv_inference_request_success", lab, s.success.count)
            for reason in sorted(set(_FAILURE_REASONS) | set(s.failures)):
                fams["nv_inference_request_failure"].add_sample(
                    "nv_inference_request_failure", {**lab, "reason": reason}, s.failures.get(reason, 0))
            fams["nv_inference_count"].add_sample("nv_inference_count", lab, s.inference_count)
            fams["nv_inference_exec_count"].add_sample("nv_inference_exec_count", lab, s.execution_count)
            for name, dur in (("request", None), ("queue", s.queue), ("compute_input", s.compute_input),
                              ("compute_infer", s.compute_infer), ("compute_output", s.compute_output)):
                ns = s.success.ns + s.fail.ns if dur is None else dur.ns
                key = f"nv_inference_{name}_duration_us"
                fams[key].add_sample(key, lab, ns // 1000)
            b = m.batcher
            q = b.queued if b is not None else 0
            pending.add_sample(pending.name, lab, q)
            queued.add_sample(queued.name, lab, q)
            executing.add_sample(executing.name, lab, b.executing if b is not None else 0)
            inflight.add_sample(inflight.name, lab, m.inflight)
            ready.add_sample(ready.name, lab, 1 if m.state == "READY" else 0)
        yield from fams.values()
        yield from (pending, inflight, queued, executing, ready)


class _GpuCollector:
    """GPU utilization and memory through NVML (pynvml); absent when NVML is not available."""

    def __init__(self, nvml):
        self._nvml = nvml

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        nv = self._nvml
        util = _metric("nv_gpu_utilization", "GPU utilization, 0.0 to 1.0", "gauge")
        total = _metric("nv_gpu_memory_total_bytes", "GPU total memory, bytes", "gauge")
        used = _metric("nv_gpu_memory_used_bytes", "GPU used memory, bytes", "gauge")
        power = _metric("nv_gpu_power_usage", "GPU power usage, watts", "gauge")
        try:
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                uuid = nv.nvmlDeviceGetUUID(h)
                uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
                lab = {"gpu_uuid": uuid}
                util.add_sample(util.name, lab, nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                total.add_sample(total.name, lab, mem.total)
                used.add_sample(used.name, lab, mem.used)
                try:
                    power.add_sample(power.name, lab, nv.nvmlDeviceGetPowerUsage(h) / 1000.0)
                except Exception:  # not every board reports power
                    pass
        except Exception as e:  # a scrape must never fail because of the GPU
            log.debug("NVML query failed: %s", e)
        yield from (util, total, used, power)


def _nvml():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:
        return None


class ServerMetrics:
    def __init__(self, served: Callable[[], list["ServedModel"]], gpu: bool = True):
        disable_created_metrics()  # the *_created series only double the scrape size; Triton has none
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.request_duration = Histogram("ember_request_duration_seconds",
                                          "End-to-end duration of successful requests inside the server",
                                          ["model", "version"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_duration = Histogram("ember_queue_duration_seconds", "Time successful requests waited in the queue",
                                        ["model", "version"], buckets=_LATENCY_BUCKETS, registry=r)
        self.compute_duration = Histogram("ember_compute_duration_seconds",
                                          "Duration of one batch: gather inputs, run the engine, split outputs",
                                          ["model", "version"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("ember_batch_size", "Batch size (items) of each engine run", ["model", "version"],
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.errors = Counter("ember_request_errors", "Requests refused before reaching a model version, by reason",
                              ["protocol", "reason"], registry=r)
        self._models = _ModelCollector(served)  # formatted by us: Triton's counters carry no `_total`
        ProcessCollector(registry=r)
        nv = _nvml() if gpu else None
        if nv is not None:
            r.register(_GpuCollector(nv))

    def for_model(self, model: str, version: str) -> "ModelMetrics":
        """The histograms of one model version, their label sets looked up once (``labels()`` takes a
        lock and hashes the labels: per request, that cost more than the observation)."""
        return ModelMetrics(self.request_duration.labels(model, version), self.queue_duration.labels(model, version),
                            self.compute_duration.labels(model, version), self.batch_size.labels(model, version))

    def observe_request(self, model: str, version: str, total_ns: int, queue_ns: int) -> None:
        self.for_model(model, version).observe_request(total_ns, queue_ns)

    def observe_batch(self, model: str, version: str, items: int, compute_ns: int) -> None:
        self.for_model(model, version).observe_batch(items, compute_ns)

    def count_error(self, protocol: str, reason: str) -> None:
        self.errors.labels(protocol, reason).inc()

    def forget_model(self, model: str, version: str) -> None:
        """Drop the label sets of an unloaded version, so label cardinality stays bounded."""
        for h in (self.request_duration, self.queue_duration, self.compute_duration, self.batch_size):
            try:
                h.remove(model, version)
            except KeyError:
                pass

    def exposition(self) -> bytes:
        return _format(self._models.collect()) + generate_latest(self.registry)


@dataclass(frozen=True)
class ModelMetrics:
    """One model version's histograms (children of ServerMetrics' labelled ones)."""

    request_duration: Any
    queue_duration: Any
    compute_duration: Any
    batch_size: Any

    def observe_request(self, total_ns: int, queue_ns: int) -> None:
        self.request_duration.observe(total_ns / 1e9)
        self.queue_duration.observe(queue_ns / 1e9)

    def observe_batch(self, items: int, compute_ns: int) -> None:
        self.batch_size.observe(items)
        self.compute_duration.observe(compute_ns / 1e9)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format(metrics: Iterable[Metric]) -> bytes:
    """Prometheus text format 0.0.4, sample names exactly as given (so counters keep Triton's names)."""
    lines = []
    for m in metrics:
        lines.append(f"# HELP {m.name} {m.documentation}")
        lines.append(f"# TYPE {m.name} {m.type}")
        for s in m.samples:
            labels = ",".join(f'{k}="{_escape(str(v))}"' for k, v in s.labels.items())
            lines.append(f"{s.name}{{{labels}}} {floatToGoString(s.value)}" if labels else
                         f"{s.name} {floatToGoString(s.value)}")
    return ("\n".join(lines) + "\n").encode() if lines else b""
