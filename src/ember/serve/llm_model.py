"""A served LLM model version: an LLM engine (``kind: "llm"`` in its manifest) found in the repository, run by
an AsyncLLM, reached through the OpenAI endpoints (openai_app.py) and, for KServe v2 clients, through
``infer`` with one BYTES input ``text_input`` and one BYTES output ``text_output``.

It has the surface the repository, the statistics and the Prometheus collector use of a ServedModel
(name, version, state, stats, inflight, load, unload, metadata, infer). Engine options come from the
model config's ``parameters``: max_model_len, max_num_seqs, max_num_batched_tokens, kv_cache_bytes,
num_blocks, max_queue_size, prefix_caching, cuda_graphs, device.

Metrics (docs/llm.md), next to the server's: histograms of time to first token, inter-token latency,
queue time and request duration; counters of prompt and generated tokens, finished requests by reason,
preemptions and prefix-cache hits; gauges of running and waiting requests and KV-cache use.
"""
from __future__ import annotations

import asyncio
import logging
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

import numpy as np

from .config import ModelConfig
from .engine import find_model_file
from .errors import BadRequestError, ModelNotReadyError, QueueFullError, RepositoryError, ServeError
from .model import ModelSettings, ServedModel
from .protocol import InferRequest, InferResponse, OutputTensor, TensorMeta
from .stats import ModelStats

if TYPE_CHECKING:
    from ..llm.async_engine import AsyncLLM, RequestTimes
    from .metrics import ServerMetrics

log = logging.getLogger("ember.serve")

PLATFORM = "ember_llm"
_OPTIONS = {"max_model_len": int, "max_num_seqs": int, "max_num_batched_tokens": int, "kv_cache_bytes": int,
            "num_blocks": int, "max_queue_size": int, "prefix_caching": bool, "cuda_graphs": bool, "device": str}
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
                  10.0)
_REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


class EngineQueueFullError(ServeError):
    """The LLM engine's waiting queue is full: 429, the client backs off."""

    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"
    reason = "QUEUE_FULL"


class EngineUnavailableError(ServeError):
    http_status = 503
    grpc_code = "UNAVAILABLE"
    reason = "UNAVAILABLE"


def is_llm_engine(path: Path) -> bool:
    """Whether ``path`` is an LLM engine file (its manifest's kind); anything unreadable is not."""
    if path.suffix != ".engine":
        return False
    try:
        from ..runtime.format import EngineArchive

        with EngineArchive.open(path) as arc:
            return arc.manifest.get("kind") == "llm"
    except Exception:  # the regular loader reports what is wrong with the file
        return False


def served_model(config: ModelConfig, version: int, version_dir: Path, settings: ModelSettings,
                 metrics: "ServerMetrics | None" = None) -> Any:
    """A ServedModel, or an LLMServedModel when the version's file is an LLM engine."""
    try:
        path = find_model_file(version_dir, config.default_model_filename)
    except ServeError:
        path = None
    if path is not None and is_llm_engine(path):
        return LLMServedModel(config, version, path, settings, metrics)
    return ServedModel(config, version, version_dir, settings, metrics)


