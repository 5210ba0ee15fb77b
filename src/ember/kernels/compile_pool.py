"""Compile Triton kernels ahead of time, in parallel, in worker processes.

Compiling one Triton kernel is CPU-bound work of 0.3-1.5 s (MLIR passes, then ptxas), and a
build of a conv net meets hundreds of them: every template configuration of every distinct layer
shape. Timing needs the GPU one candidate at a time, but compiling does not. So the tuner first
plans the launches it will time (``Launch.spec()``), and this pool compiles the distinct ones on
every core while the tuner works through the graph. A worker compiles through Triton's own JIT
path (``JITFunction.warmup`` on stand-in tensors with the same dtype and alignment), so the result
lands in Triton's on-disk cache under the key the real launch computes later: that launch is
Triton's ordinary cache hit. A spec the plan got wrong (another layout at timing time) costs a
compile in the builder's process, never a wrong kernel.

Workers need no GPU. They answer Triton's questions about the device from the build's target
(``GPUTarget``: backend, compute capability, warp size) through a compile-only driver, so they
create no CUDA context (and the same code runs on a CPU-only machine, e.g. to count compiles).

Workers are separate interpreters started as ``python -m ember.kernels.compile_pool``, not
multiprocessing's spawn, which would run a user's unguarded build script again in every worker.
They read jobs on stdin and write results on stdout (pickles between ember's own processes), and
exit when stdin closes, so a builder that dies leaves none behind.
"""
from __future__ import annotations

import atexit
import importlib
import json
import logging
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)
WORKERS_ENV = "EMBER_COMPILE_WORKERS"  # worker count; 0 compiles in the builder's process only


@dataclass(frozen=True)
class TensorArg:
    """A tensor argument as Triton specializes it: element type and 16-byte alignment."""

    dtype: str  # torch dtype name: "float16"
    aligned: bool


@dataclass(frozen=True)
class CompileSpec:
    """What one kernel compile needs: the JIT function (module and name), its arguments (tensors as
    :class:`TensorArg`, scalars as values) and its constexprs and launch options."""

    module: str
    name: str
    args: tuple
    meta: tuple  # sorted (name, value) pairs

    @classmethod
    def of(cls, kernel: Any, args: tuple, meta: dict[str, Any]) -> "CompileSpec":
        fn = getattr(kernel, "fn", kernel)
        return cls(fn.__module__, fn.__name__, tuple(_arg(a) for a in args), tuple(sorted(meta.items())))

    def key(self) -> tuple:
        """Equal for launches Triton compiles once: it specializes integers on being 1 or a multiple
        of 16 (and on their width), tensors on dtype and alignment, never on float values."""
        return (self.module, self.name, tuple(_spec_key(a) for a in self.args), self.meta)


def _arg(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return TensorArg(str(a.dtype).replace("torch.", ""), a.data_ptr() % 16 == 0)
    return a


def _spec_key(a: Any) -> Any:
    if isinstance(a, TensorArg):
        return a
    if isinstance(a, bool) or a is None:
        return ("v", a)
    if isinstance(a, int):
        return ("i", a == 1, a % 16 == 0, -2 ** 31 <= a < 2 ** 31)
    if isinstance(a, float):
        return ("f",)
    return ("v", a)


# -- the builder's side ------------------------------------------------------------------------------
def default_workers() -> int:
    env = os.environ.get(WORKERS_ENV)
    if env is not None:
        try:
            return max(0, int(env))
        except ValueError:
            log.warning("%s=%r is not a number; using the default", WORKERS_ENV, env)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus - 1, 32))  # one core stays with the builder, which times on the GPU


def triton_cache_dir() -> Optional[str]:
    """The directory Triton's file cache uses in this process (where workers must write)."""
    try:
        from triton import knobs

        return str(knobs.cache.dir)
    except Exception:  # Triton < 3.4 has no knobs: it reads the environment
        return os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")


