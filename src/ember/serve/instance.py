"""Model instances on the one run path (runtime/context.py): each instance of a model version owns an
ExecutionContext, made on the instance's launch thread, so instances overlap on the GPU through
their contexts' own streams.

On a GPU (and under ``emulated_graphs()`` in tests) a batch runs *staged*:

- launch, on the instance's launch thread: ``ctx.stage`` picks the plan of the batch's shape bucket
  and one of the plan's two pinned staging slots; each request's rows are written straight into
  the slot's input buffers (the one copy a request's data gets: decoding left it as a view of the
  request body); ``submit`` queues the copy in, the graph replay and the copy out on the stream.
- finish, on the instance's finish thread: ``wait`` returns the slot's pinned outputs, and each
  request gets views of its own rows, which the response encoders copy once.

So the launch thread gathers batch k+1 while the finish thread waits for batch k. A slot comes
round again two batches later; before its outputs are overwritten, the launch waits until no
response holds a view of them any more (an ``_OutputLease`` counts the views). Nothing allocates
device memory per request: plans, slots and their buffers are made once per bucket, and
``capture_buckets`` makes them all at load time.

Elsewhere (an engine on the CPU) a batch is concatenated and run with ``ctx.run``.
"""
from __future__ import annotations

import gc
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import InputError
from .batcher import BatchOutputs, FunctionRunner, split_rows
from .engine import EngineAdapter, bf16_tensor, kserve_array
from .errors import BadRequestError, InferenceFailedError, ServeError

log = logging.getLogger("ember.serve")

LEASE_WAIT_S = 2.0  # a launch waits this long for a slot's outputs to be released, then runs unstaged
MAX_CAPTURED_BUCKETS = 16  # capture_buckets makes at most this many plans per instance