def engine_options(config: ModelConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, text in config.parameters.items():
        kind = _OPTIONS.get(key)
        if kind is None:
            continue
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                out[key] = text.lower() in ("true", "1")
            else:
                out[key] = kind(text)
        except ValueError:
            raise RepositoryError(f"{config.source or config.name}: parameter '{key}' must be {kind.__name__}, not "
                                  f"{text!r}") from None
    return out


class LLMServedModel:
    batcher = None  # the server's collectors read queue depths of a batcher; the LLM's are in its own gauges

    def __init__(self, config: ModelConfig, version: int, path: Path, settings: ModelSettings,
                 metrics: "ServerMetrics | None" = None):
        self.name, self.version = config.name, str(version)
        self.config, self.path, self.settings, self.metrics = config, path, settings, metrics
        self.version_dir = path.parent
        self.state, self.reason = "LOADING", ""
        self.stats = ModelStats(self.name, self.version)
        self.inflight = 0
        self.llm: Optional["AsyncLLM"] = None
        self.created = int(time.time())
        self.inputs = [TensorMeta("text_input", "BYTES", (1,))]
        self.outputs = [TensorMeta("text_output", "BYTES", (1,))]
        self._obs: Optional[_PrometheusObserver] = None

    @property
    def label(self) -> str:
        return f"'{self.name}' version {self.version}"

    @property
    def engine(self) -> Any:
        return self.llm.engine if self.llm is not None else None

    # -- lifecycle ---------------------------------------------------------------------------------------------
    async def load(self) -> None:
        from ..llm.async_engine import AsyncLLM
        from ..llm.engine import EngineOptions, LLMEngine
        from ..llm.sampling import SamplingParams

        try:
            opts = engine_options(self.config)
            device = opts.pop("device", None)
            queue = opts.pop("max_queue_size", self.settings.default_max_queue_size)
            engine = await asyncio.to_thread(LLMEngine.load, self.path, device,
                                             options=EngineOptions(max_waiting=queue, **opts),
                                             verify_key=self.settings.verify_key)
            self.llm = AsyncLLM(engine, max_waiting=queue)
            async for _ in self.llm.generate(engine.tokenizer.encode("warm up") or [0],
                                             SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)):
                pass
            if self.metrics is not None:  # after the warm-up, which is no client's request
                self._obs = _PrometheusObserver(self.metrics, self.name, self.version)
                self.llm.observer = self._obs
                self._obs.track(self)
        except Exception as e:
            self.state, self.reason = "UNAVAILABLE", str(e)
            if self.llm is not None:
                self.llm.close()
                self.llm = None
            if isinstance(e, RepositoryError):
                raise
            raise RepositoryError(f"model {self.label}: {self.path}: {type(e).__name__}: {e}") from e
        self.state = "READY"
        e = self.llm.engine
        log.info("LLM %s is ready on %s (%s, %d KV blocks, up to %d sequences of %d tokens)", self.label, e.device,
                 e.config.architecture, e.kv.num_blocks, e.scheduler.max_num_seqs, e.max_model_len)

    async def unload(self, drain_s: float = 60.0) -> None:
        """Finish the requests in flight (up to ``drain_s``), then stop the engine."""
        if self.llm is None:
            self.state, self.reason = "UNAVAILABLE", "unloaded"
            return
        self.state = "UNLOADING"
        deadline = time.monotonic() + drain_s
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        llm, self.llm = self.llm, None
        await asyncio.to_thread(llm.close)
        if self._obs is not None:
            self._obs.forget()
        self.state, self.reason = "UNAVAILABLE", "unloaded"
        log.info("LLM %s unloaded", self.label)

    # -- requests ----------------------------------------------------------------------------------------------
    def running(self) -> "AsyncLLM":
        if self.state != "READY" or self.llm is None:
            raise ModelNotReadyError(f"model {self.label} is {self.state.lower()}, not ready; retry shortly")
        return self.llm

    def record(self, ok: bool, start_ns: int, reason: str = "OTHER") -> None:
        total = time.monotonic_ns() - start_ns
        if ok:
            self.stats.record_success(1, total, 0, 0, total, 0)
        else:
            self.stats.record_failure(reason, total)

    def metadata(self, versions: list[str]) -> dict:
        return {"name": self.name, "versions": versions, "platform": PLATFORM,
                "inputs": [t.as_dict() for t in self.inputs], "outputs": [t.as_dict() for t in self.outputs]}

    async def infer(self, req: InferRequest) -> InferResponse:
        """KServe v2: text_input -> text_output; sampling parameters from the request's ``parameters``
        (max_tokens, temperature, top_p, top_k, seed, stop), greedy and 128 tokens by default."""
        from ..llm.errors import EngineDeadError, QueueFullError as LLMQueueFull, RequestError
        from ..llm.sampling import SamplingParams

        start = time.monotonic_ns()
        self.inflight += 1
        try:
            llm = self.running()
            if set(req.inputs) != {"text_input"}:
                raise BadRequestError(f"model {self.label} takes one BYTES input 'text_input' (the prompt); got "
                                      f"{sorted(req.inputs)}")
            arr = req.inputs["text_input"]
            if arr.size != 1 or req.datatypes.get("text_input", "BYTES") != "BYTES":
                raise BadRequestError("'text_input' must be one BYTES element (the prompt)")
            raw = arr.reshape(-1)[0]
            prompt = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            p = {k: v for k, v in req.parameters.items() if k in ("max_tokens", "temperature", "top_p", "top_k",
                                                                   "seed", "stop")}
            p.setdefault("max_tokens", 128)
            p.setdefault("temperature", 0.0)
            if isinstance(p.get("stop"), str):
                p["stop"] = [p["stop"]]
            params = SamplingParams(**p)
            ids = llm.engine.prompt_ids(prompt)
            text = []
            async for out in llm.generate(ids, params):
                text.append(out.text)
        except (RequestError, TypeError) as e:
            self.record(False, start, "INVALID_INPUT")
            raise BadRequestError(f"model {self.label}: {e}") from None
        except LLMQueueFull as e:
            self.record(False, start, "QUEUE_FULL")
            raise QueueFullError(str(e)) from None
        except EngineDeadError as e:
            self.record(False, start, "UNAVAILABLE")
            raise EngineUnavailableError(str(e)) from None
        except ServeError as e:
            self.record(False, start, e.reason)
            raise
        except asyncio.CancelledError:
            self.record(False, start, "CANCELED")
            raise
        finally:
            self.inflight -= 1
        self.record(True, start)
        data = np.array(["".join(text).encode()], dtype=object)
        return InferResponse(self.name, self.version, req.id, [OutputTensor("text_output", "BYTES", data)])