class CompilePool:
    """Worker processes compiling :class:`CompileSpec` jobs for one GPU target.

    ``submit`` returns a Future of the compile's seconds (an exception if it failed); a spec equal
    (in :meth:`CompileSpec.key`) to one submitted before, for the same cache directory, returns the
    earlier Future: each distinct kernel is compiled once per process.
    """

    def __init__(self, target: dict[str, Any], workers: int):
        self.target = dict(target)
        self.workers = workers
        self._jobs: "queue.Queue[Optional[tuple[Any, Future]]]" = queue.Queue()
        self._futures: dict[tuple, Future] = {}
        self._lock = threading.Lock()
        self._procs: list[subprocess.Popen] = []
        self._threads: list[threading.Thread] = []
        self.submitted = 0
        self.closed = False
        self._live = 0  # serving threads whose worker still answers

    def _start(self) -> None:
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)  # workers compile for the GPU, never interpret
        src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        for _ in range(self.workers):
            p = subprocess.Popen([sys.executable, "-m", "ember.kernels.compile_pool", json.dumps(self.target)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
            t = threading.Thread(target=self._serve, args=(p,), daemon=True, name="ember-compile")
            t.start()
            self._procs.append(p)
            self._threads.append(t)
            self._live += 1

    def submit(self, spec: CompileSpec, cache_dir: Optional[str] = None) -> Future:
        cache_dir = cache_dir or triton_cache_dir()
        key = (spec.key(), cache_dir)
        with self._lock:
            fut = self._futures.get(key)
            if fut is not None:
                return fut
            if self.closed:
                raise RuntimeError("compile pool is closed")
            if not self._procs:
                self._start()
            fut = self._futures[key] = Future()
            self.submitted += 1
        self._jobs.put(((spec, cache_dir), fut))
        return fut

    def _serve(self, p: subprocess.Popen) -> None:
        """One thread per worker: hand it the next job, wait for its answer, resolve the Future."""
        while True:
            item = self._jobs.get()
            if item is None:
                break
            job, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                _send(p.stdin, job)
                ok, value = _receive(p.stdout)
            except (OSError, EOFError, pickle.UnpicklingError, struct.error) as e:
                fut.set_exception(RuntimeError(f"compile worker {p.pid} stopped ({type(e).__name__}); "
                                               "the kernel will be compiled in the builder's process"))
                self._worker_gone()
                break  # this worker is gone; the others keep serving the queue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(RuntimeError(value))
        try:
            if p.stdin:
                p.stdin.close()
        except OSError:
            pass

    def _worker_gone(self) -> None:
        """When the last worker is gone, nothing would ever answer the queued jobs: fail them."""
        with self._lock:
            self._live -= 1
            if self._live > 0:
                return
            self.closed = True  # later submits raise; the builder compiles in its own process
        while True:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                return
            if item is not None and item[1].set_running_or_notify_cancel():
                item[1].set_exception(RuntimeError("no compile worker is left"))

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
        for _ in self._threads:
            self._jobs.put(None)
        for p in self._procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


_POOLS: dict[str, CompilePool] = {}
_POOLS_LOCK = threading.Lock()


def shared_pool(device: torch.device) -> Optional[CompilePool]:
    """The process's pool for this device's target (started on first use, kept for later builds),
    or None when there are no workers to have (no Triton, no CUDA target, or EMBER_COMPILE_WORKERS=0)."""
    workers = default_workers()
    if workers == 0:
        return None
    try:
        target = current_target(device)
    except Exception as e:  # no Triton or no driver: compiles stay in this process
        log.info("no compile workers: %s", e)
        return None
    key = json.dumps(target, sort_keys=True)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None or pool.closed:
            pool = _POOLS[key] = CompilePool(target, workers)
        return pool


def current_target(device: torch.device) -> dict[str, Any]:
    """Triton's target for ``device`` as plain data: {"backend", "arch", "warp_size"}."""
    from triton.runtime.driver import driver

    with torch.cuda.device(device):
        t = driver.active.get_current_target()
    return {"backend": t.backend, "arch": t.arch, "warp_size": t.warp_size}


@atexit.register
def _close_pools() -> None:
    for pool in list(_POOLS.values()):
        pool.close()


# -- the pipe protocol: length-prefixed pickles ------------------------------------------------------
def _send(stream: Any, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _receive(stream: Any) -> Any:
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError("pipe closed")
    (n,) = struct.unpack("<Q", head)
    data = stream.read(n)
    if len(data) < n:
        raise EOFError("pipe closed")
    return pickle.loads(data)


# -- the worker's side --------------------------------------------------------------------------------
class _CompileOnlyDriver:
    """What Triton's JIT asks a driver while compiling: the target, a device and a stream id. Nothing
    here can launch; a worker only compiles."""

    def __init__(self, target: Any):
        self.target = target

    def get_current_target(self) -> Any:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: Any = None) -> int:
        return 0

    @staticmethod
    def is_active() -> bool:
        return True


def install_compile_only_driver(target: dict[str, Any]) -> None:
    """Make Triton in this process compile for ``target`` without a GPU (workers and tests)."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    driver.set_active(_CompileOnlyDriver(GPUTarget(target["backend"], target["arch"], target["warp_size"])))


def _stand_in(a: Any) -> Any:
    if not isinstance(a, TensorArg):
        return a
    from triton.runtime.jit import MockTensor

    class StandIn(MockTensor):  # Triton's own stand-in tensor, with the real one's alignment
        def data_ptr(self) -> int:
            return 0 if a.aligned else 8

    return StandIn(getattr(torch, a.dtype))


def compile_spec(spec: CompileSpec) -> float:
    """Compile ``spec`` in this process through Triton's JIT (into its cache); returns seconds."""
    fn = getattr(importlib.import_module(spec.module), spec.name)
    t0 = time.perf_counter()
    fn.warmup(*[_stand_in(a) for a in spec.args], grid=(1,), **dict(spec.meta))
    return time.perf_counter() - t0


def _worker_main() -> None:
    install_compile_only_driver(json.loads(sys.argv[1]))
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # anything a kernel module prints must not corrupt the pipe
    while True:
        try:
            spec, cache_dir = _receive(stdin)
        except EOFError:
            return
        os.environ["TRITON_CACHE_DIR"] = cache_dir
        try:
            result = (True, compile_spec(spec))
        except Exception as e:  # reported to the builder, which compiles (and fails) in its own process
            result = (False, f"{type(e).__name__}: {' '.join(str(e).split())[:500]}")
        _send(stdout, result)


if __name__ == "__main__":
    # run the imported module's copy: the jobs' classes (CompileSpec, TensorArg) unpickle as
    # ember.kernels.compile_pool's, not __main__'s
    from ember.kernels.compile_pool import _worker_main as main

    main()
