"""One served model version: its engine, batcher, statistics and state.

State goes LOADING -> READY (after warm-up) -> UNLOADING -> UNAVAILABLE. Requests that were
accepted always finish: unloading drains the batcher first.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .batcher import BatchPolicy, DynamicBatcher
from .config import ModelConfig, QueuePolicy, TensorConfig, Warmup, WarmupInput
from .datatypes import KSERVE_TO_NUMPY, deserialize_bytes_tensor, element_count
from .engine import EngineAdapter, EngineIO
from .instance import EngineInstance
from .errors import BadRequestError, ModelNotReadyError, RepositoryError, ServeError
from .protocol import InferRequest, InferResponse, OutputTensor, TensorMeta
from .safe_files import read_regular_file, resolve_inside
from .stats import ModelStats

if TYPE_CHECKING:
    from .metrics import ModelMetrics, ServerMetrics

log = logging.getLogger("ember.serve")

PLATFORM = "ember_engine"
WARMUP_MAX_BYTES = 512 << 20  # per warm-up input: a typo in a shape (or /dev/zero) must not exhaust memory


@dataclass
class ModelSettings:
    """Server-wide settings a model needs."""

    cache_dir: Path | None = None
    default_max_queue_size: int = 1024
    verify_key: bytes | None = field(default=None, repr=False)  # engines must be signed with it


def resolve_io(config: ModelConfig, adapter: EngineAdapter) -> ModelConfig:
    """Check the config's inputs/outputs against the engine and fill them in where absent."""
    src, mbs = config.source, config.max_batch_size

    def from_engine(io: EngineIO) -> TensorConfig:
        if mbs > 0:
            if not io.shape or io.shape[0] not in (-1, 1):
                raise RepositoryError(
                    f"{src}: engine tensor '{io.name}' has shape {list(io.shape)} with no batch dim first, but "
                    f"max_batch_size is {mbs}; set max_batch_size: 0 or build the engine with a dynamic batch dim")
            if io.shape[0] == 1 and mbs > 1:
                raise RepositoryError(f"{src}: engine tensor '{io.name}' has a fixed batch of 1; set max_batch_size: 1")
            return TensorConfig(io.name, io.datatype, io.shape[1:])
        return TensorConfig(io.name, io.datatype, io.shape)

    def check(kind: str, given: list[TensorConfig], engine: list[EngineIO], exact: bool) -> list[TensorConfig]:
        derived = {io.name: from_engine(io) for io in engine}
        if not given:
            return list(derived.values())
        names = {t.name for t in given}
        unknown = sorted(names - set(derived))
        if unknown:
            raise RepositoryError(f"{src}: {kind} {unknown} are not in the engine, whose {kind} are {sorted(derived)}")
        missing = sorted(set(derived) - names)
        if exact and missing:
            raise RepositoryError(f"{src}: the engine also needs {kind} {missing}; add them to the config")
        out = []
        for t in given:
            e = derived[t.name]
            if t.optional:
                raise RepositoryError(f"{src}: input '{t.name}' is marked optional; ember engines need every input")
            if t.datatype != e.datatype:
                raise RepositoryError(f"{src}: {kind[:-1]} '{t.name}' is {t.datatype} in the config but {e.datatype} "
                                      "in the engine")
            ok = len(t.dims) == len(e.dims) and all(c == -1 or d == -1 or c == d for c, d in zip(t.dims, e.dims))
            if not ok:
                what = " (without the batch dim)" if mbs > 0 else ""
                raise RepositoryError(f"{src}: {kind[:-1]} '{t.name}' has dims {list(t.dims)} in the config but "
                                      f"{list(e.dims)}{what} in the engine")
            out.append(replace(t, dims=tuple(d if c == -1 else c for c, d in zip(t.dims, e.dims))))
        return out

    return replace(config, inputs=check("inputs", config.inputs, adapter.inputs, True),
                   outputs=check("outputs", config.outputs, adapter.outputs, False))


def batch_policy(config: ModelConfig, default_queue: int) -> BatchPolicy:
    db = config.dynamic_batching

    def bounded(p: QueuePolicy) -> QueuePolicy:
        return p if p.max_queue_size > 0 else replace(p, max_queue_size=default_queue)

    if db is None:
        return BatchPolicy(config.max_batch_size, queue_policies={1: bounded(QueuePolicy())})
    levels = max(db.priority_levels, 1)
    policies = {lvl: bounded(db.priority_queue_policy.get(lvl, db.default_queue_policy))
                for lvl in range(1, levels + 1)}
    return BatchPolicy(config.max_batch_size, dynamic=config.max_batch_size > 0,
                       preferred_batch_sizes=db.preferred_batch_sizes, max_queue_delay_ns=db.max_queue_delay_us * 1000,
                       priority_levels=levels, default_priority=db.default_priority_level or levels,
                       queue_policies=policies)