# -- Prometheus --------------------------------------------------------------------------------------------------
class _Families:
    """The LLM metric families of one server registry (made once per registry)."""

    def __init__(self, registry: Any):
        from prometheus_client import Counter, Histogram

        lab = ["model", "version"]
        self.ttft = Histogram("ember_llm_time_to_first_token_seconds", "Time from a request's arrival to its first "
                              "generated token", lab, buckets=_TOKEN_BUCKETS, registry=registry)
        self.itl = Histogram("ember_llm_inter_token_latency_seconds", "Time between a request's successive outputs",
                             lab, buckets=_TOKEN_BUCKETS, registry=registry)
        self.queue = Histogram("ember_llm_queue_time_seconds", "Time a request waited before its first step", lab,
                               buckets=_TOKEN_BUCKETS, registry=registry)
        self.e2e = Histogram("ember_llm_request_duration_seconds", "Time from a request's arrival to its last token",
                             lab, buckets=_REQUEST_BUCKETS, registry=registry)
        self.prompt = Counter("ember_llm_prompt_tokens", "Prompt tokens of finished requests", lab, registry=registry)
        self.generated = Counter("ember_llm_generation_tokens", "Generated tokens of finished requests", lab,
                                 registry=registry)
        self.cached = Counter("ember_llm_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache", lab,
                              registry=registry)
        self.finished = Counter("ember_llm_requests", "Finished requests, by finish reason (stop, length, abort)",
                                lab + ["finish_reason"], registry=registry)
        self.models: "weakref.WeakSet[LLMServedModel]" = weakref.WeakSet()
        registry.register(_GaugeCollector(self.models))

    def labeled(self) -> list[Any]:
        return [self.ttft, self.itl, self.queue, self.e2e, self.prompt, self.generated, self.cached]


_FAMILIES: "weakref.WeakKeyDictionary[Any, _Families]" = weakref.WeakKeyDictionary()


class _PrometheusObserver:
    """Records an AsyncLLM's requests in the server's registry (called on the engine thread; the
    prometheus_client metrics are thread-safe)."""

    def __init__(self, metrics: "ServerMetrics", name: str, version: str):
        fam = _FAMILIES.get(metrics)
        if fam is None:
            fam = _FAMILIES[metrics] = _Families(metrics.registry)
        self.fam, self.labels = fam, (name, version)

    def track(self, model: LLMServedModel) -> None:
        self.fam.models.add(model)

    def forget(self) -> None:
        for fam in self.fam.labeled():
            try:
                fam.remove(*self.labels)
            except KeyError:
                pass
        for reason in ("stop", "length", "abort"):
            try:
                self.fam.finished.remove(*self.labels, reason)
            except KeyError:
                pass

    def request_done(self, t: "RequestTimes") -> None:
        f, lab = self.fam, self.labels
        f.finished.labels(*lab, t.finish_reason or "abort").inc()
        if t.first_token is None:
            return
        f.ttft.labels(*lab).observe(t.first_token)
        f.queue.labels(*lab).observe(t.queue)
        f.e2e.labels(*lab).observe(t.end)
        itl = f.itl.labels(*lab)
        for dt in t.inter_token:
            itl.observe(dt)
        f.prompt.labels(*lab).inc(t.prompt_tokens)
        f.generated.labels(*lab).inc(t.completion_tokens)
        f.cached.labels(*lab).inc(t.cached_tokens)

    def step_done(self, running: int, waiting: int, kv_usage: float, preemptions: int, tokens: int) -> None:
        pass  # the gauges are read at scrape time


class _GaugeCollector:
    def __init__(self, models: "weakref.WeakSet[LLMServedModel]"):
        self.models = models

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        lab = ["model", "version"]
        running = GaugeMetricFamily("ember_llm_requests_running", "Requests in the running batch", labels=lab)
        waiting = GaugeMetricFamily("ember_llm_requests_waiting", "Requests waiting to run", labels=lab)
        usage = GaugeMetricFamily("ember_llm_kv_cache_usage", "Fraction of KV-cache blocks in use (0 to 1)", labels=lab)
        blocks = GaugeMetricFamily("ember_llm_kv_cache_blocks", "KV-cache blocks of the engine", labels=lab)
        preempt = CounterMetricFamily("ember_llm_preemptions", "Requests preempted (recomputed later)", labels=lab)
        for m in list(self.models):
            llm = m.llm
            if llm is None:
                continue
            s = llm.stats()
            values = [m.name, m.version]
            running.add_metric(values, s["running"])
            waiting.add_metric(values, s["waiting"])
            usage.add_metric(values, s["kv_usage"])
            blocks.add_metric(values, llm.engine.kv.num_blocks)
            preempt.add_metric(values, s["preemptions"])
        yield from (running, waiting, usage, blocks, preempt)