class _OutputLease:
    """Counts the live views of one staged batch's outputs, plus one for the batch itself until its
    views are handed out; ``free`` is set when none is left. The count follows the views' lifetime
    (weak references), so a response that is encoded, dropped or never sent releases it alike."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live = 1
        self._refs: list[weakref.ref] = []
        self.free = threading.Event()

    def view(self, arr: np.ndarray) -> np.ndarray:
        """A view of ``arr`` that the lease counts. The view is rooted in its own buffer object, so
        every array numpy derives from it (reshape, slices) keeps the root, and with it the count."""
        if arr.size == 0 or not arr.flags.c_contiguous:
            return arr.copy()  # nothing to share, or not one span
        root = np.frombuffer(memoryview(arr).cast("B"), dtype=arr.dtype)
        with self._lock:
            self._live += 1
            self._refs.append(weakref.ref(root, self._drop))
        return root.reshape(arr.shape)

    def handed_out(self) -> None:
        self._drop(None)

    def _drop(self, _ref: Any) -> None:
        with self._lock:
            self._live -= 1
            if self._live == 0:
                self._refs.clear()
                self.free.set()


@dataclass
class _InFlight:
    run: Any  # runtime.context.StagedRun
    items: list[int]
    lease: _OutputLease
    input_ns: int
    submitted_ns: int


class EngineInstance:
    """One instance of a served engine, as the batcher drives it (batcher.BatchRunner)."""

    def __init__(self, adapter: EngineAdapter, label: str, max_batch_size: int = 0):
        self.adapter = adapter
        self.label = label
        self.max_batch_size = max_batch_size
        self.ctx: Any = None
        self.staged = False
        self.captured: list[int] = []  # batch buckets planned by capture_buckets
        self._value_inputs: frozenset[str] = frozenset()
        self._warm: dict[tuple, np.ndarray] = {}
        self._leases: "weakref.WeakKeyDictionary[Any, _OutputLease]" = weakref.WeakKeyDictionary()
        self._plain = FunctionRunner(self._run_plain, label)

    @property
    def depth(self) -> int:
        return 2 if self.staged else 1

    def open(self) -> None:
        # room for a plan per batch size, should the model's rows not allow buckets (LRU beyond)
        self.ctx = self.adapter.engine.create_execution_context(max_graphs=max(32, self.max_batch_size + 16))
        self.staged = bool(getattr(self.ctx, "planned", False)) and self.adapter.tensor_io
        self._value_inputs = frozenset(getattr(getattr(self.ctx, "interp", None), "value_inputs", ()) or ())

    # ---- the plain path (CPU engines, and a slot whose outputs are still held) ------------------------

    def _run_plain(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        bf16 = self.adapter.bf16_inputs
        out = _guarded(self.adapter, self.ctx.run, {k: bf16_tensor(v) if k in bf16 else v for k, v in feed.items()})
        return {k: kserve_array(v) for k, v in out.items()}

    # ---- the staged path --------------------------------------------------------------------------------

    def launch(self, feeds: list[dict[str, np.ndarray]], items: list[int]) -> Any:
        if not self.staged:
            return self._plain.launch(feeds, items)
        t0 = time.perf_counter_ns()
        first, single = feeds[0], len(feeds) == 1
        total = sum(items)
        shapes = {name: (first[name].shape if single else (total, *first[name].shape[1:]), dtype)
                  for name, dtype in self.adapter.stage_dtypes.items()}
        values = {}
        for name, (shape, dtype) in shapes.items():
            if name in self._value_inputs:  # their values key the plan
                values[name] = first[name] if single else np.concatenate([f[name] for f in feeds])
            else:  # what a new plan is made with (stage() would draw random data for every call)
                values[name] = self._warm_rows(name, shape, dtype)
        run = _guarded(self.adapter, self.ctx.stage, shapes, values)
        for name, dst in run.inputs.items():
            if name in self.adapter.bf16_inputs:
                dst = dst.view(np.uint16)  # KServe BF16 arrives as its bits
            if dst.shape != shapes[name][0]:
                raise InferenceFailedError(f"model {self.label}: the staged input '{name}' has shape "
                                           f"{list(dst.shape)}, the batch {list(shapes[name][0])}")
            if single:
                dst[...] = first[name]
            else:
                off = 0
                for f, n in zip(feeds, items):
                    dst[off:off + n] = f[name]
                    off += n
        if not self._slot_free(run.slot):
            return self._plain.launch(feeds, items)
        _guarded(self.adapter, run.submit)
        lease = self._leases[run.slot] = _OutputLease()
        t1 = time.perf_counter_ns()
        return _InFlight(run, items, lease, t1 - t0, t1)

    def finish(self, launched: Any) -> BatchOutputs:
        if not isinstance(launched, _InFlight):
            return self._plain.finish(launched)
        lease = launched.lease
        try:
            outs = _guarded(self.adapter, launched.run.wait)
            t1 = time.perf_counter_ns()
            arrays = {k: kserve_array(v) for k, v in outs.items()}
            per = split_rows(self.label, arrays, launched.items, lease.view)
        finally:
            lease.handed_out()
        return per, launched.input_ns, t1 - launched.submitted_ns, time.perf_counter_ns() - t1

    def _warm_rows(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """Data to plan a new batch shape with, as ExecutionContext makes it (small random floats,
        zero integers, true booleans), drawn once per input and cut to the batch: a view, no work."""
        if not shape:
            return _warm_data(shape, dtype)
        key = (name, tuple(shape[1:]), dtype.str)
        have = self._warm.get(key)
        if have is None or have.shape[0] < shape[0]:
            if len(self._warm) > 16:
                self._warm.clear()
            have = self._warm[key] = _warm_data((max(shape[0], 2 * (have.shape[0] if have is not None else 0)),
                                                 *shape[1:]), dtype)
        return have[:shape[0]]

    def _slot_free(self, slot: Any) -> bool:
        """Wait until no response holds a view of this slot's last outputs; False if one still does
        after LEASE_WAIT_S (the batch then runs unstaged, which is slower but never wrong)."""
        lease = self._leases.get(slot)
        if lease is None or lease.free.wait(LEASE_WAIT_S / 2):
            return True
        gc.collect()  # a reference cycle may hold the last views
        if lease.free.wait(LEASE_WAIT_S / 2):
            return True
        log.warning("model %s: outputs of an earlier batch are still referenced after %.1f s; running this batch "
                    "without staging", self.label, LEASE_WAIT_S)
        return False

    def capture_buckets(self, dims: dict[str, tuple[int, ...]], max_batch: int) -> list[int]:
        """Plan (and capture) the graph of every batch bucket up to ``max_batch`` now, so that no
        request waits for a capture. ``dims``: each input's shape without the batch dim. A bucket is
        staged at one row more than the bucket before it, so a padded plan is checked against an
        exact run as it is made (runtime/buckets.py). Returns the buckets planned."""
        from ember.runtime.buckets import bucket_size

        if not self.staged or self._value_inputs or max_batch < 1:
            return []
        sizes = sorted({bucket_size(n) for n in range(1, max_batch + 1)})
        if len(sizes) > MAX_CAPTURED_BUCKETS:
            log.info("model %s: %d batch buckets up to %d; they are captured on first use instead of at load",
                     self.label, len(sizes), max_batch)
            return []
        prev = 0
        for b in sizes:
            rows = prev + 1
            shapes = {k: ((rows, *d), self.adapter.stage_dtypes[k]) for k, d in dims.items()}
            try:
                self.ctx.stage(shapes, {k: self._warm_rows(k, *shapes[k]) for k in shapes})
            except InputError as e:  # outside the engine's profile: the batcher never forms it either
                log.info("model %s: batch %d is not captured: %s", self.label, rows, e)
                prev = b
                continue
            except Exception as e:  # capturing early is an optimization; the first request will plan it
                log.warning("model %s: capturing batch bucket %d failed (%s: %s); buckets are captured on first "
                            "use", self.label, b, type(e).__name__, e)
                break
            self.captured.append(b)
            prev = b
            if not getattr(self.ctx, "buckets", True):  # the model mixes rows: one exact plan per batch size
                break
        return list(self.captured)


def _warm_data(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if dtype.kind == "f" or dtype.name == "bfloat16":
        return np.random.default_rng(0).standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return np.ones(shape, dtype=dtype)
    return np.zeros(shape, dtype=dtype)


def _guarded(adapter: EngineAdapter, fn: Callable[..., Any], *args: Any) -> Any:
    """Call into the context: input problems are the client's (400), anything else the engine's (500)."""
    try:
        return fn(*args)
    except ServeError:
        raise
    except InputError as e:
        raise BadRequestError(str(e)) from e
    except Exception as e:  # the engine is not ours to trust: report it, keep serving
        raise InferenceFailedError(f"engine {adapter.path} failed: {type(e).__name__}: {e}") from e