class ServedModel:
    def __init__(self, config: ModelConfig, version: int, version_dir: Path, settings: ModelSettings,
                 metrics: "ServerMetrics | None" = None):
        self.name = config.name
        self.version = str(version)
        self.config = config
        self.version_dir = version_dir
        self.settings = settings
        self.metrics = metrics
        self._model_metrics: "ModelMetrics | None" = None
        self.state = "LOADING"
        self.reason = ""
        self.stats = ModelStats(self.name, self.version)
        self.inflight = 0
        self.adapter: EngineAdapter | None = None
        self.batcher: DynamicBatcher | None = None
        self.inputs: list[TensorMeta] = []
        self.outputs: list[TensorMeta] = []
        self._input_index: dict[str, TensorMeta] = {}
        self._output_index: dict[str, TensorMeta] = {}

    @property
    def label(self) -> str:
        return f"'{self.name}' version {self.version}"

    # ---- lifecycle --------------------------------------------------------------------------------------------

    async def load(self) -> None:
        try:
            self.adapter = await asyncio.to_thread(EngineAdapter.load, self.version_dir,
                                                   self.config.default_model_filename, self.settings.cache_dir,
                                                   f"{self.name}/{self.version}", self.config.build,
                                                   self.settings.verify_key)
            self.config = resolve_io(self.config, self.adapter)
            if not self.config.default_model_filename:
                self.config = replace(self.config, default_model_filename=self.adapter.path.name)
            batched = self.config.max_batch_size > 0
            lead = (-1,) if batched else ()
            self.inputs = [TensorMeta(t.name, t.datatype, lead + t.dims) for t in self.config.inputs]
            self.outputs = [TensorMeta(t.name, t.datatype, lead + t.dims) for t in self.config.outputs]
            self._input_index = {t.name: t for t in self.inputs}
            self._output_index = {t.name: t for t in self.outputs}
            label = f"'{self.name}' v{self.version}"
            instances = [EngineInstance(self.adapter, f"{label} instance {i}", self.config.max_batch_size)
                         for i in range(self.config.instance_count)]
            self.batcher = DynamicBatcher(label, instances,
                                          batch_policy(self.config, self.settings.default_max_queue_size),
                                          self._on_batch)
            await self.batcher.open()  # each instance makes its execution context on its own thread
            self.batcher.start()
            await self._warmup()
            await self._capture_buckets()
        except Exception as e:
            self.state, self.reason = "UNAVAILABLE", str(e)
            if self.batcher is not None:
                await self.batcher.close()
            if isinstance(e, RepositoryError):
                raise
            raise RepositoryError(f"model {self.label}: {type(e).__name__}: {e}") from e
        self.state, self.reason = "READY", ""
        staged = any(getattr(r, "staged", False) for r in self.batcher.runners)
        log.info("model %s is ready (%d instance(s), max batch %d, device %s%s)", self.label,
                 self.config.instance_count, self.config.max_batch_size, self.adapter.device,
                 ", staged through pinned memory" if staged else "")

    async def unload(self) -> None:
        """Stop taking requests, finish the accepted ones, release the engine."""
        if self.state in ("UNLOADING", "UNAVAILABLE") and self.batcher is None:
            return
        self.state = "UNLOADING"
        if self.batcher is not None:
            await self.batcher.close()
            self.batcher = None
        self.adapter = None
        self.state, self.reason = "UNAVAILABLE", "unloaded"
        log.info("model %s unloaded", self.label)

    async def _warmup(self) -> None:
        assert self.batcher is not None
        specs = self.config.warmup
        configured = bool(specs)
        if not specs:  # a default warm-up: one zero request; a failure here only warns
            specs = [Warmup("default", 1, {t.name: WarmupInput(t.datatype, tuple(max(d, 1) for d in t.dims))
                                           for t in self.config.inputs})]
        for w in specs:
            try:
                feed = self._warmup_inputs(w)
                for _ in range(w.count):
                    for inst in range(self.batcher.instance_count):
                        await self.batcher.run_direct(inst, feed)
            except Exception as e:
                if configured:
                    raise RepositoryError(f"model {self.label}: warm-up '{w.name}' failed: {e}") from e
                log.warning("model %s: default warm-up (zeros, batch 1) failed: %s; add a warmup entry to the "
                            "config with valid shapes", self.label, e)

    async def _capture_buckets(self) -> None:
        """Plan every batch bucket up to max_batch_size on each instance now (GPU), so that the first
        requests of each size do not wait for a CUDA graph capture. Needs the non-batch dims: from the
        config where they are fixed, else from the first warm-up entry."""
        assert self.batcher is not None
        mbs = self.config.max_batch_size
        if mbs <= 0 or not any(getattr(r, "staged", False) for r in self.batcher.runners):
            return
        dims = {t.name: tuple(t.dims) for t in self.config.inputs}
        if any(d < 0 for v in dims.values() for d in v):
            w = next(iter(self.config.warmup), None)
            if w is None or set(w.inputs) != set(dims):
                log.info("model %s: variable non-batch dims and no warm-up to take them from; batch buckets are "
                         "captured on first use", self.label)
                return
            dims = {k: tuple(w.inputs[k].dims) for k in dims}
        t0 = time.monotonic()
        # one instance after the other: loading gains little from two captures at once on one device
        done = await self.batcher.on_each_instance(lambda r: r.capture_buckets(dims, mbs), one_at_a_time=True)
        log.info("model %s: captured batch buckets %s on %d instance(s) in %.1f s", self.label, done[0] if done else [],
                 len(done), time.monotonic() - t0)

    def _warmup_inputs(self, w: Warmup) -> dict[str, np.ndarray]:
        batched = self.config.max_batch_size > 0
        missing = sorted(set(self._input_index) - set(w.inputs))
        if missing:
            raise RepositoryError(f"warm-up '{w.name}' gives no data for input(s) {missing}")
        rng = np.random.default_rng(0)
        feed = {}
        for name, spec in w.inputs.items():
            shape = ((max(w.batch_size, 1),) if batched else ()) + spec.dims
            dtype = KSERVE_TO_NUMPY[spec.datatype]
            count = element_count(shape)
            nbytes = count * dtype.itemsize
            if nbytes > WARMUP_MAX_BYTES:
                raise RepositoryError(f"warm-up '{w.name}' input '{name}' of shape {list(shape)} would take {nbytes} "
                                      f"bytes, more than the limit of {WARMUP_MAX_BYTES}; use a smaller shape")
            if spec.source == "file":
                # <model>/warmup/<file>, as in Triton; the name was checked to be relative when the config was read
                what = f"warm-up '{w.name}' input '{name}': file"
                path = resolve_inside(self.version_dir.parent / "warmup", str(spec.file), what)
                if dtype == object:  # BYTES: length-prefixed elements, size known only by reading
                    arr = deserialize_bytes_tensor(read_regular_file(path, WARMUP_MAX_BYTES, what), count,
                                                   name).reshape(shape)
                else:
                    arr = np.frombuffer(read_regular_file(path, WARMUP_MAX_BYTES, what, exact=nbytes),
                                        dtype=dtype.newbyteorder("<"), count=count).reshape(shape)
            elif spec.source == "random" and dtype.kind == "f":
                arr = rng.random(shape).astype(dtype)
            elif spec.source == "random" and dtype.kind in "iub":
                arr = rng.integers(0, 2, shape).astype(dtype)
            elif dtype == object:
                arr = np.full(shape, b"", dtype=object)
            else:
                arr = np.zeros(shape, dtype=dtype)
            feed[name] = arr
        return feed

    # ---- requests -------------------------------------------------------------------------------------------

    def metadata(self, versions: list[str]) -> dict:
        return {"name": self.name, "versions": versions, "platform": PLATFORM,
                "inputs": [t.as_dict() for t in self.inputs], "outputs": [t.as_dict() for t in self.outputs]}

    def validate(self, req: InferRequest) -> int:
        """Check names, datatypes and shapes against the model. Returns the batch size (items)."""
        where = f"model {self.label}"
        given, expected = set(req.inputs), set(self._input_index)
        if given != expected:
            parts = []
            if expected - given:
                parts.append(f"missing input(s) {sorted(expected - given)}")
            if given - expected:
                parts.append(f"unknown input(s) {sorted(given - expected)}")
            raise BadRequestError(f"{where}: {', '.join(parts)}; the model takes {sorted(expected)}")
        batched = self.config.max_batch_size > 0
        items = None
        for name, arr in req.inputs.items():
            meta = self._input_index[name]
            dt = req.datatypes.get(name, meta.datatype)
            if dt != meta.datatype:
                raise BadRequestError(f"{where}: input '{name}' must be {meta.datatype}, the request sent {dt}")
            shape = arr.shape
            if len(shape) != len(meta.shape) or any(m != -1 and m != s for m, s in zip(meta.shape, shape)):
                raise BadRequestError(f"{where}: input '{name}' has shape {list(shape)}, the model takes "
                                      f"{list(meta.shape)} (-1 = any size)")
            if batched:
                if items is not None and shape[0] != items:
                    raise BadRequestError(f"{where}: inputs disagree on the batch size ({items} vs {shape[0]} "
                                          f"for '{name}')")
                items = shape[0]
        if batched:
            if not items or items > self.config.max_batch_size:
                raise BadRequestError(f"{where}: batch size {items} is out of range; the model takes 1 to "
                                      f"{self.config.max_batch_size}")
            return items
        return 1

    async def infer(self, req: InferRequest) -> InferResponse:
        start = time.monotonic_ns()
        self.inflight += 1
        try:
            if self.state != "READY" or self.batcher is None:
                raise ModelNotReadyError(f"model {self.label} is {self.state.lower()}, not ready; retry shortly")
            items = self.validate(req)
            requested = self._requested_outputs(req)
            result = await self.batcher.submit(req.inputs, items, req.priority, req.timeout_us)
            outputs = []
            for name, ro in requested:
                meta = self._output_index[name]
                arr = result.outputs[name]
                if meta.datatype not in ("BYTES", "BF16") and arr.dtype != KSERVE_TO_NUMPY[meta.datatype]:
                    arr = arr.astype(KSERVE_TO_NUMPY[meta.datatype])
                if ro is not None and ro.class_count:
                    if meta.datatype in ("BYTES", "BF16"):
                        raise BadRequestError(f"model {self.label}: output '{name}' is {meta.datatype}; "
                                              "classification needs a numeric output")
                    top = classify(arr, ro.class_count, self.config.max_batch_size > 0)
                    outputs.append(OutputTensor(name, "BYTES", top, ro.binary))
                else:
                    outputs.append(OutputTensor(name, meta.datatype, arr, ro.binary if ro else None))
        except ServeError as e:
            self._record_failure(e.reason, start)
            raise
        except asyncio.CancelledError:
            self._record_failure("CANCELED", start)
            raise
        except Exception:
            self._record_failure("OTHER", start)
            raise
        finally:
            self.inflight -= 1
        t = result.timings
        total = time.monotonic_ns() - start
        self.stats.record_success(items, total, t.queue_ns, t.input_ns, t.infer_ns, t.output_ns)
        if self.metrics is not None:
            self._histograms().observe_request(total, t.queue_ns)
        return InferResponse(self.name, self.version, req.id, outputs)

    def _requested_outputs(self, req: InferRequest) -> list:
        if not req.outputs:
            return [(t.name, None) for t in self.outputs]
        out = []
        for ro in req.outputs:
            if ro.name not in self._output_index:
                raise BadRequestError(f"model {self.label}: unknown output '{ro.name}'; the model has "
                                      f"{sorted(self._output_index)}")
            if ro.class_count < 0:
                raise BadRequestError(f"model {self.label}: output '{ro.name}': classification must be >= 0")
            out.append((ro.name, ro))
        return out

    def _record_failure(self, reason: str, start: int) -> None:
        self.stats.record_failure(reason, time.monotonic_ns() - start)

    def _on_batch(self, items: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        self.stats.record_batch(items, input_ns, infer_ns, output_ns)
        if self.metrics is not None:
            self._histograms().observe_batch(items, input_ns + infer_ns + output_ns)

    def _histograms(self) -> "ModelMetrics":
        """This version's histograms, looked up on first use (a version that never ran has no series)."""
        if self._model_metrics is None:
            assert self.metrics is not None
            self._model_metrics = self.metrics.for_model(self.name, self.version)
        return self._model_metrics


def classify(arr: np.ndarray, k: int, batched: bool) -> np.ndarray:
    """Triton's classification extension: top-k of each batch item as b"value:index" strings."""
    rows = arr.reshape(arr.shape[0], -1) if batched and arr.ndim > 0 else arr.reshape(1, -1)
    k = min(k, rows.shape[1])
    out = np.empty((rows.shape[0], k), dtype=object)
    for r, row in enumerate(rows):
        idx = np.argsort(-row.astype(np.float64), kind="stable")[:k]
        out[r] = [f"{float(row[i]):f}:{int(i)}".encode() for i in idx]
    return out if batched else out.reshape(k)
